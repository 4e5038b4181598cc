//! Resumable uploads: 256 KiB-aligned chunks sent in order, each resumed from what GCS says
//! it kept after a failure.

use super::*;

/// How far a resumable upload's bytes have been accepted, shared by the chunk uploads so they
/// go out in order (object_store runs an upload's parts concurrently; GCS takes them in order).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Committed {
    Upto(u64),
    Failed(String),
}

#[derive(Debug)]
pub(super) struct Session {
    pub(super) store: GcsStore,
    pub(super) url: Url,
    pub(super) path: String,
    pub(super) committed: watch::Sender<Committed>,
}

impl Session {
    /// Waits for every byte before `offset` to be accepted.
    pub(super) async fn wait_for(&self, offset: u64) -> object_store::Result<()> {
        let mut rx = self.committed.subscribe();
        let state = rx
            .wait_for(|c| matches!(c, Committed::Failed(_)) || *c == Committed::Upto(offset))
            .await
            .map_err(|_| generic(format!("{}: upload abandoned", self.path)))?
            .clone();
        match state {
            Committed::Failed(why) => Err(generic(format!(
                "{}: an earlier chunk of this upload failed: {why}",
                self.path
            ))),
            Committed::Upto(_) => Ok(()),
        }
    }

    /// Sends `chunk` at `offset` (the last one when `total` is known), resuming from what GCS
    /// says it kept when a request fails midway. The object resource when the upload is done.
    pub(super) async fn send_chunk(
        &self,
        offset: u64,
        chunk: Bytes,
        total: Option<u64>,
    ) -> object_store::Result<Option<ObjectResource>> {
        let end = offset + chunk.len() as u64;
        let mut from = offset;
        let mut failures = 0usize;
        loop {
            let range = match (from < end, total) {
                (true, Some(total)) => format!("bytes {from}-{}/{total}", end - 1),
                (true, None) => format!("bytes {from}-{}/*", end - 1),
                (false, Some(total)) => format!("bytes */{total}"),
                (false, None) => return Ok(None),
            };
            let body = chunk.slice((from - offset) as usize..);
            let sent = self
                .store
                .inner
                .request(Method::PUT, self.url.clone())
                .await?
                .header("content-range", range)
                .body(body)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if failures < RETRIES => {
                    failures += 1;
                    tracing::warn!(error = %e, path = self.path, "GCS chunk upload failed; resuming");
                    tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    from = self.accepted_after_failure(from).await?.max(offset);
                    continue;
                }
                Err(e) => return Err(generic(format!("{}: uploading: {e}", self.path))),
            };
            let status = response.status();
            if status == StatusCode::PERMANENT_REDIRECT {
                // 308 Resume Incomplete: GCS kept bytes 0..=N.
                let kept = kept_bytes(response.headers());
                if total.is_none() && kept >= end {
                    return Ok(None);
                }
                // GCS kept less than was sent (or the last chunk did not finish): resend the rest.
                if failures >= RETRIES {
                    return Err(generic(format!(
                        "{}: GCS holds {kept} of {} bytes after {RETRIES} resends",
                        self.path,
                        total.unwrap_or(end)
                    )));
                }
                failures += 1;
                from = kept.clamp(offset, end);
                continue;
            }
            if status.is_success() {
                return json(response, &self.path).await.map(Some);
            }
            let body = response.text().await.unwrap_or_default();
            let attempt = Attempt::Status(status, body);
            if attempt.is_transient() && failures < RETRIES {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                from = self.accepted_after_failure(from).await?.max(offset);
                continue;
            }
            return Err(attempt.into_error(&self.path));
        }
    }

    /// After a failed chunk request: how many bytes GCS holds (a status query).
    pub(super) async fn accepted_after_failure(&self, fallback: u64) -> object_store::Result<u64> {
        let answer = self
            .store
            .inner
            .request(Method::PUT, self.url.clone())
            .await?
            .header("content-range", "bytes */*")
            .header("content-length", "0")
            .send()
            .await;
        Ok(match answer {
            Ok(r) if r.status() == StatusCode::PERMANENT_REDIRECT => kept_bytes(r.headers()),
            _ => fallback,
        })
    }
}

/// The `Range: bytes=0-N` of a 308 answer, as the count of bytes kept (0 when absent).
pub(super) fn kept_bytes(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes=0-"))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(0, |last| last + 1)
}

/// An object uploaded in chunks through a resumable session.
#[derive(Debug)]
pub(super) struct ResumableUpload {
    pub(super) session: Arc<Session>,
    /// Bytes not yet sent: the tail of the parts that does not fill a 256 KiB multiple.
    pub(super) carry: BytesMut,
    /// Bytes handed to chunk uploads so far.
    pub(super) assigned: u64,
}

#[async_trait]
impl MultipartUpload for ResumableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        for bytes in &data {
            self.carry.extend_from_slice(bytes);
        }
        let ready = self.carry.len() / CHUNK_ALIGN * CHUNK_ALIGN;
        if ready == 0 {
            return Box::pin(futures::future::ready(Ok(())));
        }
        let chunk = self.carry.split_to(ready).freeze();
        let offset = self.assigned;
        self.assigned += ready as u64;
        let session = self.session.clone();
        Box::pin(async move {
            session.wait_for(offset).await?;
            match session.send_chunk(offset, chunk, None).await {
                Ok(_) => {
                    session
                        .committed
                        .send_replace(Committed::Upto(offset + ready as u64));
                    Ok(())
                }
                Err(e) => {
                    session
                        .committed
                        .send_replace(Committed::Failed(e.to_string()));
                    Err(e)
                }
            }
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let session = self.session.clone();
        session.wait_for(self.assigned).await?;
        let last = std::mem::take(&mut self.carry).freeze();
        let total = self.assigned + last.len() as u64;
        let object = session
            .send_chunk(self.assigned, last, Some(total))
            .await?
            .ok_or_else(|| generic(format!("{}: GCS did not finish the upload", session.path)))?;
        Ok(object.put_result())
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        // GCS cancels a session on DELETE (answering 499); nothing was written.
        let _ = self
            .session
            .store
            .inner
            .request(Method::DELETE, self.session.url.clone())
            .await?
            .send()
            .await;
        Ok(())
    }
}

//! `ObjectStore` over those calls: puts (media or resumable), ranged gets pinned to a
//! generation, paged listing, deletes and server-side copies.

use super::*;

#[async_trait]
impl ObjectStore for GcsStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let inner = &self.inner;
        let mut url = inner.upload_url()?;
        url.query_pairs_mut()
            .append_pair("uploadType", "media")
            .append_pair("name", location.as_ref())
            .extend_pairs(put_preconditions(&opts.mode)?);
        let body = Bytes::from(payload);
        let response = inner
            .send(location.as_ref(), || async {
                Ok(inner
                    .request(Method::POST, url.clone())
                    .await?
                    .header("content-type", "application/octet-stream")
                    .body(body.clone()))
            })
            .await
            .map_err(|e| match (e, &opts.mode) {
                (object_store::Error::Precondition { path, source }, PutMode::Create) => {
                    object_store::Error::AlreadyExists { path, source }
                }
                (e, _) => inner.missing_bucket(e),
            })?;
        Ok(json::<ObjectResource>(response, location.as_ref())
            .await?
            .put_result())
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = &self.inner;
        let mut url = inner.upload_url()?;
        url.query_pairs_mut()
            .append_pair("uploadType", "resumable")
            .append_pair("name", location.as_ref());
        let response = inner
            .send(location.as_ref(), || async {
                Ok(inner
                    .request(Method::POST, url.clone())
                    .await?
                    .header("x-upload-content-type", "application/octet-stream")
                    .header("content-length", "0"))
            })
            .await
            .map_err(|e| inner.missing_bucket(e))?;
        let session = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Url::parse(v).ok())
            .ok_or_else(|| {
                generic(format!(
                    "{location}: GCS started a resumable upload without a session URL"
                ))
            })?;
        let (committed, _) = watch::channel(Committed::Upto(0));
        Ok(Box::new(ResumableUpload {
            session: Arc::new(Session {
                store: self.clone(),
                url: session,
                path: location.to_string(),
                committed,
            }),
            carry: BytesMut::new(),
            assigned: 0,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        // The metadata first: it checks the preconditions and pins the generation, so the
        // bytes read are those of the object described even if it is replaced meanwhile.
        let meta = self.metadata(location).await?;
        options.check_preconditions(&meta)?;
        if let Some(version) = &options.version
            && meta.version.as_ref() != Some(version)
        {
            return Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: format!("generation {version} is not the live one").into(),
            });
        }
        let (header, range) = match &options.range {
            Some(range) => {
                let (header, bytes) = range_header(range, meta.size)?;
                (Some(header), bytes)
            }
            None => (None, 0..meta.size),
        };
        if options.head || range.is_empty() {
            return Ok(GetResult {
                payload: GetResultPayload::Stream(stream::empty().boxed()),
                meta,
                range,
                attributes: Attributes::default(),
                extensions: Default::default(),
            });
        }
        let inner = &self.inner;
        let mut url = inner.object_url(location)?;
        url.query_pairs_mut().append_pair("alt", "media");
        if let Some(generation) = &meta.version {
            url.query_pairs_mut().append_pair("generation", generation);
        }
        let response = inner
            .send(location.as_ref(), || async {
                let request = inner.request(Method::GET, url.clone()).await?;
                Ok(match &header {
                    Some(h) => request.header("range", h.as_str()),
                    None => request,
                })
            })
            .await?;
        let path = location.to_string();
        let body = stream::try_unfold(response, move |mut response| {
            let path = path.clone();
            async move {
                match response.chunk().await {
                    Ok(Some(chunk)) => Ok(Some((chunk, response))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(generic(format!("{path}: reading: {e}"))),
                }
            }
        });
        Ok(GetResult {
            payload: GetResultPayload::Stream(body.boxed()),
            meta,
            range,
            attributes: Attributes::default(),
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let store = self.clone();
        locations
            .map(move |location| {
                let store = store.clone();
                async move {
                    let location = location?;
                    store.delete_one(&location).await?;
                    Ok(location)
                }
            })
            .buffered(DELETE_CONCURRENCY)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let store = self.clone();
        let prefix = prefix.cloned();
        // (next page token, done) — the first page has no token.
        stream::try_unfold((None::<String>, false), move |(token, done)| {
            let store = store.clone();
            let prefix = prefix.clone();
            async move {
                if done {
                    return Ok::<_, object_store::Error>(None);
                }
                let page = store
                    .list_page(prefix.as_ref(), false, token.as_deref())
                    .await?;
                let metas = page
                    .items
                    .iter()
                    .map(ObjectResource::meta)
                    .collect::<object_store::Result<Vec<_>>>()?;
                let done = page.next_page_token.is_none();
                Ok(Some((
                    stream::iter(metas.into_iter().map(Ok)),
                    (page.next_page_token, done),
                )))
            }
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut result = ListResult {
            common_prefixes: Vec::new(),
            objects: Vec::new(),
            extensions: Default::default(),
        };
        let mut token = None;
        loop {
            let page = self.list_page(prefix, true, token.as_deref()).await?;
            for item in &page.items {
                result.objects.push(item.meta()?);
            }
            for p in &page.prefixes {
                result
                    .common_prefixes
                    .push(Path::parse(p.trim_end_matches('/'))?);
            }
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => return Ok(result),
            }
        }
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let inner = &self.inner;
        let bucket = inner.bucket.as_str();
        let mut token: Option<String> = None;
        // A rewrite of a large object may take several calls, each resuming with its token.
        loop {
            let mut url = inner.url(&[
                "storage",
                "v1",
                "b",
                bucket,
                "o",
                from.as_ref(),
                "rewriteTo",
                "b",
                bucket,
                "o",
                to.as_ref(),
            ])?;
            {
                let mut query = url.query_pairs_mut();
                if options.mode == CopyMode::Create {
                    query.append_pair("ifGenerationMatch", "0");
                }
                if let Some(t) = &token {
                    query.append_pair("rewriteToken", t);
                }
            }
            let response = inner
                .send(from.as_ref(), || async {
                    Ok(inner
                        .request(Method::POST, url.clone())
                        .await?
                        .header("content-length", "0"))
                })
                .await
                .map_err(|e| match e {
                    object_store::Error::Precondition { source, .. } => {
                        object_store::Error::AlreadyExists {
                            path: to.to_string(),
                            source,
                        }
                    }
                    e => e,
                })?;
            let answer: RewriteResponse = json(response, from.as_ref()).await?;
            if answer.done {
                return Ok(());
            }
            token = Some(answer.rewrite_token.ok_or_else(|| {
                generic(format!(
                    "{from}: an unfinished rewrite came without a token"
                ))
            })?);
        }
    }
}

//! The `bq-rules` proxy: sits between the suite and bqemulator, looks up what the rules need
//! (the destination's dataset and table, the source files' footers and compression in the GCS
//! emulator's storage, the buckets' locations), refuses what real BigQuery would refuse, and
//! forwards everything else.
//!
//! Where bqemulator lacks a feature shardflow relies on, the proxy bridges it, each bridge
//! named here so no test mistakes it for the emulator's behaviour:
//! - a second `jobs.insert` of an existing job id gets BigQuery's 409 (bqemulator runs it
//!   again);
//! - `WRITE_TRUNCATE_DATA` (unknown to bqemulator, which would append) is forwarded as
//!   bqemulator's `WRITE_TRUNCATE`, which deletes the rows and keeps the table's schema,
//!   which is what `WRITE_TRUNCATE_DATA` means;
//! - a copy job without a write disposition gets BigQuery's default, `WRITE_EMPTY`
//!   (bqemulator's default appends);
//! - a BIGNUMERIC column (DuckDB has no 76-digit decimal, and DuckDB 1.5 misreads a Parquet
//!   decimal wider than 38 digits) is created as STRING in the emulator and reported as
//!   BIGNUMERIC by `tables.get`; a Parquet load into it gets, after the rules passed on the
//!   original files, copies of them with those decimals as their exact text, so the values
//!   read back are the staged ones, digit for digit (as text: no arithmetic on them here);
//! - a job the layer refuses is answered as a failed job, and `jobs.get` returns it;
//! - `ALTER TABLE … ADD COLUMN` changes bqemulator's DuckDB table but not its catalog, which
//!   `tables.get` reads: after such a job the layer adds the columns to the catalog too.
//!
//! One test hook, not a rule: `POST /rules/rewrite-during-load` with `{"uri", "content",
//! "when": "before" | "after"}` rewrites that object (a new generation) as the next load job
//! reading it reaches bqemulator, just before or just after it runs: a file rewritten while
//! BigQuery loads it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::*;

/// Marks every answer of the layer, so a test can tell it is in front of the emulator.
pub const MARK_HEADER: &str = "x-shardflow-rules";

#[derive(Clone, Debug)]
pub struct Config {
    /// bqemulator's REST base, e.g. `http://127.0.0.1:9050`.
    pub upstream: String,
    /// The GCS emulator's base, for bucket locations.
    pub gcs: String,
    /// Where the GCS emulator keeps `bucket/object` on disk (bqemulator reads gs:// there).
    pub gcs_root: PathBuf,
}

pub struct Proxy {
    config: Config,
    http: reqwest::Client,
    /// Jobs the layer refused, by job id: `jobs.get` answers with them.
    refused_jobs: Mutex<HashMap<String, Value>>,
    /// One insert of a job id at a time, so two racing inserts get one 409.
    inserting: tokio::sync::Mutex<()>,
    /// `project.dataset.table` → column → the type asked for where the emulator holds another.
    declared: Mutex<HashMap<String, BTreeMap<String, String>>>,
    /// Job id → the configuration as sent, for jobs forwarded with a bridged one: `jobs.get`
    /// shows what the client asked for, as BigQuery would.
    asked: Mutex<HashMap<String, Value>>,
    /// Objects to rewrite around the next load that reads them (the test hook).
    rewrites: Mutex<Vec<Rewrite>>,
}

#[derive(Clone, Debug)]
struct Rewrite {
    uri: String,
    content: String,
    /// Before bqemulator runs the load, or after.
    before: bool,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "application/json; charset=UTF-8".parse().expect("static"),
    );
    r
}

/// An error in BigQuery's REST shape.
fn error_reply(status: StatusCode, reason: &str, message: &str) -> Reply {
    reply(
        status,
        &json!({"error": {
            "code": status.as_u16(),
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
            "status": if status == StatusCode::CONFLICT { "ALREADY_EXISTS" } else { "INVALID_ARGUMENT" },
        }}),
    )
}

impl Proxy {
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Proxy {
            config,
            http: reqwest::Client::new(),
            refused_jobs: Mutex::default(),
            inserting: tokio::sync::Mutex::const_new(()),
            declared: Mutex::default(),
            asked: Mutex::default(),
            rewrites: Mutex::default(),
        })
    }

    /// Serves until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let mut answer = me.handle(req).await;
                            answer
                                .headers_mut()
                                .insert(MARK_HEADER, "strict".parse().expect("static"));
                            Ok::<_, Infallible>(answer)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(self: Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(self.serve(listener));
        Ok(bound)
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Reply {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error_reply(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!("unreadable body: {e}"),
                );
            }
        };
        let path = parts.uri.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = parts.method.as_str();
        let json = || serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
        // The REST API's paths, after `bigquery/v2/projects/`.
        let api: &[&str] = match segments.as_slice() {
            ["bigquery", "v2", "projects", rest @ ..] => rest,
            _ => &[],
        };
        match (method, segments.as_slice(), api) {
            ("GET", ["rules"], _) => reply(
                StatusCode::OK,
                &json!(
                    RULES
                        .iter()
                        .map(|(n, q)| json!({"rule": n, "documentation": q}))
                        .collect::<Vec<_>>()
                ),
            ),
            ("POST", ["rules", "rewrite-during-load"], _) => {
                let hook = json();
                let field = |k: &str| hook.get(k).and_then(Value::as_str).map(str::to_string);
                match (field("uri"), field("content"), field("when").as_deref()) {
                    (Some(uri), Some(content), Some(when @ ("before" | "after"))) => {
                        self.rewrites
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Rewrite {
                                uri,
                                content,
                                before: when == "before",
                            });
                        reply(StatusCode::OK, &json!({"ok": true}))
                    }
                    _ => error_reply(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        "want uri, content and when (before or after)",
                    ),
                }
            }
            ("POST", _, [project, "jobs"]) => self.insert_job(project, json(), &parts).await,
            ("GET", _, [_, "jobs", id]) => {
                let refused = self
                    .refused_jobs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(*id)
                    .cloned();
                match refused {
                    Some(job) => reply(StatusCode::OK, &job),
                    None => {
                        let answer = self.forward(&parts, body).await;
                        self.as_asked(id, answer).await
                    }
                }
            }
            ("POST", _, [_, "datasets"]) => match check_dataset(&json()) {
                Some(refusal) => refusal_reply(&refusal),
                None => self.forward(&parts, body).await,
            },
            ("POST", _, [project, "datasets", dataset, "tables"]) => {
                self.insert_table(project, dataset, json(), &parts).await
            }
            ("GET", _, [project, "datasets", dataset, "tables", table]) => {
                let answer = self.forward(&parts, body).await;
                self.restore_declared(&format!("{project}.{dataset}.{table}"), answer)
                    .await
            }
            ("DELETE", _, [project, "datasets", dataset, "tables", table]) => {
                self.declared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&format!("{project}.{dataset}.{table}"));
                self.forward(&parts, body).await
            }
            _ => self.forward(&parts, body).await,
        }
    }

    /// Sends the request on to bqemulator as it came (or with `body` rewritten).
    async fn forward(&self, parts: &hyper::http::request::Parts, body: Bytes) -> Reply {
        let url = format!(
            "{}{}",
            self.config.upstream,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
            .unwrap_or(reqwest::Method::GET);
        let mut request = self.http.request(method, &url).body(body);
        for (name, value) in &parts.headers {
            if !matches!(
                name.as_str(),
                "host" | "content-length" | "connection" | "transfer-encoding"
            ) {
                request = request.header(name.as_str(), value.as_bytes());
            }
        }
        match request.send().await {
            Ok(response) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let headers = response.headers().clone();
                let bytes = response.bytes().await.unwrap_or_default();
                let mut r = Response::new(Full::new(bytes));
                *r.status_mut() = status;
                for (name, value) in &headers {
                    let hop = matches!(
                        name.as_str(),
                        "content-length" | "connection" | "transfer-encoding"
                    );
                    if !hop
                        && let (Ok(n), Ok(v)) = (
                            hyper::header::HeaderName::from_bytes(name.as_str().as_bytes()),
                            hyper::header::HeaderValue::from_bytes(value.as_bytes()),
                        )
                    {
                        r.headers_mut().insert(n, v);
                    }
                }
                r
            }
            Err(e) => error_reply(
                StatusCode::BAD_GATEWAY,
                "backendError",
                &format!(
                    "the rules layer cannot reach bqemulator at {}: {e}",
                    self.config.upstream
                ),
            ),
        }
    }

    async fn forward_json(&self, parts: &hyper::http::request::Parts, body: &Value) -> Reply {
        self.forward(parts, Bytes::from(body.to_string())).await
    }

    /// A GET to bqemulator; None on 404 or any failure.
    async fn upstream_get(&self, path: &str) -> Option<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.config.upstream))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    async fn dataset_location(&self, project: &str, dataset: &str) -> Option<String> {
        let d = self
            .upstream_get(&format!(
                "/bigquery/v2/projects/{project}/datasets/{dataset}"
            ))
            .await?;
        d.get("location")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// A table's columns as BigQuery would report them (declared types restored).
    async fn table_columns(
        &self,
        project: &str,
        dataset: &str,
        table: &str,
    ) -> Option<Vec<TableColumn>> {
        let t = self
            .upstream_get(&format!(
                "/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}"
            ))
            .await?;
        let t = self.with_declared(&format!("{project}.{dataset}.{table}"), t);
        Some(
            t.pointer("/schema/fields")
                .and_then(Value::as_array)
                .map(|f| f.iter().map(TableColumn::from_json).collect())
                .unwrap_or_default(),
        )
    }

    fn with_declared(&self, table: &str, mut body: Value) -> Value {
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
            .cloned();
        if let (Some(declared), Some(fields)) = (
            declared,
            body.pointer_mut("/schema/fields")
                .and_then(Value::as_array_mut),
        ) {
            for field in fields {
                let name = field
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if let Some(ty) = declared.get(&name) {
                    field["type"] = json!(ty);
                }
            }
        }
        body
    }

    /// A job as bqemulator returns it, with the configuration its client sent.
    async fn as_asked(&self, id: &str, answer: Reply) -> Reply {
        let asked = self
            .asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let Some(config) = asked else {
            return answer;
        };
        let (parts, body) = answer.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut job) if job.get("configuration").is_some() => {
                job["configuration"] = config;
                Response::from_parts(parts, Full::new(Bytes::from(job.to_string())))
            }
            _ => Response::from_parts(parts, Full::new(bytes)),
        }
    }

    async fn restore_declared(&self, table: &str, answer: Reply) -> Reply {
        if answer.status() != StatusCode::OK {
            return answer;
        }
        let (parts, body) = answer.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
            return Response::from_parts(parts, Full::new(bytes));
        };
        let value = self.with_declared(table, value);
        Response::from_parts(parts, Full::new(Bytes::from(value.to_string())))
    }

    async fn insert_table(
        &self,
        project: &str,
        dataset: &str,
        mut table: Value,
        parts: &hyper::http::request::Parts,
    ) -> Reply {
        if let Some(refusal) = check_table(&table).into_iter().next() {
            return refusal_reply(&refusal);
        }
        let name = table
            .pointer("/tableReference/tableId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // Bridge: DuckDB cannot hold BIGNUMERIC; the emulator gets its exact text.
        let mut declared = BTreeMap::new();
        if let Some(fields) = table
            .pointer_mut("/schema/fields")
            .and_then(Value::as_array_mut)
        {
            for field in fields {
                if matches!(
                    field.get("type").and_then(Value::as_str),
                    Some("BIGNUMERIC" | "BIGDECIMAL")
                ) {
                    let column = field
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    declared.insert(column, "BIGNUMERIC".to_string());
                    field["type"] = json!("STRING");
                }
            }
        }
        let answer = self.forward_json(parts, &table).await;
        if answer.status().is_success() && !declared.is_empty() {
            let key = format!("{project}.{dataset}.{name}");
            self.declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), declared);
            return self.restore_declared(&key, answer).await;
        }
        answer
    }

    async fn insert_job(
        &self,
        project: &str,
        mut job: Value,
        parts: &hyper::http::request::Parts,
    ) -> Reply {
        let Some(id) = job
            .pointer("/jobReference/jobId")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return self.forward_json(parts, &job).await;
        };
        if let Some(refusal) = check_job_id(&id) {
            return refusal_reply(&refusal);
        }
        let _one_at_a_time = self.inserting.lock().await;
        let known = self
            .refused_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&id);
        if known
            || self
                .upstream_get(&format!("/bigquery/v2/projects/{project}/jobs/{id}"))
                .await
                .is_some()
        {
            let location = job
                .pointer("/jobReference/location")
                .and_then(Value::as_str)
                .unwrap_or("US");
            return refusal_reply(&duplicate_job(project, location, &id));
        }
        let job_location = job
            .pointer("/jobReference/location")
            .and_then(Value::as_str)
            .map(str::to_string);
        let config = job.get("configuration").cloned().unwrap_or(Value::Null);
        let mut refusals = Vec::new();
        if let Some(load) = config.get("load") {
            let facts = self.load_facts(load).await;
            if let Some(r) =
                check_job_location(job_location.as_deref(), facts.dataset_location.as_deref())
            {
                return refusal_reply(&r);
            }
            refusals = check_load(load, &facts);
            if load.get("writeDisposition").and_then(Value::as_str) == Some("WRITE_TRUNCATE_DATA") {
                job["configuration"]["load"]["writeDisposition"] = json!("WRITE_TRUNCATE");
            }
        } else if let Some(query) = config.get("query") {
            refusals = check_query(query);
        } else if let Some(copy) = config.get("copy") {
            let columns = |key: &str| {
                let reference = copy.get(key).cloned();
                async move {
                    let r = reference?;
                    self.table_columns(
                        text(&r, "projectId")?,
                        text(&r, "datasetId")?,
                        text(&r, "tableId")?,
                    )
                    .await
                }
            };
            let facts = CopyFacts {
                source: columns("sourceTable").await,
                destination: columns("destinationTable").await,
            };
            refusals = check_copy(copy, &facts);
            if copy.get("writeDisposition").is_none() {
                job["configuration"]["copy"]["writeDisposition"] = json!("WRITE_EMPTY");
            }
        }
        let mut bridge_files = Vec::new();
        if refusals.is_empty()
            && let Some(load) = config.get("load")
            && load.get("sourceFormat").and_then(Value::as_str) == Some("PARQUET")
        {
            match self.bridge_wide_decimals(&id, load).await {
                Ok(Some((uris, files))) => {
                    job["configuration"]["load"]["sourceUris"] = json!(uris);
                    bridge_files = files;
                }
                Ok(None) => {}
                Err(e) => {
                    return error_reply(StatusCode::INTERNAL_SERVER_ERROR, "backendError", &e);
                }
            }
        }
        if refusals.is_empty() {
            let bridged = job.get("configuration") != Some(&config);
            if bridged {
                self.asked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), config.clone());
            }
            let rewrites = self.take_rewrites(&config);
            for r in rewrites.iter().filter(|r| r.before) {
                self.rewrite(r).await;
            }
            let answer = self.forward_json(parts, &job).await;
            for r in rewrites.iter().filter(|r| !r.before) {
                self.rewrite(r).await;
            }
            for file in bridge_files {
                let _ = std::fs::remove_file(file);
            }
            if let Some(query) = config.pointer("/query/query").and_then(Value::as_str)
                && answer.status().is_success()
            {
                self.sync_added_columns(query).await;
            }
            return self.as_asked(&id, answer).await;
        }
        for r in &refusals {
            eprintln!("bq-rules: refused job {id}: {}", r.text());
        }
        let errors: Vec<Value> = refusals
            .iter()
            .map(|r| json!({"reason": "invalid", "message": r.text()}))
            .collect();
        let now = chrono::Utc::now().timestamp_millis().to_string();
        let failed = json!({
            "kind": "bigquery#job",
            "id": format!("{project}:{}.{id}", job_location.as_deref().unwrap_or("US")),
            "jobReference": {"projectId": project, "jobId": id, "location": job_location.as_deref().unwrap_or("US")},
            "configuration": config,
            "status": {"state": "DONE", "errorResult": errors[0].clone(), "errors": errors},
            "statistics": {"creationTime": now, "startTime": now, "endTime": now},
        });
        self.refused_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, failed.clone());
        reply(StatusCode::OK, &failed)
    }

    /// The test hook's rewrites of objects this job's load reads.
    fn take_rewrites(&self, config: &Value) -> Vec<Rewrite> {
        let uris: Vec<&str> = config
            .pointer("/load/sourceUris")
            .and_then(Value::as_array)
            .map(|u| u.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut all = self.rewrites.lock().unwrap_or_else(|p| p.into_inner());
        let (mine, rest): (Vec<Rewrite>, Vec<Rewrite>) =
            all.drain(..).partition(|r| uris.contains(&r.uri.as_str()));
        *all = rest;
        mine
    }

    /// Writes a new generation of the hook's object through the GCS emulator, clear of the
    /// job's start and end by a few milliseconds either side.
    async fn rewrite(&self, r: &Rewrite) {
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let Some((bucket, name)) = r.uri.strip_prefix("gs://").and_then(|u| u.split_once('/'))
        else {
            return;
        };
        let Ok(mut url) = reqwest::Url::parse(&format!(
            "{}/upload/storage/v1/b/{bucket}/o",
            self.config.gcs
        )) else {
            return;
        };
        url.query_pairs_mut()
            .append_pair("uploadType", "media")
            .append_pair("name", name);
        let written = self.http.post(url).body(r.content.clone()).send().await;
        if !written.as_ref().is_ok_and(|w| w.status().is_success()) {
            eprintln!("bq-rules: could not rewrite {}: {written:?}", r.uri);
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }

    /// For a Parquet load into a table with BIGNUMERIC columns (STRING in the emulator): copies
    /// of the files with those decimals as their exact text, and the URIs to load instead.
    async fn bridge_wide_decimals(
        &self,
        job_id: &str,
        load: &Value,
    ) -> std::result::Result<Option<(Vec<String>, Vec<PathBuf>)>, String> {
        let Some(table) = load.get("destinationTable").and_then(table_name) else {
            return Ok(None);
        };
        let wide: Vec<String> = match self
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&table)
        {
            Some(columns) => columns.keys().cloned().collect(),
            None => return Ok(None),
        };
        let facts = self.load_facts(load).await;
        let mut uris = Vec::new();
        let mut written = Vec::new();
        for (n, file) in facts.files.iter().enumerate() {
            let Some((bucket, object)) = file
                .uri
                .strip_prefix("gs://")
                .and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            let source = self.config.gcs_root.join(bucket).join(object);
            let bridged_object = format!(".bq-rules-bridge/{job_id}/{n:05}.parquet");
            let target = self.config.gcs_root.join(bucket).join(&bridged_object);
            let columns = wide.clone();
            let (from, to) = (source.clone(), target.clone());
            tokio::task::spawn_blocking(move || decimals_as_text(&from, &to, &columns))
                .await
                .map_err(|e| e.to_string())??;
            uris.push(format!("gs://{bucket}/{bridged_object}"));
            written.push(target);
        }
        Ok(Some((uris, written)))
    }

    /// After `ALTER TABLE `p.d.t` ADD COLUMN [IF NOT EXISTS] `c` TYPE, …`, the columns go into
    /// bqemulator's catalog as they went into its DuckDB table.
    async fn sync_added_columns(&self, query: &str) {
        let Some((table, added)) = parse_add_columns(query) else {
            return;
        };
        let parts: Vec<&str> = table.split('.').collect();
        let [project, dataset, name] = parts.as_slice() else {
            return;
        };
        let path = format!("/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{name}");
        let Some(current) = self.upstream_get(&path).await else {
            return;
        };
        let mut fields = current
            .pointer("/schema/fields")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (column, ty) in added {
            let known = fields.iter().any(|f| {
                f.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.eq_ignore_ascii_case(&column))
            });
            if !known {
                fields.push(json!({"name": column, "type": ty, "mode": "NULLABLE"}));
            }
        }
        let patched = self
            .http
            .patch(format!("{}{path}", self.config.upstream))
            .json(&json!({"schema": {"fields": fields}}))
            .send()
            .await;
        if let Err(e) = patched {
            eprintln!(
                "bq-rules: could not add the columns of {table} to bqemulator's catalog: {e}"
            );
        }
    }

    async fn load_facts(&self, load: &Value) -> LoadFacts {
        let mut facts = LoadFacts::default();
        if let Some(dest) = load.get("destinationTable")
            && let (Some(p), Some(d), Some(t)) = (
                text(dest, "projectId"),
                text(dest, "datasetId"),
                text(dest, "tableId"),
            )
        {
            facts.dataset_location = self.dataset_location(p, d).await;
            facts.table = self.table_columns(p, d, t).await;
        }
        let parquet = load.get("sourceFormat").and_then(Value::as_str) == Some("PARQUET");
        for uri in load
            .get("sourceUris")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some((bucket, name)) = uri
                .as_str()
                .and_then(|u| u.strip_prefix("gs://"))
                .and_then(|r| r.split_once('/'))
            else {
                continue;
            };
            if !facts.bucket_locations.contains_key(bucket)
                && let Some(location) = self.bucket_location(bucket).await
            {
                facts.bucket_locations.insert(bucket.to_string(), location);
            }
            let root = self.config.gcs_root.join(bucket);
            let matches = match name.split_once('*') {
                None => vec![name.to_string()],
                Some((prefix, suffix)) => objects_under(&root)
                    .into_iter()
                    .filter(|o| {
                        o.starts_with(prefix)
                            && o.ends_with(suffix)
                            && o.len() >= prefix.len() + suffix.len()
                    })
                    .collect(),
            };
            for object in matches {
                let path = root.join(&object);
                let uri = format!("gs://{bucket}/{object}");
                let file =
                    tokio::task::spawn_blocking(move || describe_file(&path, uri, parquet)).await;
                if let Ok(Some(file)) = file {
                    facts.files.push(file);
                }
            }
        }
        facts
    }

    async fn bucket_location(&self, bucket: &str) -> Option<String> {
        let response = self
            .http
            .get(format!("{}/storage/v1/b/{bucket}", self.config.gcs))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        body.get("location")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

fn refusal_reply(refusal: &Refusal) -> Reply {
    match refusal.answer {
        Answer::Duplicate => error_reply(StatusCode::CONFLICT, "duplicate", &refusal.text()),
        Answer::Invalid | Answer::FailedJob => {
            error_reply(StatusCode::BAD_REQUEST, "invalid", &refusal.text())
        }
    }
}

/// Every object name under a bucket's directory, `/`-separated.
fn objects_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// Size, whole-file compression and (for Parquet) the footer's columns of one stored object.
fn describe_file(path: &Path, uri: String, parquet: bool) -> Option<SourceFile> {
    use std::io::Read;
    let size = std::fs::metadata(path).ok()?.len();
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).ok()?.read(&mut magic).ok()?;
    let compression = match &magic[..read] {
        [0x1f, 0x8b, ..] => FileCompression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => FileCompression::Other("zstd"),
        [b'B', b'Z', b'h', ..] => FileCompression::Other("bzip2"),
        _ => FileCompression::None,
    };
    let parquet = if parquet { parquet_columns(path) } else { None };
    Some(SourceFile {
        uri,
        size,
        compression,
        parquet,
    })
}

/// The top-level columns of a Parquet file, from its footer.
pub fn parquet_columns(path: &Path) -> Option<Vec<ParquetColumn>> {
    use parquet::basic::{ConvertedType, LogicalType, Repetition, TimeUnit, Type as Physical};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(std::fs::File::open(path).ok()?).ok()?;
    let schema = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .clone();
    let columns =
        schema
            .get_fields()
            .iter()
            .map(|field| {
                let info = field.get_basic_info();
                let nullable = !info.has_repetition() || info.repetition() != Repetition::REQUIRED;
                let kind = if !field.is_primitive() {
                    ParquetKind::Other("STRUCT")
                } else {
                    let nanos = |u: &TimeUnit| matches!(u, TimeUnit::NANOS);
                    match (
                        field.get_physical_type(),
                        info.logical_type_ref(),
                        info.converted_type(),
                    ) {
                        (_, Some(LogicalType::Decimal(d)), _) => ParquetKind::Decimal {
                            precision: d.precision,
                            scale: d.scale,
                        },
                        (_, None, ConvertedType::DECIMAL) => match field.as_ref() {
                            parquet::schema::types::Type::PrimitiveType {
                                precision,
                                scale,
                                ..
                            } => ParquetKind::Decimal {
                                precision: *precision,
                                scale: *scale,
                            },
                            _ => ParquetKind::Other("NUMERIC"),
                        },
                        (_, Some(LogicalType::Integer(i)), _)
                            if i.bit_width == 64 && !i.is_signed =>
                        {
                            ParquetKind::UnsignedInt64
                        }
                        (_, None, ConvertedType::UINT_64) => ParquetKind::UnsignedInt64,
                        (_, Some(LogicalType::Timestamp(t)), _) if nanos(&t.unit) => {
                            ParquetKind::Nanoseconds
                        }
                        (_, Some(LogicalType::Time(t)), _) if nanos(&t.unit) => {
                            ParquetKind::Nanoseconds
                        }
                        (_, Some(LogicalType::Timestamp(_)), _) | (Physical::INT96, _, _) => {
                            ParquetKind::Other("TIMESTAMP")
                        }
                        (_, Some(LogicalType::Time(_)), _) => ParquetKind::Other("TIME"),
                        (_, Some(LogicalType::Date), _) => ParquetKind::Other("DATE"),
                        (
                            _,
                            Some(LogicalType::String | LogicalType::Enum | LogicalType::Json),
                            _,
                        )
                        | (
                            _,
                            None,
                            ConvertedType::UTF8 | ConvertedType::ENUM | ConvertedType::JSON,
                        ) => ParquetKind::Text,
                        (Physical::BOOLEAN, _, _) => ParquetKind::Other("BOOL"),
                        (Physical::INT32 | Physical::INT64, _, _) => ParquetKind::Other("INT64"),
                        (Physical::FLOAT | Physical::DOUBLE, _, _) => ParquetKind::Other("FLOAT64"),
                        _ => ParquetKind::Other("BYTES"),
                    }
                };
                ParquetColumn {
                    name: info.name().to_string(),
                    nullable,
                    kind,
                }
            })
            .collect();
    Some(columns)
}

/// Copies a Parquet file, its decimal columns named in `columns` written as their exact text.
fn decimals_as_text(from: &Path, to: &Path, columns: &[String]) -> std::result::Result<(), String> {
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let failed = |e: &dyn std::fmt::Display| format!("bridging {}: {e}", from.display());
    let file = std::fs::File::open(from).map_err(|e| failed(&e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| failed(&e))?;
    let source = reader.schema().clone();
    let wide = |f: &Field| {
        columns.iter().any(|c| c.eq_ignore_ascii_case(f.name()))
            && matches!(
                f.data_type(),
                DataType::Decimal128(..) | DataType::Decimal256(..)
            )
    };
    let schema = std::sync::Arc::new(Schema::new(
        source
            .fields()
            .iter()
            .map(|f| {
                if wide(f) {
                    Field::new(f.name(), DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect::<Vec<_>>(),
    ));
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
    }
    let out = std::fs::File::create(to).map_err(|e| failed(&e))?;
    let mut writer = ArrowWriter::try_new(out, schema.clone(), None).map_err(|e| failed(&e))?;
    for batch in reader.build().map_err(|e| failed(&e))? {
        let batch = batch.map_err(|e| failed(&e))?;
        let arrays = batch
            .columns()
            .iter()
            .zip(source.fields())
            .map(|(a, f)| {
                if wide(f) {
                    arrow::compute::cast(a, &DataType::Utf8)
                } else {
                    Ok(a.clone())
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(&e))?;
        let batch = arrow::record_batch::RecordBatch::try_new(schema.clone(), arrays)
            .map_err(|e| failed(&e))?;
        writer.write(&batch).map_err(|e| failed(&e))?;
    }
    writer.close().map_err(|e| failed(&e))?;
    Ok(())
}

/// The table and the (column, type) pairs of an `ALTER TABLE … ADD COLUMN` statement whose
/// names are back-quoted, as shardflow writes it.
pub fn parse_add_columns(query: &str) -> Option<(String, Vec<(String, String)>)> {
    let rest = query.trim().strip_prefix("ALTER TABLE ")?;
    let rest = rest.strip_prefix('`')?;
    let (table, rest) = rest.split_once('`')?;
    let mut added = Vec::new();
    for clause in rest
        .split(", ADD COLUMN ")
        .map(|c| c.trim().trim_start_matches("ADD COLUMN "))
    {
        let clause = clause.trim_start_matches("IF NOT EXISTS ").trim();
        let clause = clause.strip_prefix('`')?;
        let (column, ty) = clause.split_once('`')?;
        added.push((column.to_string(), ty.trim().to_string()));
    }
    (!added.is_empty()).then(|| (table.to_string(), added))
}

#[cfg(test)]
mod tests {
    #[test]
    fn add_column_statements_parse() {
        assert_eq!(
            super::parse_add_columns(
                "ALTER TABLE `p.d.t` ADD COLUMN IF NOT EXISTS `note` STRING, ADD COLUMN IF NOT EXISTS `n` INT64"
            ),
            Some((
                "p.d.t".to_string(),
                vec![
                    ("note".into(), "STRING".into()),
                    ("n".into(), "INT64".into())
                ]
            ))
        );
        assert_eq!(super::parse_add_columns("SELECT 1"), None);
    }
}

//! The Django API, as the seed system calls it: the job config by data source
//! (`GET {DJANGO_API_URL}/api/etl/job-config/{id}/`) and the run status
//! (`PATCH {DJANGO_API_URL}/api/etl/runs/{id}/update/`), both with `Bearer ETL_API_TOKEN`.
//! Server errors and unreachable hosts are transient (retried by the caller's policy); a 4xx
//! is a problem with the request and is reported as it is. Every error names the request and
//! the cause (`net`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;
use crate::spec::{JobConfig, Secret};
use crate::state::RunStatus;
use crate::{Error, Result};

#[derive(Clone)]
pub struct DjangoClient {
    base_url: String,
    /// None when `ETL_API_TOKEN` is empty: no `Authorization` header rather than `Bearer `.
    token: Option<Secret>,
    http: reqwest::Client,
    retry: RetryPolicy,
}

/// The body of a run-status PATCH. `None` fields are left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunUpdate {
    /// Django's statuses are `running`, `completed` and `failed`.
    pub status: RunStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_extracted: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_loaded: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Progress while running: shards finished and in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards_completed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards_total: Option<usize>,
    /// The timestamp column's high-water mark actually loaded (sent with `completed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// A file job: the files the run loaded (sent with `completed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_loaded: Option<usize>,
    /// What went wrong without failing the run, for a person to look at (e.g. a file
    /// rewritten while BigQuery loaded it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl DjangoClient {
    pub fn new(base_url: &str, token: Secret, retry: RetryPolicy) -> Result<Self> {
        let base_url = base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(Error::Api {
                message: format!("DJANGO_API_URL must be an http(s) URL, got {base_url:?}"),
                transient: false,
            });
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Api {
                message: format!("HTTP client: {e}"),
                transient: false,
            })?;
        let token = (!token.expose().is_empty()).then_some(token);
        Ok(DjangoClient {
            base_url,
            token,
            http,
            retry,
        })
    }

    /// From `DJANGO_API_URL` and `ETL_API_TOKEN`; None when `DJANGO_API_URL` is not set.
    pub fn from_env(retry: RetryPolicy) -> Result<Option<Self>> {
        let Ok(url) = std::env::var("DJANGO_API_URL") else {
            return Ok(None);
        };
        if url.trim().is_empty() {
            return Ok(None);
        }
        let token = std::env::var("ETL_API_TOKEN").unwrap_or_default();
        if token.trim().is_empty() {
            tracing::warn!(
                "DJANGO_API_URL is set but ETL_API_TOKEN is empty: requests to Django carry no \
                 Authorization header"
            );
        }
        Self::new(&url, Secret::new(token.trim().to_string()), retry).map(Some)
    }

    pub fn job_config_url(&self, data_source_id: i64) -> String {
        format!("{}/api/etl/job-config/{data_source_id}/", self.base_url)
    }

    pub fn run_update_url(&self, etl_run_id: i64) -> String {
        format!("{}/api/etl/runs/{etl_run_id}/update/", self.base_url)
    }

    pub async fn job_config(&self, data_source_id: i64) -> Result<JobConfig> {
        let url = self.job_config_url(data_source_id);
        let what = format!("GET job config {data_source_id}");
        let body = self
            .retry
            .run(&what, || async {
                let response = self
                    .authorized(self.http.get(&url))
                    .send()
                    .await
                    .map_err(|e| unreachable("GET", &url, &e))?;
                checked("GET", &url, response)
                    .await?
                    .bytes()
                    .await
                    .map_err(|e| unreachable("GET", &url, &e))
            })
            .await?;
        let mut config: JobConfig = serde_json::from_slice(&body).map_err(|e| Error::Api {
            message: format!("job config {data_source_id} from {url} is not a job config: {e}"),
            transient: false,
        })?;
        config.data_source_id.get_or_insert(data_source_id);
        Ok(config)
    }

    /// One PATCH of the run's status, no retry: the reporter (`dispatcher::report`) decides
    /// when to try again, off the run's path.
    pub async fn update_run_once(&self, etl_run_id: i64, update: &RunUpdate) -> Result<()> {
        let url = self.run_update_url(etl_run_id);
        let response = self
            .authorized(self.http.patch(&url))
            .json(update)
            .send()
            .await
            .map_err(|e| unreachable("PATCH", &url, &e))?;
        checked("PATCH", &url, response).await.map(|_| ())
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }
}

fn unreachable(method: &str, url: &str, e: &reqwest::Error) -> Error {
    Error::Api {
        message: crate::net::unanswered(method, url, e),
        transient: true,
    }
}

async fn checked(
    method: &str,
    url: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(Error::Api {
        message: crate::net::answered(method, url, status, &body),
        transient: status.is_server_error() || status.as_u16() == 429,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_django_contract() {
        let c = DjangoClient::new("http://django:8000/", Secret::new("t"), RetryPolicy::none())
            .unwrap();
        assert_eq!(
            c.job_config_url(12),
            "http://django:8000/api/etl/job-config/12/"
        );
        assert_eq!(
            c.run_update_url(34),
            "http://django:8000/api/etl/runs/34/update/"
        );
        assert!(DjangoClient::new("django:8000", Secret::new("t"), RetryPolicy::none()).is_err());
    }

    #[test]
    fn updates_leave_out_what_they_do_not_know() {
        let running = RunUpdate {
            status: RunStatus::Running,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&running).unwrap(),
            r#"{"status":"running"}"#
        );
    }
}

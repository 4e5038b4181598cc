//! Prometheus metrics (`prometheus-client`) and the `/metrics` + `/healthz` endpoint that
//! dispatcher and workers serve on `SHARDFLOW_METRICS_PORT`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::state::RunStatus;
use crate::{Error, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

/// Every metric shardflow exports; each process fills the ones its role touches.
pub struct Metrics {
    pub rows: Counter,
    pub bytes: Counter,
    pub shard_seconds: Histogram,
    pub shards_in_flight: Gauge,
    pub shard_failures: Counter,
    pub runs: Family<StatusLabel, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shardflow");
        let rows = Counter::default();
        let bytes = Counter::default();
        // 0.5 s to about 4.5 h.
        let shard_seconds = Histogram::new(exponential_buckets(0.5, 2.0, 16));
        let shards_in_flight = Gauge::default();
        let shard_failures = Counter::default();
        let runs = Family::<StatusLabel, Counter>::default();
        registry.register("rows", "Rows extracted by shards", rows.clone());
        registry.register("bytes", "Parquet bytes staged by shards", bytes.clone());
        registry.register(
            "shard_seconds",
            "Time to extract and stage one shard",
            shard_seconds.clone(),
        );
        registry.register(
            "shards_in_flight",
            "Shards being extracted now",
            shards_in_flight.clone(),
        );
        registry.register(
            "shard_failures",
            "Shard attempts that failed",
            shard_failures.clone(),
        );
        registry.register("runs", "Runs finished, by status", runs.clone());
        Metrics {
            rows,
            bytes,
            shard_seconds,
            shards_in_flight,
            shard_failures,
            runs,
            registry,
        }
    }

    pub fn run_finished(&self, status: RunStatus) {
        self.runs
            .get_or_create(&StatusLabel {
                status: status.as_str().to_string(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown`. Returns the bound address (port 0 picks
/// a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Other(format!("cannot listen on {addr} for /metrics: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener");
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        }
    });
    Ok(bound)
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_and_health_are_served() {
        let metrics = Arc::new(Metrics::new());
        metrics.rows.inc_by(42);
        metrics.run_finished(RunStatus::Completed);
        metrics.shard_seconds.observe(1.5);
        let stop = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), metrics, stop.clone())
            .await
            .unwrap();
        let client = reqwest::Client::new();
        let body = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains("shardflow_rows_total 42"), "{body}");
        assert!(
            body.contains("shardflow_runs_total{status=\"completed\"} 1"),
            "{body}"
        );
        assert!(body.contains("shardflow_shard_seconds_count 1"), "{body}");
        let health = client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
        let missing = client.get(format!("http://{addr}/x")).send().await.unwrap();
        assert_eq!(missing.status().as_u16(), 404);
        stop.cancel();
    }
}

//! Logging: plain lines for people, or one JSON object per line with the fields Cloud Logging
//! reads (`severity`, `message`, `time`) plus every field of the enclosing spans, so
//! `data_source_id` and `etl_run_id` appear on every line of a run.

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global logger. `level` takes `LOG_LEVEL` values (`DEBUG`, `info`, …) or a full
/// filter directive. Logs go to stderr: stdout is for the plan and the run report.
pub fn init(format: LogFormat, level: &str) {
    let level = level.trim().to_ascii_lowercase();
    let directive = if level.contains('=') {
        level
    } else {
        // Drivers are chatty at info; keep them to warnings unless asked.
        format!("{level},sqlx=warn,tokio_postgres=warn")
    };
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let result = match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .try_init()
            .map_err(|e| e.to_string()),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(CloudLoggingLayer)
            .try_init()
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
}

/// The JSON line format. Public so tests can render events without touching stderr.
pub struct CloudLoggingLayer;

struct SpanFields(Map<String, Value>);

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().into(), text.into());
    }
}

pub fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        _ => "DEBUG",
    }
}

impl<S> Layer<S> for CloudLoggingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut JsonVisitor(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let line = render(event, ctx);
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

fn render<S>(event: &Event<'_>, ctx: Context<'_, S>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut out = Map::new();
    out.insert("severity".into(), severity(event.metadata().level()).into());
    out.insert("time".into(), chrono::Utc::now().to_rfc3339().into());
    if let Some(scope) = ctx.event_scope(event) {
        for span in scope.from_root() {
            if let Some(fields) = span.extensions().get::<SpanFields>() {
                for (k, v) in &fields.0 {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    let mut fields = Map::new();
    event.record(&mut JsonVisitor(&mut fields));
    let message = fields
        .remove("message")
        .unwrap_or(Value::String(String::new()));
    out.insert("message".into(), message);
    out.extend(fields);
    out.insert("target".into(), event.metadata().target().into());
    Value::Object(out).to_string()
}

/// A token cancelled on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub fn shutdown_on_signal(what_stops: &'static str) -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("stopping: {what_stops}");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Same rendering as the layer, captured instead of written to stderr.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl<S> Layer<S> for Capture
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            self.0.lock().unwrap().push(render(event, ctx));
        }
    }

    #[test]
    fn json_lines_carry_cloud_logging_fields_and_run_ids() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry()
            .with(CloudLoggingLayer.with_filter(tracing_subscriber::filter::LevelFilter::OFF))
            .with(CloudLoggingLayer)
            .with(Capture(lines.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("run", data_source_id = 123, etl_run_id = 456);
            let _g = span.enter();
            tracing::warn!(rows = 10, "shard done");
        });
        let lines = lines.lock().unwrap();
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["severity"], "WARNING");
        assert_eq!(v["message"], "shard done");
        assert_eq!(v["data_source_id"], 123);
        assert_eq!(v["etl_run_id"], 456);
        assert_eq!(v["rows"], 10);
    }
}

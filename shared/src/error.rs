//! One error type for the whole pipeline. Messages are written for the person reading the run
//! report: they name the table, column, field or file involved, and never carry a secret.

use crate::spec::SpecError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job config is malformed or inconsistent; nothing was moved.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The source rejected what the job asked for (missing table or column, unsupported key).
    #[error("{0}")]
    Source(String),
    /// The source could not be reached or failed while reading.
    #[error("source database error: {0}")]
    Database(String),
    /// A file store failed while being listed or read (a dropped connection, a server error
    /// its client's own retries did not get past): trying again may succeed.
    #[error("{0}")]
    SourceRead(String),
    /// The bytes the source sent could not be decoded.
    #[error("decoding {column}: {problem}")]
    Decode { column: String, problem: String },
    #[error("staging: {0}")]
    Staging(String),
    #[error("warehouse: {0}")]
    Warehouse(String),
    #[error("state store: {0}")]
    State(String),
    #[error("queue: {0}")]
    Queue(String),
    #[error("message: {0}")]
    Message(String),
    /// The Django API answered with an error, or could not be reached (`transient`).
    #[error("Django API: {message}")]
    Api { message: String, transient: bool },
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Whether trying the same work again may succeed (a dropped connection, a busy server),
    /// as opposed to a problem in the job or the data that will fail the same way every time.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Database(_)
                | Error::SourceRead(_)
                | Error::Staging(_)
                | Error::Queue(_)
                | Error::Api {
                    transient: true,
                    ..
                }
        )
    }
}

impl Error {
    /// Whether the same shard fails the same way on every delivery: a value that does not
    /// parse, a column the source does not have, a view that was never populated. The worker
    /// reports such a failure once and the run fails at once, where anything else (a store, a
    /// queue, the worker itself) gets the shard redelivered.
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            Error::Spec(_) | Error::Source(_) | Error::Decode { .. }
        )
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // The Display of a DbError omits the detail; include it when there is one.
        match e.as_db_error() {
            Some(db) => {
                let mut text = format!("{}: {}", db.severity(), db.message());
                if let Some(detail) = db.detail() {
                    text.push_str(&format!(" ({detail})"));
                }
                if refuses_the_job(db.code().code()) {
                    Error::Source(format!("the source database refused the job: {text}"))
                } else {
                    Error::Database(text)
                }
            }
            None => Error::Database(e.to_string()),
        }
    }
}

/// SQLSTATEs that say the job or the data is wrong, so trying again gives the same answer
/// (PostgreSQL's Appendix A): invalid authorization (class 28), a missing database (3D000),
/// syntax errors and access rules (class 42: a missing table or column, a missing
/// privilege), data exceptions (class 22: a value a cast refuses), an unsupported feature
/// (0A000) and an object not in the state the query needs (55000: "materialized view … has
/// not been populated"). Lock timeouts (55P03), serialization failures (40001), shutdowns
/// (57P01) and resource limits (class 53) are retried.
pub(crate) fn refuses_the_job(sqlstate: &str) -> bool {
    sqlstate.starts_with("28")
        || sqlstate.starts_with("42")
        || sqlstate.starts_with("22")
        || matches!(sqlstate, "3D000" | "0A000" | "55000")
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::Staging(e.to_string())
    }
}

impl From<parquet::errors::ParquetError> for Error {
    fn from(e: parquet::errors::ParquetError) -> Self {
        Error::Staging(format!("parquet: {e}"))
    }
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Other(format!("arrow: {e}"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Message(e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Other(format!("I/O: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_credentials_and_databases_are_not_transient() {
        // Credentials, a missing database, table (42P01) or column (42703), a privilege, an
        // invalid timestamp (22007), an unpopulated materialized view.
        for code in [
            "28000", "28P01", "3D000", "42501", "42P01", "42703", "22007", "0A000", "55000",
        ] {
            assert!(refuses_the_job(code), "{code}");
        }
        // A server shutting down, too many connections, a serialization failure, a deadlock,
        // a lock timeout, a lost connection, a cancelled statement: retried.
        for code in [
            "57P01", "53300", "40001", "40P01", "55P03", "08006", "57014",
        ] {
            assert!(!refuses_the_job(code), "{code}");
        }
    }
}

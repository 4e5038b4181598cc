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

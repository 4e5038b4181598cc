//! What the shardflow dispatcher and workers agree on: the job spec and its validation, the wire
//! messages, the source connectors, the Parquet writer, and the backends behind small traits
//! (queue, state store, staging, warehouse).

pub mod digest;
pub mod django;
pub mod error;
pub mod fault;
pub mod fuzz_targets;
pub mod gcs;
pub mod iam_login;
pub mod messages;
pub mod metrics;
pub mod net;
pub mod parquet_sink;
pub mod plan;
pub mod queue;
pub mod retry;
pub mod seal;
pub mod secrets;
pub mod source;
pub mod spec;
pub mod staging;
pub mod state;
pub mod telemetry;
pub mod warehouse;

pub use error::{Error, Result};

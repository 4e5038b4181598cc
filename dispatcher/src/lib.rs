//! The dispatcher: validate a job, estimate and plan its shards, record the run, publish the
//! shards, track their results (idempotent by shard id), and when every shard is in, load the
//! table ONCE, verify the counts, clean staging and report.

pub mod engine;
pub mod gc;
mod planning;
pub mod progress;
pub mod report;
mod run;
pub mod serve;

pub use planning::{
    Plan, PlannedColumn, PlannedShard, RenamedColumn, plan_job, plan_job_in_stream,
};
pub use run::{QueueChoice, RunOptions, RunReport, open_staging, open_warehouse, run_job};

pub use engine::{Engine, EngineSettings, RunEvents, RunJob, RunObserver, RunOutcome};
pub use shardflow::plan::{PlanOptions, StreamState};
use shardflow::source::files::plan as files;

/// Rows per Arrow batch when `ETL_BATCH_SIZE` is not set (the seed's default).
pub const DEFAULT_BATCH_ROWS: usize = 10_000;

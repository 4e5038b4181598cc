//! Wire messages between dispatcher and workers. Versioned JSON: a reader refuses a version it
//! does not know rather than guessing. No message carries a secret in clear text: workers get
//! connection details from Django by `data_source_id`, from the run registry, or from a
//! config sealed for the run (`seal`).

use serde::{Deserialize, Serialize};

use crate::source::{ShardBounds, SourceColumn};
use crate::{Error, Result};

/// A job message, as Django and Cloud Scheduler publish it and as `dispatcher run --job` takes
/// it: `{"data_source_id": 123, "etl_run_id": 456, "config": {…}}`, where only
/// `data_source_id` (or an inline config) is required.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct JobMessage {
    pub data_source_id: Option<i64>,
    pub etl_run_id: Option<i64>,
    pub config: Option<serde_json::Value>,
}

/// Where a job came from, for its key.
#[derive(Clone, Copy, Debug)]
pub enum JobOrigin<'a> {
    /// A `dispatcher run`: each invocation is a job of its own.
    Command,
    /// A queue message: a redelivery of the same message is the same job.
    Message { id: &'a str },
}

impl JobMessage {
    /// The inline config with the message's data source id (workers fetch the config by the
    /// id the message names, so the shards must carry it); None without one.
    pub fn inline_config(&self) -> Option<Result<crate::spec::JobConfig, crate::spec::SpecError>> {
        let inline = self.config.clone()?;
        Some(
            serde_json::from_value::<crate::spec::JobConfig>(inline)
                .map(|mut config| {
                    if self.data_source_id.is_some() {
                        config.data_source_id = self.data_source_id;
                    }
                    config
                })
                .map_err(|e| {
                    crate::spec::SpecError::single("config", format!("not a job config: {e}"))
                }),
        )
    }

    /// The identity of the job (`job_key`).
    pub fn job_key(&self, origin: JobOrigin<'_>) -> String {
        job_key(self.etl_run_id, self.data_source_id, origin)
    }
}

/// The identity of a job, which its runs (`{job_key}.{attempt}`) and an append's load key
/// share: Django's run id; else for a message, the data source and the message; for a
/// command, a new id.
pub fn job_key(
    etl_run_id: Option<i64>,
    data_source_id: Option<i64>,
    origin: JobOrigin<'_>,
) -> String {
    match (etl_run_id, origin, data_source_id) {
        (Some(id), _, _) => format!("etl-{id}"),
        (None, JobOrigin::Command, _) => format!("cli-{}", uuid::Uuid::now_v7()),
        (None, JobOrigin::Message { id }, Some(ds)) => format!("sched-{ds}-{id}"),
        (None, JobOrigin::Message { id }, None) => format!("inline-{id}"),
    }
}

/// 2: shard tasks name the timestamp column; results carry a checksum, schema and maximum.
/// 3: shard tasks name the destination's columns, which the staged parts must carry.
pub const WIRE_VERSION: u32 = 3;

/// One unit of extraction work: a key range, ctid range or the whole table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardTask {
    pub version: u32,
    pub run_id: String,
    pub shard_id: String,
    pub shard_index: u32,
    pub data_source_id: Option<i64>,
    pub etl_run_id: Option<i64>,
    pub schema_name: String,
    pub table_name: String,
    /// The columns to read, in output order, with their source types.
    pub columns: Vec<SourceColumn>,
    /// The destination's name for each column, in the same order; empty: the source's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_names: Vec<String>,
    pub bounds: ShardBounds,
    /// The exported snapshot every shard of the run reads (PostgreSQL).
    pub snapshot: Option<String>,
    /// Rows per Arrow batch (`ETL_BATCH_SIZE`).
    pub batch_rows: usize,
    /// The job's timestamp column, whose largest value the result reports.
    pub timestamp_column: Option<String>,
    /// For an incremental load, the window every shard is limited to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::source::Window>,
    /// The job config, sealed for this run (see `seal`), when it did not come from Django.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_config: Option<String>,
}

/// Where one extraction of a shard stages its parts: `{run_id}/{shard_id}/{extraction}`. Each
/// extraction has its own id ([`new_extraction_id`]), so a second delivery of the shard
/// (Pub/Sub delivers at least once, and a lease can lapse mid-shard) writes beside the parts a
/// recorded result names, never over them: the load reads exactly the rows that result
/// counted, even where the source changed between the two reads or returned rows in another
/// order. The run's whole prefix goes when the run ends or is swept.
pub fn extraction_prefix(run_id: &str, shard_id: &str, extraction: &str) -> String {
    format!("{run_id}/{shard_id}/{extraction}")
}

/// A fresh extraction id: unique per call, and ordered by time for whoever lists staging.
pub fn new_extraction_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// `{extraction prefix}/part-{n:05}.parquet`
pub fn staging_part_path(extraction_prefix: &str, part: usize) -> String {
    format!("{extraction_prefix}/part-{part:05}.parquet")
}

/// A Parquet part a worker wrote to staging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedFile {
    /// Path inside the staging store.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ShardOutcome {
    Succeeded {
        rows: u64,
        bytes: u64,
        files: Vec<StagedFile>,
        seconds: f64,
        /// Order-independent checksum of the rows' content (see `digest`).
        checksum: String,
        /// The Arrow schema of the staged parts.
        schema: arrow_schema::Schema,
        /// The largest value of the task's timestamp column, ISO 8601 for dates and times.
        max_value: Option<String>,
        /// File shards: rows read from each of the shard's files, in its order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        source_rows: Vec<u64>,
    },
    Failed {
        error: String,
        /// The failure is the data's or the job's and recurs on every delivery (see
        /// `Error::is_deterministic`): the worker acked the shard and the run fails now.
        /// Absent from older workers' results, whose failures are all retried.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        permanent: bool,
    },
}

/// What a worker reports for one delivery of a shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardResult {
    pub version: u32,
    pub run_id: String,
    pub shard_id: String,
    pub delivery_attempt: u32,
    pub worker_id: String,
    #[serde(flatten)]
    pub outcome: ShardOutcome,
}

/// Decodes a message body, refusing versions this build does not speak.
pub fn decode<T: serde::de::DeserializeOwned>(kind: &str, data: &[u8]) -> Result<T> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(data)
        .map_err(|e| Error::Message(format!("{kind} is not valid JSON with a version: {e}")))?;
    if v.version != WIRE_VERSION {
        return Err(Error::Message(format!(
            "{kind} has wire version {}, this build speaks {WIRE_VERSION}",
            v.version
        )));
    }
    serde_json::from_slice(data).map_err(|e| Error::Message(format!("malformed {kind}: {e}")))
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_keys_identify_the_job() {
        let message = |json: &str| serde_json::from_str::<JobMessage>(json).unwrap();
        let from = |id| JobOrigin::Message { id };
        let django = message(r#"{"data_source_id": 3, "etl_run_id": 44}"#);
        assert_eq!(django.job_key(from("m1")), "etl-44");
        assert_eq!(django.job_key(JobOrigin::Command), "etl-44");
        let scheduled = message(r#"{"data_source_id": 3}"#);
        assert_eq!(scheduled.job_key(from("m1")), "sched-3-m1");
        assert_eq!(scheduled.job_key(from("m2")), "sched-3-m2");
        let inline = message(r#"{"config": {}}"#);
        assert_eq!(inline.job_key(from("m1")), "inline-m1");
        // Each command is a job of its own.
        let one = inline.job_key(JobOrigin::Command);
        assert!(one.starts_with("cli-"), "{one}");
        assert_ne!(one, inline.job_key(JobOrigin::Command));
    }

    #[test]
    fn an_inline_config_carries_the_messages_data_source() {
        let message: JobMessage = serde_json::from_str(
            r#"{"data_source_id": 7, "config": {"source_type": "postgresql", "data_source_id": 1}}"#,
        )
        .unwrap();
        let config = message.inline_config().unwrap().unwrap();
        assert_eq!(config.data_source_id, Some(7));
        let bad: JobMessage = serde_json::from_str(r#"{"config": []}"#).unwrap();
        let err = bad.inline_config().unwrap().unwrap_err().to_string();
        assert!(
            err.starts_with("invalid job config: config: not a job config: invalid type"),
            "{err}"
        );
        assert!(JobMessage::default().inline_config().is_none());
    }

    #[test]
    fn each_extraction_of_a_shard_stages_under_its_own_prefix() {
        let prefix = extraction_prefix("r1", "s0003", "0193aa");
        assert_eq!(prefix, "r1/s0003/0193aa");
        assert_eq!(
            staging_part_path(&prefix, 7),
            "r1/s0003/0193aa/part-00007.parquet"
        );
        let (first, second) = (new_extraction_id(), new_extraction_id());
        assert_ne!(first, second);
        assert_eq!(first.len(), 32);
        assert!(
            first.bytes().all(|b| b.is_ascii_hexdigit()),
            "a path segment with nothing to escape: {first}"
        );
    }

    #[test]
    fn results_round_trip_and_versions_are_checked() {
        let result = ShardResult {
            version: WIRE_VERSION,
            run_id: "r".into(),
            shard_id: "s0000".into(),
            delivery_attempt: 2,
            worker_id: "w".into(),
            outcome: ShardOutcome::Failed {
                error: "boom".into(),
                permanent: false,
            },
        };
        let bytes = encode(&result).unwrap();
        assert_eq!(
            decode::<ShardResult>("shard result", &bytes).unwrap(),
            result
        );
        // A result from a worker that predates `permanent` is a retried failure; a
        // permanent one says so on the wire.
        assert!(!String::from_utf8_lossy(&bytes).contains("permanent"));
        let permanent = ShardResult {
            outcome: ShardOutcome::Failed {
                error: "bad value".into(),
                permanent: true,
            },
            ..result
        };
        let bytes = encode(&permanent).unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains("\"permanent\":true"));
        assert_eq!(
            decode::<ShardResult>("shard result", &bytes).unwrap(),
            permanent
        );
        let future = serde_json::json!({"version": 99, "run_id": "r"}).to_string();
        let err = decode::<ShardResult>("shard result", future.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message: shard result has wire version 99, this build speaks 3"
        );
        let err = decode::<ShardResult>("shard result", b"{").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("message: shard result is not valid JSON"),
            "{err}"
        );
    }
}

use super::load::*;
use super::*;

fn record(shard: &str, schema: &Schema, checksum: &str, max: Option<&str>) -> ShardRecord {
    ShardRecord {
        shard_id: shard.into(),
        shard_index: 0,
        estimated_rows: 0,
        status: ShardStatus::Succeeded,
        rows: Some(1),
        files: Vec::new(),
        checksum: Some(checksum.into()),
        schema_json: Some(serde_json::to_string(schema).unwrap()),
        max_value: max.map(str::to_string),
        source_rows: Vec::new(),
        attempts: 1,
        error: None,
        task_json: String::new(),
    }
}

#[test]
fn shards_combine_into_a_checksum_and_watermark() {
    use arrow_schema::{DataType, Field};
    let schema = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("day", DataType::Date32, true),
    ]);
    let records = vec![
        record("s0", &schema, "0000000000000001", Some("2024-01-09")),
        record("s1", &schema, "0000000000000010", None),
        record("s2", &schema, "0000000000000100", Some("2024-01-10")),
    ];
    assert_eq!(
        summarize_shards(&records, &schema, Some("day")).unwrap(),
        ShardSummary {
            checksum: "0000000000000111".into(),
            watermark: Some("2024-01-10".into()),
        }
    );
    assert_eq!(
        summarize_shards(&records, &schema, None).unwrap().watermark,
        None
    );

    let drifted = Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("day", DataType::Utf8, true),
    ]);
    let mut bad = records.clone();
    bad[1] = record("s1", &drifted, "0000000000000010", None);
    assert_eq!(
        summarize_shards(&bad, &schema, None)
            .unwrap_err()
            .to_string(),
        "shard s1 staged columns [id Int64, day Utf8], the plan expects [id Int64, day Date32]"
    );
    bad[1].checksum = None;
    assert_eq!(
        summarize_shards(&bad, &schema, None)
            .unwrap_err()
            .to_string(),
        "shard s1 reported no checksum or schema"
    );
}

#[test]
fn own_configs_travel_sealed_or_not_at_all() {
    let config = r#"{"connection_params": {"password": "pw"}}"#.to_string();
    let key = SealKey::from_hex(&"ab".repeat(32)).unwrap();
    assert_eq!(config_for_workers(None, None, "r.1").unwrap(), None);
    assert_eq!(config_for_workers(None, Some(&key), "r.1").unwrap(), None);
    let sealed = config_for_workers(Some(&config), Some(&key), "r.1")
        .unwrap()
        .unwrap();
    assert_eq!(key.open(&sealed, "r.1").unwrap(), config.as_bytes());
    assert_eq!(
        config_for_workers(Some(&config), None, "r.1")
            .unwrap_err()
            .to_string(),
        "message: this job's config did not come from Django, so the workers can only \
         receive it sealed: set SHARDFLOW_SEAL_KEY (64 hex digits, the same on the \
         dispatcher and the workers), or publish the job with data_source_id alone"
    );
}

#[test]
fn a_recorded_file_plan_names_the_files_a_takeover_reads_again() {
    let plan =
        r#"{"source":"s","files":{"listed":3,"selected":["file:///in/a.csv","file:///in/b.csv"]}}"#;
    assert_eq!(
        files_of(plan),
        Some(vec![
            "file:///in/a.csv".to_string(),
            "file:///in/b.csv".to_string()
        ])
    );
    assert_eq!(files_of(r#"{"source":"s","window":{}}"#), None);
    assert_eq!(files_of("not json"), None);
}

#[test]
fn run_ids_count_attempts() {
    assert_eq!(attempt_of("etl-7.1"), 1);
    assert_eq!(attempt_of("etl-7.12"), 12);
    assert_eq!(attempt_of("sched-3-99.2"), 2);
    assert_eq!(attempt_of("odd"), 1);
}

#[test]
fn a_rewritten_file_is_recorded_in_the_version_the_load_read() {
    let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
    let version = |generation: &str, written: i64| FileInfo {
        path: "in/a.csv".into(),
        size: 10,
        last_modified: at(written),
        e_tag: None,
        version: Some(generation.into()),
    };
    let planned = version("1", 100);
    let window = Some((1_000, 2_000));
    // This attempt's job (it started after the check at 900).
    let ours = |now: &FileInfo| read_version(&planned, now, window, 900);
    assert_eq!(ours(&planned), ReadVersion::Planned);
    // Rewritten after the job ended: the job read the planned version.
    assert_eq!(ours(&version("2", 2_001)), ReadVersion::Planned);
    // Before it started (after the check): the new one.
    assert_eq!(ours(&version("2", 950)), ReadVersion::Current);
    // While it ran, or with no window to tell: either.
    for written in [1_000, 1_500, 2_000] {
        assert_eq!(ours(&version("2", written)), ReadVersion::Unknown);
    }
    assert_eq!(
        read_version(&planned, &version("2", 5), None, 900),
        ReadVersion::Unknown
    );
    assert_eq!(
        read_version(&planned, &planned, None, 900),
        ReadVersion::Planned
    );
    // An earlier attempt's job (it ran before this attempt's check at 5,000): only the times
    // tell, even for the version planned now.
    let earlier = |now: &FileInfo| read_version(now, now, window, 5_000);
    assert_eq!(earlier(&version("1", 100)), ReadVersion::Current);
    assert_eq!(earlier(&version("2", 3_000)), ReadVersion::NotRead);
    assert_eq!(earlier(&version("2", 1_500)), ReadVersion::Unknown);
}

/// The state store at the moment another dispatcher's insert of this job's run has committed
/// and this dispatcher's own insert fails (its connection dropped): the real SQLite store,
/// with that moment put in front of `create_run`.
struct AnotherDispatcherWins {
    store: shardflow::state::sql::SqlStateStore,
    winner: String,
}

#[async_trait]
impl StateStore for AnotherDispatcherWins {
    async fn create_run(&self, run: &NewRun, shards: &[NewShard]) -> Result<Created> {
        let theirs = NewRun {
            owner: self.winner.clone(),
            ..run.clone()
        };
        assert_eq!(
            self.store.create_run(&theirs, shards).await?,
            Created::Created
        );
        Err(Error::State("connection reset by the peer".into()))
    }
    async fn claim_run(&self, run_id: &str, owner: &str, stale_after: Duration) -> Result<bool> {
        self.store.claim_run(run_id, owner, stale_after).await
    }
    async fn heartbeat(&self, run_id: &str, owner: &str) -> Result<bool> {
        self.store.heartbeat(run_id, owner).await
    }
    async fn record_result(&self, result: &ShardResult) -> Result<Recorded> {
        self.store.record_result(result).await
    }
    async fn fail_shard(&self, run_id: &str, shard_id: &str, error: &str) -> Result<bool> {
        self.store.fail_shard(run_id, shard_id, error).await
    }
    async fn shards(&self, run_id: &str) -> Result<Vec<ShardRecord>> {
        self.store.shards(run_id).await
    }
    async fn finish_run(&self, run_id: &str, end: &RunEnd) -> Result<()> {
        self.store.finish_run(run_id, end).await
    }
    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        self.store.run(run_id).await
    }
    async fn latest_run(&self, job_key: &str) -> Result<Option<RunRecord>> {
        self.store.latest_run(job_key).await
    }
    async fn running_runs(&self) -> Result<Vec<RunRecord>> {
        self.store.running_runs().await
    }
    async fn latest_stream_run(&self, stream_key: &str) -> Result<Option<RunRecord>> {
        self.store.latest_stream_run(stream_key).await
    }
    async fn stream_watermark(&self, stream_key: &str) -> Result<Option<String>> {
        self.store.stream_watermark(stream_key).await
    }
    async fn processed_files(
        &self,
        stream_key: &str,
    ) -> Result<Vec<shardflow::state::ProcessedFile>> {
        self.store.processed_files(stream_key).await
    }
    async fn record_report(&self, etl_run_id: i64, body: &str) -> Result<bool> {
        self.store.record_report(etl_run_id, body).await
    }
    async fn claim_due_reports(
        &self,
        claim_for: Duration,
    ) -> Result<Vec<shardflow::state::PendingReport>> {
        self.store.claim_due_reports(claim_for).await
    }
    async fn report_attempted(
        &self,
        etl_run_id: i64,
        attempt: &shardflow::state::ReportAttempt,
    ) -> Result<()> {
        self.store.report_attempted(etl_run_id, attempt).await
    }
    async fn prune_reports(&self, older_than: Duration) -> Result<u64> {
        self.store.prune_reports(older_than).await
    }
    async fn report(
        &self,
        etl_run_id: i64,
    ) -> Result<
        Option<(
            shardflow::state::PendingReport,
            shardflow::state::ReportState,
        )>,
    > {
        self.store.report(etl_run_id).await
    }
}

/// A dispatcher that fails after another recorded the job's run (here: its own insert, a
/// moment after the other's committed; equally, a planning error while the other planned)
/// leaves that live run alone: not failed in the state store, its staging kept, and nothing
/// to report; the job is handed back as owned elsewhere.
#[tokio::test]
async fn a_failure_after_another_dispatcher_recorded_the_run_leaves_the_run_to_it() {
    let dir = std::env::temp_dir().join(format!(
        "shardflow-engine-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::write(dir.join("in/a.csv"), "id,name\n1,a\n2,b\n").unwrap();
    let config = serde_json::json!({
        "source_type": "local", "dest_table_name": "t", "file_format": "csv",
        "file_path_prefix": format!("{}/in/", dir.display()), "file_pattern": "*.csv",
    });
    let spec = JobSpec::from_json(&config.to_string()).unwrap();
    let state = Arc::new(AnotherDispatcherWins {
        store: shardflow::state::sql::SqlStateStore::open(&format!(
            "sqlite://{}",
            dir.join("state.db").display()
        ))
        .await
        .unwrap(),
        winner: "the other dispatcher".into(),
    });
    // What the winner has staged so far.
    let theirs = dir.join("staging/etl-7.1/s00000/e1/part-00000.parquet");
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, b"the winner's part").unwrap();
    let engine = Engine {
        queue: Arc::new(shardflow::queue::embedded::EmbeddedQueue::new(
            Default::default(),
        )),
        state: state.clone(),
        staging: Staging::local(&dir.join("staging")).unwrap(),
        warehouse: Arc::new(
            shardflow::warehouse::parquet_dir::ParquetDirWarehouse::new(dir.join("warehouse"))
                .unwrap(),
        ),
        topology: Topology::default(),
        owner: "this dispatcher".into(),
        events: Arc::default(),
        metrics: Arc::new(Metrics::new()),
        settings: EngineSettings::default(),
    };
    let job = RunJob {
        job_key: "etl-7".into(),
        spec: Arc::new(spec),
        etl_run_id: Some(7),
        own_config: None,
    };
    match engine.run(&job, &NoObserver).await.unwrap() {
        RunOutcome::OwnedElsewhere { run_id, owner } => {
            assert_eq!(
                (run_id.as_str(), owner.as_str()),
                ("etl-7.1", "the other dispatcher")
            );
        }
        RunOutcome::Finished(report) => panic!("finished the other's run: {report:?}"),
        _ => panic!("expected the run to be left to its owner"),
    }
    let run = state.run("etl-7.1").await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.owner.as_str(), run.error_message),
        (RunStatus::Running, "the other dispatcher", None)
    );
    assert_eq!(std::fs::read(&theirs).unwrap(), b"the winner's part");
    std::fs::remove_dir_all(dir).unwrap();
}

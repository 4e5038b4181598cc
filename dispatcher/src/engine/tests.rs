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

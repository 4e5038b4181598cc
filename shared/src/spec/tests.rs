use super::*;

fn base() -> serde_json::Value {
    serde_json::json!({
        "source_type": "postgresql",
        "connection_params": {"host": "db", "port": 5432, "database": "d", "username": "u", "password": "hunter2"},
        "source_table_name": "transactions",
        "schema_name": "public",
        "dest_table_name": "bq_transactions",
        "load_type": "catalog",
        "selected_columns": []
    })
}

fn parse(v: serde_json::Value) -> Result<JobSpec, SpecError> {
    JobSpec::from_json(&v.to_string())
}

#[test]
fn seed_example_parses_with_every_field() {
    // The example from the ETL runner seed, plus the file and mode fields.
    let text = r#"{
      "source_type": "postgresql",
      "connection_params": {"host": "db.example.com", "port": "5432", "database": "mydb",
                            "username": "user", "password": "pass"},
      "source_table_name": "transactions", "schema_name": "public",
      "dest_table_name": "bq_transactions", "load_type": "transactional",
      "timestamp_column": "created_at", "selected_columns": ["id", "amount", "created_at"],
      "last_sync_value": "2024-01-01T00:00:00", "historical_start_date": "2023-01-01",
      "processing_mode": "dataflow", "row_count_threshold": 500000,
      "is_file_based": false, "file_path_prefix": "", "file_pattern": "", "file_format": "",
      "file_format_options": {}, "load_latest_only": true, "schema_fingerprint": "",
      "bigquery_schema": [{"name": "id", "bigquery_type": "INT64", "bigquery_mode": "REQUIRED"}]
    }"#;
    let spec = JobSpec::from_json(text).unwrap();
    assert_eq!(spec.source_type, SourceType::Postgresql);
    assert_eq!(
        spec.source,
        SourceSpec::Table(TableRef {
            schema: "public".into(),
            table: "transactions".into()
        })
    );
    assert_eq!(
        spec.load,
        Load::Append {
            window: Window::Column(ColumnWindow {
                column: "created_at".into(),
                last_sync_value: Some("2024-01-01T00:00:00".into()),
                historical_start_date: Some("2023-01-01".into()),
            })
        }
    );
    assert_eq!(spec.processing_mode, ProcessingMode::Dataflow);
    assert_eq!(spec.row_count_threshold, 500_000);
    assert_eq!(spec.port(1), 5432);
    assert_eq!(
        spec.selected_columns,
        Some(vec!["id".into(), "amount".into(), "created_at".into()])
    );
    assert_eq!(spec.connection.password.as_ref().unwrap().expose(), "pass");
}

#[test]
fn defaults_apply() {
    let mut v = base();
    v.as_object_mut().unwrap().remove("load_type");
    v.as_object_mut().unwrap().remove("schema_name");
    let spec = parse(v).unwrap();
    assert_eq!(
        spec.load,
        Load::Catalog {
            watermark_column: None
        }
    );
    assert_eq!(spec.processing_mode, ProcessingMode::Auto);
    assert_eq!(spec.row_count_threshold, DEFAULT_ROW_COUNT_THRESHOLD);
    assert_eq!(spec.table().map(|t| t.schema.as_str()), Some("public"));
    assert_eq!(
        spec.selected_columns, None,
        "empty selected_columns means all"
    );
}

#[test]
fn transactional_needs_timestamp_column() {
    let mut v = base();
    v["load_type"] = "transactional".into();
    let err = parse(v).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid job config: load_type \"transactional\" needs timestamp_column"
    );
}

#[test]
fn merge_takes_keys_and_a_lookback() {
    let mut v = base();
    v["load_type"] = "merge".into();
    assert_eq!(
        parse(v.clone()).unwrap_err().to_string(),
        "invalid job config: load_type \"merge\" needs timestamp_column"
    );
    v["timestamp_column"] = "updated_at".into();
    let spec = parse(v.clone()).unwrap();
    let window = ColumnWindow {
        column: "updated_at".into(),
        last_sync_value: None,
        historical_start_date: None,
    };
    assert_eq!(
        spec.load,
        Load::Merge {
            window: window.clone(),
            keys: None,
            lookback: None
        }
    );
    assert!(spec.load.kind().is_incremental());
    v["merge_keys"] = serde_json::json!(["region", "id"]);
    v["lookback"] = "2 hours".into();
    let spec = parse(v.clone()).unwrap();
    assert_eq!(
        spec.load,
        Load::Merge {
            window,
            keys: Some(vec!["region".into(), "id".into()]),
            lookback: Some(std::time::Duration::from_secs(7200))
        }
    );

    v["merge_keys"] = serde_json::json!(["id", "id"]);
    v["lookback"] = "2 fortnights".into();
    let err = parse(v.clone()).unwrap_err().to_string();
    assert!(err.contains("merge_keys: lists \"id\" twice"), "{err}");
    assert!(
        err.contains("\"2 fortnights\" is not like \"6 hours\""),
        "{err}"
    );
    // A lookback would append rows twice; merge keys mean nothing to an append.
    v["load_type"] = "transactional".into();
    v["merge_keys"] = serde_json::json!(["id"]);
    v["lookback"] = 60.into();
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("merge_keys: is only used with load_type \"merge\"")
            && err.contains("lookback: needs load_type \"merge\""),
        "{err}"
    );
}

#[test]
fn lookback_forms() {
    use serde_json::json;
    let secs = |v: serde_json::Value| parse_lookback(&v).map(|d| d.map(|d| d.as_secs()));
    assert_eq!(secs(json!(90)), Ok(Some(90)));
    assert_eq!(secs(json!("90")), Ok(Some(90)));
    assert_eq!(secs(json!("1 day")), Ok(Some(86_400)));
    assert_eq!(secs(json!("3 Minutes")), Ok(Some(180)));
    assert_eq!(secs(json!("12 hours")), Ok(Some(43_200)));
    assert_eq!(secs(json!(0)), Ok(None));
    assert_eq!(secs(json!("")), Ok(None));
    assert_eq!(secs(json!(null)), Ok(None));
    assert!(secs(json!(-5)).is_err());
    assert!(secs(json!(1.5)).is_err());
    assert!(secs(json!("1 hour ago")).is_err());
    assert!(secs(json!([1])).is_err());
}

#[test]
fn unknown_source_type_and_mode_are_named() {
    let mut v = base();
    v["source_type"] = "oracle".into();
    v["processing_mode"] = "turbo".into();
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("source_type \"oracle\" is not supported (expected one of: postgresql, mysql, gcs, s3, azure_blob, local)"),
        "{err}"
    );
    assert!(
        err.contains(
            "processing_mode \"turbo\" is not supported (expected auto, standard or dataflow)"
        ),
        "{err}"
    );
}

#[test]
fn every_problem_is_listed_by_field() {
    let v = serde_json::json!({"source_type": "postgresql", "load_type": "weekly"});
    let err = parse(v).unwrap_err();
    let fields: Vec<_> = err.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "load_type",
            "dest_table_name",
            "source_table_name",
            "connection_params.host",
            "connection_params.database",
            "connection_params.username"
        ]
    );
}

#[test]
fn connection_urls_become_fields() {
    let params = ConnectionParams::from_value(serde_json::json!(
        "postgresql://ana%40corp:p%2Fss%3Aword@[::1]:6432/sales%20db?sslmode=verify-full&sslrootcert=%2Fca.pem"
    ))
    .unwrap();
    assert_eq!(params.host.as_deref(), Some("::1"));
    assert_eq!(params.port, Some(NumberOrString::Number(6432)));
    assert_eq!(params.username.as_deref(), Some("ana@corp"));
    assert_eq!(
        params.password.as_ref().map(Secret::expose),
        Some("p/ss:word")
    );
    assert_eq!(params.database.as_deref(), Some("sales db"));
    assert_eq!(params.other["sslmode"].expose(), "verify-full");
    assert_eq!(params.other["sslrootcert"].expose(), "/ca.pem");
    let mysql = ConnectionParams::from_value(serde_json::json!("mysql://root@db")).unwrap();
    assert_eq!(
        (mysql.host.as_deref(), mysql.port, mysql.password.is_none()),
        (Some("db"), None, true)
    );
    for bad in [
        "http://u:hunter2@h/db",
        "postgresql://u:hunter2@[h/db",
        "host=h password=hunter2",
        "postgresql://u:%FF%FE@h/db",
    ] {
        let err = ConnectionParams::from_value(serde_json::json!(bad)).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.starts_with("connection_params"), "{err}");
    }
}

#[test]
fn unknown_fields_are_warned_about_with_the_field_they_resemble() {
    let mut v = base();
    v["load_typ"] = "transactional".into();
    v["dest_tabel_name"] = "x".into();
    v["created_by"] = "ana".into();
    let spec = parse(v).unwrap();
    assert_eq!(
        spec.warnings,
        [
            "unknown field \"created_by\" ignored",
            "unknown field \"dest_tabel_name\" ignored (did you mean dest_table_name?)",
            "unknown field \"load_typ\" ignored (did you mean load_type?)",
        ]
    );
    assert!(parse(base()).unwrap().warnings.is_empty());
}

#[test]
fn bad_threshold_port_and_columns() {
    let mut v = base();
    v["row_count_threshold"] = (-1).into();
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("row_count_threshold: must be a whole number, got \"-1\""),
        "the field is named: {err}"
    );
    let mut v = base();
    v["row_count_threshold"] = "lots".into();
    v["connection_params"]["port"] = "abc".into();
    v["selected_columns"] = serde_json::json!(["id", "id"]);
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("row_count_threshold: must be a whole number, got \"lots\""),
        "{err}"
    );
    assert!(
        err.contains("connection_params.port: must be a port number from 1 to 65535"),
        "{err}"
    );
    assert!(!err.contains("abc"), "no connection value is quoted: {err}");
    assert!(
        err.contains("selected_columns: lists \"id\" twice"),
        "{err}"
    );
}

#[test]
fn file_jobs_need_format_and_pattern() {
    let v =
        serde_json::json!({"source_type": "gcs", "dest_table_name": "t", "file_format": "xlsx"});
    let err = parse(v).unwrap_err().to_string();
    assert!(
        err.contains("file_format \"xlsx\" is not supported"),
        "{err}"
    );
    assert!(
        err.contains("file_pattern: is required for file sources"),
        "{err}"
    );
    let ok = serde_json::json!({"source_type": "gcs", "dest_table_name": "t", "file_format": "csv",
        "file_pattern": "transactions_*.csv", "file_path_prefix": "data/", "schema_fingerprint": "abc"});
    let spec = parse(ok.clone()).unwrap();
    let files = spec.files().unwrap();
    assert_eq!(files.format, FileFormat::Csv);
    assert!(files.load_latest_only);
    assert_eq!(files.schema_fingerprint.as_deref(), Some("abc"));
    assert_eq!(spec.table(), None);
}

#[test]
fn a_file_jobs_increment_is_its_new_files_and_timestamp_column_only_reports() {
    let mut v = serde_json::json!({"source_type": "local", "dest_table_name": "t",
        "file_format": "csv", "file_pattern": "*.csv", "load_type": "transactional"});
    assert_eq!(
        parse(v.clone()).unwrap().load,
        Load::Append {
            window: Window::NewFiles {
                watermark_column: None
            }
        }
    );
    v["timestamp_column"] = "at".into();
    v["last_sync_value"] = "2024-01-01".into();
    let spec = parse(v.clone()).unwrap();
    assert_eq!(
        spec.load,
        Load::Append {
            window: Window::NewFiles {
                watermark_column: Some("at".into())
            }
        }
    );
    assert_eq!(spec.timestamp_column(), Some("at"));
    assert_eq!(spec.load.column_window(), None);
    v["load_type"] = "merge".into();
    assert_eq!(
        parse(v).unwrap_err().to_string(),
        "invalid job config: load_type: merge is not supported for file sources (catalog or \
         transactional)"
    );
}

#[test]
fn secrets_never_print() {
    let mut v = base();
    v["connection_params"]["service_account_json"] = "{\"private_key\": \"KEY-123\"}".into();
    let spec = parse(v).unwrap();
    let debug = format!("{spec:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("KEY-123"),
        "{debug}"
    );
    let json = serde_json::to_string(&spec.connection).unwrap();
    assert!(
        !json.contains("hunter2") && !json.contains("KEY-123"),
        "{json}"
    );
    assert_eq!(format!("{}", Secret::new("x")), "***");
    // A parse error quotes the input position, not its content.
    let err = JobSpec::from_json("{\"connection_params\": {\"password\": \"hunter2\"").unwrap_err();
    assert!(!err.to_string().contains("hunter2"));
}

#[test]
fn dest_table_name_cannot_escape_the_destination() {
    let mut v = base();
    v["dest_table_name"] = "../etc".into();
    assert!(
        parse(v)
            .unwrap_err()
            .to_string()
            .contains("is not a table name")
    );
}

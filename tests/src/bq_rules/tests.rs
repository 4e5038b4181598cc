//! Each rule refusing a request it exists for, and letting through the one shardflow sends.

use serde_json::json;

use super::*;

fn column(name: &str, ty: &str, mode: &str) -> TableColumn {
    TableColumn {
        name: name.into(),
        ty: ty.into(),
        mode: mode.into(),
        description: None,
    }
}

fn pq(name: &str, kind: ParquetKind) -> ParquetColumn {
    ParquetColumn {
        name: name.into(),
        nullable: true,
        kind,
    }
}

fn parquet_file(columns: Vec<ParquetColumn>) -> SourceFile {
    SourceFile {
        uri: "gs://b/run/s00000/part-00000.parquet".into(),
        size: 1000,
        compression: FileCompression::None,
        parquet: Some(columns),
    }
}

fn text_file(name: &str, compression: FileCompression, size: u64) -> SourceFile {
    SourceFile {
        uri: format!("gs://b/{name}"),
        size,
        compression,
        parquet: None,
    }
}

fn facts(table: Vec<TableColumn>, files: Vec<SourceFile>) -> LoadFacts {
    LoadFacts {
        dataset_location: Some("US".into()),
        bucket_locations: BTreeMap::from([("b".into(), "US-CENTRAL1".into())]),
        table: Some(table),
        files,
    }
}

/// The load shardflow sends for a staged run.
fn parquet_load(disposition: &str) -> Value {
    json!({
        "sourceUris": ["gs://b/run/s00000/part-00000.parquet"],
        "sourceFormat": "PARQUET",
        "destinationTable": {"projectId": "p", "datasetId": "d", "tableId": "t"},
        "writeDisposition": disposition,
        "createDisposition": "CREATE_NEVER",
        "decimalTargetTypes": ["NUMERIC", "BIGNUMERIC"],
    })
}

fn rules(refusals: &[Refusal]) -> Vec<&'static str> {
    refusals.iter().map(|r| r.rule).collect()
}

#[test]
fn every_rule_is_documented_once() {
    let mut names: Vec<&str> = RULES.iter().map(|(n, _)| *n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), RULES.len());
    assert!(RULES.iter().all(|(_, quote)| !quote.is_empty()));
    assert!(quote("load.json_column.format").contains("CSV, Avro, or JSON format"));
}

#[test]
fn shardflows_own_parquet_load_passes() {
    let table = vec![
        column("id", "INT64", "REQUIRED"),
        column("amount", "NUMERIC", "NULLABLE"),
        column("big", "BIGNUMERIC", "NULLABLE"),
        column("name", "STRING", "NULLABLE"),
    ];
    let mut id = pq("id", ParquetKind::Other("INT64"));
    id.nullable = false;
    let file = parquet_file(vec![
        id,
        pq(
            "amount",
            ParquetKind::Decimal {
                precision: 20,
                scale: 0,
            },
        ),
        pq(
            "big",
            ParquetKind::Decimal {
                precision: 50,
                scale: 20,
            },
        ),
        pq("name", ParquetKind::Text),
    ]);
    for disposition in ["WRITE_TRUNCATE_DATA", "WRITE_APPEND"] {
        let refused = check_load(
            &parquet_load(disposition),
            &facts(table.clone(), vec![file.clone()]),
        );
        assert!(refused.is_empty(), "{disposition}: {refused:?}");
    }
}

#[test]
fn job_ids_are_checked() {
    assert_eq!(check_job_id("shardflow_r1_t_load_0123abcd-x"), None);
    for bad in ["", "has space", "dot.ted", "ü", &"x".repeat(1025)] {
        let refusal = check_job_id(bad).expect(bad);
        assert_eq!(
            (refusal.rule, refusal.answer),
            ("job.id.format", Answer::Invalid)
        );
    }
    let dup = duplicate_job("p", "US", "j1");
    assert_eq!(dup.answer, Answer::Duplicate);
    assert_eq!(dup.message, "Already Exists: Job p:US.j1");
}

#[test]
fn a_job_runs_where_its_dataset_is() {
    assert_eq!(check_job_location(Some("us"), Some("US")), None);
    assert_eq!(check_job_location(None, Some("EU")), None);
    let refused = check_job_location(Some("US"), Some("EU")).unwrap();
    assert_eq!(refused.rule, "job.location.dataset");
}

#[test]
fn source_uris_are_limited() {
    let mut load = parquet_load("WRITE_APPEND");
    let many: Vec<String> = (0..10_001)
        .map(|i| format!("gs://b/p/{i}.parquet"))
        .collect();
    load["sourceUris"] = json!(many);
    assert!(rules(&check_load(&load, &LoadFacts::default())).contains(&"load.source_uris.max"));
    load["sourceUris"] = json!(many[..10_000]);
    assert!(check_load(&load, &LoadFacts::default()).is_empty());

    for uri in ["gs://b/a*/b*.csv", "gs://b*/x.csv"] {
        load["sourceUris"] = json!([uri]);
        assert_eq!(
            rules(&check_load(&load, &LoadFacts::default())),
            ["load.source_uris.wildcard"],
            "{uri}"
        );
    }
    load["sourceUris"] = json!(["gs://b/x.csv#1700000000"]);
    assert_eq!(
        rules(&check_load(&load, &LoadFacts::default())),
        ["load.source_uris.generation"]
    );
}

#[test]
fn compression_is_one_per_job_gzip_only_and_under_4_gb() {
    let load = json!({"sourceUris": ["gs://b/*"], "sourceFormat": "CSV"});
    let mixed = LoadFacts {
        files: vec![
            text_file("a.csv", FileCompression::None, 10),
            text_file("b.csv.gz", FileCompression::Gzip, 10),
        ],
        ..Default::default()
    };
    assert_eq!(
        rules(&check_load(&load, &mixed)),
        ["load.compression.mixed"]
    );
    let zstd = LoadFacts {
        files: vec![text_file("a.csv.zst", FileCompression::Other("zstd"), 10)],
        ..Default::default()
    };
    assert_eq!(
        rules(&check_load(&load, &zstd)),
        ["load.compression.gzip_only"]
    );
    let huge = LoadFacts {
        files: vec![text_file("a.csv.gz", FileCompression::Gzip, (4 << 30) + 1)],
        ..Default::default()
    };
    assert_eq!(
        rules(&check_load(&load, &huge)),
        ["load.compression.gzip_size"]
    );
    let fine = LoadFacts {
        files: vec![
            text_file("a.csv.gz", FileCompression::Gzip, 4 << 30),
            text_file("b.csv.gz", FileCompression::Gzip, 10),
        ],
        ..Default::default()
    };
    assert!(check_load(&load, &fine).is_empty());
}

#[test]
fn buckets_must_be_colocated_with_the_dataset() {
    assert!(colocated("US", "US"));
    assert!(colocated("US", "US-CENTRAL1"));
    assert!(colocated("US", "us-west1"));
    assert!(colocated("EU", "europe-west4"));
    assert!(colocated("EU", "europe-central2"));
    assert!(colocated("europe-west1", "EUROPE-WEST1"));
    assert!(!colocated("EU", "US-CENTRAL1"));
    assert!(!colocated("EU", "europe-west2"));
    assert!(!colocated("us-central1", "US"));
    assert!(!colocated("europe-west1", "europe-west4"));
    let mut f = facts(vec![column("a", "STRING", "NULLABLE")], vec![]);
    f.dataset_location = Some("EU".into());
    let refused = check_load(&parquet_load("WRITE_APPEND"), &f);
    assert_eq!(rules(&refused), ["load.location.colocated"]);
    assert!(
        refused[0].message.contains("gs://b is in US-CENTRAL1"),
        "{refused:?}"
    );
}

#[test]
fn json_columns_do_not_load_from_parquet() {
    let table = vec![column("doc", "JSON", "NULLABLE")];
    let file = parquet_file(vec![pq("doc", ParquetKind::Text)]);
    let refused = check_load(
        &parquet_load("WRITE_APPEND"),
        &facts(table.clone(), vec![file]),
    );
    assert_eq!(rules(&refused), ["load.json_column.format"]);
    // CSV and newline-delimited JSON do fill JSON columns.
    for format in ["CSV", "NEWLINE_DELIMITED_JSON"] {
        let load = json!({"sourceUris": ["gs://b/x"], "sourceFormat": format});
        assert!(
            check_load(&load, &facts(table.clone(), vec![])).is_empty(),
            "{format}"
        );
    }
}

#[test]
fn decimals_need_their_target_types() {
    let (numeric, fits) = decimal_target(38, 9, &["NUMERIC".into()]);
    assert_eq!((numeric, fits), ("NUMERIC", true));
    let both = ["NUMERIC".to_string(), "BIGNUMERIC".to_string()];
    // The documentation's own examples.
    assert_eq!(decimal_target(38, 9, &both), ("NUMERIC", true));
    assert_eq!(decimal_target(39, 9, &both), ("BIGNUMERIC", true));
    assert_eq!(decimal_target(38, 10, &both), ("BIGNUMERIC", true));
    assert_eq!(decimal_target(76, 38, &both), ("BIGNUMERIC", true));
    assert_eq!(decimal_target(77, 38, &both), ("BIGNUMERIC", false));
    // The default list loads decimal(50,20) as NUMERIC, which cannot hold it.
    assert_eq!(
        decimal_target(50, 20, &["NUMERIC".into()]),
        ("NUMERIC", false)
    );

    let table = vec![column("big", "BIGNUMERIC", "NULLABLE")];
    let file = parquet_file(vec![pq(
        "big",
        ParquetKind::Decimal {
            precision: 50,
            scale: 20,
        },
    )]);
    let mut load = parquet_load("WRITE_APPEND");
    load.as_object_mut().unwrap().remove("decimalTargetTypes");
    let refused = check_load(&load, &facts(table.clone(), vec![file.clone()]));
    assert_eq!(rules(&refused), ["load.parquet.decimal_target_types"]);
    assert!(
        refused[0]
            .message
            .contains("loads it as NUMERIC, not the table's BIGNUMERIC"),
        "{refused:?}"
    );
    // decimal(12,2) into a BIGNUMERIC column: NUMERIC comes first.
    let small = parquet_file(vec![pq(
        "big",
        ParquetKind::Decimal {
            precision: 12,
            scale: 2,
        },
    )]);
    let refused = check_load(&parquet_load("WRITE_APPEND"), &facts(table, vec![small]));
    assert_eq!(rules(&refused), ["load.parquet.decimal_target_types"]);
}

#[test]
fn unsigned_64_bit_integers_load_as_int64_only() {
    let file = parquet_file(vec![pq("u", ParquetKind::UnsignedInt64)]);
    let refused = check_load(
        &parquet_load("WRITE_APPEND"),
        &facts(vec![column("u", "NUMERIC", "NULLABLE")], vec![file.clone()]),
    );
    assert_eq!(rules(&refused), ["load.parquet.unsigned"]);
    let into_int = check_load(
        &parquet_load("WRITE_APPEND"),
        &facts(vec![column("u", "INT64", "NULLABLE")], vec![file]),
    );
    assert!(into_int.is_empty(), "{into_int:?}");
}

#[test]
fn nanosecond_times_are_not_loaded() {
    let file = parquet_file(vec![pq("at", ParquetKind::Nanoseconds)]);
    let refused = check_load(
        &parquet_load("WRITE_APPEND"),
        &facts(vec![column("at", "TIMESTAMP", "NULLABLE")], vec![file]),
    );
    assert_eq!(rules(&refused), ["load.parquet.nanoseconds"]);
}

#[test]
fn parquet_column_names_are_plain_and_distinct_ignoring_case() {
    let file = parquet_file(vec![
        pq("order id", ParquetKind::Text),
        pq("a.b", ParquetKind::Text),
    ]);
    let refused = check_load(
        &parquet_load("WRITE_APPEND"),
        &LoadFacts {
            files: vec![file],
            ..Default::default()
        },
    );
    assert_eq!(
        rules(&refused),
        ["load.parquet.column_names", "load.parquet.column_names"]
    );
    let file = parquet_file(vec![
        pq("Amount", ParquetKind::Text),
        pq("amount", ParquetKind::Text),
    ]);
    let refused = check_load(
        &parquet_load("WRITE_APPEND"),
        &LoadFacts {
            files: vec![file],
            ..Default::default()
        },
    );
    assert_eq!(rules(&refused), ["load.parquet.case_collision"]);
}

#[test]
fn nullable_data_does_not_fill_a_required_column_without_relaxation() {
    let table = vec![column("id", "INT64", "REQUIRED")];
    let file = parquet_file(vec![pq("id", ParquetKind::Other("INT64"))]);
    let refused = check_load(
        &parquet_load("WRITE_APPEND"),
        &facts(table.clone(), vec![file.clone()]),
    );
    assert_eq!(rules(&refused), ["load.parquet.required"]);
    assert!(
        refused[0]
            .message
            .contains("changed mode from REQUIRED to NULLABLE")
    );
    let mut relaxed = parquet_load("WRITE_APPEND");
    relaxed["schemaUpdateOptions"] = json!(["ALLOW_FIELD_RELAXATION"]);
    assert!(check_load(&relaxed, &facts(table, vec![file])).is_empty());
}

#[test]
fn parquet_columns_in_another_order_than_the_table_are_refused_here() {
    let table = vec![
        column("a", "STRING", "NULLABLE"),
        column("b", "STRING", "NULLABLE"),
    ];
    let file = parquet_file(vec![pq("b", ParquetKind::Text), pq("a", ParquetKind::Text)]);
    let refused = check_load(&parquet_load("WRITE_APPEND"), &facts(table, vec![file]));
    assert_eq!(rules(&refused), ["load.parquet.by_position"]);
}

#[test]
fn write_truncate_may_not_rewrite_an_existing_schema() {
    let mut described = column("id", "INT64", "NULLABLE");
    described.description = Some("the key".into());
    let file = parquet_file(vec![pq("id", ParquetKind::Other("INT64"))]);
    // Same columns but a description the file's schema would drop.
    let refused = check_load(
        &parquet_load("WRITE_TRUNCATE"),
        &facts(vec![described.clone()], vec![file.clone()]),
    );
    assert_eq!(rules(&refused), ["load.write_truncate.schema"]);
    assert!(
        refused[0].message.contains("loses the description of id"),
        "{refused:?}"
    );
    // A retyped column (the table's STRING would become INT64).
    let refused = check_load(
        &parquet_load("WRITE_TRUNCATE"),
        &facts(vec![column("id", "STRING", "NULLABLE")], vec![file.clone()]),
    );
    assert!(
        refused
            .iter()
            .any(|r| r.rule == "load.write_truncate.schema"
                && r.message.contains("changes id from STRING to INT64")),
        "{refused:?}"
    );
    // WRITE_TRUNCATE_DATA keeps the schema, description and all.
    assert!(
        check_load(
            &parquet_load("WRITE_TRUNCATE_DATA"),
            &facts(vec![described], vec![file.clone()])
        )
        .is_empty()
    );
    // WRITE_TRUNCATE into an identical schema changes nothing.
    assert!(
        check_load(
            &parquet_load("WRITE_TRUNCATE"),
            &facts(vec![column("id", "INT64", "NULLABLE")], vec![file])
        )
        .is_empty()
    );
    let mut bad = parquet_load("WRITE_BOGUS");
    bad["sourceUris"] = json!([]);
    assert_eq!(
        rules(&check_load(&bad, &LoadFacts::default())),
        ["load.write_disposition.values"]
    );
}

#[test]
fn query_jobs_write_with_dml_not_a_destination_table() {
    assert!(check_query(&json!({"query": "INSERT INTO `p.d.t` SELECT 1"})).is_empty());
    let refused = check_query(&json!({
        "query": "SELECT 1",
        "destinationTable": {"projectId": "p", "datasetId": "d", "tableId": "t"},
        "writeDisposition": "WRITE_TRUNCATE_DATA",
    }));
    assert_eq!(rules(&refused), ["query.destination_table"]);
}

#[test]
fn copies_keep_to_their_documented_dispositions_and_schemas() {
    let copy = |disposition: Option<&str>| {
        let mut c = json!({
            "sourceTable": {"projectId": "p", "datasetId": "d", "tableId": "s"},
            "destinationTable": {"projectId": "p", "datasetId": "d", "tableId": "t"},
        });
        if let Some(d) = disposition {
            c["writeDisposition"] = json!(d);
        }
        c
    };
    let same = CopyFacts {
        source: Some(vec![column("a", "STRING", "NULLABLE")]),
        destination: Some(vec![column("a", "STRING", "NULLABLE")]),
    };
    assert!(check_copy(&copy(Some("WRITE_APPEND")), &same).is_empty());
    assert!(check_copy(&copy(Some("WRITE_TRUNCATE")), &same).is_empty());
    assert_eq!(
        rules(&check_copy(&copy(Some("WRITE_TRUNCATE_DATA")), &same)),
        ["copy.write_disposition.values"]
    );
    let mut described = same.clone();
    described.destination.as_mut().unwrap()[0].description = Some("kept?".into());
    assert_eq!(
        rules(&check_copy(&copy(Some("WRITE_TRUNCATE")), &described)),
        ["copy.write_truncate.schema"]
    );
    let reordered = CopyFacts {
        source: Some(vec![
            column("a", "STRING", "NULLABLE"),
            column("b", "STRING", "NULLABLE"),
        ]),
        destination: Some(vec![
            column("b", "STRING", "NULLABLE"),
            column("a", "STRING", "NULLABLE"),
        ]),
    };
    assert_eq!(
        rules(&check_copy(&copy(Some("WRITE_APPEND")), &reordered)),
        ["copy.by_position"]
    );
}

#[test]
fn table_columns_follow_the_naming_rules() {
    let table = |names: &[&str]| json!({"schema": {"fields": names.iter().map(|n| json!({"name": n, "type": "STRING"})).collect::<Vec<_>>()}});
    assert!(check_table(&table(&["id", "_private", "Amount_2"])).is_empty());
    assert_eq!(
        rules(&check_table(&table(&["Amount", "amount"]))),
        ["table.duplicate_columns"]
    );
    for bad in [
        "order id",
        "1st",
        "a-b",
        "ü",
        "_TABLE_x",
        "_partitiontime",
        "__ROOT__",
    ] {
        assert_eq!(
            rules(&check_table(&table(&[bad]))),
            ["table.column_names"],
            "{bad}"
        );
    }
    assert_eq!(
        rules(&check_table(&table(&[&"x".repeat(301)]))),
        ["table.column_names"]
    );
    assert!(check_table(&table(&[&"x".repeat(300)])).is_empty());
    let wide: Vec<String> = (0..10_001).map(|i| format!("c{i}")).collect();
    let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
    assert_eq!(rules(&check_table(&table(&wide))), ["table.column_count"]);
    let long = json!({"schema": {"fields": [{"name": "a", "type": "STRING", "description": "d".repeat(1025)}]}});
    assert_eq!(rules(&check_table(&long)), ["table.description_length"]);
}

#[test]
fn datasets_are_created_somewhere_named() {
    assert!(
        check_dataset(&json!({"datasetReference": {"datasetId": "d"}, "location": "EU"})).is_none()
    );
    let refused = check_dataset(&json!({"datasetReference": {"datasetId": "d"}})).unwrap();
    assert_eq!(refused.rule, "dataset.location");
    assert!(
        refused
            .message
            .contains("Dataset d is created without a location")
    );
}

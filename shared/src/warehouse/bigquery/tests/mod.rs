use super::*;
use arrow::datatypes::TimeUnit;

fn nullable(dt: DataType) -> Field {
    Field::new("c", dt, true)
}

fn with_source_type(dt: DataType, source_type: &str) -> Field {
    nullable(dt).with_metadata(HashMap::from([(
        SOURCE_TYPE_KEY.to_string(),
        source_type.to_string(),
    )]))
}

#[test]
fn type_map_every_entry() {
    let tz = Some("UTC".into());
    let cases = [
        (nullable(DataType::Boolean), "BOOL"),
        (nullable(DataType::Int8), "INT64"),
        (nullable(DataType::Int16), "INT64"),
        (nullable(DataType::Int32), "INT64"),
        (nullable(DataType::Int64), "INT64"),
        (nullable(DataType::UInt8), "INT64"),
        (nullable(DataType::UInt16), "INT64"),
        (nullable(DataType::UInt32), "INT64"),
        (nullable(DataType::Float32), "FLOAT64"),
        (nullable(DataType::Float64), "FLOAT64"),
        (nullable(DataType::Utf8), "STRING"),
        (nullable(DataType::LargeUtf8), "STRING"),
        (with_source_type(DataType::Utf8, "uuid"), "STRING"),
        (with_source_type(DataType::Utf8, "numeric"), "STRING"),
        (with_source_type(DataType::Utf8, "json"), "JSON"),
        (with_source_type(DataType::Utf8, "jsonb"), "JSON"),
        (with_source_type(DataType::LargeUtf8, "json"), "JSON"),
        (with_source_type(DataType::LargeUtf8, "jsonb"), "JSON"),
        (nullable(DataType::Binary), "BYTES"),
        (nullable(DataType::LargeBinary), "BYTES"),
        (nullable(DataType::Date32), "DATE"),
        (
            nullable(DataType::Timestamp(TimeUnit::Microsecond, None)),
            "DATETIME",
        ),
        (
            nullable(DataType::Timestamp(TimeUnit::Millisecond, None)),
            "DATETIME",
        ),
        (
            nullable(DataType::Timestamp(TimeUnit::Microsecond, tz.clone())),
            "TIMESTAMP",
        ),
        (
            nullable(DataType::Timestamp(
                TimeUnit::Nanosecond,
                Some("+02:00".into()),
            )),
            "TIMESTAMP",
        ),
        (nullable(DataType::Time64(TimeUnit::Microsecond)), "TIME"),
        (nullable(DataType::Time64(TimeUnit::Nanosecond)), "TIME"),
        (nullable(DataType::Decimal128(12, 2)), "NUMERIC"),
        (nullable(DataType::Decimal32(9, 2)), "NUMERIC"),
        (nullable(DataType::Decimal64(18, 4)), "NUMERIC"),
        (nullable(DataType::Decimal256(20, 0)), "NUMERIC"),
        (nullable(DataType::Decimal128(38, 10)), "BIGNUMERIC"),
        (nullable(DataType::Decimal256(48, 10)), "BIGNUMERIC"),
        (nullable(DataType::Decimal256(76, 38)), "BIGNUMERIC"),
    ];
    for (field, want) in cases {
        assert_eq!(
            bigquery_type(&field).unwrap(),
            (want, "NULLABLE"),
            "{} {:?}",
            field.data_type(),
            field.metadata()
        );
    }
}

#[test]
fn decimal_bounds() {
    let ty = |p, s| bigquery_type(&nullable(DataType::Decimal256(p, s))).map(|t| t.0);
    // NUMERIC: scale <= 9 and <= 29 integer digits.
    assert_eq!(ty(38, 9).unwrap(), "NUMERIC");
    assert_eq!(ty(29, 0).unwrap(), "NUMERIC");
    assert_eq!(ty(30, 0).unwrap(), "BIGNUMERIC");
    assert_eq!(ty(20, 10).unwrap(), "BIGNUMERIC");
    // BIGNUMERIC: scale <= 38 and <= 38 integer digits.
    assert_eq!(ty(38, 0).unwrap(), "BIGNUMERIC");
    assert_eq!(ty(76, 38).unwrap(), "BIGNUMERIC");
    for (p, s) in [(39, 0), (76, 37), (40, 39), (10, -2)] {
        let err = ty(p, s).unwrap_err().to_string();
        assert!(
            err.contains("column \"c\"") && err.contains("no exact BigQuery type"),
            "decimal({p},{s}): {err}"
        );
    }
}

#[test]
fn unmapped_types_name_the_column() {
    for dt in [
        DataType::Null,
        DataType::Float16,
        DataType::Date64,
        DataType::Time32(TimeUnit::Second),
        DataType::Utf8View,
        DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
    ] {
        let field = Field::new("weird", dt.clone(), true);
        let err = bigquery_type(&field).unwrap_err().to_string();
        assert!(
            err.starts_with("warehouse: column \"weird\": Arrow type"),
            "{dt}: {err}"
        );
    }
}

#[test]
fn nullability_sets_the_mode() {
    let required = Field::new("id", DataType::Int64, false);
    assert_eq!(bigquery_type(&required).unwrap(), ("INT64", "REQUIRED"));
    let column = bigquery_field(&required).unwrap();
    assert_eq!(column.name, "id");
    assert_eq!(column.mode.as_deref(), Some("REQUIRED"));
    assert_eq!(type_name(&column.r#type), "INT64");
    // What goes on the wire is the standard SQL name.
    let doc = bigquery_field(&with_source_type(DataType::Utf8, "jsonb")).unwrap();
    assert_eq!(
        serde_json::to_value(&doc).unwrap(),
        serde_json::json!({"name": "c", "type": "JSON", "mode": "NULLABLE"})
    );
}

#[test]
fn legacy_type_names_fold() {
    for (legacy, standard) in [
        ("INTEGER", "INT64"),
        ("FLOAT", "FLOAT64"),
        ("BOOLEAN", "BOOL"),
        ("RECORD", "STRUCT"),
        ("BIGNUMERIC", "BIGNUMERIC"),
    ] {
        let ty: FieldType = serde_json::from_value(serde_json::json!(legacy)).unwrap();
        assert_eq!(type_name(&ty), standard);
    }
}

fn column(name: &str, ty: FieldType) -> TableFieldSchema {
    TableFieldSchema::new(name, ty)
}

#[test]
fn schema_drift_names_the_columns() {
    let existing = [
        column("id", FieldType::Integer),
        column("Name", FieldType::String),
        column("gone", FieldType::Date),
        column("amount", FieldType::Numeric),
    ];
    let same = [
        column("amount", FieldType::Numeric),
        column("id", FieldType::Int64),
        column("name", FieldType::String),
        column("gone", FieldType::Date),
    ];
    let check = |staged: &[TableFieldSchema], allow| {
        super::super::check_columns(
            "p.d.t",
            &named_types(&existing),
            &named_types(staged),
            allow,
        )
    };
    check(&same, false).unwrap();
    let staged = [
        column("id", FieldType::Int64),
        column("name", FieldType::String),
        column("amount", FieldType::Bignumeric),
        column("extra", FieldType::Json),
    ];
    let err = check(&staged, true).unwrap_err().to_string();
    assert_eq!(
        err,
        "warehouse: schema drift: table p.d.t exists with other columns than the staged \
         parts (added: extra JSON; removed: gone DATE; changed: amount NUMERIC -> BIGNUMERIC); \
         nothing was loaded"
    );
    // schema_policy "add_columns": new columns are added, missing ones load as NULL.
    let widened = [
        column("id", FieldType::Int64),
        column("name", FieldType::String),
        column("amount", FieldType::Numeric),
        column("extra", FieldType::Json),
    ];
    check(&widened, true).unwrap();
    assert_eq!(
        check(&widened, false).unwrap_err().to_string(),
        "warehouse: schema drift: table p.d.t exists with other columns than the staged \
         parts (added: extra JSON; removed: gone DATE); nothing was loaded"
    );
}

#[test]
fn bigquery_url() {
    assert_eq!(
        parse_bigquery_url("bigquery://test-proj/raw_data").unwrap(),
        ("test-proj".to_string(), "raw_data".to_string())
    );
    assert_eq!(
        parse_bigquery_url("bigquery://example.com:proj/raw_data/").unwrap(),
        ("example.com:proj".to_string(), "raw_data".to_string())
    );
    for bad in [
        "bq://p/d",
        "bigquery://p",
        "bigquery:///d",
        "bigquery://p/",
        "bigquery://p/d-x",
        "bigquery://p/d/e",
        "bigquery://p`x/d",
    ] {
        let err = parse_bigquery_url(bad).unwrap_err().to_string();
        assert!(err.starts_with("warehouse: "), "{bad}: {err}");
    }
}

#[test]
fn emulator_host_with_or_without_scheme() {
    for (host, want) in [
        ("127.0.0.1:9050", Some("http://127.0.0.1:9050")),
        ("http://127.0.0.1:9050", Some("http://127.0.0.1:9050")),
        ("http://127.0.0.1:9050/", Some("http://127.0.0.1:9050")),
        ("https://bq.local", Some("https://bq.local")),
        ("  ", None),
    ] {
        assert_eq!(emulator_base_url(host).as_deref(), want, "{host:?}");
    }
}

#[test]
fn job_ids_are_deterministic_and_clean() {
    let id = job_id("raw_data", "run-42", "orders", "load");
    assert!(id.starts_with("shardflow_run-42_orders_load_"), "{id}");
    assert_eq!(id.len(), "shardflow_run-42_orders_load_".len() + 12);
    assert_eq!(id, job_id("raw_data", "run-42", "orders", "load"));
    let valid = |id: &str| {
        id.len() <= MAX_ID_LEN
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    // Every input tells ids apart: the dataset (job ids are per project), the run, the
    // table, the step, and names that clean or split alike.
    let others = [
        job_id("other", "run-42", "orders", "load"),
        job_id("raw_data", "run-43", "orders", "load"),
        job_id("raw_data", "run-42", "orders2", "load"),
        job_id("raw_data", "run-42", "orders", "copy"),
        job_id("raw_data", "run/42", "orders", "load"),
        job_id("raw_data", "run", "42_orders", "load"),
    ];
    for other in &others {
        assert!(valid(other), "{other}");
        assert_ne!(&id, other);
    }
    assert!(
        job_id("d", "2024/01/02 é", "orders", "stage00002")
            .starts_with("shardflow_2024_01_02___orders_stage00002_")
    );
    // Long names are cut, leaving room for the retry suffix.
    let long = job_id("d", &"r".repeat(900), &"t".repeat(1024), "copy");
    assert!(long.len() <= MAX_JOB_BASE_LEN, "{}", long.len());
    assert!(valid(&attempt_id(&long, MAX_ATTEMPTS)));
    assert_ne!(
        long,
        job_id("d", &"r".repeat(900), &"t".repeat(1023), "copy")
    );
    assert_eq!(attempt_id("x", 0), "x");
    assert_eq!(attempt_id("x", 2), "x_retry2");
}

#[test]
fn a_job_under_our_id_must_write_our_table() {
    let load = |dataset: &str| JobConfiguration {
        load: Some(JobConfigurationLoad {
            destination_table: Some(TableReference::new("p", dataset, "t")),
            ..Default::default()
        }),
        ..Default::default()
    };
    let job = |dataset: &str| Job {
        job_reference: Some(JobReference {
            job_id: Some("j".into()),
            ..Default::default()
        }),
        configuration: Some(load(dataset)),
        ..Default::default()
    };
    check_destination(&job("d"), &load("d")).unwrap();
    assert_eq!(
        check_destination(&job("e"), &load("d"))
            .unwrap_err()
            .to_string(),
        "warehouse: BigQuery job j already exists but writes p.e.t, not p.d.t; not using it"
    );
}

#[test]
fn staging_table_names() {
    assert_eq!(staging_table_name("orders", "42"), "orders__shardflow_42");
    let s = staging_table_name("orders", "run-42");
    assert!(s.starts_with("orders__shardflow_run_42_"), "{s}");
    assert_ne!(s, staging_table_name("orders", "run_42"));
    let long = staging_table_name(&"t".repeat(1024), "42");
    assert!(long.len() <= MAX_ID_LEN);
}

#[test]
fn unsigned_64_bit_integers_have_no_column() {
    let err = bigquery_type(&nullable(DataType::UInt64))
        .unwrap_err()
        .to_string();
    assert!(err.contains("staged as decimal(20, 0)"), "{err}");
    // What sources stage instead loads as NUMERIC.
    assert_eq!(
        bigquery_type(&nullable(DataType::Decimal128(20, 0)))
            .unwrap()
            .0,
        "NUMERIC"
    );
}

#[test]
fn the_token_is_good_for_cloud_storage_too() {
    assert_eq!(
        OAUTH_SCOPE,
        "https://www.googleapis.com/auth/cloud-platform"
    );
    assert_eq!(DECIMAL_TARGET_TYPES, ["NUMERIC", "BIGNUMERIC"]);
}

#[test]
fn buckets_feed_datasets_in_their_location() {
    assert!(colocated("US", "us"));
    assert!(colocated("US", "US-CENTRAL1"));
    assert!(colocated("US", "NAM4"));
    assert!(colocated("EU", "EUROPE-WEST4"));
    assert!(colocated("europe-west1", "EUROPE-WEST1"));
    // A region inside the dataset's multi-region loads (at a transfer charge).
    assert!(colocated("US", "US-WEST1"));
    assert!(colocated("EU", "EUROPE-CENTRAL2"));
    assert!(!colocated("EU", "EUROPE-WEST2"));
    assert!(!colocated("EU", "US-CENTRAL1"));
    assert!(!colocated("US", "EUROPE-WEST4"));
    assert!(!colocated("us-central1", "US"));
    assert!(!colocated("europe-west1", "EUROPE-WEST4"));
}

#[test]
fn required_columns_need_values_from_the_source() {
    let field = |name: &str, mode: &str| TableFieldSchema {
        mode: Some(mode.into()),
        ..TableFieldSchema::new(name, FieldType::Int64)
    };
    let table = [field("id", "REQUIRED"), field("note", "NULLABLE")];
    check_modes(
        "t",
        &table,
        &[field("ID", "REQUIRED"), field("note", "NULLABLE")],
    )
    .unwrap();
    check_modes(
        "t",
        &[field("note", "NULLABLE")],
        &[field("note", "REQUIRED")],
    )
    .unwrap();
    let err = check_modes("p.d.t", &table, &[field("id", "NULLABLE")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "warehouse: table p.d.t has REQUIRED columns the source may leave NULL: id (nullable in \
         the source); make them NULLABLE in BigQuery (ALTER TABLE … ALTER COLUMN … DROP NOT \
         NULL) or NOT NULL in the source; nothing was loaded"
    );
    let err = check_modes("t", &table, &[field("note", "NULLABLE")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("id (the source has no such column)"), "{err}");
}

#[test]
fn staging_tables_hold_json_as_text() {
    let json = TableFieldSchema::new("doc", FieldType::Json);
    let id = TableFieldSchema::new("id", FieldType::Int64);
    let staged = staging_columns(&[id, json]);
    assert_eq!(type_name(&staged[0].r#type), "INT64");
    assert_eq!(type_name(&staged[1].r#type), "STRING");
    assert_eq!(staged[1].name, "doc");
}

async fn offline_warehouse() -> BigQueryWarehouse {
    let client = ClientBuilder::new()
        .with_v2_base_url("http://127.0.0.1:9/bigquery/v2".into())
        .build_from_authenticator(Arc::new(Anonymous))
        .await
        .unwrap();
    BigQueryWarehouse::from_client(client, "p", "d").unwrap()
}

#[tokio::test]
async fn an_unreachable_bigquery_is_named_with_the_cause() {
    let port = crate::net::closed_port();
    let client = ClientBuilder::new()
        .with_v2_base_url(format!("http://127.0.0.1:{port}/bigquery/v2"))
        .build_from_authenticator(Arc::new(Anonymous))
        .await
        .unwrap();
    let wh = BigQueryWarehouse::from_client(client, "p", "d").unwrap();
    let err = wh.get_table("orders").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "warehouse: cannot read table p.d.orders: BigQuery at http://127.0.0.1:{port}: \
             connection refused (nothing listens there)"
        )
    );
}

#[tokio::test]
async fn table_names() {
    let wh = offline_warehouse().await;
    wh.check_table_name("orders_2024-01").unwrap();
    for bad in ["", "a.b", "a`b", "naïve", "x__shardflow_1"] {
        assert!(wh.check_table_name(bad).is_err(), "{bad:?}");
    }
    assert!(wh.check_table_name(&"t".repeat(1025)).is_err());
}

#[cfg(feature = "service-tests")]
mod emulated;

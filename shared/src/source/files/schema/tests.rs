#[test]
fn json_integers_past_int64_are_not_taken_for_floats() {
    let lines = b"{\"a\": 18446744073709551615, \"b\": 1.5, \"c\": 1}\n{\"a\": 1, \"b\": 18446744073709551615, \"c\": null}\n";
    let schema = Schema::new(vec![
        Field::new("a", DataType::Float64, true),
        Field::new("b", DataType::Float64, true),
        Field::new("c", DataType::Int64, true),
    ]);
    let wide = wide_integer_keys(lines, &schema);
    // a: integers, one past INT64; b: a real float among them; c: inferred an integer.
    assert_eq!(wide, ["a".to_string()].into_iter().collect());
    let (columns, rows) = sample_json(lines, "file:///x.json").unwrap();
    assert_eq!(rows, 2);
    let types: Vec<(&str, &str)> = columns
        .iter()
        .map(|c| (c.name.as_str(), c.bigquery_type.as_str()))
        .collect();
    // c: an integer and a null are float64 to read_json, as to the seed.
    assert_eq!(
        types,
        [("a", "NUMERIC"), ("b", "FLOAT64"), ("c", "FLOAT64")]
    );
}

#[test]
fn json_errors_name_the_line_that_is_not_an_object() {
    let err = |sample: &[u8]| {
        sample_json(sample, "gs://b/x.json")
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(b"{\"a\": 1}\n\n{\"a\": 2}\n{\"a\": 3,, }\n{\"a\": 4}\n"),
        "gs://b/x.json, line 4: not JSON: key must be a string at column 9"
    );
    assert_eq!(
        err(b"{\"a\": 1}\n[1, 2]\n"),
        "gs://b/x.json, line 2: a JSON array where an object (one row) belongs"
    );
    // In a top-level array the count is of elements, whatever the lines.
    assert_eq!(
        err(b"[\n  {\"a\": 1},\n  {\"a\":\n    2},\n  7\n]\n"),
        "gs://b/x.json, element 3: a JSON number where an object (one row) belongs"
    );
}

#[test]
fn repeated_header_names_are_made_distinct_as_pandas_does() {
    let names =
        |list: &[&str]| dedup_names(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    // What pandas' read_csv gives for each header (pandas 3.1, C engine).
    assert_eq!(names(&["id", "name", "name"]), ["id", "name", "name.1"]);
    assert_eq!(names(&["a", "a", "a", "b"]), ["a", "a.1", "a.2", "b"]);
    assert_eq!(names(&["a", "a", "a.1"]), ["a", "a.2", "a.1"]);
    assert_eq!(names(&["a.1", "a", "a"]), ["a.1", "a", "a.2"]);
    assert_eq!(names(&["a", "a.1", "a", "a"]), ["a", "a.1", "a.2", "a.3"]);
    assert_eq!(
        names(&["x", "x", "x.1", "x.2", "x"]),
        ["x", "x.3", "x.1", "x.2", "x.4"]
    );
    assert_eq!(
        names(&["b.1", "b", "b", "b.1"]),
        ["b.1", "b", "b.2", "b.1.1"]
    );
}

use super::json::wide_integer_keys;
use super::*;

#[test]
fn fingerprints_are_the_seeds() {
    // hashlib.md5("id:INT64|amount:FLOAT64".encode()).hexdigest()
    assert_eq!(
        fingerprint([("id", "INT64"), ("amount", "FLOAT64")]),
        "d71a31d8764a032d1ceab178643b3e98"
    );
}

#[test]
fn types_fold_and_map() {
    assert_eq!(canonical_type("integer"), Some("INT64"));
    assert_eq!(canonical_type("FLOAT"), Some("FLOAT64"));
    assert_eq!(canonical_type("BOOLEAN"), Some("BOOL"));
    assert_eq!(canonical_type("RECORD"), None);
    assert_eq!(
        arrow_type_of("TIMESTAMP"),
        Some(DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("UTC".into())
        ))
    );
    assert_eq!(arrow_type_of("NUMERIC"), Some(DataType::Decimal128(38, 9)));
    for ty in [
        "INT64",
        "FLOAT64",
        "BOOL",
        "STRING",
        "BYTES",
        "TIMESTAMP",
        "DATE",
        "DATETIME",
        "TIME",
        "NUMERIC",
        "BIGNUMERIC",
    ] {
        let field = Field::new("c", arrow_type_of(ty).unwrap(), true);
        assert_eq!(
            crate::warehouse::bigquery::bigquery_type(&field).unwrap().0,
            ty
        );
    }
}

fn found(name: &str, arrow: &str, bq: &str) -> DetectedColumn {
    DetectedColumn {
        name: name.into(),
        dtype: arrow.into(),
        arrow_type: arrow.into(),
        bigquery_type: bq.into(),
        bigquery_mode: "NULLABLE".into(),
        sample_values: vec![],
        nullable: true,
    }
}

#[test]
fn what_loads_as_what() {
    assert!(loads_as("Int64", "INT64", "FLOAT64"));
    assert!(!loads_as("Float64", "FLOAT64", "INT64"));
    assert!(loads_as("Null", "STRING", "INT64"));
    assert!(loads_as("Date32", "TIMESTAMP", "DATE"));
    assert!(!loads_as("Timestamp(s)", "TIMESTAMP", "DATE"));
    assert!(loads_as("Timestamp(s)", "TIMESTAMP", "DATETIME"));
    assert!(!loads_as("Utf8", "STRING", "BOOL"));
}

#[test]
fn json_columns_follow_the_objects_key_order() {
    let sample = br#"{"zeta": 1, "alpha": "a", "mid": true}
{"zeta": 2, "later": 1.5, "alpha": "b"}
"#;
    let (columns, rows) = sample_json(sample, "mem://x.json").unwrap();
    let named: Vec<(&str, &str)> = columns
        .iter()
        .map(|c| (c.name.as_str(), c.bigquery_type.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            ("zeta", "INT64"),
            ("alpha", "STRING"),
            // true and a missing key: read_json makes that float64 (1.0, NaN).
            ("mid", "FLOAT64"),
            ("later", "FLOAT64")
        ]
    );
    assert_eq!(rows, 2);
}

#[test]
fn detected_columns_widen_across_files() {
    let newest = vec![
        found("id", "Int64", "INT64"),
        found("amount", "Int64", "INT64"),
        found("note", "Null", "STRING"),
        found("flag", "Boolean", "BOOL"),
    ];
    let older = vec![
        found("id", "Int64", "INT64"),
        found("amount", "Float64", "FLOAT64"),
        found("note", "Utf8", "STRING"),
        found("flag", "Utf8", "STRING"),
    ];
    let unified = unify(&newest, &[&older]);
    let text: Vec<String> = unified.iter().map(|(n, t)| format!("{n}:{t}")).collect();
    // BOOL against STRING stays as detected: that difference is drift.
    assert_eq!(
        text,
        vec!["id:INT64", "amount:FLOAT64", "note:STRING", "flag:BOOL"]
    );
}

#[test]
fn drift_names_added_removed_and_changed_columns() {
    let expected = vec![
        ("id".to_string(), "INT64".to_string()),
        ("amount".to_string(), "FLOAT64".to_string()),
        ("note".to_string(), "STRING".to_string()),
        ("at".to_string(), "TIMESTAMP".to_string()),
    ];
    // Integers load as FLOAT64, anything as STRING, an empty column as anything.
    let same = vec![
        found("id", "Int64", "INT64"),
        found("amount", "Int64", "INT64"),
        found("note", "Int64", "INT64"),
        found("at", "Null", "STRING"),
    ];
    assert!(drift(&expected, &same, true).is_empty());
    let other = vec![
        found("id", "Utf8", "STRING"),
        found("amount", "Float64", "FLOAT64"),
        found("extra", "Boolean", "BOOL"),
    ];
    let d = drift(&expected, &other, false);
    assert_eq!(
        d.describe(),
        "added: extra BOOL; removed: note, at; changed: id INT64 -> STRING"
    );
    // Text that does not parse fails the load on its line instead.
    assert_eq!(
        drift(&expected, &other, true).describe(),
        "added: extra BOOL; removed: note, at"
    );
}

use super::*;

fn kind(fields: &[&str]) -> ColumnKind {
    csv_column_kind(fields.iter().copied())
}

#[test]
fn column_types_follow_pandas_read_csv() {
    assert!(NA_VALUES.iter().all(|v| is_na(v)));
    assert!(!is_na("na") && !is_na(" NA") && !is_na("NA "));
    assert_eq!(kind(&["1", "2"]), ColumnKind::Int64);
    assert_eq!(kind(&[" 1", "+2", "00012"]), ColumnKind::Int64);
    // A missing value makes integers float64 (NaN is a float).
    assert_eq!(kind(&["1", ""]), ColumnKind::Float64);
    assert_eq!(kind(&["NA", "1"]), ColumnKind::Float64);
    assert_eq!(kind(&["9223372036854775808", "1"]), ColumnKind::UInt64);
    assert_eq!(kind(&["18446744073709551616", "1"]), ColumnKind::Object);
    assert_eq!(
        kind(&["1.", ".5", "1e3", "-inf", "Infinity", "inF"]),
        ColumnKind::Float64
    );
    assert_eq!(kind(&["nan", "1.5"]), ColumnKind::Float64);
    assert_eq!(kind(&["0x10", "1"]), ColumnKind::Object);
    assert_eq!(kind(&["1_000", "2"]), ColumnKind::Object);
    assert_eq!(kind(&["True", "false", "FALSE"]), ColumnKind::Bool);
    // A missing boolean makes the column object, and objects of True/False are no dates.
    assert_eq!(kind(&["True", ""]), ColumnKind::Object);
    assert_eq!(kind(&["TRUE", "1"]), ColumnKind::Object);
    assert_eq!(kind(&["yes", "no"]), ColumnKind::Object);
    assert_eq!(kind(&["", "NULL"]), ColumnKind::Float64);
    assert_eq!(kind(&["None", "x"]), ColumnKind::Object);
    assert_eq!(kind(&["2012/01/01", "2012/01/02"]), ColumnKind::Datetime);
}

#[test]
fn formats_are_guessed_as_pandas_guesses_them() {
    let cases = [
        ("2012/01/01", Some("%Y/%m/%d")),
        ("2010/01/01 00:00", Some("%Y/%m/%d %H:%M")),
        ("Jan 1 2000", Some("%b %d %Y")),
        ("2020-01-01T10:00:00Z", Some("%Y-%m-%dT%H:%M:%S%z")),
        (
            "2020-01-01T10:00:00.123+02:00",
            Some("%Y-%m-%dT%H:%M:%S.%f%z"),
        ),
        ("2020-01-01 10:00:00.123456", Some("%Y-%m-%d %H:%M:%S.%f")),
        ("13/2/2020", Some("%d/%m/%Y")),
        ("1/2/2020", Some("%m/%d/%Y")),
        ("01.02.2020", Some("%m.%d.%Y")),
        ("20200101", Some("%Y%m%d")),
        ("2020", Some("%Y")),
        ("2020-01", Some("%Y-%m")),
        ("January 5, 2020", Some("%B %d, %Y")),
        ("5 January 2020", Some("%d %B %Y")),
        ("2020-01-01 10:00:00 UTC", Some("%Y-%m-%d %H:%M:%S %Z")),
        ("2020-01-01T10:00:00+0200", Some("%Y-%m-%dT%H:%M:%S%z")),
        ("2020-01-01 10:00:00-05", Some("%Y-%m-%d %H:%M:%S%z")),
        ("2020-01-01T10", Some("%Y-%m-%dT%H")),
        ("Jan-1-1995", Some("%b-%d-%Y")),
        ("01-Jan-1995", Some("%d-%b-%Y")),
        ("Jan/1/1995", Some("%b/%d/%Y")),
        ("1995-Jan-01", Some("%Y-%b-%d")),
        ("1974Q1", None),
        ("Jan-1995", None),
        ("10:30", None),
        ("Jan 2020", None),
        ("01/02/20", None),
        ("12/31/1999 11:59 PM", None),
    ];
    for (value, expected) in cases {
        assert_eq!(guess_format(value).as_deref(), expected, "{value}");
    }
}

#[test]
fn columns_parse_as_to_datetime_parses_them() {
    let rule = |values: &[&str]| DatetimeRule::for_column(values.iter().copied());
    // Every value must match the first one's format.
    assert!(rule(&["2020-01-05", "2020-1-5"]).is_some());
    assert!(rule(&["2020-01-01", "2020-01-01 10:00"]).is_none());
    assert!(rule(&["1/2/2020", "13/2/2020"]).is_none());
    assert!(rule(&["13/2/2020", "1/2/2020"]).is_some());
    assert!(rule(&["Jan 1 2000", "jan 1 2000"]).is_some());
    assert!(rule(&["Jan 1 2000", "January 1 2000"]).is_none());
    assert!(rule(&["2020-01-01T10:00:00Z", "2020-01-01T10:00:00+02:00"]).is_some());
    assert!(rule(&["2020-01-01T10:00:00", "2020-01-01T10:00:00Z"]).is_none());
    assert!(rule(&["2020-02-30"]).is_none());
    assert!(rule(&["1677-01-01"]).is_none());
    assert!(rule(&["a", "b"]).is_none());
    assert!(rule(&["1.5", "x"]).is_none());
    assert!(rule(&["2020", "abc"]).is_none());
    assert!(rule(&["Monday", "Tuesday"]).is_none());
    // dateutil, value by value.
    assert!(rule(&["11/11/07", "12/1/07"]).is_some());
    assert!(rule(&["12/31/1999 11:59 PM", "1/1/2000 1:00 AM"]).is_some());
    assert!(rule(&["March 2020", "April 2020"]).is_some());
    assert!(rule(&["10:30", "11:00"]).is_some());
    assert!(rule(&["1974Q1", "1974q2", "2Q-1974", "74Q1"]).is_some());
    assert!(rule(&["Jan-1995", "Feb-1995"]).is_some());
    assert!(rule(&["1974Q5"]).is_none());
    // dateutil reads a four-digit first number as the year.
    assert!(rule(&["2020-01-02 10:00 PM", "2020-12-31 1:00 PM"]).is_some());
    // An offset past 23:59 is none.
    assert!(rule(&["2020-01-01T10:00:00+05:75"]).is_none());

    let today = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
    let micros = |rule: &DatetimeRule, v: &str| rule.parse(v, today).unwrap().utc_micros();
    let iso = DatetimeRule::for_first_value("2020-01-01T10:00:00+02:00");
    assert_eq!(
        micros(&iso, "2020-01-01T10:00:00+02:00"),
        1_577_865_600_000_000
    );
    assert_eq!(micros(&iso, "2020-01-01T08:00:00Z"), 1_577_865_600_000_000);
    let each = DatetimeRule::EachValue;
    assert_eq!(
        each.parse("12/31/1999 11:59 PM", today)
            .unwrap()
            .local
            .to_string(),
        "1999-12-31 23:59:00"
    );
    assert_eq!(
        each.parse("2Q-1974", today).unwrap().local.to_string(),
        "1974-04-01 00:00:00"
    );
    assert_eq!(
        each.parse("74Q1", today).unwrap().local.to_string(),
        "2074-01-01 00:00:00"
    );
    assert_eq!(
        each.parse("11/11/07", today).unwrap().local.to_string(),
        "2007-11-11 00:00:00"
    );
    assert_eq!(
        each.parse("10:30", today).unwrap().local.to_string(),
        "2026-12-02 10:30:00"
    );
    let err = DatetimeRule::for_first_value("2020-01-01").parse("2020-01-01 10:00", today);
    assert_eq!(err.unwrap_err(), "has \" 10:00\" left over");
}

#[test]
fn text_loads_into_the_jobs_types_by_pandas_rules() {
    use arrow::array::{
        Array, BooleanArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };
    use arrow::datatypes::{DataType, TimeUnit};
    let today = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
    let text = |v: &[&str]| StringArray::from(v.to_vec());
    let mut csv = ColumnReader::new(true);
    let ints = csv
        .convert(&text(&[" 1", "NA", "+3", ""]), &DataType::Int64, today)
        .unwrap();
    let ints = ints.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!(
        ints.iter().collect::<Vec<_>>(),
        [Some(1), None, Some(3), None]
    );
    let floats = csv
        .convert(
            &text(&["1e3", "-inf", "nan", "#N/A"]),
            &DataType::Float64,
            today,
        )
        .unwrap();
    let floats = floats.as_any().downcast_ref::<Float64Array>().unwrap();
    assert_eq!(
        floats.iter().collect::<Vec<_>>(),
        [Some(1000.0), Some(f64::NEG_INFINITY), None, None]
    );
    let bools = csv
        .convert(&text(&["True", "FALSE", "null"]), &DataType::Boolean, today)
        .unwrap();
    let bools = bools.as_any().downcast_ref::<BooleanArray>().unwrap();
    assert_eq!(
        bools.iter().collect::<Vec<_>>(),
        [Some(true), Some(false), None]
    );
    // pandas' markers are NULL in text columns too ("NA" included), as the seed read them.
    let strings = csv
        .convert(&text(&["NA", "n/a", "x", " NA"]), &DataType::Utf8, today)
        .unwrap();
    let strings = strings.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(
        strings.iter().collect::<Vec<_>>(),
        [None, None, Some("x"), Some(" NA")]
    );
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut times = ColumnReader::new(true);
    let got = times
        .convert(&text(&["2012/01/31", "2012/1/5", ""]), &utc, today)
        .unwrap();
    let got = got
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(got.value(0), 1_327_968_000_000_000);
    assert_eq!(got.value(1), 1_325_721_600_000_000);
    assert!(got.is_null(2));
    // Another ISO precision than the first value's loads; another format is named.
    let mut iso = ColumnReader::new(true);
    let got = iso
        .convert(
            &text(&[
                "2024-01-01T10:00:00",
                "1999-12-31T23:59:59.123456",
                "2024-01-01T10:00:00+01:00",
            ]),
            &utc,
            today,
        )
        .unwrap();
    let got = got
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(got.value(1), 946_684_799_123_456);
    assert_eq!(got.value(2), 1_704_099_600_000_000);
    let err = iso
        .convert(&text(&["2024-01-01T10:00:00", "01/02/2024"]), &utc, today)
        .unwrap_err();
    assert_eq!(
        err,
        Unconverted {
            row: 1,
            value: "01/02/2024".into(),
            why: "does not match: the format %Y-%m-%dT%H:%M:%S of the column's first value".into()
        }
    );
    let err = csv
        .convert(&text(&["1", "1.5"]), &DataType::Int64, today)
        .unwrap_err();
    assert_eq!(
        (err.row, err.value.as_str(), err.why.as_str()),
        (1, "1.5", "is not an integer (INT64)")
    );
    // TIME takes a time alone: a date with it would be lost.
    let time = DataType::Time64(TimeUnit::Microsecond);
    assert!(
        csv.convert(&text(&["10:30", "23:59:59.5"]), &time, today)
            .is_ok()
    );
    let err = csv
        .convert(&text(&["12/2/2026 10:30"]), &time, today)
        .unwrap_err();
    assert_eq!(err.why, "is not a time of day (TIME)");
    // JSON: numeric text and booleans are numbers, as read_json makes them; "NA" is text.
    let mut json = ColumnReader::new(false);
    let ints = json
        .convert(&text(&["1", "true", "2.0"]), &DataType::Int64, today)
        .unwrap();
    let ints = ints.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!(ints.iter().collect::<Vec<_>>(), [Some(1), Some(1), Some(2)]);
    let strings = json
        .convert(&text(&["NA"]), &DataType::Utf8, today)
        .unwrap();
    assert_eq!(
        strings
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .value(0),
        "NA"
    );
}

#[test]
fn json_keys_get_read_json_types() {
    let kind = |values: &[serde_json::Value]| json_column_kind(values.iter().map(Some));
    use serde_json::json;
    assert_eq!(kind(&[json!(1.0), json!(2.0)]), Some(ColumnKind::Int64));
    assert_eq!(kind(&[json!(1), json!(null)]), Some(ColumnKind::Float64));
    assert_eq!(kind(&[json!("1"), json!("2")]), Some(ColumnKind::Int64));
    assert_eq!(kind(&[json!("1.5"), json!("2")]), Some(ColumnKind::Float64));
    assert_eq!(kind(&[json!(true), json!(null)]), Some(ColumnKind::Float64));
    assert_eq!(kind(&[json!(true), json!(false)]), Some(ColumnKind::Bool));
    assert_eq!(kind(&[json!(true), json!(1)]), Some(ColumnKind::Int64));
    assert_eq!(kind(&[json!("x"), json!(1)]), Some(ColumnKind::Object));
    assert_eq!(kind(&[json!("NA"), json!("x")]), Some(ColumnKind::Object));
    assert_eq!(kind(&[json!(null), json!(null)]), Some(ColumnKind::Float64));
    assert_eq!(
        kind(&[json!(18446744073709551615u64)]),
        Some(ColumnKind::UInt64)
    );
    // Whole, but past what int64 holds: float64, as pandas keeps it.
    assert_eq!(kind(&[json!(1e19)]), Some(ColumnKind::Float64));
    assert_eq!(
        kind(&[json!("18446744073709551615")]),
        Some(ColumnKind::Float64)
    );
    assert_eq!(
        kind(&[json!("2020-01-01"), json!("2020-01-02")]),
        Some(ColumnKind::Datetime)
    );
    assert_eq!(kind(&[json!({"b": 1})]), None);
}

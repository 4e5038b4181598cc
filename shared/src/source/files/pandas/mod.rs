//! The rules pandas 2.x applies when it reads a CSV (`pd.read_csv`, C parser, default options)
//! and when `pd.to_datetime` turns text into times. The system shardflow replaces detected every
//! file job's schema with them, and Django keeps the fingerprints it computed: the same file
//! must detect the same way, and load the values pandas would have read.
//!
//! Only what detection and loading need: missing-value markers, integer, float and boolean
//! text, the column type pandas infers, and the date formats `to_datetime` guesses from a
//! column's first value (`guess_datetime_format`) or, failing that, parses value by value
//! (dateutil). `tests/tests/corpus.rs` checks these rules against pandas itself.

use arrow::array::Array as _;
use chrono::{Datelike as _, NaiveDate, NaiveDateTime, NaiveTime};

mod convert;
mod datetime;
#[cfg(test)]
mod tests;

pub use self::convert::{ColumnReader, Unconverted};
use self::datetime::*;
pub use self::datetime::{DatetimeRule, Item, ParsedTime, guess_format};

/// pandas' default missing-value markers (`pandas._libs.parsers.STR_NA_VALUES`, 2.x): a CSV
/// field that is exactly one of these is missing, whatever the column's type.
pub const NA_VALUES: [&str; 19] = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// `to_datetime` reads these as NaT as well.
const NAT_VALUES: [&str; 4] = ["NaT", "nat", "NAT", "NONE"];

pub fn is_na(field: &str) -> bool {
    // A match compiles to a length switch and one comparison; most fields fail at the length.
    matches!(
        field,
        "" | "#N/A"
            | "#N/A N/A"
            | "#NA"
            | "-1.#IND"
            | "-1.#QNAN"
            | "-NaN"
            | "-nan"
            | "1.#IND"
            | "1.#QNAN"
            | "<NA>"
            | "N/A"
            | "NA"
            | "NULL"
            | "NaN"
            | "None"
            | "n/a"
            | "nan"
            | "null"
    )
}

/// The C parser trims spaces and tabs around numbers.
fn trim_number(text: &str) -> &str {
    text.trim_matches(|c| c == ' ' || c == '\t')
}

fn is_integer_text(text: &str) -> bool {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// An integer as the C parser reads one: optional sign, decimal digits, spaces around.
pub fn parse_int(text: &str) -> Option<i64> {
    let t = trim_number(text);
    is_integer_text(t).then(|| t.parse().ok()).flatten()
}

/// A float as the C parser reads one: decimal digits with an optional point and exponent, or
/// `inf`/`infinity` in any case, with a sign; spaces around.
pub fn parse_float(text: &str) -> Option<f64> {
    let t = trim_number(text);
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    if body.eq_ignore_ascii_case("inf") || body.eq_ignore_ascii_case("infinity") {
        let inf = f64::INFINITY;
        return Some(if t.starts_with('-') { -inf } else { inf });
    }
    // Rust also reads "nan" and "infinity" spellings pandas does not; only digits, a point and
    // an exponent reach it.
    let mut parts = body.splitn(2, ['e', 'E']);
    let mantissa = parts.next().unwrap_or("");
    let exponent_ok = parts.next().is_none_or(is_integer_text);
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !exponent_ok || !digits(whole) || !digits(fraction) || whole.len() + fraction.len() == 0 {
        return None;
    }
    t.parse().ok()
}

/// The C parser's default `true_values`/`false_values`.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "True" | "TRUE" | "true" => Some(true),
        "False" | "FALSE" | "false" => Some(false),
        _ => None,
    }
}

/// The dtype pandas gives a CSV column, and the BigQuery type the seed mapped it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    Int64,
    UInt64,
    Float64,
    Bool,
    /// Text `to_datetime` parses (the seed's "object → TIMESTAMP if parseable as date").
    Datetime,
    Object,
}

impl ColumnKind {
    /// The dtype's name as pandas prints it (the `type` of `detect-schema`).
    pub fn dtype(&self) -> &'static str {
        match self {
            ColumnKind::Int64 => "int64",
            ColumnKind::UInt64 => "uint64",
            ColumnKind::Float64 => "float64",
            ColumnKind::Bool => "bool",
            ColumnKind::Datetime | ColumnKind::Object => "object",
        }
    }

    /// The seed's mapping: `int*` INT64 (but uint64 NUMERIC), `float*` FLOAT64, `bool` BOOL, `datetime64` and
    /// parseable objects TIMESTAMP, other objects STRING.
    pub fn bigquery_type(&self) -> &'static str {
        match self {
            ColumnKind::Int64 => "INT64",
            // pandas' uint64 (integers past INT64): the seed said INT64, which cannot hold
            // them; NUMERIC holds them exactly.
            ColumnKind::UInt64 => "NUMERIC",
            ColumnKind::Float64 => "FLOAT64",
            ColumnKind::Bool => "BOOL",
            ColumnKind::Datetime => "TIMESTAMP",
            ColumnKind::Object => "STRING",
        }
    }
}

/// The type pandas infers for a CSV column from its fields (missing markers included): integers
/// are int64, or float64 once one is missing (NaN is a float); integers past int64 uint64;
/// numbers float64; booleans bool, or object once one is missing; an all-missing column
/// float64; the rest object, which the seed called TIMESTAMP when `to_datetime` parses it.
pub fn csv_column_kind<'a>(fields: impl Iterator<Item = &'a str> + Clone) -> ColumnKind {
    let present = || fields.clone().filter(|f| !is_na(f));
    let any_missing = fields.clone().any(is_na);
    if fields.clone().next().is_none() {
        return ColumnKind::Object;
    }
    if present().next().is_none() {
        return ColumnKind::Float64;
    }
    if present().all(|f| parse_int(f).is_some()) {
        return if any_missing {
            ColumnKind::Float64
        } else {
            ColumnKind::Int64
        };
    }
    let unsigned = |f: &str| {
        let t = trim_number(f);
        is_integer_text(t) && t.trim_start_matches('+').parse::<u64>().is_ok()
    };
    if present().all(unsigned) {
        return if any_missing {
            ColumnKind::Float64
        } else {
            ColumnKind::UInt64
        };
    }
    // Integers past uint64 are neither integers nor floats to the C parser: text.
    if present().all(|f| is_integer_text(trim_number(f))) {
        return ColumnKind::Object;
    }
    if present().all(|f| parse_float(f).is_some()) {
        return ColumnKind::Float64;
    }
    if !any_missing && present().all(|f| parse_bool(f).is_some()) {
        return ColumnKind::Bool;
    }
    if DatetimeRule::for_column(present()).is_some() {
        return ColumnKind::Datetime;
    }
    ColumnKind::Object
}

/// Python's `float()` of a string, as `read_json` converts text columns to numbers.
fn python_float(text: &str) -> Option<f64> {
    let t = text.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    if body.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    if !t.contains('_') {
        // The common case, without an allocation per value.
        return parse_float(t);
    }
    parse_float(&t.replace('_', ""))
        .filter(|_| !t.starts_with('_') && !t.ends_with('_') && !t.contains("__"))
}

/// The type `pd.read_json` gives a JSON key (`dtype=True`): its values' numpy type, then
/// objects converted to float64 where every value is a number, a boolean or numeric text, and
/// float64 to int64 where nothing is missing and every value is whole. So numeric strings are
/// numbers, `true` with a null is float64, and an all-null key is float64. Text stays object,
/// which the seed called TIMESTAMP when `to_datetime` parses it. None for nested values.
pub fn json_column_kind<'a>(
    values: impl Iterator<Item = Option<&'a serde_json::Value>> + Clone,
) -> Option<ColumnKind> {
    use serde_json::Value;
    let present = || values.clone().flatten().filter(|v| !v.is_null());
    if present().any(|v| v.is_object() || v.is_array()) {
        return None;
    }
    let any_missing = values.clone().any(|v| v.is_none_or(Value::is_null));
    if present().next().is_none() {
        return Some(ColumnKind::Float64);
    }
    if !any_missing && present().all(Value::is_boolean) {
        return Some(ColumnKind::Bool);
    }
    let as_float = |v: &Value| match v {
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Number(n) => n.as_f64(),
        Value::String(s) => python_float(s),
        _ => None,
    };
    if present().all(|v| as_float(v).is_some()) {
        let whole = |v: &Value| match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => true,
            // int64 holds it: pandas keeps float64 where the cast would not be equal.
            other => as_float(other).is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.2e18),
        };
        if any_missing || !present().all(whole) {
            return Some(ColumnKind::Float64);
        }
        let past_int64 =
            present().any(|v| matches!(v, Value::Number(n) if n.is_u64() && !n.is_i64()));
        return Some(if past_int64 {
            ColumnKind::UInt64
        } else {
            ColumnKind::Int64
        });
    }
    if present().all(Value::is_string)
        && DatetimeRule::for_column(present().filter_map(Value::as_str)).is_some()
    {
        return Some(ColumnKind::Datetime);
    }
    Some(ColumnKind::Object)
}

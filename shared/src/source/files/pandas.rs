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

// ---------------------------------------------------------------------------------------------
// Dates and times as `to_datetime` reads them
// ---------------------------------------------------------------------------------------------

/// One directive of a strptime format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Year,
    Month,
    MonthAbbr,
    MonthName,
    WeekdayAbbr,
    Day,
    Hour,
    /// `%I`: an hour on a 12-hour clock, with `%p` (AM/PM) after it.
    Hour12,
    AmPm,
    Minute,
    Second,
    Fraction,
    Offset,
    /// `%Z`: a zone name; only UTC and GMT are read.
    ZoneName,
    Literal(char),
    /// A space in a format matches any run of whitespace (Python's strptime).
    Space,
}

/// How a column's text becomes times: the format pandas guesses from the first value, which
/// every value must then match, or dateutil's reading of each value on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatetimeRule {
    Format { format: String, items: Vec<Item> },
    EachValue,
}

/// A time read from text: naive, or with its offset from UTC in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedTime {
    pub local: NaiveDateTime,
    pub offset_seconds: Option<i32>,
}

impl ParsedTime {
    /// Microseconds since the epoch in UTC; a naive time is taken as UTC, as BigQuery takes a
    /// TIMESTAMP without a zone.
    pub fn utc_micros(&self) -> i64 {
        let utc = self.local.and_utc().timestamp_micros();
        utc - i64::from(self.offset_seconds.unwrap_or(0)) * 1_000_000
    }

    /// Within pandas' nanosecond range (1677-09-21 to 2262-04-11): outside it `to_datetime`
    /// fails, so detection calls such a column text.
    fn in_pandas_range(&self) -> bool {
        let micros = self.utc_micros();
        (-9_223_372_036_854_775..=9_223_372_036_854_775).contains(&micros)
    }
}

const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];
const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn month_number(word: &str) -> Option<(u32, bool)> {
    let lower = word.to_ascii_lowercase();
    MONTHS.iter().position(|m| *m == lower).map_or_else(
        || {
            MONTHS
                .iter()
                .position(|m| lower.len() == 3 && m.starts_with(&lower))
                .map(|i| (i as u32 + 1, false))
        },
        |i| Some((i as u32 + 1, true)),
    )
}

fn is_weekday(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    WEEKDAYS
        .iter()
        .any(|d| *d == lower || (lower.len() == 3 && d.starts_with(&lower)))
}

/// A value's pieces: digit runs, letter runs, and single other characters.
#[derive(Clone, Debug, PartialEq)]
enum Token<'a> {
    Digits(&'a str),
    Word(&'a str),
    Space,
    Mark(char),
}

fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let run = |pred: fn(char) -> bool| rest.find(|c: char| !pred(c)).unwrap_or(rest.len());
        let (token, len) = if c.is_ascii_digit() {
            let n = run(|c| c.is_ascii_digit());
            (Token::Digits(&rest[..n]), n)
        } else if c.is_ascii_alphabetic() {
            let n = run(|c| c.is_ascii_alphabetic());
            (Token::Word(&rest[..n]), n)
        } else if c.is_whitespace() {
            (Token::Space, run(char::is_whitespace))
        } else {
            (Token::Mark(c), c.len_utf8())
        };
        out.push(token);
        rest = &rest[len..];
    }
    out
}

fn parse_format(format: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        items.push(match c {
            '%' => match chars.next() {
                Some('Y') => Item::Year,
                Some('m') => Item::Month,
                Some('b') => Item::MonthAbbr,
                Some('B') => Item::MonthName,
                Some('a') => Item::WeekdayAbbr,
                Some('d') => Item::Day,
                Some('H') => Item::Hour,
                Some('I') => Item::Hour12,
                Some('p') => Item::AmPm,
                Some('M') => Item::Minute,
                Some('S') => Item::Second,
                Some('f') => Item::Fraction,
                Some('z') => Item::Offset,
                Some('Z') => Item::ZoneName,
                Some(other) => Item::Literal(other),
                None => Item::Literal('%'),
            },
            ' ' => Item::Space,
            other => Item::Literal(other),
        });
    }
    items
}

/// The format `guess_datetime_format` gives a value (`dayfirst=False`), for the shapes real
/// files hold: year-first dates with `-`, `/` or `.` (or 8 digits), month-first dates with a
/// four-digit year (day-first when the first number cannot be a month), month names,
/// `%Y` and `%Y-%m`, each optionally followed by a time (`T` or a space; hours, minutes,
/// seconds, a fraction) and a zone (`Z`, `±hh:mm`, `±hhmm`, `±hh`, ` UTC`). None where pandas
/// guesses nothing either (two-digit years, AM/PM, a time alone) and dateutil reads each value.
pub fn guess_format(value: &str) -> Option<String> {
    // pandas guesses only from a value it can parse as a time in its range.
    let format = guess_shape(value)?;
    parse_with(&parse_format(&format), value)
        .ok()
        .filter(ParsedTime::in_pandas_range)
        .map(|_| format)
}

/// The format a value's shape suggests (`guess_format` without the check that it parses).
fn guess_shape(value: &str) -> Option<String> {
    let t = tokens(value);
    let num = |i: usize| match t.get(i) {
        Some(Token::Digits(d)) => Some(*d),
        _ => None,
    };
    let mark = |i: usize| match t.get(i) {
        Some(Token::Mark(c)) => Some(*c),
        _ => None,
    };
    let mut format = String::new();
    // The date: how many tokens it takes.
    let date_len;
    match (num(0), mark(1), num(2), mark(3), num(4)) {
        (Some(y), Some(s), Some(m), Some(s2), Some(d))
            if y.len() == 4 && s == s2 && "-/.".contains(s) && m.len() <= 2 && d.len() <= 2 =>
        {
            format = format!("%Y{s}%m{s}%d");
            date_len = 5;
        }
        (Some(a), Some(s), Some(b), Some(s2), Some(y))
            if y.len() == 4 && s == s2 && "-/.".contains(s) && a.len() <= 2 && b.len() <= 2 =>
        {
            let first: u32 = a.parse().ok()?;
            format = if first > 12 {
                format!("%d{s}%m{s}%Y")
            } else {
                format!("%m{s}%d{s}%Y")
            };
            date_len = 5;
        }
        (Some(y), Some('-'), Some(m), _, _) if y.len() == 4 && m.len() == 2 && t.len() == 3 => {
            return Some("%Y-%m".into());
        }
        (Some(d), _, _, _, _) if d.len() == 8 && t.len() == 1 => return Some("%Y%m%d".into()),
        (Some(y), _, _, _, _) if y.len() == 4 && t.len() == 1 => return Some("%Y".into()),
        _ => {
            // Month names: "Jan 1 2000", "January 5, 2020", "5 January 2020", with an
            // optional weekday in front ("Mon, 06 Jan 2020").
            let mut i = 0;
            if let Some(Token::Word(w)) = t.first()
                && is_weekday(w)
                && w.len() == 3
                && mark(1) == Some(',')
                && t.get(2) == Some(&Token::Space)
            {
                format.push_str("%a, ");
                i = 3;
            }
            let month_directive =
                |w: &str| month_number(w).map(|(_, full)| if full { "%B" } else { "%b" });
            let word = |k: usize| match t.get(k) {
                Some(Token::Word(w)) => Some(*w),
                _ => None,
            };
            // A separator between the parts: a space, `-` or `/`.
            let sep = |k: usize| match t.get(k) {
                Some(Token::Space) => Some(' '),
                Some(Token::Mark(c @ ('-' | '/'))) => Some(*c),
                _ => None,
            };
            let year = |k: usize| num(k).is_some_and(|y| y.len() == 4);
            // A day, with its ordinal suffix as pandas keeps it ("1st" is `%dst`): the
            // directive and the tokens it takes.
            let day = |k: usize| {
                num(k).filter(|d| d.len() <= 2)?;
                match word(k + 1) {
                    Some(w @ ("st" | "nd" | "rd" | "th")) => Some((format!("%d{w}"), 2)),
                    _ => Some(("%d".to_string(), 1)),
                }
            };
            if let (Some(m), Some(s), Some((d, n))) =
                (word(i).and_then(month_directive), sep(i + 1), day(i + 2))
            {
                // "Jan 1 2000", "January 5, 2020", "Jan-1-1995".
                let comma = s == ' ' && mark(i + 2 + n) == Some(',');
                let j = i + 2 + n + usize::from(comma);
                if sep(j) != Some(s) || !year(j + 1) {
                    return None;
                }
                format.push_str(&format!("{m}{s}{d}{}{s}%Y", if comma { "," } else { "" }));
                date_len = j + 2;
            } else if let Some((d, n)) = day(i)
                && let Some(s) = sep(i + n)
                && let Some(m) = word(i + n + 1).and_then(month_directive)
                && sep(i + n + 2) == Some(s)
                && year(i + n + 3)
            {
                // "5 January 2020", "01-Jan-1995", "1st Jan 2020".
                format.push_str(&format!("{d}{s}{m}{s}%Y"));
                date_len = i + n + 4;
            } else if let (true, Some(s), Some(m)) =
                (year(i), sep(i + 1), word(i + 2).and_then(month_directive))
                && s != ' '
                && sep(i + 3) == Some(s)
                && num(i + 4).is_some_and(|d| d.len() <= 2)
            {
                // "1995-Jan-01".
                format.push_str(&format!("%Y{s}{m}{s}%d"));
                date_len = i + 5;
            } else {
                return None;
            }
        }
    }
    let rest = &t[date_len..];
    if rest.is_empty() {
        return Some(format);
    }
    // The time.
    let mut k = 0;
    let at = |k: usize| rest.get(k);
    match at(0) {
        Some(Token::Word("T")) => format.push('T'),
        Some(Token::Space) => format.push(' '),
        _ => return None,
    }
    k += 1;
    let digits = |k: usize, max: usize| matches!(at(k), Some(Token::Digits(d)) if d.len() <= max);
    // "T10" alone is an hour.
    if !digits(k, 2) {
        return None;
    }
    format.push_str("%H");
    k += 1;
    for directive in ["%M", "%S"] {
        if at(k) == Some(&Token::Mark(':')) && digits(k + 1, 2) {
            format.push(':');
            format.push_str(directive);
            k += 2;
        } else {
            break;
        }
    }
    if format.ends_with("%S") && at(k) == Some(&Token::Mark('.')) && digits(k + 1, 9) {
        format.push_str(".%f");
        k += 2;
    }
    // A 12-hour clock: pandas guesses `%I … %p` only where the written hour is the day's
    // hour (AM before noon, 12 PM), and nothing for other PM times (dateutil reads them).
    if at(k) == Some(&Token::Space)
        && let Some(Token::Word(w)) = at(k + 1)
        && (w.eq_ignore_ascii_case("AM") || w.eq_ignore_ascii_case("PM"))
    {
        let hour: u32 = match rest.get(1) {
            Some(Token::Digits(h)) => h.parse().ok()?,
            _ => return None,
        };
        let pm = w.eq_ignore_ascii_case("PM");
        if !(1..=12).contains(&hour) || (pm != (hour == 12)) {
            return None;
        }
        format = format.replacen("%H", "%I", 1);
        format.push_str(" %p");
        k += 2;
    }
    // The zone.
    match (at(k), at(k + 1), at(k + 2), at(k + 3)) {
        (None, ..) => {}
        (Some(Token::Word("Z" | "z")), None, ..) => format.push_str("%z"),
        (Some(Token::Mark('+' | '-')), Some(Token::Digits(h)), None, _)
            if h.len() == 2 || h.len() == 4 =>
        {
            format.push_str("%z")
        }
        (
            Some(Token::Mark('+' | '-')),
            Some(Token::Digits(h)),
            Some(Token::Mark(':')),
            Some(Token::Digits(m)),
        ) if h.len() == 2 && m.len() == 2 && rest.len() == k + 4 => format.push_str("%z"),
        (Some(Token::Space), Some(Token::Word("UTC")), None, _) => format.push_str(" %Z"),
        _ => return None,
    }
    Some(format)
}

/// Reads up to `max` digits (at least one), the longest prefix whose value is at most `limit`,
/// as Python's strptime regexes (`1[0-2]|0[1-9]|[1-9]`) do.
fn take_number(text: &str, max: usize, limit: u32) -> Option<(u32, &str)> {
    let n = text
        .bytes()
        .take(max)
        .take_while(u8::is_ascii_digit)
        .count();
    (1..=n).rev().find_map(|len| {
        let v: u32 = text[..len].parse().ok()?;
        (v <= limit).then_some((v, &text[len..]))
    })
}

fn take_word<'a>(text: &'a str, words: &[&str], abbreviated: bool) -> Option<(u32, &'a str)> {
    words.iter().enumerate().find_map(|(i, w)| {
        let w = if abbreviated { &w[..3] } else { w };
        let head = text.get(..w.len())?;
        head.eq_ignore_ascii_case(w)
            .then(|| (i as u32 + 1, &text[w.len()..]))
    })
}

/// The time `text` holds under `items`, or why not.
fn parse_with(items: &[Item], text: &str) -> Result<ParsedTime, String> {
    let mut rest = text;
    let (mut year, mut month, mut day) = (1900, 1, 1);
    let (mut hour, mut minute, mut second, mut nanos) = (0, 0, 0, 0u32);
    let mut offset = None;
    let unmatched = || "does not match".to_string();
    for item in items {
        match item {
            Item::Year => {
                if rest.len() < 4 || !rest.as_bytes()[..4].iter().all(u8::is_ascii_digit) {
                    return Err(unmatched());
                }
                year = rest[..4].parse().map_err(|_| unmatched())?;
                rest = &rest[4..];
            }
            Item::Month => (month, rest) = take_number(rest, 2, 12).ok_or_else(unmatched)?,
            Item::MonthAbbr => {
                (month, rest) = take_word(rest, &MONTHS, true).ok_or_else(unmatched)?
            }
            Item::MonthName => {
                (month, rest) = take_word(rest, &MONTHS, false).ok_or_else(unmatched)?
            }
            Item::WeekdayAbbr => {
                (_, rest) = take_word(rest, &WEEKDAYS, true).ok_or_else(unmatched)?
            }
            Item::Day => (day, rest) = take_number(rest, 2, 31).ok_or_else(unmatched)?,
            Item::Hour => (hour, rest) = take_number(rest, 2, 23).ok_or_else(unmatched)?,
            Item::Hour12 => {
                (hour, rest) = take_number(rest, 2, 12).ok_or_else(unmatched)?;
                if hour == 0 {
                    return Err(unmatched());
                }
            }
            Item::AmPm => {
                let head = rest.get(..2).ok_or_else(unmatched)?;
                let pm = head.eq_ignore_ascii_case("PM");
                if !pm && !head.eq_ignore_ascii_case("AM") {
                    return Err(unmatched());
                }
                hour = hour % 12 + if pm { 12 } else { 0 };
                rest = &rest[2..];
            }
            Item::Minute => (minute, rest) = take_number(rest, 2, 59).ok_or_else(unmatched)?,
            Item::Second => (second, rest) = take_number(rest, 2, 59).ok_or_else(unmatched)?,
            Item::Fraction => {
                let n = rest.bytes().take(9).take_while(u8::is_ascii_digit).count();
                if n == 0 {
                    return Err(unmatched());
                }
                nanos = format!("{:0<9}", &rest[..n])
                    .parse()
                    .map_err(|_| unmatched())?;
                rest = &rest[n..];
            }
            Item::Offset => {
                let (seconds, after) = take_offset(rest).ok_or_else(unmatched)?;
                offset = Some(seconds);
                rest = after;
            }
            Item::ZoneName => {
                let head = rest.get(..3).ok_or_else(unmatched)?;
                if !head.eq_ignore_ascii_case("UTC") && !head.eq_ignore_ascii_case("GMT") {
                    return Err(unmatched());
                }
                offset = Some(0);
                rest = &rest[3..];
            }
            Item::Space => {
                let trimmed = rest.trim_start();
                if trimmed.len() == rest.len() {
                    return Err(unmatched());
                }
                rest = trimmed;
            }
            Item::Literal(c) => rest = rest.strip_prefix(*c).ok_or_else(unmatched)?,
        }
    }
    if !rest.is_empty() {
        return Err(format!("has {rest:?} left over"));
    }
    let date = NaiveDate::from_ymd_opt(year, month, day)
        .ok_or_else(|| format!("is not a date ({year}-{month:02}-{day:02})"))?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        .ok_or_else(|| "is not a time of day".to_string())?;
    Ok(ParsedTime {
        local: date.and_time(time),
        offset_seconds: offset,
    })
}

/// `Z`, `±hh`, `±hhmm` or `±hh:mm`, in seconds east of UTC.
fn take_offset(text: &str) -> Option<(i32, &str)> {
    if let Some(rest) = text.strip_prefix(['Z', 'z']) {
        return Some((0, rest));
    }
    let sign = match text.chars().next()? {
        '+' => 1,
        '-' => -1,
        _ => return None,
    };
    let rest = &text[1..];
    let digits =
        |s: &str, n: usize| s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit);
    if !digits(rest, 2) {
        return None;
    }
    let hours: i32 = rest[..2].parse().ok()?;
    let rest = &rest[2..];
    let rest_minutes = rest.strip_prefix(':').unwrap_or(rest);
    let (minutes, rest) = if digits(rest_minutes, 2) {
        (rest_minutes[..2].parse::<i32>().ok()?, &rest_minutes[2..])
    } else {
        (0, rest)
    };
    // `+05:75` or `+99:00` is no offset (pandas refuses them too).
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some((sign * (hours * 3600 + minutes * 60), rest))
}

/// Two-digit years as dateutil reads them: within 50 years of today.
fn full_year(two_digits: i32, this_year: i32) -> i32 {
    let century = this_year - this_year % 100;
    let mut year = century + two_digits;
    if year >= this_year + 50 {
        year -= 100;
    } else if year < this_year - 50 {
        year += 100;
    }
    year
}

/// pandas' quarters (`_parse_dateabbr_string`): `1974Q1`, `1974-Q1`, `1Q1974`, `2Q-1974`,
/// `74Q1` (20yy), in any case; the quarter's first day.
fn quarter(text: &str) -> Option<NaiveDate> {
    let upper = text.to_ascii_uppercase();
    if !(4..=7).contains(&upper.len()) || !upper.is_ascii() {
        return None;
    }
    let q = upper[1..].find('Q')? + 1;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (year, quarter): (&str, &str) = match q {
        // (\d)Q-?(\d\d) and (\d)Q-?(\d{4})
        1 => (
            upper[2..].strip_prefix('-').unwrap_or(&upper[2..]),
            &upper[..1],
        ),
        // (\d\d)-?Q(\d) and (\d{4})-?Q(\d)
        2..=5 => (
            upper[..q].strip_suffix('-').unwrap_or(&upper[..q]),
            &upper[q + 1..],
        ),
        _ => return None,
    };
    if !digits(year) || !digits(quarter) || quarter.len() != 1 {
        return None;
    }
    let year: i32 = match year.len() {
        2 => 2000 + year.parse::<i32>().ok()?,
        4 => year.parse().ok()?,
        _ => return None,
    };
    let quarter: u32 = quarter.parse().ok()?;
    if !(1..=4).contains(&quarter) {
        return None;
    }
    NaiveDate::from_ymd_opt(year, (quarter - 1) * 3 + 1, 1)
}

/// dateutil's reading of a value pandas guessed no format for, for the shapes real files
/// hold: `m/d/yy` (or `d/m/yy` when the first number cannot be a month; `-` and `.` too),
/// "March 2020", month-name dates, each optionally with a time `H:MM[:SS[.f]]`, `AM`/`PM`
/// and a zone (`Z`, `UTC`, `GMT`, `±hh:mm`); a time alone falls on today's date, as pandas
/// puts it.
fn parse_each_value(text: &str, today: NaiveDate) -> Result<ParsedTime, String> {
    let unknown = || "is not a date and time pandas reads".to_string();
    if let Some(date) = quarter(text) {
        return Ok(ParsedTime {
            local: date.and_time(NaiveTime::MIN),
            offset_seconds: None,
        });
    }
    let t = tokens(text);
    let mut i = 0;
    let at = |i: usize| t.get(i);
    let number = |i: usize| match t.get(i) {
        Some(Token::Digits(d)) => d.parse::<i32>().ok().map(|v| (v, d.len())),
        _ => None,
    };
    let mark = |i: usize| match t.get(i) {
        Some(Token::Mark(c)) => Some(*c),
        _ => None,
    };
    let mut date = None;
    // Numeric dates.
    if let (Some((a, a_len)), Some(s), Some((b, _)), Some(s2), Some((c, c_len))) =
        (number(0), mark(1), number(2), mark(3), number(4))
        && s == s2
        && "/-.".contains(s)
    {
        // Year first when it has four digits (`2020-01-02 10:00 PM`), else month (or day,
        // when the first cannot be a month) first, the year last.
        let (year, m, d) = if a_len == 4 {
            (a, b, c)
        } else {
            let year = if c_len <= 2 {
                full_year(c, today.year())
            } else {
                c
            };
            let (m, d) = if a > 12 { (b, a) } else { (a, b) };
            (year, m, d)
        };
        date = Some(
            NaiveDate::from_ymd_opt(year, m as u32, d as u32)
                .ok_or_else(|| format!("is not a date ({year}-{m:02}-{d:02})"))?,
        );
        i = 5;
    } else if let Some(Token::Word(w)) = at(0)
        && let Some((m, _)) = month_number(w)
    {
        // "March 2020", "Jan 1 2000", "January 5, 2020".
        match (at(1), number(2), mark(3)) {
            (Some(Token::Space | Token::Mark('-' | '/')), Some((y, 4)), _)
                if at(3).is_none() || at(3) == Some(&Token::Space) =>
            {
                date = NaiveDate::from_ymd_opt(y, m, 1);
                i = 3;
            }
            (Some(Token::Space), Some((d, 1 | 2)), comma) => {
                let j = 3 + usize::from(comma == Some(','));
                if let (Some(Token::Space), Some((y, 4))) = (at(j), number(j + 1)) {
                    date = Some(NaiveDate::from_ymd_opt(y, m, d as u32).ok_or_else(unknown)?);
                    i = j + 2;
                }
            }
            _ => {}
        }
        date.ok_or_else(unknown)?;
    }
    let date_given = date.is_some();
    if date_given {
        match at(i) {
            None => {}
            Some(Token::Space) => i += 1,
            _ => return Err(unknown()),
        }
    }
    let mut time = NaiveTime::MIN;
    let mut offset = None;
    if let (Some((h, 1 | 2)), Some(':'), Some((m, 2))) = (number(i), mark(i + 1), number(i + 2)) {
        let (mut h, mut s, mut nanos) = (h as u32, 0, 0);
        i += 3;
        if let (Some(':'), Some((sec, 2))) = (mark(i), number(i + 1)) {
            s = sec as u32;
            i += 2;
            if let (Some('.'), Some(Token::Digits(f))) = (mark(i), at(i + 1))
                && f.len() <= 9
            {
                nanos = format!("{f:0<9}").parse().map_err(|_| unknown())?;
                i += 2;
            }
        }
        if at(i) == Some(&Token::Space)
            && let Some(Token::Word(w)) = at(i + 1)
            && (w.eq_ignore_ascii_case("AM") || w.eq_ignore_ascii_case("PM"))
        {
            if !(1..=12).contains(&h) {
                return Err(unknown());
            }
            h = h % 12 + if w.eq_ignore_ascii_case("PM") { 12 } else { 0 };
            i += 2;
        }
        time = NaiveTime::from_hms_nano_opt(h, m as u32, s, nanos).ok_or_else(unknown)?;
        let zone_text: String = t[i..]
            .iter()
            .map(|tok| match tok {
                Token::Digits(d) | Token::Word(d) => d.to_string(),
                Token::Space => " ".into(),
                Token::Mark(c) => c.to_string(),
            })
            .collect();
        let zone = zone_text.trim_start();
        if !zone.is_empty() {
            if zone.eq_ignore_ascii_case("UTC") || zone.eq_ignore_ascii_case("GMT") {
                offset = Some(0);
            } else {
                match take_offset(zone) {
                    Some((seconds, "")) => offset = Some(seconds),
                    _ => return Err(unknown()),
                }
            }
        }
    } else if !date_given || at(i).is_some() {
        return Err(unknown());
    }
    Ok(ParsedTime {
        local: date.unwrap_or(today).and_time(time),
        offset_seconds: offset,
    })
}

impl DatetimeRule {
    /// The rule `to_datetime` follows for a column whose first value (missing ones skipped)
    /// is `first`.
    pub fn for_first_value(first: &str) -> Self {
        match guess_format(first) {
            Some(format) => {
                let items = parse_format(&format);
                DatetimeRule::Format { format, items }
            }
            None => DatetimeRule::EachValue,
        }
    }

    /// The rule under which every value of a column parses, in pandas' range, as
    /// `pd.to_datetime(column)` requires; None when it raises.
    pub fn for_column<'a>(mut values: impl Iterator<Item = &'a str>) -> Option<Self> {
        let today = chrono::Utc::now().date_naive();
        let values_left = values.by_ref().filter(|v| !NAT_VALUES.contains(v));
        let mut values_left = values_left.peekable();
        let first = *values_left.peek()?;
        if !looks_like_a_datetime(first) {
            return None;
        }
        let rule = Self::for_first_value(first);
        for v in values_left {
            match rule.parse(v, today) {
                Ok(t) if t.in_pandas_range() => {}
                _ => return None,
            }
        }
        Some(rule)
    }

    /// `text` as a time under this rule.
    pub fn parse(&self, text: &str, today: NaiveDate) -> Result<ParsedTime, String> {
        match self {
            DatetimeRule::Format { items, .. } => parse_with(items, text),
            DatetimeRule::EachValue => {
                if !looks_like_a_datetime(text) {
                    return Err(unknown_value());
                }
                parse_each_value(text, today)
            }
        }
    }

    /// How the rule is described in an error.
    pub fn describe(&self) -> String {
        match self {
            DatetimeRule::Format { format, .. } => {
                format!("the format {format} of the column's first value")
            }
            DatetimeRule::EachValue => "a date and time pandas reads".into(),
        }
    }
}

fn unknown_value() -> String {
    "is not a date and time pandas reads".into()
}

/// pandas' `_does_string_look_like_datetime`: a number under 1000 is not a date (unless it
/// starts with 0), nor are the single letters dateutil would read as AM/PM or a zone.
fn looks_like_a_datetime(text: &str) -> bool {
    if text.starts_with('0') {
        return true;
    }
    if let Ok(v) = text.trim().parse::<f64>()
        && v < 1000.0
    {
        return false;
    }
    !matches!(text, "a" | "A" | "m" | "M" | "p" | "P" | "t" | "T")
}

// ---------------------------------------------------------------------------------------------
// Loading text into the job's types
// ---------------------------------------------------------------------------------------------

/// Why a value did not convert: its row in the batch, the value, and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unconverted {
    pub row: usize,
    pub value: String,
    pub why: String,
}

/// Converts each present value with `parse`, handing the results to `push` (None for a
/// missing one); the first value that does not convert is named with its row.
fn each_value<'a, T>(
    values: impl Iterator<Item = Option<&'a str>>,
    mut push: impl FnMut(Option<T>),
    mut parse: impl FnMut(&'a str) -> Result<T, String>,
) -> Result<(), Unconverted> {
    for (row, v) in values.enumerate() {
        match v {
            None => push(None),
            Some(t) => push(Some(parse(t).map_err(|why| Unconverted {
                row,
                value: t.to_string(),
                why,
            })?)),
        }
    }
    Ok(())
}

/// How one file's text column becomes the job's type: the date rule comes from the file's
/// first value, as `to_datetime` takes it from the column's first value.
#[derive(Debug, Default)]
pub struct ColumnReader {
    rule: Option<DatetimeRule>,
    /// CSV: pandas' missing-value markers are NULL. JSON has null for that, and its numbers
    /// take booleans and numeric text as `read_json` does (`true` is 1).
    pub na_markers: bool,
}

/// JSON's integers as `read_json` makes them: whole numbers, numeric text, booleans.
fn json_int(text: &str) -> Option<i64> {
    parse_int(text).or_else(|| match text {
        "true" => Some(1),
        "false" => Some(0),
        _ => python_float(text)
            .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 9.2e18)
            .map(|f| f as i64),
    })
}

/// JSON's floats as `read_json` makes them: numbers, numeric text, booleans.
fn json_float(text: &str) -> Option<f64> {
    match text {
        "true" => Some(1.0),
        "false" => Some(0.0),
        _ => python_float(text),
    }
}

impl ColumnReader {
    pub fn new(na_markers: bool) -> Self {
        Self {
            rule: None,
            na_markers,
        }
    }

    /// `text` converted to `target`, value by value, by pandas' rules; anything else is named.
    pub fn convert(
        &mut self,
        text: &arrow::array::StringArray,
        target: &arrow::datatypes::DataType,
        today: NaiveDate,
    ) -> Result<arrow::array::ArrayRef, Unconverted> {
        use arrow::array::{
            BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, StringBuilder,
            Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
        };
        use arrow::datatypes::{DataType, TimeUnit};
        use std::sync::Arc;
        let fail = |row: usize, value: &str, why: String| Unconverted {
            row,
            value: value.to_string(),
            why,
        };
        let datetime = matches!(
            target,
            DataType::Timestamp(_, _) | DataType::Date32 | DataType::Time64(_)
        );
        let na_markers = self.na_markers;
        let missing = move |t: &str| {
            (na_markers && is_na(t)) || (datetime && (t.is_empty() || NAT_VALUES.contains(&t)))
        };
        let values = text.iter().map(move |v| v.filter(|t| !missing(t)));
        Ok(match target {
            DataType::Utf8 => {
                // The same bytes, the markers masked as NULL: no copy.
                let present = arrow::buffer::NullBuffer::from(
                    values.map(|v| v.is_some()).collect::<Vec<_>>(),
                );
                let unchanged = present.null_count() == text.null_count();
                if unchanged {
                    Arc::new(text.clone())
                } else {
                    Arc::new(arrow::array::StringArray::new(
                        text.offsets().clone(),
                        text.values().clone(),
                        Some(present),
                    ))
                }
            }
            DataType::Int64 => {
                let mut b = Int64Builder::with_capacity(text.len());
                let int = if na_markers { parse_int } else { json_int };
                each_value(
                    values,
                    |v| b.append_option(v),
                    |t| int(t).ok_or_else(|| "is not an integer (INT64)".into()),
                )?;
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::with_capacity(text.len());
                let float = if na_markers { parse_float } else { json_float };
                each_value(
                    values,
                    |v| b.append_option(v),
                    |t| float(t).ok_or_else(|| "is not a number (FLOAT64)".into()),
                )?;
                Arc::new(b.finish())
            }
            DataType::Boolean => {
                let mut b = BooleanBuilder::with_capacity(text.len());
                each_value(
                    values,
                    |v| b.append_option(v),
                    |t| {
                        parse_bool(t)
                            .or_else(|| match t.to_ascii_lowercase().as_str() {
                                "true" => Some(true),
                                "false" => Some(false),
                                _ => None,
                            })
                            .ok_or_else(|| "is not True or False (BOOL)".into())
                    },
                )?;
                Arc::new(b.finish())
            }
            DataType::Timestamp(TimeUnit::Microsecond, zone) => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(text.len());
                each_value(
                    values,
                    |v| b.append_option(v),
                    |t| {
                        let parsed = self.parse_time(t, today)?;
                        if parsed.local.and_utc().timestamp_subsec_nanos() % 1000 != 0 {
                            return Err(
                                "has nanoseconds, which BigQuery cannot hold (microseconds \
                                    at most)"
                                    .into(),
                            );
                        }
                        // DATETIME keeps the wall-clock time of a zoned value in UTC.
                        Ok(parsed.utc_micros())
                    },
                )?;
                let array = b.finish();
                Arc::new(match zone {
                    Some(z) => array.with_timezone(z.clone()),
                    None => array,
                })
            }
            DataType::Date32 => {
                let mut b = Date32Builder::with_capacity(text.len());
                let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
                each_value(
                    values,
                    |v| b.append_option(v),
                    |t| {
                        let parsed = self.parse_time(t, today)?;
                        if parsed.local.time() != NaiveTime::MIN || parsed.offset_seconds.is_some()
                        {
                            return Err("has a time of day (DATE)".into());
                        }
                        Ok((parsed.local.date() - epoch).num_days() as i32)
                    },
                )?;
                Arc::new(b.finish())
            }
            DataType::Time64(TimeUnit::Microsecond) => {
                let mut b = Time64MicrosecondBuilder::with_capacity(text.len());
                each_value(
                    values,
                    |v| b.append_option(v),
                    |t| {
                        // A time alone (`10:30`, `23:59:59.5`, `1:00 PM`): a date would be lost.
                        let time_alone = t.split(':').next().is_some_and(|h| {
                            (1..=2).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_digit())
                        });
                        let parsed = parse_each_value(t, today)
                            .ok()
                            .filter(|p| time_alone && p.offset_seconds.is_none())
                            .ok_or_else(|| "is not a time of day (TIME)".to_string())?;
                        if parsed.local.and_utc().timestamp_subsec_nanos() % 1000 != 0 {
                            return Err("has nanoseconds, which BigQuery cannot hold \
                                        (microseconds at most)"
                                .into());
                        }
                        let since_midnight = parsed.local.time() - NaiveTime::MIN;
                        Ok(since_midnight.num_microseconds().unwrap_or_default())
                    },
                )?;
                Arc::new(b.finish())
            }
            other => {
                // NUMERIC, BIGNUMERIC, BYTES: arrow's own parsing of the text, which refuses
                // what does not fit.
                let mut b = StringBuilder::with_capacity(text.len(), text.value_data().len());
                values.for_each(|v| b.append_option(v.map(|t| t.trim())));
                let trimmed = b.finish();
                let options = arrow::compute::CastOptions {
                    safe: false,
                    ..Default::default()
                };
                arrow::compute::cast_with_options(&trimmed, other, &options).map_err(|e| {
                    let row = (0..trimmed.len()).find(|&r| {
                        trimmed.is_valid(r)
                            && arrow::compute::cast_with_options(
                                &trimmed.slice(r, 1),
                                other,
                                &options,
                            )
                            .is_err()
                    });
                    let row = row.unwrap_or(0);
                    fail(
                        row,
                        trimmed.value(row),
                        format!("does not convert to {other}: {e}"),
                    )
                })?
            }
        })
    }

    fn parse_time(&mut self, text: &str, today: NaiveDate) -> Result<ParsedTime, String> {
        let rule = self
            .rule
            .get_or_insert_with(|| DatetimeRule::for_first_value(text));
        let why = match rule.parse(text, today) {
            Ok(parsed) => return Ok(parsed),
            Err(why) => why,
        };
        // ISO 8601 in another precision than the first value's ("10:00:00" and
        // "23:59:59.123456"): pandas' format="ISO8601", unambiguous, so read as it is.
        if let DatetimeRule::Format { format, .. } = &*rule
            && format.starts_with("%Y-")
            && let own = DatetimeRule::for_first_value(text)
            && matches!(&own, DatetimeRule::Format { format, .. } if format.starts_with("%Y-"))
            && let Ok(parsed) = own.parse(text, today)
        {
            return Ok(parsed);
        }
        Err(match rule {
            DatetimeRule::Format { .. } => format!("{why}: {}", rule.describe()),
            DatetimeRule::EachValue => why,
        })
    }
}

#[cfg(test)]
mod tests {
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
                why: "does not match: the format %Y-%m-%dT%H:%M:%S of the column's first value"
                    .into()
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
}

//! Values as MySQL spells them: identifiers quoted, key and window values normalised,
//! compared and bound as parameters of the right type.

use super::*;

/// Quotes an identifier: always backticks, embedded backticks doubled.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// How a key or window value is compared and bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Int { unsigned: bool },
    Text,
    Date,
    Datetime,
    Timestamp,
}

/// The kinds shardflow cuts key ranges on; anything else is refused.
pub fn key_kind(type_name: &str) -> Option<ValueKind> {
    let t = parse_column_type(type_name);
    Some(match t.base {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => ValueKind::Int {
            unsigned: t.unsigned,
        },
        "char" | "varchar" => ValueKind::Text,
        "date" => ValueKind::Date,
        "datetime" => ValueKind::Datetime,
        "timestamp" => ValueKind::Timestamp,
        _ => return None,
    })
}

/// The kinds an incremental window can be drawn on.
pub(super) fn window_kind(column: &str, type_name: &str) -> Result<ValueKind> {
    match key_kind(type_name) {
        Some(kind) if kind != ValueKind::Text => Ok(kind),
        _ => Err(Error::Spec(SpecError::single(
            "timestamp_column",
            format!(
                "{column:?} is {type_name}; an incremental load needs a date, datetime, timestamp or integer column"
            ),
        ))),
    }
}

/// A value in the one text form shardflow binds and compares: integers in decimal, dates as
/// `YYYY-MM-DD`, datetimes and timestamps as `YYYY-MM-DD HH:MM:SS.ffffff` (timestamps in UTC,
/// the session's zone). Accepts the ISO 8601 forms a watermark is reported in.
pub fn normalize(kind: ValueKind, text: &str) -> std::result::Result<String, String> {
    let text = text.trim();
    match kind {
        ValueKind::Int { unsigned: false } => text
            .parse::<i64>()
            .map(|v| v.to_string())
            .map_err(|_| "not a signed 64-bit integer".into()),
        ValueKind::Int { unsigned: true } => text
            .parse::<u64>()
            .map(|v| v.to_string())
            .map_err(|_| "not an unsigned 64-bit integer".into()),
        ValueKind::Text => Ok(text.to_string()),
        ValueKind::Date => {
            let at = parse_instant(text, false)?;
            if at.time() != chrono::NaiveTime::MIN {
                return Err("has a time of day, and the column is a date".into());
            }
            Ok(at.date().format("%Y-%m-%d").to_string())
        }
        ValueKind::Datetime => Ok(format_datetime(parse_instant(text, false)?)),
        ValueKind::Timestamp => Ok(format_datetime(parse_instant(text, true)?)),
    }
}

pub(super) fn format_datetime(at: chrono::NaiveDateTime) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// A date or date-time, naive or with an offset (converted to UTC when `zoned`; a DATETIME
/// has no zone, so only a zero offset is taken for it).
pub(super) fn parse_instant(
    text: &str,
    zoned: bool,
) -> std::result::Result<chrono::NaiveDateTime, String> {
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(at) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(at);
        }
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN));
    }
    let zoned_text = text.replacen(' ', "T", 1).replace("Z", "+00:00");
    for format in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(at) = chrono::DateTime::parse_from_str(&zoned_text, format) {
            if !zoned && at.offset().local_minus_utc() != 0 {
                return Err("has a UTC offset, and a DATETIME has no time zone".into());
            }
            return Ok(at.naive_utc());
        }
    }
    Err("not a date or date-time (YYYY-MM-DD[THH:MM:SS[.ffffff]][+HH:MM])".into())
}

/// A value bound to a statement in its column's own type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    Int(i64),
    UInt(u64),
    Text(String),
}

pub(super) fn bound(kind: ValueKind, value: &str) -> Result<Bound> {
    let bad = |why: String| Error::Message(format!("bound value {value:?}: {why}"));
    Ok(match kind {
        ValueKind::Int { unsigned: false } => Bound::Int(
            value
                .parse()
                .map_err(|_| bad("not a signed integer".into()))?,
        ),
        ValueKind::Int { unsigned: true } => Bound::UInt(
            value
                .parse()
                .map_err(|_| bad("not an unsigned integer".into()))?,
        ),
        ValueKind::Text => Bound::Text(value.to_string()),
        kind => Bound::Text(normalize(kind, value).map_err(bad)?),
    })
}

pub(super) fn bind_all<'q>(
    mut query: Query<'q, MySql, MySqlArguments>,
    values: &[Bound],
) -> Query<'q, MySql, MySqlArguments> {
    for v in values {
        query = match v {
            Bound::Int(i) => query.bind(*i),
            Bound::UInt(u) => query.bind(*u),
            Bound::Text(t) => query.bind(t.clone()),
        };
    }
    query
}

/// Two normalized values of one kind in the column's order.
pub(super) fn compare(kind: ValueKind, a: &str, b: &str) -> std::cmp::Ordering {
    match kind {
        ValueKind::Int { .. } => match (a.parse::<i128>(), b.parse::<i128>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
        // Fixed-width ISO forms sort as they read.
        _ => a.cmp(b),
    }
}

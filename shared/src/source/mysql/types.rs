//! MySQL/MariaDB values, as the binary protocol of a prepared statement sends them, decoded
//! straight into Arrow builders. The type map below is the only place MySQL types meet Arrow
//! types; the README's table is this one.
//!
//! | MySQL / MariaDB | Arrow | note |
//! |---|---|---|
//! | tinyint | Int8 | `bool`/`tinyint(1)` stays an integer: it can hold 2 or -1 |
//! | tinyint unsigned, smallint | Int16 | |
//! | smallint unsigned, mediumint (both), int | Int32 | |
//! | int unsigned, bigint | Int64 | |
//! | bigint unsigned | Decimal128(20, 0) | up to 18446744073709551615 (BigQuery NUMERIC; a Parquet UINT_64 would load as INT64) |
//! | bit(1) | Boolean | |
//! | bit(2..=63) / bit(64) | Int64 / Decimal128(20, 0) | the bits as a number |
//! | year | Int16 | |
//! | float / double | Float32 / Float64 | bit-exact |
//! | decimal(p,s), p <= 38 / p > 38 | Decimal128(p,s) / Decimal256(p,s) | decimal(65,30) is BigQuery BIGNUMERIC |
//! | char, varchar, *text, enum, set | Utf8 | set is its comma-separated members |
//! | json (MySQL), longtext with a `json_valid` check (MariaDB) | Utf8 | field metadata says `json` |
//! | binary, varbinary, *blob, geometry | Binary | binary(n) keeps its `\0` padding |
//! | date | Date32 | zero dates (`0000-00-00`, `2024-00-10`) become NULL, counted in a warning |
//! | datetime(fsp) | Timestamp(µs) | zero dates as for date |
//! | timestamp(fsp) | Timestamp(µs, UTC) | read at time_zone +00:00 |
//! | time(fsp) | Utf8 | `-838:59:59.000000`..`838:59:59`: a duration, which no Arrow or BigQuery time of day holds |
//! | anything else | Utf8 | the server's text |

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Decimal256Builder,
    Float32Builder, Float64Builder, Int8Builder, Int16Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Decimal128Type, Decimal256Type, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::source::SourceColumn;
use crate::{Error, Result};

/// How one column is read: the Arrow type and the decoding, decided once per column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    Int8,
    Int16,
    Int32,
    Int64,
    UInt64,
    /// bit(1).
    Bit1,
    /// bit(n), n <= 63, as a signed number; `unsigned` for bit(64).
    Bits {
        unsigned: bool,
    },
    Float32,
    Float64,
    Decimal128 {
        precision: u8,
        scale: i8,
    },
    Decimal256 {
        precision: u8,
        scale: i8,
    },
    Text,
    Json,
    Binary,
    Date,
    Datetime,
    Timestamp,
    /// time(fsp), as MySQL's own text with `fsp` fraction digits.
    Time {
        fsp: u8,
    },
}

/// A MySQL column type split into its parts: `bigint(20) unsigned` is base `bigint`, args
/// `[20]`, unsigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnType<'a> {
    pub base: &'a str,
    pub args: Vec<&'a str>,
    pub unsigned: bool,
}

/// Reads `COLUMN_TYPE` (lower case), e.g. `decimal(65,30)`, `int(10) unsigned zerofill`.
pub fn parse_column_type(text: &str) -> ColumnType<'_> {
    let text = text.trim();
    let base_end = text
        .find(|c: char| c == '(' || c.is_whitespace())
        .unwrap_or(text.len());
    let base = &text[..base_end];
    let rest = &text[base_end..];
    let (args, tail) = match (rest.starts_with('('), rest.rfind(')')) {
        (true, Some(close)) => (
            rest[1..close].split(',').map(str::trim).collect(),
            &rest[close + 1..],
        ),
        _ => (Vec::new(), rest),
    };
    ColumnType {
        base,
        // enum('a','b') members are not numbers; only numeric types read args.
        args,
        unsigned: tail.split_whitespace().any(|w| w == "unsigned"),
    }
}

fn arg(t: &ColumnType<'_>, i: usize) -> Option<u32> {
    t.args.get(i).and_then(|a| a.parse().ok())
}

/// The type map: one source column to its decoding.
pub fn decoding_for(col: &SourceColumn) -> Decoding {
    let t = parse_column_type(&col.type_name);
    match (t.base, t.unsigned) {
        ("tinyint", false) => Decoding::Int8,
        ("tinyint", true) | ("smallint", false) | ("year", _) => Decoding::Int16,
        ("smallint", true) | ("mediumint", _) | ("int" | "integer", false) => Decoding::Int32,
        ("int" | "integer", true) | ("bigint", false) => Decoding::Int64,
        ("bigint", true) => Decoding::UInt64,
        ("bit", _) => match arg(&t, 0).unwrap_or(1) {
            1 => Decoding::Bit1,
            n => Decoding::Bits { unsigned: n > 63 },
        },
        ("float", _) => Decoding::Float32,
        ("double" | "real", _) => Decoding::Float64,
        ("decimal" | "numeric" | "dec" | "fixed", _) => {
            let precision = arg(&t, 0).unwrap_or(10).clamp(1, 76) as u8;
            let scale = arg(&t, 1).unwrap_or(0).min(u32::from(precision)) as i8;
            if precision <= 38 {
                Decoding::Decimal128 { precision, scale }
            } else {
                Decoding::Decimal256 { precision, scale }
            }
        }
        ("json", _) => Decoding::Json,
        (
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry"
            | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
            | "multipolygon" | "geometrycollection",
            _,
        ) => Decoding::Binary,
        ("date", _) => Decoding::Date,
        ("datetime", _) => Decoding::Datetime,
        ("timestamp", _) => Decoding::Timestamp,
        ("time", _) => Decoding::Time {
            fsp: arg(&t, 0).unwrap_or(0).min(6) as u8,
        },
        _ => Decoding::Text,
    }
}

impl Decoding {
    pub fn data_type(self) -> DataType {
        match self {
            Decoding::Int8 => DataType::Int8,
            Decoding::Int16 => DataType::Int16,
            Decoding::Int32 => DataType::Int32,
            Decoding::Int64 | Decoding::Bits { unsigned: false } => DataType::Int64,
            // Exact, and a decimal BigQuery loads as NUMERIC (a Parquet UINT_64 loads as INT64
            // only, failing past 2^63 - 1).
            Decoding::UInt64 | Decoding::Bits { unsigned: true } => DataType::Decimal128(20, 0),
            Decoding::Bit1 => DataType::Boolean,
            Decoding::Float32 => DataType::Float32,
            Decoding::Float64 => DataType::Float64,
            Decoding::Decimal128 { precision, scale } => DataType::Decimal128(precision, scale),
            Decoding::Decimal256 { precision, scale } => DataType::Decimal256(precision, scale),
            Decoding::Text | Decoding::Json | Decoding::Time { .. } => DataType::Utf8,
            Decoding::Binary => DataType::Binary,
            Decoding::Date => DataType::Date32,
            Decoding::Datetime => DataType::Timestamp(TimeUnit::Microsecond, None),
            Decoding::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        }
    }
}

/// The source type as shown to people and warehouses: the column type without display
/// widths, `json` for MariaDB's checked longtext.
pub fn source_type_label(col: &SourceColumn) -> String {
    let t = parse_column_type(&col.type_name);
    match decoding_for(col) {
        Decoding::Json => "json".into(),
        Decoding::Decimal128 { precision, scale } | Decoding::Decimal256 { precision, scale } => {
            format!("decimal({precision},{scale})")
        }
        _ if t.unsigned => format!("{} unsigned", t.base),
        // Display widths mean nothing (MySQL 8 drops them); tinyint(1) is how bool shows.
        Decoding::Int8 | Decoding::Int16 | Decoding::Int32 | Decoding::Int64
            if col.type_name != "tinyint(1)" =>
        {
            t.base.to_string()
        }
        _ if matches!(t.base, "enum" | "set") => t.base.to_string(),
        _ => col.type_name.clone(),
    }
}

/// Days from 0001-01-01 (chrono's day 1) to 1970-01-01.
const UNIX_EPOCH_FROM_CE: i32 = 719_163;

enum Builder {
    Int8(Int8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Bool(BooleanBuilder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal128(Decimal128Builder),
    Decimal256(Decimal256Builder),
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl Builder {
    fn new(d: Decoding, capacity: usize) -> Self {
        match d {
            Decoding::Int8 => Builder::Int8(Int8Builder::with_capacity(capacity)),
            Decoding::Int16 => Builder::Int16(Int16Builder::with_capacity(capacity)),
            Decoding::Int32 => Builder::Int32(Int32Builder::with_capacity(capacity)),
            Decoding::Int64 | Decoding::Bits { unsigned: false } => {
                Builder::Int64(Int64Builder::with_capacity(capacity))
            }
            Decoding::Bit1 => Builder::Bool(BooleanBuilder::with_capacity(capacity)),
            Decoding::Float32 => Builder::Float32(Float32Builder::with_capacity(capacity)),
            Decoding::Float64 => Builder::Float64(Float64Builder::with_capacity(capacity)),
            Decoding::Decimal128 { .. } | Decoding::UInt64 | Decoding::Bits { unsigned: true } => {
                Builder::Decimal128(Decimal128Builder::with_capacity(capacity))
            }
            Decoding::Decimal256 { .. } => {
                Builder::Decimal256(Decimal256Builder::with_capacity(capacity))
            }
            Decoding::Text | Decoding::Json | Decoding::Time { .. } => {
                Builder::Utf8(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            Decoding::Binary => Builder::Binary(BinaryBuilder::with_capacity(capacity, capacity)),
            Decoding::Date => Builder::Date(Date32Builder::with_capacity(capacity)),
            Decoding::Datetime | Decoding::Timestamp => {
                Builder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity))
            }
        }
    }

    fn append_null(&mut self) {
        match self {
            Builder::Int8(b) => b.append_null(),
            Builder::Int16(b) => b.append_null(),
            Builder::Int32(b) => b.append_null(),
            Builder::Int64(b) => b.append_null(),
            Builder::Bool(b) => b.append_null(),
            Builder::Float32(b) => b.append_null(),
            Builder::Float64(b) => b.append_null(),
            Builder::Decimal128(b) => b.append_null(),
            Builder::Decimal256(b) => b.append_null(),
            Builder::Utf8(b) => b.append_null(),
            Builder::Binary(b) => b.append_null(),
            Builder::Date(b) => b.append_null(),
            Builder::Timestamp(b) => b.append_null(),
        }
    }

    fn finish(&mut self, d: Decoding) -> Result<ArrayRef> {
        Ok(match self {
            Builder::Int8(b) => Arc::new(b.finish()),
            Builder::Int16(b) => Arc::new(b.finish()),
            Builder::Int32(b) => Arc::new(b.finish()),
            Builder::Int64(b) => Arc::new(b.finish()),
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Float32(b) => Arc::new(b.finish()),
            Builder::Float64(b) => Arc::new(b.finish()),
            Builder::Decimal128(b) => match d {
                Decoding::Decimal128 { precision, scale } => {
                    Arc::new(b.finish().with_precision_and_scale(precision, scale)?)
                }
                _ => Arc::new(b.finish().with_precision_and_scale(20, 0)?),
            },
            Builder::Decimal256(b) => match d {
                Decoding::Decimal256 { precision, scale } => {
                    Arc::new(b.finish().with_precision_and_scale(precision, scale)?)
                }
                _ => Arc::new(b.finish()),
            },
            Builder::Utf8(b) => Arc::new(b.finish()),
            Builder::Binary(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Timestamp(b) => match d {
                Decoding::Timestamp => Arc::new(b.finish().with_timezone("UTC")),
                _ => Arc::new(b.finish()),
            },
        })
    }
}

/// Rows of one shard into Arrow batches of `batch_rows`.
pub struct RowDecoder {
    schema: SchemaRef,
    names: Vec<String>,
    decodings: Vec<Decoding>,
    builders: Vec<Builder>,
    rows: usize,
    batch_rows: usize,
    /// Zero dates read as NULL, per column.
    zero_dates: Vec<u64>,
}

impl RowDecoder {
    pub fn new(columns: &[SourceColumn], batch_rows: usize) -> Self {
        let batch_rows = batch_rows.max(1);
        let decodings: Vec<Decoding> = columns.iter().map(decoding_for).collect();
        RowDecoder {
            schema: crate::source::arrow_schema(crate::spec::SourceType::Mysql, columns),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            builders: decodings
                .iter()
                .map(|d| Builder::new(*d, batch_rows))
                .collect(),
            decodings,
            rows: 0,
            batch_rows,
            zero_dates: vec![0; columns.len()],
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn batch_full(&self) -> bool {
        self.rows >= self.batch_rows
    }

    /// Zero dates read as NULL so far, by column name (only columns that had any).
    pub fn zero_dates(&self) -> Vec<(&str, u64)> {
        self.names
            .iter()
            .zip(&self.zero_dates)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| (name.as_str(), *n))
            .collect()
    }

    /// Appends one row: `values[i]` is column i's binary-protocol bytes, `None` for NULL.
    pub fn push_row<'a>(
        &mut self,
        values: impl IntoIterator<Item = Option<&'a [u8]>>,
    ) -> Result<()> {
        let mut n = 0;
        for (i, value) in values.into_iter().enumerate() {
            let (Some(d), Some(b)) = (self.decodings.get(i), self.builders.get_mut(i)) else {
                return Err(Error::Message(format!(
                    "the source sent more than the {} columns asked for",
                    self.decodings.len()
                )));
            };
            n += 1;
            let Some(bytes) = value else {
                b.append_null();
                continue;
            };
            let zero_date = append(*d, b, bytes).map_err(|problem| Error::Decode {
                column: self.names[i].clone(),
                problem,
            })?;
            if zero_date {
                self.zero_dates[i] += 1;
            }
        }
        if n != self.decodings.len() {
            return Err(Error::Message(format!(
                "the source sent {n} of the {} columns asked for",
                self.decodings.len()
            )));
        }
        self.rows += 1;
        Ok(())
    }

    pub fn take_batch(&mut self) -> Result<Option<RecordBatch>> {
        if self.rows == 0 {
            return Ok(None);
        }
        let columns = self
            .builders
            .iter_mut()
            .zip(&self.decodings)
            .map(|(b, d)| b.finish(*d))
            .collect::<Result<Vec<_>>>()?;
        self.rows = 0;
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }
}

fn fixed<const N: usize>(bytes: &[u8]) -> std::result::Result<[u8; N], String> {
    bytes
        .try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", bytes.len()))
}

/// A little-endian integer of 1, 2, 4 or 8 bytes.
fn int_le(bytes: &[u8], unsigned: bool) -> std::result::Result<i128, String> {
    Ok(match (bytes.len(), unsigned) {
        (1, false) => i128::from(bytes[0] as i8),
        (1, true) => i128::from(bytes[0]),
        (2, false) => i128::from(i16::from_le_bytes(fixed(bytes)?)),
        (2, true) => i128::from(u16::from_le_bytes(fixed(bytes)?)),
        (4, false) => i128::from(i32::from_le_bytes(fixed(bytes)?)),
        (4, true) => i128::from(u32::from_le_bytes(fixed(bytes)?)),
        (8, false) => i128::from(i64::from_le_bytes(fixed(bytes)?)),
        (8, true) => i128::from(u64::from_le_bytes(fixed(bytes)?)),
        (n, _) => return Err(format!("an integer of {n} bytes")),
    })
}

fn narrow<T: TryFrom<i128>>(v: i128, what: &str) -> std::result::Result<T, String> {
    T::try_from(v).map_err(|_| format!("{v} does not fit {what}"))
}

/// The date part of a binary DATE/DATETIME/TIMESTAMP (`[len, year lo, year hi, month, day,
/// ...]`); `None` for a zero date or one with a zero month or day.
fn ymd(bytes: &[u8]) -> std::result::Result<Option<(chrono::NaiveDate, &[u8])>, String> {
    let len = usize::from(*bytes.first().ok_or("an empty date")?);
    let body = bytes.get(1..1 + len).ok_or("a truncated date")?;
    if len == 0 {
        return Ok(None);
    }
    if len < 4 {
        return Err(format!("a date of {len} bytes"));
    }
    let year = i32::from(u16::from_le_bytes([body[0], body[1]]));
    let (month, day) = (u32::from(body[2]), u32::from(body[3]));
    if month == 0 || day == 0 {
        return Ok(None);
    }
    let date = chrono::NaiveDate::from_ymd_opt(year, month, day)
        .ok_or_else(|| format!("{year:04}-{month:02}-{day:02} is not a date"))?;
    Ok(Some((date, &body[4..])))
}

fn days(date: chrono::NaiveDate) -> i32 {
    use chrono::Datelike;
    date.num_days_from_ce() - UNIX_EPOCH_FROM_CE
}

/// Microseconds of `[hour, minute, second, (micros u32)]`.
fn day_micros(rest: &[u8]) -> std::result::Result<i64, String> {
    let (h, m, s, micros) = match rest.len() {
        0 => (0, 0, 0, 0),
        3 => (rest[0], rest[1], rest[2], 0),
        7 => (
            rest[0],
            rest[1],
            rest[2],
            u32::from_le_bytes([rest[3], rest[4], rest[5], rest[6]]),
        ),
        n => return Err(format!("a time of day of {n} bytes")),
    };
    Ok(((i64::from(h) * 60 + i64::from(m)) * 60 + i64::from(s)) * 1_000_000 + i64::from(micros))
}

/// MySQL's text of a binary TIME: `[len, negative, days u32, hour, minute, second, (micros)]`.
fn time_text(bytes: &[u8], fsp: u8) -> std::result::Result<String, String> {
    let len = usize::from(*bytes.first().ok_or("an empty time")?);
    let body = bytes.get(1..1 + len).ok_or("a truncated time")?;
    let (negative, hours, minutes, seconds, micros) = match len {
        0 => (false, 0u64, 0u8, 0u8, 0u32),
        8 | 12 => (
            body[0] != 0,
            u64::from(u32::from_le_bytes([body[1], body[2], body[3], body[4]])) * 24
                + u64::from(body[5]),
            body[6],
            body[7],
            if len == 12 {
                u32::from_le_bytes([body[8], body[9], body[10], body[11]])
            } else {
                0
            },
        ),
        n => return Err(format!("a time of {n} bytes")),
    };
    let mut text = format!(
        "{}{hours:02}:{minutes:02}:{seconds:02}",
        if negative { "-" } else { "" }
    );
    if fsp > 0 {
        let fraction = format!("{micros:06}");
        text.push('.');
        text.push_str(&fraction[..usize::from(fsp)]);
    }
    Ok(text)
}

fn utf8(bytes: &[u8]) -> std::result::Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("text that is not UTF-8 ({e})"))
}

/// Appends one non-NULL value; true when it was a zero date, appended as NULL.
fn append(d: Decoding, b: &mut Builder, bytes: &[u8]) -> std::result::Result<bool, String> {
    match (d, b) {
        (Decoding::Int8, Builder::Int8(b)) => {
            b.append_value(narrow(int_le(bytes, false)?, "tinyint")?)
        }
        (Decoding::Int16, Builder::Int16(b)) => {
            // tinyint unsigned comes as one byte, year as two.
            b.append_value(narrow(int_le(bytes, bytes.len() == 1)?, "Int16")?)
        }
        (Decoding::Int32, Builder::Int32(b)) => {
            // smallint unsigned comes as two bytes; mediumint as four, sign-extended.
            b.append_value(narrow(int_le(bytes, bytes.len() == 2)?, "Int32")?)
        }
        (Decoding::Int64, Builder::Int64(b)) => {
            // int unsigned comes as four bytes.
            b.append_value(narrow(int_le(bytes, bytes.len() == 4)?, "Int64")?)
        }
        (Decoding::UInt64, Builder::Decimal128(b)) => b.append_value(int_le(bytes, true)?),
        (Decoding::Bit1, Builder::Bool(b)) => b.append_value(bytes.iter().any(|x| *x != 0)),
        (Decoding::Bits { .. }, Builder::Int64(b)) => {
            b.append_value(narrow(bits(bytes)?, "Int64")?)
        }
        (Decoding::Bits { .. }, Builder::Decimal128(b)) => b.append_value(bits(bytes)?),
        (Decoding::Float32, Builder::Float32(b)) => {
            b.append_value(f32::from_le_bytes(fixed(bytes)?))
        }
        (Decoding::Float64, Builder::Float64(b)) => {
            b.append_value(f64::from_le_bytes(fixed(bytes)?))
        }
        (Decoding::Decimal128 { precision, scale }, Builder::Decimal128(b)) => {
            let text = utf8(bytes)?;
            b.append_value(
                arrow::compute::kernels::cast_utils::parse_decimal::<Decimal128Type>(
                    text, precision, scale,
                )
                .map_err(|e| format!("{text:?} as decimal({precision},{scale}): {e}"))?,
            )
        }
        (Decoding::Decimal256 { precision, scale }, Builder::Decimal256(b)) => {
            let text = utf8(bytes)?;
            b.append_value(
                arrow::compute::kernels::cast_utils::parse_decimal::<Decimal256Type>(
                    text, precision, scale,
                )
                .map_err(|e| format!("{text:?} as decimal({precision},{scale}): {e}"))?,
            )
        }
        (Decoding::Text | Decoding::Json, Builder::Utf8(b)) => b.append_value(utf8(bytes)?),
        (Decoding::Time { fsp }, Builder::Utf8(b)) => b.append_value(time_text(bytes, fsp)?),
        (Decoding::Binary, Builder::Binary(b)) => b.append_value(bytes),
        (Decoding::Date, Builder::Date(b)) => match ymd(bytes)? {
            Some((date, _)) => b.append_value(days(date)),
            None => {
                b.append_null();
                return Ok(true);
            }
        },
        (Decoding::Datetime | Decoding::Timestamp, Builder::Timestamp(b)) => match ymd(bytes)? {
            Some((date, rest)) => {
                b.append_value(i64::from(days(date)) * 86_400_000_000 + day_micros(rest)?)
            }
            None => {
                b.append_null();
                return Ok(true);
            }
        },
        (d, _) => return Err(format!("no builder for {d:?}")),
    }
    Ok(false)
}

/// A BIT(n) value: big-endian bytes.
fn bits(bytes: &[u8]) -> std::result::Result<i128, String> {
    if bytes.len() > 8 {
        return Err(format!("a bit value of {} bytes", bytes.len()));
    }
    Ok(bytes
        .iter()
        .fold(0i128, |acc, b| (acc << 8) | i128::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Decimal128Type as D128, TimestampMicrosecondType};

    fn col(name: &str, ty: &str) -> SourceColumn {
        SourceColumn {
            name: name.into(),
            type_oid: 0,
            type_name: ty.into(),
            typmod: -1,
            nullable: true,
        }
    }

    #[test]
    fn column_types_are_parsed() {
        let t = parse_column_type("bigint(20) unsigned zerofill");
        assert_eq!((t.base, t.args, t.unsigned), ("bigint", vec!["20"], true));
        let t = parse_column_type("decimal(65,30)");
        assert_eq!(
            (t.base, t.args, t.unsigned),
            ("decimal", vec!["65", "30"], false)
        );
        let t = parse_column_type("enum('a,b','unsigned')");
        assert_eq!((t.base, t.unsigned), ("enum", false));
    }

    #[test]
    fn the_type_map() {
        let cases = [
            ("tinyint(1)", DataType::Int8),
            ("tinyint(3) unsigned", DataType::Int16),
            ("smallint(5) unsigned", DataType::Int32),
            ("mediumint(8) unsigned", DataType::Int32),
            ("int(10) unsigned", DataType::Int64),
            ("bigint(20) unsigned", DataType::Decimal128(20, 0)),
            ("bit(1)", DataType::Boolean),
            ("bit(12)", DataType::Int64),
            ("bit(64)", DataType::Decimal128(20, 0)),
            ("year(4)", DataType::Int16),
            ("float", DataType::Float32),
            ("double", DataType::Float64),
            ("decimal(38,10)", DataType::Decimal128(38, 10)),
            ("decimal(65,30)", DataType::Decimal256(65, 30)),
            ("enum('x','y')", DataType::Utf8),
            ("set('x','y')", DataType::Utf8),
            ("json", DataType::Utf8),
            ("varbinary(10)", DataType::Binary),
            ("date", DataType::Date32),
            (
                "datetime(6)",
                DataType::Timestamp(TimeUnit::Microsecond, None),
            ),
            (
                "timestamp",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ),
            ("time(3)", DataType::Utf8),
            ("inet6", DataType::Utf8),
        ];
        for (ty, want) in cases {
            assert_eq!(decoding_for(&col("c", ty)).data_type(), want, "{ty}");
        }
        assert_eq!(
            source_type_label(&col("c", "bigint(20) unsigned")),
            "bigint unsigned"
        );
        assert_eq!(
            source_type_label(&col("c", "decimal(65,30)")),
            "decimal(65,30)"
        );
        assert_eq!(source_type_label(&col("c", "enum('a','b')")), "enum");
    }

    #[test]
    fn binary_values_decode_exactly() {
        let cols = [
            col("u", "bigint(20) unsigned"),
            col("d", "date"),
            col("ts", "datetime(6)"),
            col("t", "time(6)"),
            col("b", "bit(12)"),
        ];
        let mut decoder = RowDecoder::new(&cols, 10);
        let date = [4u8, 0xe8, 0x07, 2, 29]; // 2024-02-29
        let ts = [11u8, 0x0f, 0x27, 12, 31, 23, 59, 59, 0x3f, 0x42, 0x0f, 0]; // 9999-12-31 23:59:59.999999
        let time = [12u8, 1, 34, 0, 0, 0, 22, 59, 59, 1, 0, 0, 0]; // -838:59:59.000001
        decoder
            .push_row([
                Some(&u64::MAX.to_le_bytes()[..]),
                Some(&date[..]),
                Some(&ts[..]),
                Some(&time[..]),
                Some(&[0x0f, 0xff][..]),
            ])
            .unwrap();
        decoder
            .push_row([
                None,
                Some(&[0u8][..]),
                Some(&[0u8][..]),
                Some(&[0u8][..]),
                None,
            ])
            .unwrap();
        let batch = decoder.take_batch().unwrap().unwrap();
        assert_eq!(
            batch.column(0).as_primitive::<D128>().value(0),
            i128::from(u64::MAX)
        );
        assert_eq!(
            batch.schema().field(0).data_type(),
            &DataType::Decimal128(20, 0)
        );
        assert!(batch.column(0).is_null(1));
        assert_eq!(
            batch.column(1).as_primitive::<Date32Type>().value(0),
            19_782
        );
        assert!(batch.column(1).is_null(1), "a zero date is NULL");
        assert_eq!(
            batch
                .column(2)
                .as_primitive::<TimestampMicrosecondType>()
                .value(0),
            253_402_300_799_999_999
        );
        assert_eq!(
            batch.column(3).as_string::<i32>().value(0),
            "-838:59:59.000001"
        );
        assert_eq!(
            batch.column(3).as_string::<i32>().value(1),
            "00:00:00.000000"
        );
        assert_eq!(
            batch
                .column(4)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0),
            0x0fff
        );
        assert_eq!(decoder.zero_dates(), vec![("d", 1), ("ts", 1)]);
        let err = decoder.push_row([Some(&[1u8; 3][..])]).unwrap_err();
        assert_eq!(err.to_string(), "decoding u: an integer of 3 bytes");
        let mut decoder = RowDecoder::new(&cols, 10);
        let err = decoder.push_row([None]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message: the source sent 1 of the 5 columns asked for"
        );
    }
}

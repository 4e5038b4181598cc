//! PostgreSQL binary COPY decoded straight into Arrow builders: no per-row Rust values, one
//! pass over each tuple's bytes. The type map below is the only place PostgreSQL types meet
//! Arrow types; every entry has a test.
//!
//! | PostgreSQL | Arrow | note |
//! |---|---|---|
//! | boolean | Boolean | |
//! | smallint / integer / bigint | Int16 / Int32 / Int64 | |
//! | real / double precision | Float32 / Float64 | bit-exact, NaN and ±Infinity kept |
//! | numeric(p,s), 1 <= p <= 38, 0 <= s <= p | Decimal128(p,s) | |
//! | numeric(p,s), 38 < p <= 76, 0 <= s <= p | Decimal256(p,s) | |
//! | numeric (unconstrained, or p > 76, or s < 0, or s > p) | Utf8 | the exact decimal text, `NaN`, `Infinity`; no fixed Arrow scale can hold every value losslessly |
//! | text, varchar(n), char(n), name | Utf8 | char(n) keeps its padding, as PostgreSQL returns it |
//! | json / jsonb | Utf8 | the JSON text; field metadata says `json`/`jsonb` |
//! | uuid | Utf8 | canonical lower-case 36-character form |
//! | bytea | Binary | |
//! | date | Date32 | `infinity` / `-infinity` become 9999-12-31 / 0001-01-01, the ends of BigQuery's range |
//! | timestamp | Timestamp(µs) | `infinity` / `-infinity` become 9999-12-31 23:59:59.999999 / 0001-01-01 00:00:00 |
//! | timestamptz | Timestamp(µs, "UTC") | as timestamp |
//! | time | Time64(µs) | `24:00:00` is refused with an error naming the column |
//! | money | Utf8 | `column::numeric::text`: the exact amount, without the locale's symbol |
//! | anything else | Utf8 | read as `column::text`, PostgreSQL's own text form under the settings the extraction pins (ISO dates, ISO 8601 intervals, UTC, shortest exact floats) |

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Decimal256Builder,
    Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit, i256};
use arrow::record_batch::RecordBatch;
use bytes::{Buf, BytesMut};

use crate::source::{SourceColumn, quote_ident};
use crate::{Error, Result};

pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const MONEY: u32 = 790;
    pub const JSONB: u32 = 3802;
}

/// Days from 1970-01-01 to PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Where PostgreSQL's `-infinity` / `infinity` dates land: the ends of BigQuery's DATE range,
/// 0001-01-01 and 9999-12-31 (days since 1970-01-01), so comparisons keep their meaning.
pub const DATE_MINUS_INFINITY: i32 = -719_162;
pub const DATE_INFINITY: i32 = 2_932_896;
/// And `-infinity` / `infinity` timestamps: 0001-01-01 00:00:00 and 9999-12-31 23:59:59.999999
/// (µs since 1970-01-01), the ends of BigQuery's DATETIME and TIMESTAMP ranges.
pub const TIMESTAMP_MINUS_INFINITY: i64 = -62_135_596_800_000_000;
pub const TIMESTAMP_INFINITY: i64 = 253_402_300_799_999_999;

/// How one column is read: the Arrow type and the decoding, decided once per column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    Bool,
    Int16,
    Int32,
    Int64,
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
    NumericText,
    Text,
    Jsonb,
    Uuid,
    Bytea,
    Date,
    Timestamp,
    TimestampTz,
    Time,
    /// Not decoded natively: selected as `::text`.
    TextCast,
    /// `money`, selected as `::numeric::text` (its text form carries the locale's symbol).
    MoneyText,
}

/// `numeric(p,s)` from a type modifier; None when unconstrained.
pub fn numeric_precision_scale(typmod: i32) -> Option<(i32, i32)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let precision = (t >> 16) & 0xffff;
    // PostgreSQL 15 stores the scale as an 11-bit signed number.
    let scale = ((t & 0x7ff) ^ 1024) - 1024;
    Some((precision, scale))
}

/// The type map: one source column to its decoding.
pub fn decoding_for(col: &SourceColumn) -> Decoding {
    match col.type_oid {
        oid::BOOL => Decoding::Bool,
        oid::INT2 => Decoding::Int16,
        oid::INT4 => Decoding::Int32,
        oid::INT8 => Decoding::Int64,
        oid::FLOAT4 => Decoding::Float32,
        oid::FLOAT8 => Decoding::Float64,
        oid::NUMERIC => match numeric_precision_scale(col.typmod) {
            Some((p, s)) if (1..=38).contains(&p) && (0..=p).contains(&s) => Decoding::Decimal128 {
                precision: p as u8,
                scale: s as i8,
            },
            Some((p, s)) if (39..=76).contains(&p) && (0..=p).contains(&s) => {
                Decoding::Decimal256 {
                    precision: p as u8,
                    scale: s as i8,
                }
            }
            _ => Decoding::NumericText,
        },
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::JSON => Decoding::Text,
        oid::JSONB => Decoding::Jsonb,
        oid::UUID => Decoding::Uuid,
        oid::BYTEA => Decoding::Bytea,
        oid::DATE => Decoding::Date,
        oid::TIMESTAMP => Decoding::Timestamp,
        oid::TIMESTAMPTZ => Decoding::TimestampTz,
        oid::TIME => Decoding::Time,
        oid::MONEY => Decoding::MoneyText,
        _ => Decoding::TextCast,
    }
}

impl Decoding {
    pub fn data_type(self) -> DataType {
        match self {
            Decoding::Bool => DataType::Boolean,
            Decoding::Int16 => DataType::Int16,
            Decoding::Int32 => DataType::Int32,
            Decoding::Int64 => DataType::Int64,
            Decoding::Float32 => DataType::Float32,
            Decoding::Float64 => DataType::Float64,
            Decoding::Decimal128 { precision, scale } => DataType::Decimal128(precision, scale),
            Decoding::Decimal256 { precision, scale } => DataType::Decimal256(precision, scale),
            Decoding::NumericText
            | Decoding::Text
            | Decoding::Jsonb
            | Decoding::Uuid
            | Decoding::TextCast
            | Decoding::MoneyText => DataType::Utf8,
            Decoding::Bytea => DataType::Binary,
            Decoding::Date => DataType::Date32,
            Decoding::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Decoding::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Decoding::Time => DataType::Time64(TimeUnit::Microsecond),
        }
    }
}

/// The source type as shown to people and warehouses: `numeric(12,2)`, `jsonb`, `uuid`.
pub fn source_type_label(col: &SourceColumn) -> String {
    match (col.type_oid, numeric_precision_scale(col.typmod)) {
        (oid::NUMERIC, Some((p, s))) => format!("numeric({p},{s})"),
        _ => col.type_name.clone(),
    }
}

/// The SELECT list item for a column: natively decoded types as they are, the rest as text.
pub fn select_item(col: &SourceColumn) -> String {
    match decoding_for(col) {
        Decoding::TextCast => format!("{}::text", quote_ident(&col.name)),
        Decoding::MoneyText => format!("{}::numeric::text", quote_ident(&col.name)),
        _ => quote_ident(&col.name),
    }
}

enum Builder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal128(Decimal128Builder, i8),
    Decimal256(Decimal256Builder, i8),
    NumericText(StringBuilder),
    Text(StringBuilder),
    Jsonb(StringBuilder),
    Uuid(StringBuilder),
    Bytea(BinaryBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Time(Time64MicrosecondBuilder),
}

impl Builder {
    fn new(decoding: Decoding, capacity: usize) -> Result<Self> {
        Ok(match decoding {
            Decoding::Bool => Builder::Bool(BooleanBuilder::with_capacity(capacity)),
            Decoding::Int16 => Builder::Int16(Int16Builder::with_capacity(capacity)),
            Decoding::Int32 => Builder::Int32(Int32Builder::with_capacity(capacity)),
            Decoding::Int64 => Builder::Int64(Int64Builder::with_capacity(capacity)),
            Decoding::Float32 => Builder::Float32(Float32Builder::with_capacity(capacity)),
            Decoding::Float64 => Builder::Float64(Float64Builder::with_capacity(capacity)),
            Decoding::Decimal128 { precision, scale } => Builder::Decimal128(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)?,
                scale,
            ),
            Decoding::Decimal256 { precision, scale } => Builder::Decimal256(
                Decimal256Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)?,
                scale,
            ),
            Decoding::NumericText => {
                Builder::NumericText(StringBuilder::with_capacity(capacity, capacity * 8))
            }
            Decoding::Text | Decoding::TextCast | Decoding::MoneyText => {
                Builder::Text(StringBuilder::with_capacity(capacity, capacity * 16))
            }
            Decoding::Jsonb => {
                Builder::Jsonb(StringBuilder::with_capacity(capacity, capacity * 32))
            }
            Decoding::Uuid => Builder::Uuid(StringBuilder::with_capacity(capacity, capacity * 36)),
            Decoding::Bytea => {
                Builder::Bytea(BinaryBuilder::with_capacity(capacity, capacity * 16))
            }
            Decoding::Date => Builder::Date(Date32Builder::with_capacity(capacity)),
            Decoding::Time => Builder::Time(Time64MicrosecondBuilder::with_capacity(capacity)),
            Decoding::Timestamp => {
                Builder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity))
            }
            Decoding::TimestampTz => Builder::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            ),
        })
    }

    fn append_null(&mut self) {
        match self {
            Builder::Bool(b) => b.append_null(),
            Builder::Int16(b) => b.append_null(),
            Builder::Int32(b) => b.append_null(),
            Builder::Int64(b) => b.append_null(),
            Builder::Float32(b) => b.append_null(),
            Builder::Float64(b) => b.append_null(),
            Builder::Decimal128(b, _) => b.append_null(),
            Builder::Decimal256(b, _) => b.append_null(),
            Builder::NumericText(b) | Builder::Text(b) | Builder::Jsonb(b) | Builder::Uuid(b) => {
                b.append_null()
            }
            Builder::Bytea(b) => b.append_null(),
            Builder::Date(b) => b.append_null(),
            Builder::Timestamp(b) => b.append_null(),
            Builder::Time(b) => b.append_null(),
        }
    }

    /// Appends one non-NULL value from its binary wire form.
    #[inline]
    fn append(&mut self, v: &[u8]) -> std::result::Result<(), String> {
        match self {
            Builder::Bool(b) => b.append_value(fixed::<1>(v)?[0] != 0),
            Builder::Int16(b) => b.append_value(i16::from_be_bytes(fixed(v)?)),
            Builder::Int32(b) => b.append_value(i32::from_be_bytes(fixed(v)?)),
            Builder::Int64(b) => b.append_value(i64::from_be_bytes(fixed(v)?)),
            Builder::Float32(b) => b.append_value(f32::from_be_bytes(fixed(v)?)),
            Builder::Float64(b) => b.append_value(f64::from_be_bytes(fixed(v)?)),
            Builder::Decimal128(b, scale) => b.append_value(numeric_to_i128(v, *scale)?),
            Builder::Decimal256(b, scale) => b.append_value(numeric_to_i256(v, *scale)?),
            Builder::NumericText(b) => {
                // Written straight into the builder's buffer, then closed as one value.
                write_numeric(v, b)?;
                b.append_value("");
            }
            Builder::Text(b) => b.append_value(utf8(v)?),
            Builder::Jsonb(b) => match v.split_first() {
                Some((1, text)) => b.append_value(utf8(text)?),
                Some((version, _)) => {
                    return Err(format!("unknown jsonb format version {version}"));
                }
                None => return Err("empty jsonb value".into()),
            },
            Builder::Uuid(b) => {
                let text = format_uuid(fixed(v)?);
                b.append_value(std::str::from_utf8(&text).map_err(|e| e.to_string())?)
            }
            Builder::Bytea(b) => b.append_value(v),
            Builder::Date(b) => b.append_value(match i32::from_be_bytes(fixed(v)?) {
                i32::MAX => DATE_INFINITY,
                i32::MIN => DATE_MINUS_INFINITY,
                // PostgreSQL's dates end in 5874897 AD, far inside this sum's range; bytes
                // past it are refused rather than wrapped (found by the pg_copy fuzz target).
                days => days
                    .checked_add(PG_EPOCH_DAYS)
                    .ok_or("date is past what PostgreSQL and Arrow's Date32 can hold")?,
            }),
            Builder::Time(b) => {
                let micros = i64::from_be_bytes(fixed(v)?);
                if !(0..MICROS_PER_DAY).contains(&micros) {
                    return Err(
                        "time is 24:00:00, which Arrow Time64 and BigQuery TIME cannot hold".into(),
                    );
                }
                b.append_value(micros)
            }
            Builder::Timestamp(b) => b.append_value(match i64::from_be_bytes(fixed(v)?) {
                i64::MAX => TIMESTAMP_INFINITY,
                i64::MIN => TIMESTAMP_MINUS_INFINITY,
                // PostgreSQL reaches 294276 AD; microseconds since 1970 in an i64 end at
                // 294247-01-10T04:00:54.775807, where the sum would wrap to year -290,308.
                micros => micros.checked_add(PG_EPOCH_MICROS).ok_or(
                    "timestamp is after 294247-01-10T04:00:54.775807, past what Arrow's \
                     microsecond timestamps can hold",
                )?,
            }),
        }
        Ok(())
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::Int16(b) => Arc::new(b.finish()),
            Builder::Int32(b) => Arc::new(b.finish()),
            Builder::Int64(b) => Arc::new(b.finish()),
            Builder::Float32(b) => Arc::new(b.finish()),
            Builder::Float64(b) => Arc::new(b.finish()),
            Builder::Decimal128(b, _) => Arc::new(b.finish()),
            Builder::Decimal256(b, _) => Arc::new(b.finish()),
            Builder::NumericText(b) | Builder::Text(b) | Builder::Jsonb(b) | Builder::Uuid(b) => {
                Arc::new(b.finish())
            }
            Builder::Bytea(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Timestamp(b) => Arc::new(b.finish()),
            Builder::Time(b) => Arc::new(b.finish()),
        }
    }
}

#[inline]
fn fixed<const N: usize>(v: &[u8]) -> std::result::Result<[u8; N], String> {
    v.try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", v.len()))
}

#[inline]
fn utf8(v: &[u8]) -> std::result::Result<&str, String> {
    std::str::from_utf8(v).map_err(|e| format!("invalid UTF-8: {e}"))
}

/// The canonical 36-character form, on the stack: no allocation per value.
fn format_uuid(b: [u8; 16]) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut pos = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            pos += 1;
        }
        out[pos] = HEX[(byte >> 4) as usize];
        out[pos + 1] = HEX[(byte & 0xf) as usize];
        pos += 2;
    }
    out
}

/// The parts of a binary `numeric`: base-10000 digits, the weight of the first digit, sign.
struct NumericParts<'a> {
    digits: &'a [u8],
    weight: i32,
    sign: u16,
    dscale: u16,
}

const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

fn numeric_parts(v: &[u8]) -> std::result::Result<NumericParts<'_>, String> {
    if v.len() < 8 {
        return Err(format!("numeric value of {} bytes is too short", v.len()));
    }
    let ndigits = u16::from_be_bytes([v[0], v[1]]) as usize;
    let weight = i16::from_be_bytes([v[2], v[3]]) as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    let dscale = u16::from_be_bytes([v[6], v[7]]);
    let digits = &v[8..];
    if digits.len() != ndigits * 2 {
        return Err(format!(
            "numeric says {ndigits} digits but carries {} bytes",
            digits.len()
        ));
    }
    Ok(NumericParts {
        digits,
        weight,
        sign,
        dscale,
    })
}

fn digit(digits: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([digits[2 * i], digits[2 * i + 1]])
}

fn special(sign: u16) -> Option<&'static str> {
    match sign {
        NUMERIC_NAN => Some("NaN"),
        NUMERIC_PINF => Some("Infinity"),
        NUMERIC_NINF => Some("-Infinity"),
        _ => None,
    }
}

/// A `numeric` as an integer scaled by `10^scale`, refusing values that would lose digits.
fn numeric_to_i128(v: &[u8], scale: i8) -> std::result::Result<i128, String> {
    let n = numeric_parts(v)?;
    if let Some(s) = special(n.sign) {
        return Err(format!("numeric {s} cannot be stored in a DECIMAL column"));
    }
    match scaled_i128(&n, scale) {
        Some(x) => Ok(x),
        // Intermediate overflow near precision 38: redo it in 256 bits.
        None => numeric_to_i256(v, scale)?
            .to_i128()
            .ok_or_else(|| "numeric value out of range for Decimal128".to_string()),
    }
}

fn scaled_i128(n: &NumericParts<'_>, scale: i8) -> Option<i128> {
    let count = n.digits.len() / 2;
    let mut acc: i128 = 0;
    for i in 0..count {
        acc = acc
            .checked_mul(10_000)?
            .checked_add(digit(n.digits, i) as i128)?;
    }
    let exp = 4 * (n.weight - count as i32 + 1) + scale as i32;
    if exp >= 0 {
        acc = acc.checked_mul(10i128.checked_pow(exp as u32)?)?;
    } else {
        let div = 10i128.checked_pow((-exp) as u32)?;
        if acc % div != 0 {
            return None;
        }
        acc /= div;
    }
    Some(if n.sign == NUMERIC_NEG { -acc } else { acc })
}

fn numeric_to_i256(v: &[u8], scale: i8) -> std::result::Result<i256, String> {
    let n = numeric_parts(v)?;
    if let Some(s) = special(n.sign) {
        return Err(format!("numeric {s} cannot be stored in a DECIMAL column"));
    }
    let overflow = || "numeric value out of range for its declared precision".to_string();
    let count = n.digits.len() / 2;
    let ten_k = i256::from_i128(10_000);
    let mut acc = i256::ZERO;
    for i in 0..count {
        acc = acc
            .checked_mul(ten_k)
            .and_then(|a| a.checked_add(i256::from_i128(digit(n.digits, i) as i128)))
            .ok_or_else(overflow)?;
    }
    let exp = 4 * (n.weight - count as i32 + 1) + scale as i32;
    let ten = i256::from_i128(10);
    if exp >= 0 {
        acc = acc
            .checked_mul(ten.checked_pow(exp as u32).ok_or_else(overflow)?)
            .ok_or_else(overflow)?;
    } else {
        let div = ten.checked_pow((-exp) as u32).ok_or_else(overflow)?;
        if acc.checked_rem(div) != Some(i256::ZERO) {
            return Err(format!(
                "numeric value has more than {scale} fractional digits"
            ));
        }
        acc = acc.checked_div(div).ok_or_else(overflow)?;
    }
    Ok(if n.sign == NUMERIC_NEG {
        acc.wrapping_neg()
    } else {
        acc
    })
}

/// Writes a `numeric` as PostgreSQL prints it (every digit, exactly `dscale` fractional
/// digits) into `out`, without building a temporary string. Nothing is written when the value
/// is malformed.
fn write_numeric(v: &[u8], out: &mut impl std::fmt::Write) -> std::result::Result<(), String> {
    let n = numeric_parts(v)?;
    let failed = |_| "cannot format a numeric".to_string();
    if let Some(s) = special(n.sign) {
        return out.write_str(s).map_err(failed);
    }
    let count = (n.digits.len() / 2) as i32;
    let group = |g: i32| -> u16 {
        if g >= 0 && g < count {
            digit(n.digits, g as usize)
        } else {
            0
        }
    };
    if n.sign == NUMERIC_NEG {
        out.write_char('-').map_err(failed)?;
    }
    if n.weight < 0 {
        out.write_char('0').map_err(failed)?;
    } else {
        write!(out, "{}", group(0)).map_err(failed)?;
        for g in 1..=n.weight {
            write!(out, "{:04}", group(g)).map_err(failed)?;
        }
    }
    if n.dscale > 0 {
        out.write_char('.').map_err(failed)?;
        let mut left = n.dscale as usize;
        let mut g = n.weight + 1;
        while left > 0 {
            let d = group(g);
            if left >= 4 {
                write!(out, "{d:04}").map_err(failed)?;
                left -= 4;
            } else {
                // The leading `left` digits of this group.
                let shown = d / 10u16.pow((4 - left) as u32);
                write!(out, "{shown:0left$}").map_err(failed)?;
                left = 0;
            }
            g += 1;
        }
    }
    Ok(())
}

const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Decodes a binary COPY stream, chunk by chunk, into Arrow record batches.
pub struct CopyDecoder {
    schema: SchemaRef,
    names: Vec<String>,
    builders: Vec<Builder>,
    batch_rows: usize,
    /// Bytes of a tuple split across chunks.
    partial: BytesMut,
    header_seen: bool,
    trailer_seen: bool,
    rows_in_batch: usize,
    bytes_in_batch: usize,
}

impl CopyDecoder {
    pub fn new(columns: &[SourceColumn], batch_rows: usize) -> Result<Self> {
        let batch_rows = batch_rows.max(1);
        let builders = columns
            .iter()
            .map(|c| Builder::new(decoding_for(c), batch_rows))
            .collect::<Result<Vec<_>>>()?;
        Ok(CopyDecoder {
            schema: crate::source::arrow_schema(crate::spec::SourceType::Postgresql, columns),
            names: columns.iter().map(|c| c.name.clone()).collect(),
            builders,
            batch_rows,
            partial: BytesMut::new(),
            header_seen: false,
            trailer_seen: false,
            rows_in_batch: 0,
            bytes_in_batch: 0,
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Whether a batch is full: `batch_rows` rows, or enough bytes that a batch of wide rows
    /// stays small (and Arrow's 32-bit offsets stay far from overflow).
    pub fn batch_full(&self) -> bool {
        const MAX_BATCH_BYTES: usize = 64 << 20;
        self.rows_in_batch >= self.batch_rows || self.bytes_in_batch >= MAX_BATCH_BYTES
    }

    /// Feeds one chunk of the COPY stream.
    pub fn push(&mut self, chunk: &[u8]) -> Result<()> {
        if self.partial.is_empty() {
            let used = self.consume(chunk)?;
            self.partial.extend_from_slice(&chunk[used..]);
        } else {
            self.partial.extend_from_slice(chunk);
            let partial = std::mem::take(&mut self.partial);
            let used = self.consume(&partial)?;
            self.partial = partial;
            self.partial.advance(used);
        }
        Ok(())
    }

    /// Decodes every complete tuple at the start of `data`; returns the bytes used.
    fn consume(&mut self, data: &[u8]) -> Result<usize> {
        let mut pos = 0;
        if !self.header_seen {
            if data.len() < 19 {
                return Ok(0);
            }
            if &data[..11] != COPY_SIGNATURE {
                return Err(Error::Database(
                    "COPY stream does not start with the binary signature".into(),
                ));
            }
            let ext = i32::from_be_bytes([data[15], data[16], data[17], data[18]]);
            // A negative length would wrap `19 + ext` (found by the pg_copy fuzz target).
            let Ok(ext) = usize::try_from(ext) else {
                return Err(Error::Database(format!(
                    "COPY header extension length is negative ({ext})"
                )));
            };
            if data.len() < 19 + ext {
                return Ok(0);
            }
            pos = 19 + ext;
            self.header_seen = true;
        }
        let ncols = self.builders.len();
        while pos + 2 <= data.len() {
            if self.trailer_seen {
                return Err(Error::Database("data after the COPY trailer".into()));
            }
            let fields = i16::from_be_bytes([data[pos], data[pos + 1]]);
            if fields == -1 {
                self.trailer_seen = true;
                pos += 2;
                continue;
            }
            if fields as usize != ncols {
                return Err(Error::Database(format!(
                    "COPY tuple has {fields} fields, expected {ncols}"
                )));
            }
            // Only decode a tuple once it is complete, so builders never hold half a row.
            let Some(end) = tuple_end(data, pos + 2, ncols) else {
                break;
            };
            let mut p = pos + 2;
            for (i, builder) in self.builders.iter_mut().enumerate() {
                let len = i32::from_be_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]);
                p += 4;
                if len < 0 {
                    builder.append_null();
                } else {
                    let value = &data[p..p + len as usize];
                    p += len as usize;
                    builder.append(value).map_err(|problem| Error::Decode {
                        column: self.names[i].clone(),
                        problem,
                    })?;
                }
            }
            self.rows_in_batch += 1;
            self.bytes_in_batch += end - pos;
            pos = end;
        }
        Ok(pos)
    }

    /// Takes the rows decoded so far as a batch (None when there are none).
    pub fn take_batch(&mut self) -> Result<Option<RecordBatch>> {
        if self.rows_in_batch == 0 {
            return Ok(None);
        }
        let columns: Vec<ArrayRef> = self.builders.iter_mut().map(Builder::finish).collect();
        self.rows_in_batch = 0;
        self.bytes_in_batch = 0;
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }

    /// Checks that the stream ended cleanly, with its trailer and no dangling bytes.
    pub fn finish(&self) -> Result<()> {
        if !self.trailer_seen || !self.partial.is_empty() {
            return Err(Error::Database(format!(
                "COPY stream ended early ({} bytes of an incomplete tuple)",
                self.partial.len()
            )));
        }
        Ok(())
    }
}

/// The end of the tuple whose fields start at `p`, if all of it is in `data`.
#[inline]
fn tuple_end(data: &[u8], mut p: usize, ncols: usize) -> Option<usize> {
    for _ in 0..ncols {
        let len_bytes = data.get(p..p + 4)?;
        let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        p += 4;
        if len > 0 {
            p += len as usize;
        }
        if p > data.len() {
            return None;
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Decimal256Type, Int64Type};

    fn col(name: &str, type_oid: u32, typmod: i32) -> SourceColumn {
        SourceColumn {
            name: name.into(),
            type_oid,
            type_name: "t".into(),
            typmod,
            nullable: true,
        }
    }

    fn typmod(p: i32, s: i32) -> i32 {
        ((p << 16) | (s & 0x7ff)) + 4
    }

    /// Binary numeric from base-10000 digits.
    fn numeric(digits: &[u16], weight: i16, sign: u16, dscale: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((digits.len() as u16).to_be_bytes());
        v.extend(weight.to_be_bytes());
        v.extend(sign.to_be_bytes());
        v.extend(dscale.to_be_bytes());
        for d in digits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn type_map_has_an_entry_for_every_native_type() {
        let cases = [
            (oid::BOOL, -1, DataType::Boolean),
            (oid::INT2, -1, DataType::Int16),
            (oid::INT4, -1, DataType::Int32),
            (oid::INT8, -1, DataType::Int64),
            (oid::FLOAT4, -1, DataType::Float32),
            (oid::FLOAT8, -1, DataType::Float64),
            (oid::NUMERIC, typmod(12, 2), DataType::Decimal128(12, 2)),
            (oid::NUMERIC, typmod(38, 0), DataType::Decimal128(38, 0)),
            (oid::NUMERIC, typmod(50, 10), DataType::Decimal256(50, 10)),
            (oid::NUMERIC, -1, DataType::Utf8),
            (oid::NUMERIC, typmod(100, 2), DataType::Utf8),
            (oid::NUMERIC, typmod(5, -2), DataType::Utf8),
            (oid::TEXT, -1, DataType::Utf8),
            (oid::VARCHAR, 24, DataType::Utf8),
            (oid::BPCHAR, 9, DataType::Utf8),
            (oid::NAME, -1, DataType::Utf8),
            (oid::JSON, -1, DataType::Utf8),
            (oid::JSONB, -1, DataType::Utf8),
            (oid::UUID, -1, DataType::Utf8),
            (oid::BYTEA, -1, DataType::Binary),
            (oid::DATE, -1, DataType::Date32),
            (
                oid::TIMESTAMP,
                -1,
                DataType::Timestamp(TimeUnit::Microsecond, None),
            ),
            (
                oid::TIMESTAMPTZ,
                -1,
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ),
            (oid::TIME, -1, DataType::Time64(TimeUnit::Microsecond)),
            (oid::MONEY, -1, DataType::Utf8),
            (1186 /* interval */, -1, DataType::Utf8),
        ];
        for (type_oid, tm, expected) in cases {
            assert_eq!(
                decoding_for(&col("c", type_oid, tm)).data_type(),
                expected,
                "oid {type_oid}"
            );
        }
        assert_eq!(select_item(&col("iv", 1186, -1)), "\"iv\"::text");
        assert_eq!(select_item(&col("n", oid::NUMERIC, -1)), "\"n\"");
        assert_eq!(
            select_item(&col("m", oid::MONEY, -1)),
            "\"m\"::numeric::text"
        );
        let numeric_label = source_type_label(&SourceColumn {
            type_name: "numeric".into(),
            ..col("n", oid::NUMERIC, typmod(12, 2))
        });
        assert_eq!(numeric_label, "numeric(12,2)");
    }

    #[test]
    fn numeric_typmod_decodes_negative_scale() {
        assert_eq!(numeric_precision_scale(typmod(12, 2)), Some((12, 2)));
        assert_eq!(numeric_precision_scale(typmod(5, -2)), Some((5, -2)));
        assert_eq!(numeric_precision_scale(-1), None);
    }

    #[test]
    fn numeric_to_decimal_is_exact() {
        // 12345.67 = [1, 2345, 6700] weight 1
        let v = numeric(&[1, 2345, 6700], 1, 0, 2);
        assert_eq!(numeric_to_i128(&v, 2).unwrap(), 1_234_567);
        assert_eq!(numeric_to_i128(&v, 4).unwrap(), 123_456_700);
        assert_eq!(
            numeric_to_i128(&v, 1).unwrap_err(),
            "numeric value has more than 1 fractional digits"
        );
        // -0.05 = [500] weight -1, negative
        let v = numeric(&[500], -1, NUMERIC_NEG, 2);
        assert_eq!(numeric_to_i128(&v, 2).unwrap(), -5);
        // zero has no digits
        assert_eq!(numeric_to_i128(&numeric(&[], 0, 0, 2), 2).unwrap(), 0);
        // 123456789012345678901234567890123456.78 in numeric(38,2): 40 digits before the
        // scale comes down, so the 128-bit path overflows and the 256-bit one finishes it.
        let big = numeric(
            &[1234, 5678, 9012, 3456, 7890, 1234, 5678, 9012, 3456, 7800],
            8,
            0,
            2,
        );
        assert_eq!(
            numeric_to_i128(&big, 2).unwrap(),
            12_345_678_901_234_567_890_123_456_789_012_345_678
        );
        assert_eq!(
            numeric_to_i256(&big, 3).unwrap(),
            i256::from_i128(12_345_678_901_234_567_890_123_456_789_012_345_678)
                .checked_mul(i256::from_i128(10))
                .unwrap()
        );
        assert_eq!(
            numeric_to_i128(&numeric(&[], 0, NUMERIC_NAN, 0), 2).unwrap_err(),
            "numeric NaN cannot be stored in a DECIMAL column"
        );
    }

    fn numeric_to_string(v: &[u8]) -> std::result::Result<String, String> {
        let mut out = String::new();
        write_numeric(v, &mut out)?;
        Ok(out)
    }

    #[test]
    fn numeric_text_matches_postgres_output() {
        assert_eq!(
            numeric_to_string(&numeric(&[1, 2345, 6700], 1, 0, 2)).unwrap(),
            "12345.67"
        );
        assert_eq!(
            numeric_to_string(&numeric(&[500], -1, NUMERIC_NEG, 2)).unwrap(),
            "-0.05"
        );
        assert_eq!(
            numeric_to_string(&numeric(&[100], -8, 0, 30)).unwrap(),
            "0.000000000000000000000000000001"
        );
        assert_eq!(
            numeric_to_string(&numeric(&[12], 2, 0, 0)).unwrap(),
            "1200000000"
        );
        assert_eq!(numeric_to_string(&numeric(&[], 0, 0, 3)).unwrap(), "0.000");
        assert_eq!(
            numeric_to_string(&numeric(&[], 0, NUMERIC_NAN, 0)).unwrap(),
            "NaN"
        );
        assert_eq!(
            numeric_to_string(&numeric(&[], 0, NUMERIC_NINF, 0)).unwrap(),
            "-Infinity"
        );
    }

    #[test]
    fn uuid_is_canonical() {
        let bytes = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(&format_uuid(bytes), b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    fn copy_stream(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(COPY_SIGNATURE);
        out.extend(0i32.to_be_bytes());
        out.extend(0i32.to_be_bytes());
        for row in rows {
            out.extend((row.len() as i16).to_be_bytes());
            for field in row {
                match field {
                    None => out.extend((-1i32).to_be_bytes()),
                    Some(v) => {
                        out.extend((v.len() as i32).to_be_bytes());
                        out.extend(v);
                    }
                }
            }
        }
        out.extend((-1i16).to_be_bytes());
        out
    }

    #[test]
    fn decodes_a_stream_split_at_every_byte() {
        let columns = [
            col("id", oid::INT8, -1),
            col("amount", oid::NUMERIC, typmod(12, 2)),
            col("big", oid::NUMERIC, typmod(50, 0)),
            col("name", oid::TEXT, -1),
            col("day", oid::DATE, -1),
            col("doc", oid::JSONB, -1),
        ];
        let rows = vec![
            vec![
                Some(7i64.to_be_bytes().to_vec()),
                Some(numeric(&[1, 2345, 6700], 1, 0, 2)),
                Some(numeric(&[12], 0, 0, 0)),
                Some("héllo 🦀".as_bytes().to_vec()),
                Some(1i32.to_be_bytes().to_vec()),
                Some([&[1u8][..], br#"{"a": 1}"#].concat()),
            ],
            vec![
                Some((-1i64).to_be_bytes().to_vec()),
                None,
                None,
                None,
                None,
                None,
            ],
        ];
        let stream = copy_stream(&rows);
        for split in 1..stream.len() {
            let mut d = CopyDecoder::new(&columns, 100).unwrap();
            d.push(&stream[..split]).unwrap();
            d.push(&stream[split..]).unwrap();
            d.finish().unwrap();
            let batch = d.take_batch().unwrap().unwrap();
            assert_eq!(batch.num_rows(), 2);
            let ids = batch.column(0).as_primitive::<Int64Type>();
            assert_eq!(ids.values().to_vec(), vec![7, -1]);
            let amount = batch.column(1).as_primitive::<Decimal128Type>();
            assert_eq!(amount.value(0), 1_234_567);
            assert!(amount.is_null(1));
            assert_eq!(
                batch.column(2).as_primitive::<Decimal256Type>().value(0),
                i256::from_i128(12)
            );
            assert_eq!(batch.column(3).as_string::<i32>().value(0), "héllo 🦀");
            assert_eq!(
                batch
                    .column(4)
                    .as_primitive::<arrow::datatypes::Date32Type>()
                    .value(0),
                10_958
            );
            assert_eq!(batch.column(5).as_string::<i32>().value(0), r#"{"a": 1}"#);
            assert_eq!(batch.column(5).null_count(), 1);
        }
    }

    #[test]
    fn infinities_become_the_ends_of_bigquery_ranges() {
        let columns = [col("day", oid::DATE, -1), col("at", oid::TIMESTAMP, -1)];
        let stream = copy_stream(&[
            vec![
                Some(i32::MAX.to_be_bytes().to_vec()),
                Some(i64::MAX.to_be_bytes().to_vec()),
            ],
            vec![
                Some(i32::MIN.to_be_bytes().to_vec()),
                Some(i64::MIN.to_be_bytes().to_vec()),
            ],
        ]);
        let mut d = CopyDecoder::new(&columns, 10).unwrap();
        d.push(&stream).unwrap();
        d.finish().unwrap();
        let batch = d.take_batch().unwrap().unwrap();
        let days = batch
            .column(0)
            .as_primitive::<arrow::datatypes::Date32Type>();
        let at = batch
            .column(1)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        let last_day = chrono::NaiveDate::from_ymd_opt(9999, 12, 31).unwrap();
        assert_eq!(
            arrow::temporal_conversions::date32_to_datetime(days.value(0))
                .unwrap()
                .date(),
            last_day
        );
        assert_eq!(
            arrow::temporal_conversions::date32_to_datetime(days.value(1))
                .unwrap()
                .date()
                .to_string(),
            "0001-01-01"
        );
        assert_eq!(
            arrow::temporal_conversions::timestamp_us_to_datetime(at.value(0))
                .unwrap()
                .to_string(),
            "9999-12-31 23:59:59.999999"
        );
        assert_eq!(
            arrow::temporal_conversions::timestamp_us_to_datetime(at.value(1))
                .unwrap()
                .to_string(),
            "0001-01-01 00:00:00"
        );
    }

    #[test]
    fn bad_bytes_name_the_column() {
        let columns = [col("id", oid::INT8, -1), col("day", oid::DATE, -1)];
        let stream = copy_stream(&[vec![Some(vec![1, 2, 3]), None]]);
        let mut d = CopyDecoder::new(&columns, 10).unwrap();
        assert_eq!(
            d.push(&stream).unwrap_err().to_string(),
            "decoding id: expected 8 bytes, got 3"
        );
        let mut d = CopyDecoder::new(&columns, 10).unwrap();
        d.push(&copy_stream(&[])[..20]).unwrap();
        assert!(d.finish().unwrap_err().to_string().contains("ended early"));
    }

    /// Found by the pg_copy fuzz target: both panicked (an overflowing add) before.
    #[test]
    fn a_negative_header_extension_and_a_date_past_postgres_range_are_refused() {
        let columns = [col("day", oid::DATE, -1)];
        let mut stream = copy_stream(&[]);
        stream[15..19].copy_from_slice(&(-2i32).to_be_bytes());
        let mut d = CopyDecoder::new(&columns, 10).unwrap();
        assert_eq!(
            d.push(&stream).unwrap_err().to_string(),
            "source database error: COPY header extension length is negative (-2)"
        );
        let stream = copy_stream(&[vec![Some((i32::MAX - 1).to_be_bytes().to_vec())]]);
        let mut d = CopyDecoder::new(&columns, 10).unwrap();
        let e = d.push(&stream).unwrap_err().to_string();
        assert_eq!(
            e,
            "decoding day: date is past what PostgreSQL and Arrow's Date32 can hold"
        );
    }
}

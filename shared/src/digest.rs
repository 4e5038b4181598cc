//! What a worker says about the rows it extracted, beyond their count: an order-independent
//! content checksum and the largest value of the job's timestamp column. Shards combine into a
//! run without re-reading anything: checksums add, maxima compare in the column's own type.
//!
//! The checksum of a row is XXH64 of its Arrow row encoding (`arrow::row`, which is exact for
//! every type and tells NULL from empty); a shard's checksum is the wrapping sum over its rows.
//! A sum does not depend on order or on how the table was cut into shards, so the same rows
//! give the same run checksum whatever the plan, and a duplicated or missing row changes it.

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::compute::{SortOptions, cast, concat, sort_to_indices, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use twox_hash::XxHash64;

use crate::{Error, Result};

/// The checksum of no rows.
pub const EMPTY_CHECKSUM: &str = "0000000000000000";

/// Accumulates the checksum and the timestamp column's maximum over a batch stream.
pub struct ContentDigest {
    rows: RowConverter,
    sum: u64,
    /// Index of the timestamp column, and the largest value seen so far (one element).
    watermark_column: Option<usize>,
    max: Option<ArrayRef>,
}

impl std::fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentDigest")
            .field("sum", &self.sum)
            .field("watermark_column", &self.watermark_column)
            .finish()
    }
}

/// The digest of a finished stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// 16 hex digits.
    pub checksum: String,
    /// The timestamp column's largest non-NULL value, formatted as ISO 8601 for dates and
    /// timestamps (decimal text for numbers); `None` without a column or without a value.
    pub max_value: Option<String>,
}

impl ContentDigest {
    /// `timestamp_column`, when given, must be a column of `schema`.
    pub fn new(schema: &SchemaRef, timestamp_column: Option<&str>) -> Result<Self> {
        let fields = schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let watermark_column = timestamp_column
            .map(|name| {
                schema.index_of(name).map_err(|_| {
                    Error::Message(format!(
                        "timestamp_column {name:?} is not among the extracted columns"
                    ))
                })
            })
            .transpose()?;
        Ok(ContentDigest {
            rows: RowConverter::new(fields)?,
            sum: 0,
            watermark_column,
            max: None,
        })
    }

    pub fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let rows = self.rows.convert_columns(batch.columns())?;
        for row in rows.iter() {
            self.sum = self.sum.wrapping_add(XxHash64::oneshot(0, row.as_ref()));
        }
        if let Some(index) = self.watermark_column {
            // The batch's largest, then against the running one: no copy of the column.
            self.max = match (self.max.take(), largest(batch.column(index))?) {
                (Some(max), Some(top)) => largest(&concat(&[max.as_ref(), top.as_ref()])?)?,
                (max, top) => max.or(top),
            };
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Digest> {
        Ok(Digest {
            checksum: format!("{:016x}", self.sum),
            max_value: self.max.map(|m| format_value(&m)).transpose()?,
        })
    }
}

/// The largest non-NULL element as a one-element array, or `None` when all are NULL.
fn largest(values: &ArrayRef) -> Result<Option<ArrayRef>> {
    if values.null_count() == values.len() {
        return Ok(None);
    }
    let options = SortOptions {
        descending: true,
        nulls_first: false,
    };
    let top = sort_to_indices(values.as_ref(), Some(options), Some(1))?;
    Ok(Some(take(values.as_ref(), &top, None)?))
}

/// Timestamps with a zone are instants; this build names zones by offset only (no tz
/// database), so they are shown and parsed at `+00:00`, which keeps every value.
fn comparable_type(data_type: &DataType) -> DataType {
    match data_type {
        DataType::Timestamp(unit, Some(_)) => DataType::Timestamp(*unit, Some("+00:00".into())),
        other => other.clone(),
    }
}

fn format_value(value: &ArrayRef) -> Result<String> {
    let value = cast(value, &comparable_type(value.data_type()))?;
    let formatter = ArrayFormatter::try_new(value.as_ref(), &FormatOptions::default())?;
    Ok(formatter.value(0).to_string())
}

/// The run checksum: the wrapping sum of its shards' checksums.
pub fn combine_checksums<'a>(checksums: impl IntoIterator<Item = &'a str>) -> Result<String> {
    let mut sum = 0u64;
    for c in checksums {
        let part = u64::from_str_radix(c, 16)
            .map_err(|_| Error::Message(format!("{c:?} is not a shard checksum")))?;
        sum = sum.wrapping_add(part);
    }
    Ok(format!("{sum:016x}"))
}

/// The largest of the shards' maxima, compared in the column's own type (text would put
/// "10" before "9" and negative years after positive ones).
pub fn max_of(values: &[String], data_type: &DataType) -> Result<Option<String>> {
    if values.is_empty() {
        return Ok(None);
    }
    let text: ArrayRef = std::sync::Arc::new(StringArray::from(values.to_vec()));
    let typed = cast(&text, &comparable_type(data_type))?;
    if typed.null_count() > 0 {
        return Err(Error::Message(format!(
            "a shard reported a maximum that is not a {data_type}: {values:?}"
        )));
    }
    largest(&typed)?.map(|m| format_value(&m)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]))
    }

    fn batch(rows: &[(i64, Option<&str>, Option<i64>)]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter(rows.iter().map(|r| r.2))
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    fn digest(batches: &[RecordBatch]) -> Digest {
        let mut d = ContentDigest::new(&schema(), Some("at")).unwrap();
        for b in batches {
            d.update(b).unwrap();
        }
        d.finish().unwrap()
    }

    #[test]
    fn checksum_ignores_order_and_cuts_but_not_content() {
        let a = batch(&[(1, Some("a"), Some(0)), (2, None, None)]);
        let b = batch(&[(3, Some(""), Some(1_700_000_000_000_001))]);
        let whole = digest(&[a.clone(), b.clone()]);
        assert_eq!(whole, digest(&[b.clone(), a.clone()]));
        // Cut into two shards and combined: the same run checksum.
        let run = combine_checksums([
            digest(std::slice::from_ref(&a)).checksum.as_str(),
            &digest(&[b]).checksum,
        ])
        .unwrap();
        assert_eq!(run, whole.checksum);
        // NULL is not the empty string; a duplicated row shows.
        let null_name = digest(&[batch(&[(3, None, Some(1_700_000_000_000_001))])]);
        let empty_name = digest(&[batch(&[(3, Some(""), Some(1_700_000_000_000_001))])]);
        assert_ne!(null_name.checksum, empty_name.checksum);
        assert_ne!(
            digest(&[a.clone(), a.clone()]).checksum,
            digest(&[a]).checksum
        );
        assert_eq!(digest(&[]).checksum, EMPTY_CHECKSUM);
    }

    #[test]
    fn max_value_is_the_largest_non_null_in_iso_form() {
        let d = digest(&[
            batch(&[(1, None, Some(1_700_000_000_000_001)), (2, None, None)]),
            batch(&[(3, None, Some(-5))]),
        ]);
        assert_eq!(d.max_value.as_deref(), Some("2023-11-14T22:13:20.000001Z"));
        assert_eq!(digest(&[batch(&[(1, None, None)])]).max_value, None);
        let err = ContentDigest::new(&schema(), Some("nope")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "message: timestamp_column \"nope\" is not among the extracted columns"
        );
    }

    #[test]
    fn maxima_compare_in_their_own_type() {
        let ints = ["9".to_string(), "10".to_string(), "-11".to_string()];
        assert_eq!(
            max_of(&ints, &DataType::Int64).unwrap().as_deref(),
            Some("10")
        );
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let stamps = [
            "2023-11-14T22:13:20.000001+00:00".to_string(),
            "2023-11-14T22:13:20.000010+00:00".to_string(),
            "0999-01-01T00:00:00+00:00".to_string(),
        ];
        assert_eq!(
            max_of(&stamps, &ts).unwrap().as_deref(),
            Some("2023-11-14T22:13:20.000010Z")
        );
        assert_eq!(
            max_of(&["2024-02-30".to_string()], &DataType::Date32)
                .unwrap_err()
                .to_string(),
            "message: a shard reported a maximum that is not a Date32: [\"2024-02-30\"]"
        );
        assert_eq!(max_of(&[], &DataType::Int64).unwrap(), None);
        assert_eq!(
            combine_checksums(["ffffffffffffffff", "0000000000000002"]).unwrap(),
            "0000000000000001"
        );
        assert_eq!(
            combine_checksums(["xyz"]).unwrap_err().to_string(),
            "message: \"xyz\" is not a shard checksum"
        );
    }
}

//! Loading text into the job's types, value by value, as pandas would have read it.

use super::*;

/// Why a value did not convert: its row in the batch, the value, and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unconverted {
    pub row: usize,
    pub value: String,
    pub why: String,
}

/// Converts each present value with `parse`, handing the results to `push` (None for a
/// missing one); the first value that does not convert is named with its row.
pub(super) fn each_value<'a, T>(
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
pub(super) fn json_int(text: &str) -> Option<i64> {
    parse_int(text).or_else(|| match text {
        "true" => Some(1),
        "false" => Some(0),
        _ => python_float(text)
            .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 9.2e18)
            .map(|f| f as i64),
    })
}

/// JSON's floats as `read_json` makes them: numbers, numeric text, booleans.
pub(super) fn json_float(text: &str) -> Option<f64> {
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

    pub(super) fn parse_time(
        &mut self,
        text: &str,
        today: NaiveDate,
    ) -> Result<ParsedTime, String> {
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

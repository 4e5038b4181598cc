//! A CSV sample's columns as pandas names and types them.

use super::*;

/// Header names made distinct as pandas' CSV reader makes them ("Duplicate columns will be
/// specified as 'X', 'X.1', …'X.N'", skipping a name the header already has), the same
/// steps, so a stored fingerprint matches: `id,name,name` reads as `id`, `name`, `name.1`.
pub fn dedup_names(names: &[String]) -> Vec<String> {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(names.len());
    for original in names {
        let mut name = original.clone();
        let mut seen = counts.get(&name).copied().unwrap_or(0);
        while seen > 0 {
            counts.insert(original.clone(), seen + 1);
            name = format!("{original}.{seen}");
            seen = if names.contains(&name) {
                seen + 1
            } else {
                counts.get(&name).copied().unwrap_or(0)
            };
        }
        counts.insert(name.clone(), seen + 1);
        out.push(name);
    }
    out
}

/// A CSV's header as pandas names it: an empty name is `Unnamed: <position>`, repeated names
/// get `.1`, `.2` (see `dedup_names`).
pub fn pandas_header(names: &[String]) -> Vec<String> {
    let named: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if n.is_empty() {
                format!("Unnamed: {i}")
            } else {
                n.clone()
            }
        })
        .collect();
    dedup_names(&named)
}

/// The file's columns as text, named as pandas names them.
pub fn csv_text_schema(
    sample: &[u8],
    options: &crate::spec::FileOptions,
    uri: &str,
) -> Result<SchemaRef> {
    let format = files::csv_format(options);
    let (schema, _) = format
        .infer_schema(Cursor::new(sample), Some(1))
        .map_err(|e| files::csv_error(uri, &e))?;
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    Ok(Arc::new(Schema::new(
        pandas_header(&names)
            .into_iter()
            .map(|name| Field::new(name, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    )))
}

/// Detects a CSV sample's columns by pandas' `read_csv` rules and the seed's type mapping
/// (`pandas::csv_column_kind`).
pub(crate) fn sample_csv(
    sample: &[u8],
    options: &crate::spec::FileOptions,
    uri: &str,
) -> Result<(Vec<DetectedColumn>, u64)> {
    let schema = csv_text_schema(sample, options, uri)?;
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_format(files::csv_format(options))
        .build(Cursor::new(sample))
        .map_err(|e| files::csv_error(uri, &e))?;
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| files::csv_error(uri, &e))?;
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let batch = concat(&schema, &batches, uri)?;
    let empty = arrow::array::StringArray::from(Vec::<Option<&str>>::new());
    let columns = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let text = batch
                .as_ref()
                .and_then(|b| {
                    b.column(i)
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                })
                .unwrap_or(&empty);
            text_column(field.name(), text)
        })
        .collect();
    Ok((columns, rows))
}

/// A text column described as the seed described it: pandas' dtype, the BigQuery type it
/// maps to, the first five present values.
pub(super) fn text_column(name: &str, text: &arrow::array::StringArray) -> DetectedColumn {
    use crate::source::files::pandas::{self, ColumnKind};
    let fields = (0..text.len()).map(|r| if text.is_null(r) { "" } else { text.value(r) });
    let missing = pandas::is_na;
    let kind = pandas::csv_column_kind(fields.clone());
    let all_missing = fields.clone().all(missing);
    let dates_only = kind == ColumnKind::Datetime
        && pandas::DatetimeRule::for_column(fields.clone().filter(|f| !missing(f))).is_some_and(
            |rule| {
                let today = chrono::Utc::now().date_naive();
                fields.clone().filter(|f| !missing(f)).all(|f| {
                    rule.parse(f, today).is_ok_and(|t| {
                        t.local.time() == chrono::NaiveTime::MIN && t.offset_seconds.is_none()
                    })
                })
            },
        );
    DetectedColumn {
        name: name.to_string(),
        dtype: kind.dtype().to_string(),
        arrow_type: if all_missing && text.len() > 0 {
            "Null".into()
        } else if dates_only {
            "Date32".into()
        } else {
            kind.dtype().to_string()
        },
        bigquery_type: kind.bigquery_type().to_string(),
        bigquery_mode: "NULLABLE".into(),
        sample_values: fields
            .clone()
            .filter(|f| !missing(f))
            .take(5)
            .map(str::to_string)
            .collect(),
        nullable: fields.clone().any(missing) || text.is_empty(),
    }
}

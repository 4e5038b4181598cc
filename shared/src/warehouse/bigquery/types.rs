//! The type map: the BigQuery column each Arrow field is created as (see the table in
//! `mod.rs`), and the checks of an existing table's columns against it.

use super::*;

/// The BigQuery type and mode of one Arrow field, per the map at the top of this file.
pub fn bigquery_type(field: &Field) -> Result<(&'static str, &'static str)> {
    let (ty, mode) = map_field(field)?;
    Ok((type_name(&ty), mode))
}

/// The BigQuery column for one Arrow field.
pub fn bigquery_field(field: &Field) -> Result<TableFieldSchema> {
    let (ty, mode) = map_field(field)?;
    let mut column = TableFieldSchema::new(field.name(), ty);
    column.mode = Some(mode.to_string());
    Ok(column)
}

/// The BigQuery columns for a whole Arrow schema.
pub fn bigquery_schema(schema: &Schema) -> Result<Vec<TableFieldSchema>> {
    schema.fields().iter().map(|f| bigquery_field(f)).collect()
}

/// The columns of a staging table: the parts as they are, a JSON column as the STRING a
/// Parquet part fills ("If you use a batch load job to ingest JSON data into a table, the source
/// data must be in CSV, Avro, or JSON format").
pub fn staging_columns(columns: &[TableFieldSchema]) -> Vec<TableFieldSchema> {
    columns
        .iter()
        .map(|c| match c.r#type {
            FieldType::Json => TableFieldSchema {
                r#type: FieldType::String,
                ..c.clone()
            },
            _ => c.clone(),
        })
        .collect()
}

pub(super) fn map_field(field: &Field) -> Result<(FieldType, &'static str)> {
    let name = field.name();
    let is_json = matches!(
        field.metadata().get(SOURCE_TYPE_KEY).map(String::as_str),
        Some("json" | "jsonb")
    );
    let ty = match field.data_type() {
        DataType::Boolean => FieldType::Bool,
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => FieldType::Int64,
        // Parquet's UINT_64 loads as INT64 only, failing past 2^63 - 1: sources stage these as
        // decimal(20, 0).
        DataType::UInt64 => {
            return Err(Error::Warehouse(format!(
                "column {name:?}: unsigned 64-bit integers are staged as decimal(20, 0) for \
                 BigQuery (a Parquet UINT_64 loads only as INT64); this part holds UInt64"
            )));
        }
        DataType::Float32 | DataType::Float64 => FieldType::Float64,
        DataType::Utf8 | DataType::LargeUtf8 if is_json => FieldType::Json,
        DataType::Utf8 | DataType::LargeUtf8 => FieldType::String,
        DataType::Binary | DataType::LargeBinary => FieldType::Bytes,
        DataType::Date32 => FieldType::Date,
        DataType::Timestamp(_, None) => FieldType::Datetime,
        DataType::Timestamp(_, Some(_)) => FieldType::Timestamp,
        DataType::Time64(_) => FieldType::Time,
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => decimal_type(name, *p, *s)?,
        other => {
            return Err(Error::Warehouse(format!(
                "column {name:?}: Arrow type {other} has no BigQuery type in shardflow's type map"
            )));
        }
    };
    let mode = if field.is_nullable() {
        "NULLABLE"
    } else {
        "REQUIRED"
    };
    Ok((ty, mode))
}

/// NUMERIC is decimal(38, 9) and BIGNUMERIC decimal(76.76, 38): a decimal fits when both its
/// scale and its integer digits do. A negative scale cannot be written to Parquet.
pub(super) fn decimal_type(name: &str, precision: u8, scale: i8) -> Result<FieldType> {
    let (p, s) = (i32::from(precision), i32::from(scale));
    if (0..=9).contains(&s) && p - s <= 29 {
        Ok(FieldType::Numeric)
    } else if (0..=38).contains(&s) && p - s <= 38 {
        Ok(FieldType::Bignumeric)
    } else {
        Err(Error::Warehouse(format!(
            "column {name:?}: decimal({p}, {s}) has no exact BigQuery type (NUMERIC takes a \
             scale up to 9 and 29 integer digits, BIGNUMERIC a scale up to 38 and 38 integer digits)"
        )))
    }
}

/// The standard SQL name of a column type; legacy aliases (INTEGER, FLOAT, BOOLEAN, RECORD),
/// which `tables.get` returns, fold into it.
pub(super) fn type_name(ty: &FieldType) -> &'static str {
    match ty {
        FieldType::String => "STRING",
        FieldType::Bytes => "BYTES",
        FieldType::Integer | FieldType::Int64 => "INT64",
        FieldType::Float | FieldType::Float64 => "FLOAT64",
        FieldType::Numeric => "NUMERIC",
        FieldType::Bignumeric => "BIGNUMERIC",
        FieldType::Boolean | FieldType::Bool => "BOOL",
        FieldType::Timestamp => "TIMESTAMP",
        FieldType::Date => "DATE",
        FieldType::Time => "TIME",
        FieldType::Datetime => "DATETIME",
        FieldType::Record | FieldType::Struct => "STRUCT",
        FieldType::Geography => "GEOGRAPHY",
        FieldType::Json => "JSON",
        FieldType::Interval => "INTERVAL",
    }
}

/// Refuses a table with a REQUIRED column the staged rows may leave NULL: BigQuery would
/// refuse the load ("When appending data from Avro, ORC, or Parquet files, relax columns to
/// NULL in your schema [...] ALLOW_FIELD_RELAXATION"), and relaxing it would change the
/// table's schema behind its owner's back.
pub fn check_modes(
    table: &str,
    existing: &[TableFieldSchema],
    staged: &[TableFieldSchema],
) -> Result<()> {
    let required = |f: &TableFieldSchema| f.mode.as_deref() == Some("REQUIRED");
    let problems: Vec<String> = existing
        .iter()
        .filter(|f| required(f))
        .filter_map(
            |f| match staged.iter().find(|s| s.name.eq_ignore_ascii_case(&f.name)) {
                None => Some(format!("{} (the source has no such column)", f.name)),
                Some(s) if !required(s) => Some(format!("{} (nullable in the source)", f.name)),
                Some(_) => None,
            },
        )
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::Warehouse(format!(
        "table {table} has REQUIRED columns the source may leave NULL: {}; make them NULLABLE \
         in BigQuery (ALTER TABLE … ALTER COLUMN … DROP NOT NULL) or NOT NULL in the source; \
         nothing was loaded",
        problems.join(", ")
    )))
}

/// The columns as `check_columns` compares them.
pub(super) fn named_types(fields: &[TableFieldSchema]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|f| (f.name.clone(), type_name(&f.r#type).to_string()))
        .collect()
}

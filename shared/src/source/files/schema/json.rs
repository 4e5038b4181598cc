//! A JSON-lines sample's columns: keys in file order, types as `read_json` gives them, and
//! the first line that is not JSON named.

use super::*;

/// The keys of the sampled objects in the order they first appear.
pub(super) fn key_order(lines: &[u8]) -> Vec<String> {
    /// One object's keys, in order; the values are skipped.
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(key);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    let mut order: Vec<String> = Vec::new();
    for line in lines.split(|&b| b == b'\n') {
        if let Ok(Keys(keys)) = serde_json::from_slice::<Keys>(line) {
            for key in keys {
                if !order.contains(&key) {
                    order.push(key);
                }
            }
        }
    }
    order
}

/// Keys inferred as floats whose sampled values are all integers, one of them past INT64:
/// arrow infers those as Float64, which would round them.
pub(super) fn wide_integer_keys(
    lines: &[u8],
    inferred: &Schema,
) -> std::collections::HashSet<String> {
    let floats: Vec<&str> = inferred
        .fields()
        .iter()
        .filter(|f| f.data_type() == &DataType::Float64)
        .map(|f| f.name().as_str())
        .collect();
    let mut integral: std::collections::HashMap<&str, (bool, bool)> =
        floats.iter().map(|k| (*k, (true, false))).collect();
    if floats.is_empty() {
        return Default::default();
    }
    for line in lines.split(|&b| b == b'\n') {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(line) else {
            continue;
        };
        for (key, seen) in integral.iter_mut() {
            match object.get(*key) {
                Some(serde_json::Value::Number(n)) if n.is_i64() => {}
                Some(serde_json::Value::Number(n)) if n.is_u64() => seen.1 = true,
                None | Some(serde_json::Value::Null) => {}
                Some(_) => seen.0 = false,
            }
        }
    }
    integral
        .into_iter()
        .filter(|(_, (all_integers, past_int64))| *all_integers && *past_int64)
        .map(|(key, _)| key.to_string())
        .collect()
}

/// Where a sample stops being JSON lines, for the error: "line 3: expected value at column 7".
/// A top-level array counts elements, its lines having been rejoined.
pub(super) fn first_bad_json_line(lines: &[u8], sample: &[u8]) -> Option<String> {
    let unit = match sample.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "element",
        _ => "line",
    };
    // Numbered as the reader numbers them (`files::read_json`), so both errors agree.
    for (index, line) in lines.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(line) {
            Err(e) => {
                // serde counts within the one line it was given: keep only the column.
                let why = e.to_string();
                let why = match why.split_once(" at line 1 column ") {
                    Some((what, column)) => format!("{what} at column {column}"),
                    None => why,
                };
                return Some(format!("{unit} {number}: not JSON: {why}"));
            }
            Ok(v) if !v.is_object() => {
                return Some(format!(
                    "{unit} {number}: a JSON {} where an object (one row) belongs",
                    json_kind(&v)
                ));
            }
            Ok(_) => {}
        }
    }
    None
}

pub(super) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

pub(crate) fn sample_json(sample: &[u8], uri: &str) -> Result<(Vec<DetectedColumn>, u64)> {
    let lines = files::json_lines(sample);
    let (inferred, _) =
        arrow::json::reader::infer_json_schema(Cursor::new(&lines), None).map_err(|e| {
            match first_bad_json_line(&lines, sample) {
                Some(at) => Error::Source(format!("{uri}, {at}")),
                None => Error::Source(format!("{uri}: not JSON lines: {e}")),
            }
        })?;
    for f in inferred.fields() {
        if text_bigquery_type(f.data_type()).is_none() {
            return Err(Error::Source(format!(
                "{uri}: column {:?} holds nested JSON ({}); file sources load flat objects only",
                f.name(),
                f.data_type()
            )));
        }
    }
    // Inference sorts the keys; the columns follow the objects' own order instead.
    let order = key_order(&lines);
    let wide = wide_integer_keys(&lines, &inferred);
    let mut fields: Vec<_> = inferred
        .fields()
        .iter()
        .map(|f| {
            if wide.contains(f.name()) {
                // Integers past INT64 (up to 2^64 - 1) are exact in NUMERIC, not floats.
                Arc::new(
                    f.as_ref()
                        .clone()
                        .with_data_type(DataType::Decimal128(20, 0)),
                )
            } else {
                f.clone()
            }
        })
        .collect();
    fields.sort_by_key(|f| {
        order
            .iter()
            .position(|k| k == f.name())
            .unwrap_or(usize::MAX)
    });
    let schema = Arc::new(Schema::new(fields));
    // Mixed numbers and text infer as text: read the numbers as their text too.
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_coerce_primitive(true)
        .build_decoder()
        .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    let mut batches = Vec::new();
    for line in lines.split_inclusive(|&b| b == b'\n') {
        decoder
            .decode(line)
            .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
        if decoder.len() >= 8192 {
            batches.extend(
                decoder
                    .flush()
                    .map_err(|e| Error::Source(format!("{uri}: {e}")))?,
            );
        }
    }
    batches.extend(
        decoder
            .flush()
            .map_err(|e| Error::Source(format!("{uri}: {e}")))?,
    );
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let batch = concat(&schema, &batches, uri)?;
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = lines
        .split(|&b| b == b'\n')
        .filter_map(|line| match serde_json::from_slice(line) {
            Ok(serde_json::Value::Object(o)) => Some(o),
            _ => None,
        })
        .collect();
    let mut columns = describe_columns(batch.as_ref(), &schema, |f| {
        Ok(text_bigquery_type(f.data_type())
            .unwrap_or("STRING")
            .to_string())
    })?;
    // The types pandas' read_json gives (numeric text is a number, a missing integer makes
    // floats), which the seed's fingerprints record.
    for column in &mut columns {
        let values = objects.iter().map(|o| o.get(&column.name));
        if let Some(kind) = crate::source::files::pandas::json_column_kind(values) {
            column.dtype = kind.dtype().to_string();
            column.bigquery_type = kind.bigquery_type().to_string();
        }
    }
    Ok((columns, rows))
}

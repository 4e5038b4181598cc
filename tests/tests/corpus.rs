//! The compatibility corpus (issue 16): real CSV and JSON files shipped in PyPI packages
//! (`tests/corpus/SOURCES.md`), none written here. For each, pandas itself (in the test venv,
//! `tests/corpus/pandas_reference.py`) says what the system shardflow replaces detected: the
//! columns, their types and the schema fingerprint Django stored, and every row as pandas reads
//! it. shardflow must detect the same, and a `dispatcher run` with that fingerprint and
//! `bigquery_schema` must leave the same rows and values in BigQuery (the rules layer in front
//! of bqemulator).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use shardflow::retry::RetryPolicy;
use shardflow::spec::JobSpec;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{PlanOptions, RunOptions, run_job};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The test venv's Python, with pandas.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/emulators/venv/bin/python");
    let python = std::env::var_os("SHARDFLOW_TEST_PYTHON").map_or(venv, PathBuf::from);
    let has_pandas = std::process::Command::new(&python)
        .args(["-c", "import pandas"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_pandas,
        "{} has no pandas: run `bash tests/emulators.sh start` (it installs pandas into the test \
         venv), or point SHARDFLOW_TEST_PYTHON at a Python with pandas 2.x",
        python.display()
    );
    python
}

/// Runs a Python script of the corpus and parses what it prints.
fn run_python(script: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(python())
        .arg(corpus_dir().join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the script")
}

struct Entry {
    file: String,
    format: String,
    options: serde_json::Value,
    /// Where shardflow refuses a file pandas reads, the error it gives (`why` in the file
    /// says why).
    refused: Option<String>,
}

fn entries() -> Vec<Entry> {
    let text = std::fs::read_to_string(corpus_dir().join("corpus.json")).expect("corpus.json");
    let list: serde_json::Value = serde_json::from_str(&text).expect("corpus.json is JSON");
    list.as_array()
        .expect("a list of files")
        .iter()
        .map(|e| Entry {
            file: e["file"].as_str().expect("file").to_string(),
            format: e["format"].as_str().expect("format").to_string(),
            options: e["options"].clone(),
            refused: e["refused"].as_str().map(str::to_string),
        })
        .collect()
}

fn job_for(entry: &Entry, extra: serde_json::Value) -> serde_json::Value {
    let path = corpus_dir().join(&entry.file);
    let mut options =
        serde_json::json!({"delimiter": ",", "encoding": "utf-8", "has_header": true});
    if let Some(given) = entry.options.as_object() {
        for (k, v) in given {
            options[k] = v.clone();
        }
    }
    let base = serde_json::json!({
        "source_type": "local",
        "dest_table_name": "loaded",
        "file_path_prefix": format!("{}/", path.parent().unwrap().display()),
        "file_pattern": path.file_name().unwrap().to_str().unwrap(),
        "file_format": entry.format,
        "file_format_options": options,
        "load_type": "catalog",
        "processing_mode": "dataflow",
    });
    common::with_fields(base, extra)
}

fn detect(entry: &Entry, dir: &Path) -> serde_json::Value {
    let job_file = dir.join("job.json");
    std::fs::write(&job_file, job_for(entry, serde_json::json!({})).to_string()).unwrap();
    common::dispatcher_json(&["detect-schema", "--job", job_file.to_str().unwrap()])
}

fn columns_of(value: &serde_json::Value) -> Vec<(String, String)> {
    value["columns"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap_or_default().to_string(),
                        c["bigquery_type"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_corpus_file_is_detected_as_pandas_detects_it() {
    let reference = run_python("pandas_reference.py", &[corpus_dir().to_str().unwrap()]);
    let dir = common::scratch("corpus-detect");
    let entries = entries();
    assert!(
        entries.len() >= 20,
        "the corpus holds {} files",
        entries.len()
    );
    let mut differences = Vec::new();
    for entry in &entries {
        let ours = detect(entry, &dir);
        if let Some(refusal) = &entry.refused {
            let message = ours["message"].as_str().unwrap_or_default();
            assert!(
                ours["status"] == "error" && message.contains(refusal.as_str()),
                "{}: expected the refusal {refusal:?}, got {ours}",
                entry.file
            );
            continue;
        }
        let theirs = &reference[&entry.file];
        let (got, want) = (columns_of(&ours), columns_of(theirs));
        if got != want || ours["schema_fingerprint"] != theirs["schema_fingerprint"] {
            differences.push(format!(
                "{}: shardflow {:?} ({}), pandas {:?} ({})",
                entry.file, got, ours["schema_fingerprint"], want, theirs["schema_fingerprint"]
            ));
        }
        // The dtype is pandas' own name for it ("int64", "float64", "object", ...).
        let dtypes: Vec<&str> = ours["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["type"].as_str().unwrap_or_default())
            .collect();
        let pandas_dtypes: Vec<&str> = theirs["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["dtype"].as_str().unwrap_or_default())
            .map(|d| {
                if d.starts_with("datetime64") {
                    "object"
                } else {
                    d
                }
            })
            .collect();
        if got == want && dtypes != pandas_dtypes {
            differences.push(format!(
                "{}: dtypes {dtypes:?}, pandas {pandas_dtypes:?}",
                entry.file
            ));
        }
        assert_eq!(
            ours["total_rows"].as_u64(),
            Some(theirs["rows"].as_array().map_or(0, Vec::len) as u64),
            "{}",
            entry.file
        );
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// A reference row's value and BigQuery's, in one form: floats by value, times as
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (the query formats them so).
fn same_value(ty: &str, pandas: Option<&str>, bigquery: Option<&str>) -> bool {
    match (pandas, bigquery) {
        (None, None) => true,
        (Some(p), Some(b)) if ty == "FLOAT64" => {
            let (p, b) = (p.parse::<f64>(), b.parse::<f64>());
            matches!((p, b), (Ok(p), Ok(b)) if p == b || (p.is_nan() && b.is_nan()))
        }
        (Some(p), Some(b)) => p == b,
        _ => false,
    }
}

#[tokio::test]
async fn every_corpus_file_loads_into_bigquery_as_pandas_reads_it() {
    let reference = run_python("pandas_reference.py", &[corpus_dir().to_str().unwrap()]);
    let dir = common::scratch("corpus-load");
    let gcs = common::env_or_fail("STORAGE_EMULATOR_HOST");
    let bucket = format!(
        "corpus-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let created = reqwest::Client::new()
        .post(format!("{gcs}/storage/v1/b"))
        .json(&serde_json::json!({ "name": bucket }))
        .send()
        .await
        .expect("fake-gcs-server answers");
    assert!(created.status().is_success(), "{}", created.status());
    let dataset = format!(
        "ds_corpus{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut failures = Vec::new();
    for (i, entry) in entries().iter().enumerate() {
        if entry.refused.is_some() {
            continue;
        }
        let theirs = &reference[&entry.file];
        let schema: Vec<serde_json::Value> = columns_of(theirs)
            .iter()
            .map(|(name, ty)| {
                serde_json::json!({"name": name, "bigquery_type": ty, "bigquery_mode": "NULLABLE"})
            })
            .collect();
        let table = format!("t{i}");
        let job = job_for(
            entry,
            serde_json::json!({
                "dest_table_name": table,
                "bigquery_schema": schema,
                "schema_fingerprint": theirs["schema_fingerprint"],
            }),
        );
        let spec = JobSpec::from_json(&job.to_string()).expect("a valid job");
        let opts = RunOptions {
            plan: PlanOptions {
                retry: RetryPolicy::none(),
                warehouse_loads_gcs: true,
                ..Default::default()
            },
            workers: 2,
            dest: format!("bigquery://{}/{dataset}", common::BIGQUERY_PROJECT),
            staging: Some(format!("gs://{bucket}/staging/{table}")),
            state_url: format!("sqlite://{}", dir.join(format!("state{i}.db")).display()),
            max_delivery_attempts: 1,
            ..Default::default()
        };
        let report = run_job(spec, opts).await;
        let expected_rows = theirs["rows"].as_array().cloned().unwrap_or_default();
        if report.status != RunStatus::Completed {
            failures.push(format!("{}: {:?}", entry.file, report.error_message));
            continue;
        }
        assert_eq!(
            report.rows_loaded,
            expected_rows.len() as u64,
            "{}",
            entry.file
        );
        // The destination's names (some renamed by BigQuery's naming rule), in order.
        let renamed: BTreeMap<&str, &str> = report
            .renamed_columns
            .iter()
            .map(|r| (r.source.as_str(), r.destination.as_str()))
            .collect();
        let types = columns_of(theirs);
        let select: Vec<String> = types
            .iter()
            .map(|(name, ty)| {
                let column = renamed.get(name.as_str()).copied().unwrap_or(name);
                match ty.as_str() {
                    "TIMESTAMP" => {
                        format!("FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%E6SZ', `{column}`)")
                    }
                    _ => format!("`{column}`"),
                }
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM `{}.{dataset}.{table}`",
            select.join(", "),
            common::BIGQUERY_PROJECT
        );
        let mut loaded = common::bigquery_rows(&sql).await;
        let mut wanted: Vec<Vec<Option<String>>> = expected_rows
            .iter()
            .map(|r| {
                r.as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .collect();
        // Rows compared as sets: BigQuery keeps no order. Floats sort by their text, which
        // both sides print for the same value differently only in form, so compare by
        // normalising them first.
        let normal = |rows: &mut Vec<Vec<Option<String>>>| {
            for row in rows.iter_mut() {
                for (cell, (_, ty)) in row.iter_mut().zip(&types) {
                    if ty == "FLOAT64"
                        && let Some(v) = cell
                        && let Ok(f) = v.parse::<f64>()
                    {
                        *v = format!("{f:e}");
                    }
                }
            }
            rows.sort();
        };
        normal(&mut loaded);
        normal(&mut wanted);
        let mismatch = loaded.iter().zip(&wanted).find(|(l, w)| {
            l.len() != w.len()
                || l.iter()
                    .zip(w.iter())
                    .zip(&types)
                    .any(|((l, w), (_, ty))| !same_value(ty, w.as_deref(), l.as_deref()))
        });
        if loaded.len() != wanted.len() || mismatch.is_some() {
            failures.push(format!(
                "{}: {} rows in BigQuery, {} from pandas; first difference {mismatch:?}",
                entry.file,
                loaded.len(),
                wanted.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The date formats detection guesses and the values it parses, against pandas'
/// `guess_datetime_format` and `to_datetime` on the same strings (`tests/corpus/dates.txt`).
#[test]
fn dates_are_guessed_and_parsed_as_pandas_does() {
    use shardflow::source::files::pandas::{DatetimeRule, guess_format};
    let pandas = run_python(
        "pandas_dates.py",
        &[corpus_dir().join("dates.txt").to_str().unwrap()],
    );
    let today = chrono::Utc::now().date_naive();
    let mut differences = Vec::new();
    for case in pandas.as_array().expect("cases") {
        let value = case["value"].as_str().unwrap_or_default();
        let theirs_format = case["format"].as_str();
        let ours_format = guess_format(value);
        if ours_format.as_deref() != theirs_format {
            differences.push(format!(
                "{value:?}: format {ours_format:?}, pandas {theirs_format:?}"
            ));
        }
        let theirs = case["parsed"].as_str();
        let ours = DatetimeRule::for_column(std::iter::once(value)).and_then(|rule| {
            rule.parse(value, today).ok().map(|t| {
                chrono::DateTime::from_timestamp_micros(t.utc_micros())
                    .map(|d| d.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
                    .unwrap_or_default()
            })
        });
        if ours.as_deref() != theirs {
            differences.push(format!("{value:?}: parsed {ours:?}, pandas {theirs:?}"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

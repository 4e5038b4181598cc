//! `deploy/smoke.sh`, the end-to-end check a user runs against a real project, run here against
//! the emulators (BigQuery behind the strict rules layer): it must pass, and leave nothing.

mod common;

use std::process::Command;

#[tokio::test]
async fn the_smoke_script_passes_against_the_emulators_and_cleans_up() {
    let bq = common::bigquery_host().await;
    for var in ["STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"] {
        common::env_or_fail(var);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = common::dispatcher_bin();
    let output = Command::new("bash")
        .arg(root.join("deploy/smoke.sh"))
        .env("GCP_PROJECT_ID", common::BIGQUERY_PROJECT)
        .env("BIGQUERY_LOCATION", "US")
        .env("SHARDFLOW_BIN_DIR", bin.parent().unwrap())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "smoke.sh failed:\n{stdout}\n{stderr}"
    );
    for line in [
        "smoke_catalog: 27 rows, every value as in PostgreSQL",
        "smoke_tx: 25 rows, every value as in PostgreSQL",
        "smoke_merge: 27 rows, every value as in PostgreSQL",
        "smoke_files: 4 rows from 2 JSON lines files, loaded by BigQuery from GCS directly",
        "smoke: passed (emulator)",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // Nothing is left: the dataset and the bucket the script named are gone.
    let dataset = stdout
        .split_whitespace()
        .skip_while(|w| *w != "dataset")
        .nth(1)
        .unwrap()
        .trim_end_matches(',')
        .to_string();
    let gone = reqwest::get(format!(
        "{bq}/bigquery/v2/projects/{}/datasets/{dataset}",
        common::BIGQUERY_PROJECT
    ))
    .await
    .unwrap();
    assert_eq!(
        gone.status().as_u16(),
        404,
        "dataset {dataset} is still there"
    );
    let bucket = stdout
        .split_whitespace()
        .skip_while(|w| *w != "bucket")
        .nth(1)
        .unwrap()
        .to_string();
    let gcs = common::env_or_fail("STORAGE_EMULATOR_HOST");
    let gone = reqwest::get(format!("{gcs}/storage/v1/b/{bucket}"))
        .await
        .unwrap();
    assert_eq!(
        gone.status().as_u16(),
        404,
        "bucket {bucket} is still there"
    );
}

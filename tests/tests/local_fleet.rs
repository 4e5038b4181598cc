//! `deploy/local-fleet.sh`, the one command that runs the whole fleet on one machine, run here
//! against the emulators (BigQuery behind the strict rules layer) with a small sample table:
//! the run completes with every PostgreSQL row, the query command it prints works when pasted,
//! and nothing it started outlives it.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

/// A free loopback port for the Django stand-in and a free one followed by two more for the
/// dispatcher and the two workers (the script puts worker N on the dispatcher's port + N).
fn free_ports() -> (u16, u16) {
    let django = TcpListener::bind("127.0.0.1:0").unwrap();
    loop {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = first.local_addr().unwrap().port();
        if base > u16::MAX - 2 {
            continue;
        }
        let next: Vec<_> = (1..=2)
            .filter_map(|n| TcpListener::bind(("127.0.0.1", base + n)).ok())
            .collect();
        if next.len() == 2 && base != django.local_addr().unwrap().port() {
            return (django.local_addr().unwrap().port(), base);
        }
    }
}

/// Whether a process is still running (a zombie is not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_local_fleet_script_loads_the_sample_into_bigquery_and_stops_what_it_started() {
    let bq = common::bigquery_host().await;
    for var in ["STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"] {
        common::env_or_fail(var);
    }
    let pg = common::pg().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = common::dispatcher_bin();
    let dir = common::scratch("local_fleet");
    let (django_port, metrics_port) = free_ports();
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    // The script makes the sample table; it goes when the test ends, passed or failed.
    let _sample = common::DropOnExit::pg_table(common::PG_URL, "public.shardflow_sample_orders");
    let mut script = Command::new("bash");
    script
        .arg(root.join("deploy/local-fleet.sh"))
        .env("LOCAL_FLEET_ROWS", "20000")
        .env("LOCAL_FLEET_DIR", &dir)
        .env("LOCAL_FLEET_TIMEOUT", "300")
        .env("LOCAL_FLEET_DJANGO_PORT", django_port.to_string())
        .env("LOCAL_FLEET_METRICS_PORT", metrics_port.to_string())
        .env("SHARDFLOW_BIN_DIR", bin.parent().unwrap())
        .env_remove("LOCAL_FLEET_STOP_EMULATORS");
    // Topics of its own, so a local fleet someone runs by hand on the default ones is left be.
    for (var, default) in [
        ("JOBS_TOPIC", "etl-jobs"),
        ("JOBS_SUBSCRIPTION", "etl-jobs-dispatcher"),
        ("SHARDS_TOPIC", "etl-shards"),
        ("SHARDS_SUBSCRIPTION", "etl-shards-workers"),
        ("RESULTS_TOPIC", "etl-shard-results"),
        ("RESULTS_SUBSCRIPTION", "etl-shard-results-dispatcher"),
        ("DEAD_LETTER_TOPIC", "etl-shards-dead-letter"),
        (
            "DEAD_LETTER_SUBSCRIPTION",
            "etl-shards-dead-letter-dispatcher",
        ),
    ] {
        script.env(format!("SHARDFLOW_{var}"), format!("{default}-lf{id}"));
    }
    let output = script.output().expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "local-fleet.sh failed:\n{stdout}\n{stderr}"
    );

    // The final status it printed: the run as the Django stand-in holds it.
    let status_text: String = stdout
        .lines()
        .skip_while(|l| !l.ends_with("the run as Django holds it:"))
        .skip(1)
        .take_while(|l| !l.starts_with("local-fleet:"))
        .collect::<Vec<_>>()
        .join("\n");
    let status: serde_json::Value = serde_json::from_str(&status_text)
        .unwrap_or_else(|e| panic!("no final status JSON ({e}) in:\n{stdout}"));
    let source_rows: i64 = pg
        .query_one("SELECT count(*) FROM public.shardflow_sample_orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        source_rows, 20000,
        "the sample table has LOCAL_FLEET_ROWS rows"
    );
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["rows_loaded"], source_rows, "{status}");
    for line in [
        format!(
            "local-fleet: loaded into BigQuery (emulator {bq}): project {}, dataset raw_data, table sample_orders",
            common::BIGQUERY_PROJECT
        ),
        format!(
            "local-fleet: rows: {source_rows} in BigQuery {}.raw_data.sample_orders, {source_rows} in PostgreSQL public.shardflow_sample_orders, rows_loaded {source_rows}",
            common::BIGQUERY_PROJECT
        ),
        "local-fleet: passed".to_string(),
        "local-fleet: stopped django-standin dispatcher worker-1 worker-2".to_string(),
    ] {
        assert!(stdout.contains(&line), "no {line:?} in:\n{stdout}");
    }

    // The query command works as pasted into a fresh shell: nothing from this environment.
    let query = stdout
        .lines()
        .find(|l| l.starts_with("curl "))
        .unwrap_or_else(|| panic!("no query command in:\n{stdout}"));
    let answer = Command::new("bash")
        .arg("-c")
        .arg(query)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .current_dir(std::env::temp_dir())
        .output()
        .expect("bash runs");
    assert!(answer.status.success(), "{query}: {answer:?}");
    let answer: serde_json::Value = serde_json::from_slice(&answer.stdout)
        .unwrap_or_else(|e| panic!("{query}: not JSON ({e}): {answer:?}"));
    assert_eq!(
        answer["rows"][0]["f"][0]["v"],
        source_rows.to_string(),
        "{query}: {answer}"
    );

    // Nothing it started is still running.
    let pids = std::fs::read_to_string(dir.join("logs/pids")).expect("the pids file");
    let started: Vec<(String, u32)> = pids
        .lines()
        .map(|l| {
            let (name, pid) = l.split_once(' ').expect("NAME PID");
            (name.to_string(), pid.parse().expect("a pid"))
        })
        .collect();
    let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["django-standin", "dispatcher", "worker-1", "worker-2"],
        "{pids}"
    );
    for (name, pid) in &started {
        assert!(!alive(*pid), "{name} (pid {pid}) outlived local-fleet.sh");
    }
}

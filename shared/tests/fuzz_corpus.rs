//! The fuzz corpora as regression tests: every file of `fuzz/corpus/<target>/` (the seeds, the
//! minimized finds, every input that once crashed) goes through the same function the fuzzer
//! runs (`shardflow::fuzz_targets`), which panics on a broken property. No services needed.
//! A missing or empty corpus directory fails the test: a corpus that is not there tests
//! nothing.

use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs every file of the target's corpus, and fails naming each file that panicked.
fn run_corpus(target: &str, body: fn(&[u8])) {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} holds no file",
        dir.display()
    );
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("a readable corpus file");
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} corpus files failed (the panic of each is printed above): {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn job_spec_corpus() {
    run_corpus("job_spec", shardflow::fuzz_targets::job_spec);
}

#[test]
fn pg_copy_corpus() {
    run_corpus("pg_copy", shardflow::fuzz_targets::pg_copy);
}

#[test]
fn csv_reader_corpus() {
    run_corpus("csv_reader", shardflow::fuzz_targets::csv_reader);
}

#[test]
fn json_reader_corpus() {
    run_corpus("json_reader", shardflow::fuzz_targets::json_reader);
}

/// The corpus test is only as good as its seeds: each target's real inputs must be there
/// (the COPY seeds come from a real PostgreSQL, see `fuzz/README.md`).
#[test]
fn seeds_are_in_place() {
    for (target, seed) in [
        ("job_spec", "example_sample_job.json"),
        ("pg_copy", "all_types"),
        ("csv_reader", "rows_comma"),
        ("json_reader", "rows_jsonl"),
    ] {
        let path = corpus_dir(target).join(seed);
        assert!(path.is_file(), "seed {} is missing", path.display());
    }
}

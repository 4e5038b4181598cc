use super::*;
use crate::messages::{StagedFile, extraction_prefix, new_extraction_id};
use crate::parquet_sink::{PartOptions, write_parts};
use crate::staging::Staging;
use arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use std::sync::Arc;

/// A fresh directory per test, read back as any Parquet reader would: every file of the
/// table's current version, a column the file lacks read as NULL.
async fn fixture() -> crate::warehouse::conformance::Fixture {
    let root =
        std::env::temp_dir().join(format!("shardflow-suite-{}", uuid::Uuid::new_v4().simple()));
    let staging = Staging::local(&root.join("stage")).unwrap();
    let warehouse = Arc::new(ParquetDirWarehouse::new(root.join("wh")).unwrap());
    let tables = root.join("wh");
    crate::warehouse::conformance::Fixture {
        warehouse,
        staging,
        read: Box::new(move |table, columns| {
            let dir = tables.join(table);
            Box::pin(async move { read_back(&dir, &columns) })
        }),
    }
}

fn read_back(dir: &Path, columns: &[String]) -> crate::warehouse::conformance::Rows {
    let mut rows = Vec::new();
    for file in table_files(dir).unwrap() {
        for batch in read_batches(&file, None).unwrap().1 {
            let text: Vec<Option<ArrayRef>> = columns
                .iter()
                .map(|c| {
                    batch
                        .column_by_name(c)
                        .map(|a| arrow::compute::cast(a, &DataType::Utf8).unwrap())
                })
                .collect();
            for i in 0..batch.num_rows() {
                rows.push(
                    text.iter()
                        .map(|a| {
                            let a = a.as_ref()?.as_string::<i32>();
                            a.is_valid(i).then(|| a.value(i).to_string())
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
    }
    rows.sort_by_key(|r: &Vec<Option<String>>| {
        r[0].as_deref().and_then(|id| id.parse::<i64>().ok())
    });
    rows
}

crate::warehouse::conformance::warehouse_conformance_suite!(super::fixture);

#[tokio::test]
async fn parts_without_a_table_column_load_null_under_add_columns() {
    crate::warehouse::conformance::parts_without_a_table_column_load_null_under_add_columns(
        fixture().await,
    )
    .await;
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Utf8, true),
        Field::new("at", DataType::Int64, true),
    ]))
}

/// One staged part per list of (id, v, at) rows.
async fn stage(
    staging: &Staging,
    run: &str,
    parts: &[&[(i64, &str, Option<i64>)]],
) -> Vec<StagedFile> {
    let mut staged = Vec::new();
    for (n, rows) in parts.iter().enumerate() {
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap();
        let stream: crate::source::BatchStream = Box::pin(futures::stream::iter(vec![Ok(batch)]));
        let shard = format!("s{n}");
        staged.extend(
            write_parts(
                staging.store(),
                &extraction_prefix(run, &shard, &new_extraction_id()),
                schema(),
                stream,
                &PartOptions::default(),
                |_| Ok(()),
            )
            .await
            .unwrap(),
        );
    }
    staged
}

/// The table's rows as (id, v), in id order.
fn rows(dir: &Path) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    for f in table_files(dir).unwrap() {
        for b in read_batches(&f, None).unwrap().1 {
            let ids = b.column(0).as_primitive::<Int64Type>();
            let vs = b.column(1).as_string::<i32>();
            out.extend((0..b.num_rows()).map(|i| (ids.value(i), vs.value(i).to_string())));
        }
    }
    out.sort();
    out
}

fn names(dir: &Path) -> Vec<String> {
    table_files(dir)
        .unwrap()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn replace<'a>(
    schema: &'a arrow::datatypes::Schema,
    staging: &'a Staging,
    run_id: &'a str,
    parts: &'a [StagedFile],
    expected_rows: u64,
) -> LoadRequest<'a> {
    LoadRequest {
        table: "t",
        schema,
        run_id,
        load_key: run_id,
        parts,
        staging,
        mode: WriteMode::Replace,
        expected_rows,
        merge_keys: &[],
        latest_by: None,
        allow_new_columns: false,
    }
}

/// A reader that resolves the table's link once reads one whole version to the end while
/// swaps go on; replaced versions go once their grace period is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pinned_a_version_reads_it_whole_through_repeated_swaps() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let root =
        std::env::temp_dir().join(format!("shardflow-pin-{}", uuid::Uuid::new_v4().simple()));
    let staging = Staging::local(&root.join("stage")).unwrap();
    let wh = ParquetDirWarehouse::new(root.join("wh"))
        .unwrap()
        .with_version_grace(Duration::from_secs(60));
    let schema = schema();
    // Version k: k + 2 rows over two parts, each row saying how many rows its version has.
    let version = |k: usize| -> Vec<Vec<(i64, String, Option<i64>)>> {
        let n = k + 2;
        let rows: Vec<_> = (0..n as i64).map(|i| (i, format!("n={n}"), None)).collect();
        vec![rows[..1].to_vec(), rows[1..].to_vec()]
    };
    let stage_version = |k: usize| {
        let staging = staging.clone();
        async move {
            let parts = version(k);
            let parts: Vec<Vec<(i64, &str, Option<i64>)>> = parts
                .iter()
                .map(|p| p.iter().map(|(i, v, a)| (*i, v.as_str(), *a)).collect())
                .collect();
            let refs: Vec<&[(i64, &str, Option<i64>)]> =
                parts.iter().map(|p| p.as_slice()).collect();
            stage(&staging, &format!("r{k}"), &refs).await
        }
    };
    let first = stage_version(0).await;
    wh.load(replace(&schema, &staging, "r0", &first, 2))
        .await
        .unwrap();

    let table = wh.table_dir("t");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, table) = (stop.clone(), reads.clone(), table.clone());
        std::thread::spawn(move || -> std::result::Result<(), String> {
            let mut pause = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let pinned = std::fs::canonicalize(&table).map_err(|e| e.to_string())?;
                let files = table_files(&pinned).map_err(|e| e.to_string())?;
                // Long enough for swaps to happen between the listing and the reading.
                pause = (pause + 7) % 40;
                std::thread::sleep(Duration::from_millis(pause));
                let mut tags = Vec::new();
                for f in &files {
                    let (_, batches) =
                        read_batches(f, None).map_err(|e| format!("{}: {e}", f.display()))?;
                    for b in batches {
                        let v = b.column(1).as_string::<i32>();
                        tags.extend((0..b.num_rows()).map(|i| v.value(i).to_string()));
                    }
                }
                let whole = format!("n={}", tags.len());
                if tags.is_empty() || tags.iter().any(|t| *t != whole) {
                    return Err(format!("read a mix or a part: {tags:?}"));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    const SWAPS: usize = 30;
    for k in 1..=SWAPS {
        let parts = stage_version(k).await;
        let run = format!("r{k}");
        wh.load(replace(&schema, &staging, &run, &parts, k as u64 + 2))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap().unwrap();
    assert!(
        reads.load(Ordering::Relaxed) >= 5,
        "the reader read too rarely to tell"
    );
    assert_eq!(rows(&table).len(), SWAPS + 2);
    // Every replaced version is still there, in its grace period, and none is a leftover
    // the sweep may take yet.
    let leftovers = wh.leftovers().await.unwrap();
    assert_eq!(leftovers.len(), SWAPS, "{leftovers:?}");
    let nothing_running = std::collections::HashSet::new();
    assert!(
        leftovers
            .iter()
            .all(|l| l.run_id.is_none() && !l.removable(&nothing_running, SystemTime::now()))
    );
    // With the grace period over, the next load removes them: only the table is left.
    let wh = ParquetDirWarehouse::new(root.join("wh"))
        .unwrap()
        .with_version_grace(Duration::ZERO);
    let last = stage_version(SWAPS + 1).await;
    let run = format!("r{}", SWAPS + 1);
    wh.load(replace(&schema, &staging, &run, &last, SWAPS as u64 + 3))
        .await
        .unwrap();
    assert_eq!(wh.leftovers().await.unwrap(), vec![]);
    let versions: Vec<_> = std::fs::read_dir(root.join("wh").join(VERSIONS_DIR).join("t"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(versions, vec![std::fs::canonicalize(&table).unwrap()]);
    let _ = std::fs::remove_dir_all(&root);
}

/// A table made before versions (a plain directory) becomes a link at its first load;
/// a killed run's scratch is listed under its run, and nothing else can be removed.
#[tokio::test]
async fn leftovers_name_their_runs_and_a_plain_table_directory_is_taken_over() {
    let root =
        std::env::temp_dir().join(format!("shardflow-left-{}", uuid::Uuid::new_v4().simple()));
    let staging = Staging::local(&root.join("stage")).unwrap();
    let wh = ParquetDirWarehouse::new(root.join("wh")).unwrap();
    let schema = schema();
    let old = stage(&staging, "r0", &[&[(1, "old", None)]]).await;
    let table = wh.table_dir("t");
    std::fs::create_dir_all(&table).unwrap();
    std::fs::copy(
        staging.local_path(&old[0].path).unwrap(),
        table.join("legacy.parquet"),
    )
    .unwrap();
    let new = stage(&staging, "r1", &[&[(1, "new", None), (2, "new", None)]]).await;
    wh.load(replace(&schema, &staging, "r1", &new, 2))
        .await
        .unwrap();
    assert!(
        std::fs::symlink_metadata(&table)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(rows(&table), vec![(1, "new".into()), (2, "new".into())]);
    assert_eq!(
        wh.leftovers().await.unwrap(),
        vec![],
        "the plain directory is gone"
    );

    // What a run killed mid-load leaves, and a build directory of a release before versions.
    let half = root
        .join("wh")
        .join(VERSIONS_DIR)
        .join("t")
        .join("0000000000001-dead.1");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("part.parquet"), b"half").unwrap();
    std::os::unix::fs::symlink(
        ".shardflow-versions/t/0000000000001-dead.1",
        root.join("wh/.shardflow-link-dead.1"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("wh/.shardflow-t-cli-x.1")).unwrap();
    let mut found = wh.leftovers().await.unwrap();
    found.sort_by(|a, b| a.location.cmp(&b.location));
    let runs: Vec<_> = found.iter().map(|l| l.run_id.clone()).collect();
    assert_eq!(
        runs,
        vec![Some("dead.1".into()), None, Some("dead.1".into())],
        "{found:?}"
    );
    let running: std::collections::HashSet<String> = ["dead.1".to_string()].into();
    assert!(
        found
            .iter()
            .all(|l| !l.removable(&running, SystemTime::now())),
        "running: kept"
    );
    for l in &found {
        if l.removable(&Default::default(), SystemTime::now()) {
            wh.remove_leftover(l).await.unwrap();
        }
    }
    // The old build directory waits its grace period (its run cannot be told); the rest went.
    let left: Vec<_> = wh
        .leftovers()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.location)
        .collect();
    assert_eq!(
        left,
        vec![root.join("wh/.shardflow-t-cli-x.1").display().to_string()]
    );
    assert!(!half.exists());
    assert_eq!(rows(&table).len(), 2, "the table is untouched");
    let err = wh
        .remove_leftover(&Leftover {
            run_id: None,
            location: table.display().to_string(),
            keep_until: None,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a leftover of this warehouse"), "{err}");
    assert_eq!(rows(&table).len(), 2);
    let _ = std::fs::remove_dir_all(&root);
}

#[tokio::test]
async fn merge_keeps_the_latest_staged_row_of_each_key_and_links_untouched_files() {
    let root =
        std::env::temp_dir().join(format!("shardflow-merge-{}", uuid::Uuid::new_v4().simple()));
    let staging = Staging::local(&root.join("stage")).unwrap();
    let wh = ParquetDirWarehouse::new(root.join("wh")).unwrap();
    let schema = schema();
    let keys = ["id".to_string()];
    let request = |run_id: &'static str, parts, mode, expected_rows| LoadRequest {
        table: "t",
        schema: &schema,
        run_id,
        load_key: run_id,
        parts,
        staging: &staging,
        mode,
        expected_rows,
        merge_keys: &keys,
        latest_by: Some("at"),
        allow_new_columns: false,
    };

    let base = stage(
        &staging,
        "r1",
        &[
            &[
                (1, "old", Some(0)),
                (2, "old", Some(0)),
                (3, "old", Some(0)),
            ],
            &[(5, "old", Some(0)), (6, "old", Some(0))],
        ],
    )
    .await;
    wh.load(request("r1", &base, WriteMode::Replace, 5))
        .await
        .unwrap();
    // A staged part's table file is its staging path with '/' made '-'.
    let untouched = base[1].path.replace('/', "-");
    let rewritten = base[0].path.replace('/', "-");
    assert!(names(&wh.table_dir("t")).contains(&untouched));

    // Key 2 three times: the greatest `at` wins, the later part on a tie. Key 7: a
    // value beats a NULL. Key 8 is new.
    let changes = stage(
        &staging,
        "r2",
        &[
            &[(2, "x", Some(5)), (2, "y", Some(9)), (7, "null", None)],
            &[(2, "z", Some(9)), (7, "m", Some(1)), (8, "new", None)],
        ],
    )
    .await;
    let outcome = wh
        .load(request("r2", &changes, WriteMode::Merge, 6))
        .await
        .unwrap();
    assert_eq!(outcome.rows_loaded, 3, "keys 2, 7 and 8");
    let want: Vec<(i64, String)> = [
        (1, "old"),
        (2, "z"),
        (3, "old"),
        (5, "old"),
        (6, "old"),
        (7, "m"),
        (8, "new"),
    ]
    .iter()
    .map(|(i, v)| (*i, v.to_string()))
    .collect();
    assert_eq!(rows(&wh.table_dir("t")), want);
    // The file without a staged key is the same file; the other was rewritten.
    let after = names(&wh.table_dir("t"));
    assert!(after.contains(&untouched), "{after:?}");
    assert!(!after.contains(&rewritten), "{after:?}");

    // The same merge again changes nothing; a wrong count is refused.
    wh.load(request("r2", &changes, WriteMode::Merge, 6))
        .await
        .unwrap();
    assert_eq!(rows(&wh.table_dir("t")), want);
    let err = wh
        .load(request("r3", &changes, WriteMode::Merge, 7))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hold 6 rows but the workers reported 7"),
        "{err}"
    );
    assert_eq!(rows(&wh.table_dir("t")), want);
    let _ = std::fs::remove_dir_all(&root);
}

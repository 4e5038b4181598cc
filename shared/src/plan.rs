//! Planning decisions as pure functions: standard vs sharded, how many shards, and where to cut
//! a key space so that every shard holds about the same number of ROWS (not the same key width).
//! The source connector gathers the evidence (estimates, histogram bounds, samples, page counts);
//! these functions decide.

use serde::{Deserialize, Serialize};

use crate::source::{ShardBounds, SourceColumn};
use crate::spec::ProcessingMode;

/// Rows per shard when `--shard-rows` is not given: large enough that per-shard overhead
/// (a connection, a snapshot import, a Parquet footer) is noise, small enough that a 2-core
/// worker finishes a shard in well under a minute and the fleet balances.
pub const DEFAULT_SHARD_ROWS: u64 = 500_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One shard.
    Standard,
    /// Key or ctid ranges spread over the workers.
    Sharded,
}

/// Decides the mode from `processing_mode` and the estimate, and says why.
pub fn choose_mode(
    requested: ProcessingMode,
    estimated_rows: u64,
    threshold: u64,
) -> (Mode, String) {
    match requested {
        ProcessingMode::Standard => (
            Mode::Standard,
            "processing_mode is \"standard\": one shard".to_string(),
        ),
        ProcessingMode::Dataflow => (
            Mode::Sharded,
            "processing_mode is \"dataflow\": sharded across the workers".to_string(),
        ),
        ProcessingMode::Auto if estimated_rows >= threshold => (
            Mode::Sharded,
            format!(
                "processing_mode is \"auto\" and the estimate of {estimated_rows} rows reaches row_count_threshold {threshold}"
            ),
        ),
        ProcessingMode::Auto => (
            Mode::Standard,
            format!(
                "processing_mode is \"auto\" and the estimate of {estimated_rows} rows is below row_count_threshold {threshold}"
            ),
        ),
    }
}

/// How many shards `estimated_rows` needs at `shard_rows` per shard (at least one).
pub fn shard_count(estimated_rows: u64, shard_rows: u64) -> usize {
    let per = shard_rows.max(1);
    usize::try_from(estimated_rows.div_ceil(per))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// When the number of workers is known (the embedded `run`), rounds the shard count up to a
/// multiple of it, so no worker idles while another runs the last shard alone.
pub fn fit_to_workers(shards: usize, workers: usize) -> usize {
    if shards <= 1 || workers <= 1 {
        return shards.max(1);
    }
    shards.div_ceil(workers) * workers
}

/// A cut point and the share of the rows that falls before it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cut {
    pub value: String,
    /// Fraction of the rows below `value`, 0..=1.
    pub rank: f64,
}

/// Cuts an ordered list of values that each stand for an equal share of the rows (PostgreSQL's
/// equi-depth `histogram_bounds`, or a sorted random sample) into `shards` ranges of equal rank.
/// `points` must be sorted in the key's own order (the database sorts, never Rust: collations).
/// Equal neighbouring cut values are merged, so a hot key never yields an empty range.
pub fn equal_rank_cuts(points: &[String], shards: usize) -> Vec<Cut> {
    if points.len() < 2 || shards < 2 {
        return Vec::new();
    }
    // Histogram bounds: n+1 bounds delimit n buckets of equal depth; bound i has rank i/n.
    // A sample of n+1 sorted values reads the same way.
    let buckets = points.len() - 1;
    let mut cuts: Vec<Cut> = Vec::with_capacity(shards - 1);
    for i in 1..shards {
        let pos = (i * buckets + shards / 2) / shards;
        if pos == 0 || pos >= buckets {
            continue;
        }
        let value = &points[pos];
        if cuts.last().is_some_and(|c| &c.value == value) {
            continue;
        }
        cuts.push(Cut {
            value: value.clone(),
            rank: pos as f64 / buckets as f64,
        });
    }
    cuts
}

/// Turns cut points into contiguous half-open key ranges covering the whole key space: the
/// first is unbounded below (and takes NULL keys), the last unbounded above, so rows beyond the
/// statistics are never lost, only counted in the edge shards.
pub fn key_ranges(
    column: &SourceColumn,
    cuts: &[Cut],
    estimated_rows: u64,
) -> Vec<(ShardBounds, u64)> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut lower: Option<&Cut> = None;
    for i in 0..=cuts.len() {
        let upper = cuts.get(i);
        let lo_rank = lower.map_or(0.0, |c| c.rank);
        let hi_rank = upper.map_or(1.0, |c| c.rank);
        let rows = ((hi_rank - lo_rank) * estimated_rows as f64).round() as u64;
        out.push((
            ShardBounds::KeyRange {
                column: column.name.clone(),
                key_type: column.type_name.clone(),
                lower: lower.map(|c| c.value.clone()),
                upper: upper.map(|c| c.value.clone()),
                include_nulls: i == 0 && column.nullable,
            },
            rows,
        ));
        lower = upper;
    }
    out
}

/// Splits `pages` heap pages into `shards` ctid block ranges of equal size; the last range is
/// unbounded so pages added after the estimate still belong to a shard.
pub fn ctid_ranges(pages: u64, shards: usize, estimated_rows: u64) -> Vec<(ShardBounds, u64)> {
    let shards = shards
        .max(1)
        .min(usize::try_from(pages.max(1)).unwrap_or(usize::MAX));
    let n = shards as u64;
    (0..n)
        .map(|i| {
            let first = pages * i / n;
            let end = (i + 1 < n).then(|| pages * (i + 1) / n);
            let span = end.unwrap_or(pages.max(first + 1)) - first;
            let rows = if pages == 0 {
                estimated_rows
            } else {
                estimated_rows * span / pages.max(1)
            };
            (
                ShardBounds::CtidRange {
                    first_block: first,
                    end_block: end,
                },
                rows,
            )
        })
        .collect()
}

/// The ratio of the largest shard to the mean, the balance measure the tests hold to 1.5.
pub fn imbalance(rows: &[u64]) -> f64 {
    if rows.is_empty() {
        return 1.0;
    }
    let total: u64 = rows.iter().sum();
    let mean = total as f64 / rows.len() as f64;
    let max = rows.iter().copied().max().unwrap_or(0) as f64;
    if mean == 0.0 { 1.0 } else { max / mean }
}

/// What planning knows of one file: its estimated rows and (Parquet) rows per row group.
#[derive(Clone, Debug, PartialEq)]
pub struct FileEstimate {
    pub rows: u64,
    pub row_groups: Vec<u64>,
}

/// One file (or row groups `first..end` of it) in a shard, with its estimated rows.
#[derive(Clone, Debug, PartialEq)]
pub struct FileSlice {
    pub file: usize,
    pub row_groups: Option<(usize, usize)>,
    pub rows: u64,
}

/// Files in one shard at most, so a shard message stays small.
pub const MAX_FILES_PER_SHARD: usize = 500;

/// Groups files into shards of about `shard_rows`: small files together (in order), a file
/// of `shard_rows` or more alone, and a Parquet file larger than that cut at row-group
/// boundaries. `one_shard` (processing_mode "standard") puts every file in one shard.
pub fn file_shards(
    files: &[FileEstimate],
    shard_rows: u64,
    one_shard: bool,
) -> Vec<Vec<FileSlice>> {
    let whole = |i: usize, f: &FileEstimate| FileSlice {
        file: i,
        row_groups: None,
        rows: f.rows,
    };
    if one_shard {
        let all: Vec<FileSlice> = files.iter().enumerate().map(|(i, f)| whole(i, f)).collect();
        return if all.is_empty() {
            Vec::new()
        } else {
            vec![all]
        };
    }
    let target = shard_rows.max(1);
    let mut shards = Vec::new();
    let mut current: Vec<FileSlice> = Vec::new();
    let mut current_rows = 0u64;
    for (i, f) in files.iter().enumerate() {
        if f.rows > target && f.row_groups.len() > 1 {
            if !current.is_empty() {
                shards.push(std::mem::take(&mut current));
                current_rows = 0;
            }
            let (mut first, mut rows) = (0usize, 0u64);
            for (g, group_rows) in f.row_groups.iter().enumerate() {
                rows += group_rows;
                if rows >= target || g + 1 == f.row_groups.len() {
                    shards.push(vec![FileSlice {
                        file: i,
                        row_groups: Some((first, g + 1)),
                        rows,
                    }]);
                    (first, rows) = (g + 1, 0);
                }
            }
            continue;
        }
        current.push(whole(i, f));
        current_rows += f.rows;
        if current_rows >= target || current.len() >= MAX_FILES_PER_SHARD {
            shards.push(std::mem::take(&mut current));
            current_rows = 0;
        }
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// What planning a job takes besides its spec: shard size, fleet size and what the warehouse
/// can do itself.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub shard_rows: u64,
    /// Workers known to be running the shards (embedded `run`): the shard count is rounded up
    /// to a multiple of it. None for a fleet whose size the autoscaler decides.
    pub workers: Option<usize>,
    pub exact_count: bool,
    pub retry: crate::retry::RetryPolicy,
    /// The warehouse loads gs:// source files itself (BigQuery): a GCS file job it can read
    /// as is takes the fast path.
    pub warehouse_loads_gcs: bool,
    /// The warehouse's location (a BigQuery dataset's): source files it loads itself must be in
    /// a bucket there.
    pub warehouse_location: Option<String>,
    /// How the warehouse names each source column (BigQuery renames what it cannot take).
    pub column_names: fn(&[String]) -> Vec<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            shard_rows: DEFAULT_SHARD_ROWS,
            workers: None,
            exact_count: false,
            retry: crate::retry::RetryPolicy::default(),
            warehouse_loads_gcs: false,
            warehouse_location: None,
            column_names: crate::warehouse::names_as_they_are,
        }
    }
}

/// What the state store knows about an incremental stream, beyond the job config.
#[derive(Clone, Debug, Default)]
pub struct StreamState {
    /// The window of a run this one takes over: it is read again exactly, so a load that
    /// committed before its dispatcher died is not followed by a wider window.
    pub inherited_window: Option<crate::source::Window>,
    /// The watermark recorded with the stream's last committed load: a `last_sync_value`
    /// older than it (Django missed the final report, or a scheduled job has no run to
    /// report to) must not read those rows again.
    pub recorded_watermark: Option<String>,
    /// A file stream: the files its committed loads read.
    pub processed_files: Vec<crate::state::ProcessedFile>,
    /// A file stream's run this one takes over: the files it selected (their URIs). Only
    /// those are read again: its append may have committed under the job's load key, and a
    /// file listed since would be recorded as loaded with it without being in it.
    pub inherited_files: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_group_small_and_split_large_parquet() {
        let f = |rows: u64, groups: &[u64]| FileEstimate {
            rows,
            row_groups: groups.to_vec(),
        };
        let files = vec![
            f(100, &[]),
            f(200, &[]),
            f(800, &[]),
            f(2500, &[1000, 1000, 500]),
            f(50, &[]),
        ];
        let shards = file_shards(&files, 1000, false);
        type Shape = Vec<Vec<(usize, Option<(usize, usize)>, u64)>>;
        let shape: Shape = shards
            .iter()
            .map(|s| s.iter().map(|x| (x.file, x.row_groups, x.rows)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![(0, None, 100), (1, None, 200), (2, None, 800)],
                vec![(3, Some((0, 1)), 1000)],
                vec![(3, Some((1, 2)), 1000)],
                vec![(3, Some((2, 3)), 500)],
                vec![(4, None, 50)],
            ]
        );
        // Every file and row group exactly once.
        let rows: u64 = shards.iter().flatten().map(|s| s.rows).sum();
        assert_eq!(rows, files.iter().map(|f| f.rows).sum::<u64>());
        assert_eq!(file_shards(&files, 1000, true).len(), 1);
        assert_eq!(file_shards(&files, 1000, true)[0].len(), 5);
        assert!(file_shards(&[], 1000, true).is_empty());
        assert!(file_shards(&[], 1000, false).is_empty());
        // A large CSV file cannot be cut: it is one shard.
        assert_eq!(file_shards(&[f(5000, &[])], 1000, false).len(), 1);
    }

    fn col(nullable: bool) -> SourceColumn {
        SourceColumn {
            name: "id".into(),
            type_oid: 20,
            type_name: "bigint".into(),
            typmod: -1,
            nullable,
        }
    }

    #[test]
    fn mode_follows_processing_mode_and_threshold() {
        assert_eq!(
            choose_mode(ProcessingMode::Auto, 999_999, 1_000_000).0,
            Mode::Standard
        );
        let (mode, why) = choose_mode(ProcessingMode::Auto, 1_000_000, 1_000_000);
        assert_eq!(mode, Mode::Sharded);
        assert!(why.contains("reaches row_count_threshold 1000000"), "{why}");
        assert_eq!(
            choose_mode(ProcessingMode::Standard, u64::MAX, 1).0,
            Mode::Standard
        );
        assert_eq!(
            choose_mode(ProcessingMode::Dataflow, 0, 1_000_000).0,
            Mode::Sharded
        );
    }

    #[test]
    fn shard_count_rounds_up_and_is_at_least_one() {
        assert_eq!(shard_count(0, 100), 1);
        assert_eq!(shard_count(100, 100), 1);
        assert_eq!(shard_count(101, 100), 2);
        assert_eq!(shard_count(1_000_000, 0), 1_000_000);
    }

    #[test]
    fn shard_count_fits_the_workers() {
        assert_eq!(fit_to_workers(11, 2), 12);
        assert_eq!(fit_to_workers(10, 2), 10);
        assert_eq!(fit_to_workers(5, 4), 8);
        assert_eq!(fit_to_workers(1, 4), 1, "a standard run stays one shard");
        assert_eq!(fit_to_workers(7, 1), 7);
    }

    fn points(values: impl IntoIterator<Item = i64>) -> Vec<String> {
        values.into_iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn cuts_follow_rank_not_key_width() {
        // Skewed keys: 90% of the sample sits in 1..=900, the rest spread up to 10^9.
        let mut sample: Vec<i64> = (1..=900).collect();
        sample.extend((1..=100).map(|i| i * 10_000_000));
        let cuts = equal_rank_cuts(&points(sample.clone()), 10);
        assert_eq!(cuts.len(), 9);
        // Count the sample per range: each gets about a tenth, whatever the key width.
        let bounds: Vec<i64> = cuts.iter().map(|c| c.value.parse().unwrap()).collect();
        let mut per = vec![0u64; 10];
        for v in &sample {
            let idx = bounds.iter().filter(|b| v >= b).count();
            per[idx] += 1;
        }
        assert!(imbalance(&per) <= 1.05, "{per:?}");
    }

    #[test]
    fn equal_cut_values_are_merged() {
        let sample = points([1, 5, 5, 5, 5, 5, 5, 5, 5, 9]);
        let cuts = equal_rank_cuts(&sample, 5);
        let values: Vec<_> = cuts.iter().map(|c| c.value.as_str()).collect();
        assert_eq!(values, vec!["5"]);
    }

    #[test]
    fn too_little_evidence_means_no_cuts() {
        assert!(equal_rank_cuts(&points([1]), 4).is_empty());
        assert!(equal_rank_cuts(&points([1, 2, 3]), 1).is_empty());
    }

    #[test]
    fn key_ranges_cover_everything_and_nulls_go_first() {
        let cuts = vec![
            Cut {
                value: "10".into(),
                rank: 0.25,
            },
            Cut {
                value: "20".into(),
                rank: 0.75,
            },
        ];
        let ranges = key_ranges(&col(true), &cuts, 1000);
        let rows: Vec<u64> = ranges.iter().map(|r| r.1).collect();
        assert_eq!(rows, vec![250, 500, 250]);
        let bounds: Vec<_> = ranges
            .iter()
            .map(|(b, _)| match b {
                ShardBounds::KeyRange {
                    lower,
                    upper,
                    include_nulls,
                    ..
                } => (lower.clone(), upper.clone(), *include_nulls),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            bounds,
            vec![
                (None, Some("10".to_string()), true),
                (Some("10".to_string()), Some("20".to_string()), false),
                (Some("20".to_string()), None, false),
            ]
        );
        // A NOT NULL key has no NULL rows to pick up.
        assert!(matches!(
            key_ranges(&col(false), &cuts, 1000)[0].0,
            ShardBounds::KeyRange {
                include_nulls: false,
                ..
            }
        ));
    }

    #[test]
    fn ctid_ranges_are_contiguous_and_open_ended() {
        let ranges = ctid_ranges(1000, 3, 30_000);
        let spans: Vec<_> = ranges
            .iter()
            .map(|(b, rows)| match b {
                ShardBounds::CtidRange {
                    first_block,
                    end_block,
                } => (*first_block, *end_block, *rows),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, Some(333), 9990),
                (333, Some(666), 9990),
                (666, None, 10020)
            ]
        );
        // Never more shards than pages; an empty table is one open range.
        assert_eq!(ctid_ranges(2, 10, 20).len(), 2);
        assert_eq!(ctid_ranges(0, 10, 0).len(), 1);
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[10, 10, 10]), 1.0);
        assert_eq!(imbalance(&[30, 10, 20]), 1.5);
        assert_eq!(imbalance(&[]), 1.0);
    }
}

//! Planning a job: its source surveyed through its connector, the mode chosen, the table or
//! the incremental window cut into equal-row shards, and the plan `dispatcher plan` prints.

use serde::Serialize;
use shardflow::plan::{self, Mode};
use shardflow::source::{
    Estimate, PlannedWindow, ShardBounds, SourceColumn, SourceSurvey, Split, TableSurvey, Window,
    WindowBounds,
};
use shardflow::spec::{ColumnWindow, JobSpec, Load, LoadType, ProcessingMode};
use shardflow::{Error, Result};

use crate::{PlanOptions, StreamState, files};

#[derive(Clone, Debug, Serialize)]
pub struct PlannedColumn {
    pub name: String,
    pub source_type: String,
    pub arrow_type: String,
    pub nullable: bool,
    /// The destination's name for it, when the warehouse cannot take the source's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_name: Option<String>,
}

/// A source column the warehouse holds under another name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RenamedColumn {
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedShard {
    pub shard_id: String,
    pub estimated_rows: u64,
    /// The bounds in words (`502130 <= order_id < 994064`): lower inclusive, upper exclusive.
    pub reads: String,
    pub bounds: ShardBounds,
}

/// A plan, as `dispatcher plan` prints it. Holds no secret.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub data_source_id: Option<i64>,
    pub source: String,
    pub dest_table: String,
    pub load_type: LoadType,
    pub estimated_rows: u64,
    pub estimate_source: String,
    pub processing_mode: ProcessingMode,
    pub row_count_threshold: u64,
    pub mode: Mode,
    pub mode_reason: String,
    pub shard_rows_target: u64,
    pub split_method: String,
    pub split_column: Option<String>,
    pub columns: Vec<PlannedColumn>,
    pub shards: Vec<PlannedShard>,
    #[serde(skip)]
    pub source_columns: Vec<SourceColumn>,
    /// The destination's name for each of `source_columns`, in order.
    #[serde(skip)]
    pub destination_names: Vec<String>,
    /// The columns the destination holds under another name (the warehouse's naming rule).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub renamed_columns: Vec<RenamedColumn>,
    /// For a transactional load: the rows this run reads. `None` with no shard at all when
    /// the window is empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// For a transactional load: the watermark of the load before, which the window starts
    /// after (the greater of `last_sync_value` and the one the state store recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumes_after: Option<String>,
    /// For a merge: the columns that identify a row in the destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merge_keys: Vec<String>,
    /// For a file job: which files the run reads and where its columns came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<files::FilesPlan>,
    /// What the run's report should say about the plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Plan {
    /// The destination's name of a source column (itself when not renamed, or not read).
    pub fn destination_name<'a>(&'a self, source: &'a str) -> &'a str {
        self.source_columns
            .iter()
            .zip(&self.destination_names)
            .find(|(c, _)| c.name == source)
            .map_or(source, |(_, d)| d.as_str())
    }
}

/// The columns a merge matches rows on: `merge_keys`, else the primary key; each must be read.
pub(crate) fn merge_keys(
    spec: &JobSpec,
    named: Option<&[String]>,
    primary_key: &[String],
    read: &[SourceColumn],
) -> Result<Vec<String>> {
    let keys = match named {
        Some(keys) => keys.to_vec(),
        None if primary_key.is_empty() => {
            return Err(Error::Spec(shardflow::spec::SpecError::single(
                "merge_keys",
                format!(
                    "{} has no primary key: name the columns that identify a row",
                    spec.qualified_table()
                ),
            )));
        }
        None => primary_key.to_vec(),
    };
    let unread: Vec<&str> = keys
        .iter()
        .filter(|k| !read.iter().any(|c| &c.name == *k))
        .map(String::as_str)
        .collect();
    if !unread.is_empty() {
        return Err(Error::Spec(shardflow::spec::SpecError::single(
            "merge_keys",
            format!(
                "{} must be among the columns read from {} (a column of the table, in \
                 selected_columns when those are given)",
                unread.join(", "),
                spec.qualified_table()
            ),
        )));
    }
    Ok(keys)
}

pub(crate) fn shard_id(index: usize) -> String {
    format!("s{index:05}")
}

/// Plans a job: checks the table and columns exist, estimates without scanning, picks the
/// mode, and cuts equal-row shards. Moves no data.
pub async fn plan_job(spec: &JobSpec, opts: &PlanOptions) -> Result<Plan> {
    plan_job_in_stream(spec, opts, &StreamState::default()).await
}

/// What the source database says of the job's table: the columns read, the rows and their
/// cut, and for an incremental load its window.
pub(crate) struct Survey {
    columns: Vec<SourceColumn>,
    merge_keys: Vec<String>,
    estimate: Estimate,
    split: Split,
    window: Option<Window>,
    resumes_after: Option<String>,
    /// What the report should say about the plan (rows no window takes).
    warnings: Vec<String>,
}

/// The columns to read, checked, and a merge's keys.
pub(crate) fn columns_and_keys(
    spec: &JobSpec,
    table_columns: &[SourceColumn],
    primary_key: &[String],
) -> Result<(Vec<SourceColumn>, Vec<String>)> {
    let columns = shardflow::source::project(
        table_columns,
        &spec.qualified_table(),
        spec.selected_columns.as_deref(),
        spec.timestamp_column(),
    )?;
    if columns.is_empty() {
        return Err(Error::Source(format!(
            "{} has no columns to read",
            spec.qualified_table()
        )));
    }
    let merge_keys = match &spec.load {
        Load::Merge { keys, .. } => merge_keys(spec, keys.as_deref(), primary_key, &columns)?,
        Load::Catalog { .. } | Load::Append { .. } => Vec::new(),
    };
    Ok((columns, merge_keys))
}

/// How an incremental window was cut, for the plan.
pub(crate) fn window_split(
    planned: PlannedWindow,
    column: &str,
) -> (Estimate, Split, Option<Window>, Option<String>, Vec<String>) {
    let PlannedWindow {
        window,
        after,
        rows,
        beyond,
        shards,
    } = planned;
    let warnings = match beyond {
        0 => Vec::new(),
        n => vec![format!(
            "{n} row{} of timestamp_column {column:?} {} infinity (or NaN), past the end of \
             every incremental window: an incremental load never takes {}; a catalog load does",
            if n == 1 { "" } else { "s" },
            if n == 1 { "is" } else { "are" },
            if n == 1 { "it" } else { "them" },
        )],
    };
    let method = match (&window, shards.len()) {
        (None, _) => "none (the window is empty)",
        (Some(_), 1) => "none",
        (Some(_), _) => "window quantiles",
    };
    let split = Split {
        method: method.into(),
        column: (shards.len() > 1).then(|| column.to_string()),
        shards,
    };
    let estimate = Estimate {
        rows,
        source: "count(*) over the window".into(),
    };
    (estimate, split, window, after, warnings)
}

pub(crate) fn warn_if_behind(window: &ColumnWindow, stream: &StreamState, after: &Option<String>) {
    let told = window.last_sync_value.as_ref().and_then(sync_value_text);
    if stream.inherited_window.is_none() && *after != told {
        tracing::warn!(
            last_sync_value = ?told,
            recorded = ?after,
            "last_sync_value is older than the watermark of this stream's last committed \
             load; the window starts after the recorded one"
        );
    }
}

/// The columns, rows and cut of a table source (PostgreSQL, MySQL).
pub(crate) async fn survey_table(
    mut table: Box<dyn TableSurvey>,
    spec: &JobSpec,
    opts: &PlanOptions,
    stream: &StreamState,
    wanted: &(dyn Fn(u64) -> usize + Send + Sync),
) -> Result<Survey> {
    let (columns, merge_keys) = columns_and_keys(spec, table.columns(), table.primary_key())?;
    let (estimate, split, window, resumes_after, warnings) = match spec.load.column_window() {
        Some(column_window) => {
            let column = &column_window.column;
            let bounds = window_bounds(column_window, spec.load.lookback(), stream);
            let planned = table.plan_window(column, bounds, wanted).await?;
            let cut = window_split(planned, column);
            warn_if_behind(column_window, stream, &cut.3);
            cut
        }
        None => {
            let estimate = table.estimate(opts.exact_count).await?;
            let split = table.split(estimate.rows, wanted(estimate.rows)).await?;
            (estimate, split, None, None, Vec::new())
        }
    };
    Ok(Survey {
        columns,
        merge_keys,
        estimate,
        split,
        window,
        resumes_after,
        warnings,
    })
}

/// `plan_job` for a run whose incremental stream the state store knows.
pub async fn plan_job_in_stream(
    spec: &JobSpec,
    opts: &PlanOptions,
    stream: &StreamState,
) -> Result<Plan> {
    let wanted =
        |rows: u64| match plan::choose_mode(spec.processing_mode, rows, spec.row_count_threshold).0
        {
            Mode::Standard => 1,
            Mode::Sharded => plan::fit_to_workers(
                plan::shard_count(rows, opts.shard_rows),
                opts.workers.unwrap_or(1),
            ),
        };
    let mut files_plan = None;
    let Survey {
        columns,
        merge_keys,
        estimate,
        split,
        window,
        resumes_after,
        warnings,
    } = match shardflow::source::open(spec)
        .survey(spec, opts, stream)
        .await?
    {
        SourceSurvey::Table(table) => survey_table(table, spec, opts, stream, &wanted).await?,
        SourceSurvey::Files(survey) => {
            files_plan = Some(survey.files);
            Survey {
                columns: survey.columns,
                merge_keys: Vec::new(),
                estimate: survey.estimate,
                split: survey.split,
                window: None,
                resumes_after: None,
                warnings: Vec::new(),
            }
        }
    };
    let (mode, mode_reason) = plan::choose_mode(
        spec.processing_mode,
        estimate.rows,
        spec.row_count_threshold,
    );
    let source_names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let destination_names = (opts.column_names)(&source_names);
    let renamed_columns: Vec<RenamedColumn> = source_names
        .iter()
        .zip(&destination_names)
        .filter(|(s, d)| s != d)
        .map(|(s, d)| RenamedColumn {
            source: s.clone(),
            destination: d.clone(),
        })
        .collect();
    Ok(Plan {
        data_source_id: spec.data_source_id,
        source: match &files_plan {
            Some(_) => format!("{:?} files {}", spec.source_type, spec.qualified_table()),
            None => spec.qualified_table(),
        },
        dest_table: spec.dest_table_name.clone(),
        load_type: spec.load.kind(),
        estimated_rows: estimate.rows,
        estimate_source: estimate.source,
        processing_mode: spec.processing_mode,
        row_count_threshold: spec.row_count_threshold,
        mode,
        mode_reason,
        shard_rows_target: opts.shard_rows,
        split_method: split.method,
        split_column: split.column,
        columns: columns
            .iter()
            .zip(&destination_names)
            .map(|(c, destination)| {
                let (source_type, arrow_type) =
                    shardflow::source::column_types(spec.source_type, c);
                PlannedColumn {
                    name: c.name.clone(),
                    source_type,
                    arrow_type: arrow_type.to_string(),
                    nullable: c.nullable,
                    destination_name: (destination != &c.name).then(|| destination.clone()),
                }
            })
            .collect(),
        shards: split
            .shards
            .into_iter()
            .enumerate()
            .map(|(i, (bounds, estimated_rows))| PlannedShard {
                shard_id: shard_id(i),
                estimated_rows,
                reads: bounds.describe(),
                bounds,
            })
            .collect(),
        source_columns: columns,
        destination_names,
        renamed_columns,
        window,
        resumes_after,
        merge_keys,
        files: files_plan,
        warnings,
    })
}

/// The bounds of an incremental run's window: a taken-over run's own, or after the greater
/// of `last_sync_value` and the recorded watermark (else from `historical_start_date`).
pub(crate) fn window_bounds(
    window: &ColumnWindow,
    lookback: Option<std::time::Duration>,
    stream: &StreamState,
) -> WindowBounds {
    if let Some(w) = &stream.inherited_window {
        return WindowBounds {
            after: w.after.iter().cloned().collect(),
            from: w.from.clone(),
            through: Some(w.through.clone()),
            // The inherited window already starts where the lookback put it.
            lookback: None,
        };
    }
    let told = window.last_sync_value.as_ref().and_then(sync_value_text);
    WindowBounds {
        after: told
            .into_iter()
            .chain(stream.recorded_watermark.clone())
            .collect(),
        from: window.historical_start_date.clone(),
        through: None,
        lookback,
    }
}

/// `last_sync_value` as the text PostgreSQL casts back: a JSON string as is, a number as
/// written; null or an empty string mean no watermark yet.
pub(crate) fn sync_value_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

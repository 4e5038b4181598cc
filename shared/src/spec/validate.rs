//! From a Django job config to a [`JobSpec`]: every problem found, each naming its field.

use super::*;

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl JobSpec {
    /// Parses and validates a job config. Syntax errors keep serde's position; every semantic
    /// problem is listed by field.
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let config: JobConfig = serde_json::from_str(text)
            .map_err(|e| SpecError::single("job config", format!("not valid job JSON: {e}")))?;
        JobSpec::validate(config)
    }

    pub fn validate(config: JobConfig) -> Result<JobSpec, SpecError> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, text: String| {
            problems.push(FieldProblem {
                field: field.to_string(),
                problem: text,
            })
        };

        let source_type = match non_empty(&config.source_type) {
            None => {
                problem("source_type", "is required".into());
                None
            }
            Some(name) => match SourceType::parse(name) {
                Some(t) => Some(t),
                None => {
                    problem(
                        "source_type",
                        format!(
                            "source_type \"{name}\" is not supported (expected one of: {})",
                            SourceType::NAMES
                        ),
                    );
                    None
                }
            },
        };

        let load_type = match config.load_type.as_deref().map(str::trim) {
            None | Some("") | Some("catalog") => Some(LoadType::Catalog),
            Some("transactional") => Some(LoadType::Transactional),
            Some("merge") => Some(LoadType::Merge),
            Some(other) => {
                problem(
                    "load_type",
                    format!(
                        "load_type \"{other}\" is not supported (expected catalog, transactional or merge)"
                    ),
                );
                None
            }
        };
        let timestamp_column = non_empty(&config.timestamp_column).map(str::to_string);
        // A file job's increment is the files not loaded yet, not a column.
        let reads_files = config.is_file_based.unwrap_or(false)
            || source_type.is_some_and(SourceType::is_file_source);
        if let Some(lt @ (LoadType::Transactional | LoadType::Merge)) = load_type
            && timestamp_column.is_none()
            && !reads_files
        {
            let name = if lt == LoadType::Merge {
                "merge"
            } else {
                "transactional"
            };
            problem(
                "load_type",
                format!("load_type \"{name}\" needs timestamp_column"),
            );
        }
        let merge_keys = match &config.merge_keys {
            None => None,
            Some(keys) if keys.is_empty() => None,
            Some(keys) => {
                if load_type != Some(LoadType::Merge) {
                    problem("merge_keys", "is only used with load_type \"merge\"".into());
                }
                for (i, k) in keys.iter().enumerate() {
                    if k.trim().is_empty() {
                        problem("merge_keys", "contains an empty column name".into());
                    } else if keys[..i].contains(k) {
                        problem("merge_keys", format!("lists \"{k}\" twice"));
                    }
                }
                Some(keys.clone())
            }
        };
        let lookback = match config.lookback.as_ref().map(parse_lookback) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(d))) => {
                if load_type != Some(LoadType::Merge) {
                    problem(
                        "lookback",
                        "needs load_type \"merge\": an append would load the rows it reads again twice"
                            .into(),
                    );
                }
                Some(d)
            }
            Some(Err(why)) => {
                problem("lookback", why);
                None
            }
        };

        let processing_mode = match config.processing_mode.as_deref().map(str::trim) {
            None | Some("") | Some("auto") => Some(ProcessingMode::Auto),
            Some("standard") => Some(ProcessingMode::Standard),
            Some("dataflow") => Some(ProcessingMode::Dataflow),
            Some(other) => {
                problem(
                    "processing_mode",
                    format!(
                        "processing_mode \"{other}\" is not supported (expected auto, standard or dataflow)"
                    ),
                );
                None
            }
        };

        let row_count_threshold = match &config.row_count_threshold {
            None => DEFAULT_ROW_COUNT_THRESHOLD,
            Some(NumberOrString::Number(n)) => *n,
            Some(NumberOrString::Text(t)) => t.trim().parse().unwrap_or_else(|_| {
                problem(
                    "row_count_threshold",
                    format!("must be a whole number, got \"{t}\""),
                );
                DEFAULT_ROW_COUNT_THRESHOLD
            }),
        };
        if row_count_threshold == 0 {
            problem("row_count_threshold", "must be at least 1".into());
        }

        let dest_table_name = match non_empty(&config.dest_table_name) {
            None => {
                problem("dest_table_name", "is required".into());
                String::new()
            }
            Some(name) => {
                if let Err(why) = check_dest_table_name(name) {
                    problem("dest_table_name", why);
                }
                name.to_string()
            }
        };

        let selected_columns = match &config.selected_columns {
            None => None,
            Some(cols) if cols.is_empty() => None,
            Some(cols) => {
                let mut seen = std::collections::BTreeSet::new();
                for c in cols {
                    if c.trim().is_empty() {
                        problem("selected_columns", "contains an empty column name".into());
                    } else if !seen.insert(c.as_str()) {
                        problem("selected_columns", format!("lists \"{c}\" twice"));
                    }
                }
                Some(cols.clone())
            }
        };

        let mut files = None;
        let mut table_name = String::new();
        if reads_files {
            let format = match config.file_format.as_deref().map(str::trim) {
                Some("csv") => Some(FileFormat::Csv),
                Some("parquet") => Some(FileFormat::Parquet),
                Some("json") | Some("jsonl") => Some(FileFormat::Json),
                None | Some("") => {
                    problem("file_format", "is required for file sources".into());
                    None
                }
                Some(other) => {
                    problem(
                        "file_format",
                        format!(
                            "file_format \"{other}\" is not supported (expected csv, parquet or json)"
                        ),
                    );
                    None
                }
            };
            let pattern = non_empty(&config.file_pattern);
            match pattern {
                None => problem("file_pattern", "is required for file sources".into()),
                Some(p) => {
                    if let Err(e) = globset::Glob::new(p) {
                        problem("file_pattern", format!("{p:?} is not a glob: {}", e.kind()));
                    }
                }
            }
            let options = match FileOptions::from_json(
                config
                    .file_format_options
                    .as_ref()
                    .unwrap_or(&serde_json::Value::Null),
            ) {
                Ok(o) => Some(o),
                Err(why) => {
                    why.into_iter()
                        .for_each(|w| problem("file_format_options", w));
                    None
                }
            };
            let schema_policy = match config.schema_policy.as_deref().map(str::trim) {
                None | Some("") | Some("fail") => Some(SchemaPolicy::Fail),
                Some("add_columns") => Some(SchemaPolicy::AddColumns),
                Some(other) => {
                    problem(
                        "schema_policy",
                        format!(
                            "schema_policy \"{other}\" is not supported (expected fail or add_columns)"
                        ),
                    );
                    None
                }
            };
            if source_type.is_some_and(|t| !t.is_file_source()) {
                problem(
                    "is_file_based",
                    "file jobs need source_type gcs, s3, azure_blob or local".into(),
                );
            }
            if matches!(load_type, Some(LoadType::Merge)) {
                problem(
                    "load_type",
                    "merge is not supported for file sources (catalog or transactional)".into(),
                );
            }
            if let (Some(format), Some(pattern), Some(options), Some(schema_policy)) =
                (format, pattern, options, schema_policy)
            {
                files = Some(FileSpec {
                    path_prefix: config.file_path_prefix.clone().unwrap_or_default(),
                    pattern: pattern.to_string(),
                    format,
                    options,
                    load_latest_only: config.load_latest_only.unwrap_or(true),
                    schema_fingerprint: non_empty(&config.schema_fingerprint).map(str::to_string),
                    bigquery_schema: config.bigquery_schema.clone().filter(|s| !s.is_empty()),
                    schema_policy,
                });
            }
        } else {
            match non_empty(&config.source_table_name) {
                None => problem("source_table_name", "is required".into()),
                Some(t) => table_name = t.to_string(),
            }
            let params = &config.connection_params;
            if non_empty(&params.host).is_none() {
                problem("connection_params.host", "is required".into());
            }
            if non_empty(&params.database).is_none() {
                problem("connection_params.database", "is required".into());
            }
            if non_empty(&params.username).is_none() {
                problem("connection_params.username", "is required".into());
            }
            // The value is not quoted: connection_params values stay out of every message.
            let port_ok = match &params.port {
                None => true,
                Some(NumberOrString::Number(p)) => (1..=65535).contains(p),
                Some(NumberOrString::Text(p)) => p.trim().parse::<u16>().is_ok_and(|p| p > 0),
            };
            if !port_ok {
                problem(
                    "connection_params.port",
                    "must be a port number from 1 to 65535".into(),
                );
            }
        }

        if !problems.is_empty() {
            return Err(SpecError { problems });
        }
        // Every Option below is Some when no problem was recorded.
        let (Some(source_type), Some(load_type), Some(processing_mode)) =
            (source_type, load_type, processing_mode)
        else {
            return Err(SpecError::single("job config", "incomplete"));
        };
        let source = match files {
            Some(files) => SourceSpec::Files(files),
            None => SourceSpec::Table(TableRef {
                schema: non_empty(&config.schema_name)
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        source_type.default_schema(config.connection_params.database.as_deref())
                    }),
                table: table_name,
            }),
        };
        let column_window = |column: String| ColumnWindow {
            column,
            last_sync_value: config.last_sync_value.clone(),
            historical_start_date: non_empty(&config.historical_start_date).map(str::to_string),
        };
        // The problems above leave one shape per load type: a table's incremental loads have
        // their column, a file job's increment is its new files, and merges are tables'.
        let load = match (load_type, timestamp_column, &source) {
            (LoadType::Catalog, watermark_column, _) => Load::Catalog { watermark_column },
            (LoadType::Transactional, watermark_column, SourceSpec::Files(_)) => Load::Append {
                window: Window::NewFiles { watermark_column },
            },
            (LoadType::Transactional, Some(column), SourceSpec::Table(_)) => Load::Append {
                window: Window::Column(column_window(column)),
            },
            (LoadType::Merge, Some(column), SourceSpec::Table(_)) => Load::Merge {
                window: column_window(column),
                keys: merge_keys,
                lookback,
            },
            _ => return Err(SpecError::single("job config", "incomplete")),
        };
        Ok(JobSpec {
            data_source_id: config.data_source_id,
            source_type,
            connection: config.connection_params,
            source,
            dest_table_name,
            load,
            selected_columns,
            processing_mode,
            row_count_threshold,
            warnings: config
                .unknown
                .keys()
                .map(|field| unknown_field_warning(field))
                .collect(),
        })
    }
}

/// BigQuery table names allow letters, digits, underscores and (with care) dashes and spaces;
/// shardflow also uses the name as a directory, so separators and dot names are refused.
fn check_dest_table_name(name: &str) -> Result<(), String> {
    if name.len() > 1024 {
        return Err("is longer than 1024 characters".into());
    }
    if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(format!(
            "\"{name}\" is not a table name (no slashes, NUL or dot names)"
        ));
    }
    Ok(())
}

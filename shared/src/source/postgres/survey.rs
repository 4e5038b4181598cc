//! Planning reads: the table described from the catalog, its rows estimated from statistics,
//! cut into equal-row key or ctid ranges, and an incremental window's bounds and quantiles.

use super::*;

/// Looks the table up; a missing table is named with the database it was looked for in.
pub async fn describe(client: &Client, schema: &str, table: &str) -> Result<TableInfo> {
    let row = client.query_opt(TABLE_SQL, &[&schema, &table]).await?;
    let Some(row) = row else {
        let db: String = client
            .query_one("SELECT current_database()", &[])
            .await?
            .get(0);
        return Err(Error::Source(format!(
            "table {schema}.{table} not found in database \"{db}\""
        )));
    };
    let oid: u32 = row.get(0);
    let columns: Vec<SourceColumn> = client
        .query(COLUMNS_SQL, &[&oid])
        .await?
        .iter()
        .map(|r| SourceColumn {
            name: r.get(0),
            type_oid: r.get(1),
            type_name: r.get(2),
            typmod: r.get(3),
            nullable: r.get(4),
        })
        .collect();
    let mut split_key = None;
    for r in client.query(KEY_SQL, &[&oid]).await? {
        let name: String = r.get(0);
        if let Some(c) = columns.iter().find(|c| c.name == name)
            && cast_type(&c.type_name).is_some()
        {
            split_key = Some(c.clone());
            break;
        }
    }
    let primary_key = client
        .query(PRIMARY_KEY_SQL, &[&oid])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        oid,
        relkind: row.get(1),
        relpages: row.get(2),
        reltuples: row.get(3),
        pages_now: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
        columns,
        split_key,
        primary_key,
    })
}

/// Estimates the table's rows without scanning it: `pg_class.reltuples` scaled to the current
/// size as the planner does, `EXPLAIN` when the table was never analysed; `COUNT(*)` only when
/// asked for.
pub async fn estimate(client: &Client, info: &TableInfo, exact: bool) -> Result<Estimate> {
    if exact {
        let sql = format!("SELECT count(*) FROM {}", info.qualified());
        let n: i64 = client.query_one(&sql, &[]).await?.get(0);
        return Ok(Estimate {
            rows: n.max(0) as u64,
            source: "count(*)".into(),
        });
    }
    let heap = matches!(info.relkind.as_str(), "r" | "m");
    if heap && info.reltuples >= 0.0 {
        if info.pages_now == 0 {
            return Ok(Estimate {
                rows: 0,
                source: "pg_class: the table has no pages".into(),
            });
        }
        if info.relpages > 0 {
            let density = info.reltuples as f64 / info.relpages as f64;
            return Ok(Estimate {
                rows: (density * info.pages_now as f64).round() as u64,
                source: "pg_class.reltuples scaled to the current size".into(),
            });
        }
    }
    let sql = format!("EXPLAIN (FORMAT JSON) SELECT * FROM {}", info.qualified());
    let plan: serde_json::Value = {
        let text: String = client
            .simple_query(&sql)
            .await?
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| Error::Database("EXPLAIN returned no plan".into()))?;
        serde_json::from_str(&text)?
    };
    let rows = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
    Ok(Estimate {
        rows: rows.round() as u64,
        source: "EXPLAIN (the table has no statistics yet; ANALYZE improves the estimate)".into(),
    })
}

/// Cuts the table into `shards` ranges of about equal row count.
pub async fn split(
    client: &Client,
    info: &TableInfo,
    estimated_rows: u64,
    shards: usize,
) -> Result<Split> {
    let whole = |why: &str| Split {
        method: why.to_string(),
        column: None,
        shards: vec![(ShardBounds::Whole, estimated_rows)],
    };
    if shards <= 1 {
        return Ok(whole("none"));
    }
    let heap = matches!(info.relkind.as_str(), "r" | "m");
    if let Some(key) = &info.split_key {
        // Equi-depth histogram: fine enough when it has a few buckets per shard.
        let bounds: Option<Vec<String>> = client
            .query_opt(
                "SELECT histogram_bounds::text::text[] FROM pg_stats
                 WHERE schemaname = $1 AND tablename = $2 AND attname = $3
                 ORDER BY inherited LIMIT 1",
                &[&info.schema, &info.table, &key.name],
            )
            .await?
            .and_then(|r| r.get(0));
        if let Some(bounds) = bounds.filter(|b| b.len() > 4 * shards) {
            let cuts = plan::equal_rank_cuts(&bounds, shards);
            check_ascending(client, key, &cuts).await?;
            return Ok(Split {
                method: "histogram".into(),
                column: Some(key.name.clone()),
                shards: plan::key_ranges(key, &cuts, estimated_rows),
            });
        }
        // A block sample: many blocks so that clustered keys still give even ranks.
        let target = (shards as u64 * 2_000).clamp(100_000, 2_000_000);
        let percent = if estimated_rows == 0 {
            100.0
        } else {
            (target as f64 * 100.0 / estimated_rows as f64).clamp(0.000_1, 100.0)
        };
        // The alias matters: ORDER BY a bare name prefers an output column, and sorting the
        // text form would put 10 before 9 and give overlapping ranges.
        let sql = format!(
            "SELECT {k}::text AS cut FROM {t} TABLESAMPLE SYSTEM ($1) REPEATABLE (17) \
             WHERE {k} IS NOT NULL ORDER BY {t}.{k}",
            k = quote_ident(&key.name),
            t = info.qualified()
        );
        let sample: Vec<String> = client
            .query(&sql, &[&(percent as f32)])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if sample.len() > 2 * shards {
            let cuts = plan::equal_rank_cuts(&sample, shards);
            check_ascending(client, key, &cuts).await?;
            return Ok(Split {
                method: "sample".into(),
                column: Some(key.name.clone()),
                shards: plan::key_ranges(key, &cuts, estimated_rows),
            });
        }
    }
    if heap {
        return Ok(Split {
            method: "ctid".into(),
            column: None,
            shards: plan::ctid_ranges(info.pages_now, shards, estimated_rows),
        });
    }
    Ok(whole("none (no usable key and not a plain table)"))
}

/// Overlapping key ranges would load rows twice, so before any shard runs PostgreSQL itself
/// confirms that the cuts are strictly ascending in the key's own type and collation.
pub async fn check_ascending(
    client: &Client,
    key: &SourceColumn,
    cuts: &[plan::Cut],
) -> Result<()> {
    let Some(ty) = cast_type(&key.type_name) else {
        return Err(Error::Source(format!(
            "cannot cut on key type {}",
            key.type_name
        )));
    };
    let values: Vec<&str> = cuts.iter().map(|c| c.value.as_str()).collect();
    let sql = format!(
        "SELECT count(*) FROM (
           SELECT v::{ty} AS v, lag(v::{ty}) OVER (ORDER BY n) AS prev
           FROM unnest($1::text[]) WITH ORDINALITY AS u(v, n)) s
         WHERE prev >= v",
    );
    let out_of_order: i64 = client.query_one(&sql, &[&values]).await?.get(0);
    if out_of_order > 0 {
        return Err(Error::Source(format!(
            "the shard cuts on {} are not in ascending order ({out_of_order} out of place); refusing to plan overlapping ranges",
            key.name
        )));
    }
    Ok(())
}

/// The types an incremental window can be drawn on, cast as `cast_type` casts keys.
pub(super) fn window_type(column: &str, column_type: &str) -> Result<&'static str> {
    match column_type {
        "smallint"
        | "integer"
        | "bigint"
        | "numeric"
        | "date"
        | "timestamp without time zone"
        | "timestamp with time zone" => cast_type(column_type).ok_or_else(|| {
            Error::Message(format!("no cast for timestamp_column type {column_type}"))
        }),
        other => Err(Error::Spec(crate::spec::SpecError::single(
            "timestamp_column",
            format!(
                "{column:?} is {other}; an incremental load needs a date, timestamp or number column"
            ),
        ))),
    }
}

/// The window of an incremental load, its exact row count, and its cut into `shards` ranges
/// of the window column with about equal rows. `None` when the window holds no row (and no
/// high-water mark was fixed). The resolved exclusive lower bound comes back either way.
pub async fn plan_window(
    client: &Client,
    info: &TableInfo,
    column: &str,
    bounds: WindowBounds,
    shards: impl Fn(u64) -> usize,
) -> Result<PlannedWindow> {
    let col = info
        .columns
        .iter()
        .find(|c| c.name == column)
        .ok_or_else(|| {
            Error::Spec(crate::spec::SpecError::single(
                "timestamp_column",
                format!("{column:?} is not a column of {}", info.qualified()),
            ))
        })?;
    let t = window_type(column, &col.type_name)?;
    let c = quote_ident(column);
    let table = info.qualified();
    let bad_value = |value: String, field: &str, e: tokio_postgres::Error| {
        Error::Spec(crate::spec::SpecError::single(
            field,
            format!(
                "{value:?} is not a value of {column:?} ({}): {}",
                col.type_name,
                pg_text(&e)
            ),
        ))
    };
    // Each candidate must be a value of the column (named alone when it is not)...
    for value in &bounds.after {
        client
            .query_one(&format!("SELECT $1::text::{t}"), &[value])
            .await
            .map_err(|e| bad_value(value.clone(), "last_sync_value", e))?;
    }
    // ...and the greatest, compared in the column's type, bounds the window.
    let after: Option<String> = match bounds.after.len() {
        0 => None,
        1 => bounds.after.first().cloned(),
        _ => client
            .query_one(
                // The candidate itself, not PostgreSQL's text of it: the watermark keeps
                // the ISO form it was reported in.
                &format!("SELECT v FROM unnest($1::text[]) v ORDER BY v::{t} DESC LIMIT 1"),
                &[&bounds.after],
            )
            .await
            .map_err(|e| bad_value(bounds.after.join(", "), "last_sync_value", e))?
            .get(0),
    };
    // The window's own lower bound: `after` less the lookback. `after` itself stays what the
    // run resumes after (the watermark an empty window reports).
    let start_after = match (&after, bounds.lookback) {
        (Some(v), Some(lookback)) => {
            if !matches!(
                col.type_name.as_str(),
                "date" | "timestamp without time zone" | "timestamp with time zone"
            ) {
                return Err(Error::Spec(crate::spec::SpecError::single(
                    "lookback",
                    format!(
                        "needs a date or timestamp timestamp_column; {column:?} is {}",
                        col.type_name
                    ),
                )));
            }
            let seconds = lookback.as_secs_f64();
            let earlier: String = client
                .query_one(
                    &format!("SELECT ($1::text::{t} - make_interval(secs => $2))::{t}::text"),
                    &[v, &seconds],
                )
                .await
                .map_err(|e| bad_value(v.clone(), "last_sync_value", e))?
                .get(0);
            Some(earlier)
        }
        (after, _) => after.clone(),
    };
    let from = bounds.from;
    let (lower_sql, lower) = match (&start_after, &from) {
        (Some(v), _) => (format!("{c} > $1::text::{t}"), Some(v.clone())),
        (None, Some(v)) => (format!("{c} >= $1::text::{t}"), Some(v.clone())),
        (None, None) => (format!("($1::text IS NULL AND {c} IS NOT NULL)"), None),
    };
    let bad_bound = |e| {
        let field = if after.is_some() {
            "last_sync_value"
        } else {
            "historical_start_date"
        };
        bad_value(lower.clone().unwrap_or_default(), field, e)
    };
    // The high-water mark is the greatest finite value: `infinity` (and numeric `NaN`, which
    // PostgreSQL sorts above every number) would be a watermark no later row ever passes, or,
    // clamped into Arrow's range, one the same row passes again on every run.
    let finite = match col.type_name.as_str() {
        "date" | "timestamp without time zone" | "timestamp with time zone" => {
            format!("isfinite({c})")
        }
        "numeric" => format!("{c}::text NOT IN ('NaN', 'Infinity', '-Infinity')"),
        _ => "true".to_string(),
    };
    let through: Option<String> = match bounds.through {
        Some(fixed) => Some(fixed),
        None => client
            .query_one(
                &format!(
                    "SELECT (max({c}) FILTER (WHERE {finite}))::text FROM {table} WHERE {lower_sql}"
                ),
                &[&lower],
            )
            .await
            .map_err(bad_bound)?
            .get(0),
    };
    let Some(through) = through else {
        let beyond: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {lower_sql} AND NOT ({finite})"),
                &[&lower],
            )
            .await
            .map_err(bad_bound)?
            .get(0);
        return Ok(PlannedWindow {
            window: None,
            after,
            rows: 0,
            beyond: beyond.max(0) as u64,
            shards: Vec::new(),
        });
    };
    let window_sql = format!("{lower_sql} AND {c} <= $2::text::{t}");
    // One scan: the window's rows, and those past its end that no window takes (`infinity`,
    // `NaN`; not rows committed since, which the next run takes).
    let counted = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE {c} <= $2::text::{t}),
                        count(*) FILTER (WHERE {c} > $2::text::{t} AND NOT ({finite}))
                 FROM {table} WHERE {lower_sql}"
            ),
            &[&lower, &through],
        )
        .await
        .map_err(bad_bound)?;
    let rows = counted.get::<_, i64>(0).max(0) as u64;
    let beyond = counted.get::<_, i64>(1).max(0) as u64;
    let wanted = shards(rows);
    let window = Window {
        column: column.to_string(),
        column_type: col.type_name.clone(),
        after: start_after.clone(),
        from,
        through: through.clone(),
    };
    let planned = |shards| PlannedWindow {
        window: Some(window.clone()),
        after: after.clone(),
        rows,
        beyond,
        shards,
    };
    if wanted <= 1 {
        return Ok(planned(vec![(ShardBounds::Whole, rows)]));
    }
    // Exact quantiles of the window column over the window's rows: equal-row ranges.
    let fractions: Vec<f64> = (1..wanted).map(|i| i as f64 / wanted as f64).collect();
    let cuts: Vec<String> = client
        .query_one(
            &format!(
                "SELECT (percentile_disc($3::float8[]) WITHIN GROUP (ORDER BY {c}))::text[] \
                 FROM {table} WHERE {window_sql}"
            ),
            &[&lower, &through, &fractions],
        )
        .await?
        .get(0);
    let mut points: Vec<Cut> = Vec::new();
    for (i, value) in cuts.into_iter().enumerate() {
        if points.last().is_some_and(|p| p.value == value) {
            continue;
        }
        points.push(Cut {
            value,
            rank: fractions[i],
        });
    }
    let key = SourceColumn {
        nullable: false,
        ..col.clone()
    };
    Ok(planned(crate::plan::key_ranges(&key, &points, rows)))
}

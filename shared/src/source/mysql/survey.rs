//! Planning reads: the table described from `information_schema`, its rows estimated without
//! a scan, cut into equal-row key ranges, and an incremental window's bounds and quantiles.

use super::*;

/// Looks the table up; a missing table is named with the database it was looked for in.
pub async fn describe(conn: &mut MySqlConnection, schema: &str, table: &str) -> Result<TableInfo> {
    let row = sqlx::query(TABLE_SQL)
        .bind(schema)
        .bind(table)
        .fetch_optional(&mut *conn)
        .await
        .map_err(source_error)?;
    let Some(row) = row else {
        return Err(Error::Source(format!(
            "table {schema}.{table} not found in MySQL"
        )));
    };
    let table_type = text(&row, 0)?.unwrap_or_default();
    let table_rows: Option<u64> = row.try_get(1).map_err(source_error)?;
    let json_checks: Vec<String> = match sqlx::query(JSON_CHECKS_SQL)
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| text(r, 0).ok().flatten())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut columns = Vec::new();
    let mut collations = HashMap::new();
    for r in sqlx::query(COLUMNS_SQL)
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .map_err(source_error)?
    {
        let name = text(&r, 0)?.unwrap_or_default();
        let mut type_name = text(&r, 1)?.unwrap_or_default();
        let is_json = json_checks
            .iter()
            .any(|c| c.contains(&format!("json_valid({})", quote_ident(&name))));
        if type_name == "longtext" && is_json {
            type_name = "json".into();
        }
        if let (Some(charset), Some(collation)) = (text(&r, 3)?, text(&r, 4)?) {
            collations.insert(name.clone(), (charset, collation));
        }
        columns.push(SourceColumn {
            name,
            type_oid: 0,
            type_name,
            typmod: -1,
            nullable: text(&r, 2)?.as_deref() != Some("NO"),
        });
    }
    let mut indexes: Vec<(String, Vec<String>, bool)> = Vec::new();
    for r in sqlx::query(INDEXES_SQL)
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .map_err(source_error)?
    {
        let (index, column) = (text(&r, 0)?.unwrap_or_default(), text(&r, 1)?);
        let unique = r.try_get::<i64, _>(2).map_err(source_error)? == 0;
        match indexes.last_mut() {
            Some((name, cols, _)) if *name == index => cols.extend(column),
            _ => indexes.push((index, column.into_iter().collect(), unique)),
        }
    }
    let column = |name: &str| columns.iter().find(|c| c.name == name);
    let primary_key = indexes
        .iter()
        .find(|(name, ..)| name == "PRIMARY")
        .map(|(_, cols, _)| cols.clone())
        .unwrap_or_default();
    let split_key = indexes
        .iter()
        .filter(|(_, cols, unique)| {
            *unique && cols.iter().all(|c| column(c).is_some_and(|c| !c.nullable))
        })
        .filter_map(|(_, cols, _)| cols.first().and_then(|c| column(c)))
        .find(|c| {
            matches!(
                key_kind(&c.type_name),
                Some(ValueKind::Int { .. } | ValueKind::Text)
            )
        })
        .cloned();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        table_type,
        table_rows,
        columns,
        split_key,
        primary_key,
        collations,
    })
}

/// Reads a count that the server may send as a signed or unsigned integer, a decimal or text.
pub(super) fn count_at(row: &MySqlRow, i: usize) -> Result<u64> {
    if let Ok(v) = row.try_get::<Option<u64>, _>(i) {
        return Ok(v.unwrap_or(0));
    }
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return Ok(v.unwrap_or(0).max(0) as u64);
    }
    let text = text(row, i)?.unwrap_or_default();
    Ok(text.parse::<f64>().map(|f| f.max(0.0) as u64).unwrap_or(0))
}

/// Estimates the table's rows without scanning it: InnoDB's `TABLE_ROWS`, `EXPLAIN` for a
/// view; `COUNT(*)` only when asked for.
pub async fn estimate(
    conn: &mut MySqlConnection,
    info: &TableInfo,
    exact: bool,
) -> Result<Estimate> {
    if exact {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            info.qualified()
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(source_error)?;
        return Ok(Estimate {
            rows: count_at(&row, 0)?,
            source: "count(*)".into(),
        });
    }
    if let Some(rows) = info.table_rows
        && info.table_type != "VIEW"
    {
        return Ok(Estimate {
            rows,
            source: "information_schema.TABLES.TABLE_ROWS (InnoDB's estimate; ANALYZE TABLE refreshes it)".into(),
        });
    }
    let plan = sqlx::query(AssertSqlSafe(format!(
        "EXPLAIN SELECT * FROM {}",
        info.qualified()
    )))
    .fetch_all(&mut *conn)
    .await
    .map_err(source_error)?;
    let mut rows = 0;
    for r in &plan {
        let i = r
            .columns()
            .iter()
            .position(|c| sqlx::Column::name(c) == "rows")
            .ok_or_else(|| Error::Database("EXPLAIN returned no rows column".into()))?;
        rows = rows.max(count_at(r, i)?);
    }
    Ok(Estimate {
        rows,
        source: "EXPLAIN".into(),
    })
}

/// Integer keys whose span is at most this many times the rows are cut by value: rows are
/// spread evenly enough over a dense key (an auto-increment id, even with deletions).
pub(super) const DENSE_KEY_SPAN: u128 = 2;

/// Cuts the table into `shards` ranges of about equal row count: by value over a dense
/// integer key (no read at all), else from every n-th key read in index order (MySQL has no
/// block sampling; only the key column crosses the wire). No usable key: one shard.
pub async fn split(
    conn: &mut MySqlConnection,
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
    let Some(key) = &info.split_key else {
        return Ok(whole(
            "none (no primary key or unique NOT NULL key of an integer or string type)",
        ));
    };
    let Some(kind) = key_kind(&key.type_name) else {
        return Ok(whole("none"));
    };
    let k = quote_ident(&key.name);
    let t = info.qualified();
    if let ValueKind::Int { .. } = kind {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT CAST(MIN({k}) AS CHAR), CAST(MAX({k}) AS CHAR) FROM {t}"
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(source_error)?;
        let (Some(min), Some(max)) = (text(&row, 0)?, text(&row, 1)?) else {
            return Ok(whole("none (the table is empty)"));
        };
        let (Ok(min), Ok(max)) = (min.parse::<i128>(), max.parse::<i128>()) else {
            return Err(Error::Database(format!("MIN/MAX of {k} are not integers")));
        };
        let span = (max - min) as u128 + 1;
        if span >= shards as u128 && span <= DENSE_KEY_SPAN * u128::from(estimated_rows.max(1)) {
            let cuts: Vec<Cut> = (1..shards)
                .map(|i| Cut {
                    value: (min + (span * i as u128 / shards as u128) as i128).to_string(),
                    rank: i as f64 / shards as f64,
                })
                .collect();
            return Ok(Split {
                method: "key span (dense integer key)".into(),
                column: Some(key.name.clone()),
                shards: plan::key_ranges(key, &cuts, estimated_rows),
            });
        }
    }
    let stride = (estimated_rows / (shards as u64 * 1_000)).max(1);
    let (points, _) = every_nth(
        conn,
        format!("SELECT CAST({k} AS CHAR) FROM {t} WHERE {k} IS NOT NULL ORDER BY {k}"),
        &[],
        stride,
    )
    .await?;
    if points.len() <= 2 * shards {
        return Ok(whole("none (too few keys to cut)"));
    }
    let cuts = check_ascending(conn, info, key, plan::equal_rank_cuts(&points, shards)).await?;
    Ok(Split {
        method: "key scan".into(),
        column: Some(key.name.clone()),
        shards: plan::key_ranges(key, &cuts, estimated_rows),
    })
}

/// Every `stride`-th value (and the last) of a one-column query, in its order, and the rows.
pub(super) async fn every_nth(
    conn: &mut MySqlConnection,
    sql: String,
    binds: &[Bound],
    stride: u64,
) -> Result<(Vec<String>, u64)> {
    let query = bind_all(sqlx::query(AssertSqlSafe(sql)), binds);
    let mut rows = query.fetch(&mut *conn);
    let mut points = Vec::new();
    let mut n = 0u64;
    let mut last = None;
    while let Some(row) = rows.next().await {
        let row = row.map_err(source_error)?;
        if n.is_multiple_of(stride) {
            points.push(text(&row, 0)?.unwrap_or_default());
            last = None;
        } else {
            last = Some(row);
        }
        n += 1;
    }
    if let Some(row) = last {
        points.push(text(&row, 0)?.unwrap_or_default());
    }
    Ok((points, n))
}

/// Overlapping ranges would load rows twice: the server compares neighbouring cuts in the
/// key's own collation; cuts equal under it (`a` and `A`) are merged, descending ones refused.
pub async fn check_ascending(
    conn: &mut MySqlConnection,
    info: &TableInfo,
    key: &SourceColumn,
    cuts: Vec<Cut>,
) -> Result<Vec<Cut>> {
    let kind = key_kind(&key.type_name)
        .ok_or_else(|| Error::Source(format!("cannot cut on key type {}", key.type_name)))?;
    let mut kept: Vec<Cut> = Vec::with_capacity(cuts.len());
    for cut in cuts {
        let Some(prev) = kept.last() else {
            kept.push(cut);
            continue;
        };
        let order = match kind {
            ValueKind::Int { .. } => {
                let parse = |v: &str| {
                    v.parse::<i128>()
                        .map_err(|_| Error::Source(format!("cut {v:?} is not an integer")))
                };
                parse(&prev.value)?.cmp(&parse(&cut.value)?)
            }
            ValueKind::Text => {
                let (charset, collation) = info
                    .collations
                    .get(&key.name)
                    .ok_or_else(|| Error::Source(format!("no collation known for {}", key.name)))?;
                let safe = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !safe(charset) || !safe(collation) {
                    return Err(Error::Source(format!(
                        "unexpected collation {charset}/{collation}"
                    )));
                }
                let v = format!("CAST(? AS CHAR CHARACTER SET {charset}) COLLATE {collation}");
                let row = sqlx::query(AssertSqlSafe(format!("SELECT STRCMP({v}, {v})")))
                    .bind(prev.value.clone())
                    .bind(cut.value.clone())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(source_error)?;
                let c: i64 = row.try_get(0).map_err(source_error)?;
                c.cmp(&0)
            }
            _ => prev.value.cmp(&cut.value),
        };
        match order {
            std::cmp::Ordering::Less => kept.push(cut),
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Greater => {
                return Err(Error::Source(format!(
                    "the shard cuts on {} are not in ascending order ({:?} before {:?}); refusing to plan overlapping ranges",
                    key.name, prev.value, cut.value
                )));
            }
        }
    }
    Ok(kept)
}

/// The window of an incremental load, its exact row count, and its cut into `shards` ranges
/// of about equal rows (every n-th value of the window column, read in order).
pub async fn plan_window(
    conn: &mut MySqlConnection,
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
            Error::Spec(SpecError::single(
                "timestamp_column",
                format!("{column:?} is not a column of {}", info.qualified()),
            ))
        })?;
    let kind = window_kind(column, &col.type_name)?;
    let value_of = |value: &str, field: &str| {
        normalize(kind, value).map_err(|why| {
            Error::Spec(SpecError::single(
                field,
                format!(
                    "{value:?} is not a value of {column:?} ({}): {why}",
                    col.type_name
                ),
            ))
        })
    };
    // The greatest candidate, compared in the column's type, bounds the window; the
    // watermark keeps the form it was reported in.
    let mut after: Option<(String, String)> = None;
    for value in &bounds.after {
        let normal = value_of(value, "last_sync_value")?;
        let greater = match &after {
            None => true,
            Some((_, best)) => compare(kind, &normal, best) == std::cmp::Ordering::Greater,
        };
        if greater {
            after = Some((value.clone(), normal));
        }
    }
    let start_after = match (&after, bounds.lookback) {
        (Some((_, normal)), Some(lookback)) => {
            if matches!(kind, ValueKind::Int { .. }) {
                return Err(Error::Spec(SpecError::single(
                    "lookback",
                    format!(
                        "needs a date, datetime or timestamp timestamp_column; {column:?} is {}",
                        col.type_name
                    ),
                )));
            }
            let at = parse_instant(normal, true).map_err(Error::Message)?;
            let earlier =
                at - chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
            Some(normalize(kind, &format_datetime(earlier)).or_else(|_| {
                // A date column: the day the instant falls on.
                Ok::<_, Error>(earlier.date().format("%Y-%m-%d").to_string())
            })?)
        }
        (after, _) => after.as_ref().map(|(_, n)| n.clone()),
    };
    let from = bounds
        .from
        .as_deref()
        .map(|v| value_of(v, "historical_start_date"))
        .transpose()?;
    let c = quote_ident(column);
    let table = info.qualified();
    let (lower_sql, lower): (String, Vec<Bound>) = match (&start_after, &from) {
        (Some(v), _) => (format!("{c} > ?"), vec![bound(kind, v)?]),
        (None, Some(v)) => (format!("{c} >= ?"), vec![bound(kind, v)?]),
        (None, None) => (format!("{c} IS NOT NULL"), Vec::new()),
    };
    let through = match bounds.through {
        Some(fixed) => Some(value_of(&fixed, "last_sync_value")?),
        None => {
            let row = bind_all(
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT CAST(MAX({c}) AS CHAR) FROM {table} WHERE {lower_sql}"
                ))),
                &lower,
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(source_error)?;
            text(&row, 0)?
                .map(|v| normalize(kind, &v).map_err(Error::Message))
                .transpose()?
        }
    };
    let resumes_after = after.map(|(told, _)| told);
    let Some(through) = through else {
        return Ok(PlannedWindow {
            window: None,
            after: resumes_after,
            rows: 0,
            // MySQL's dates and decimals have no infinities.
            beyond: 0,
            shards: Vec::new(),
        });
    };
    let window_sql = format!("{lower_sql} AND {c} <= ?");
    let mut binds = lower.clone();
    binds.push(bound(kind, &through)?);
    let row = bind_all(
        sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {table} WHERE {window_sql}"
        ))),
        &binds,
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(source_error)?;
    let rows = count_at(&row, 0)?;
    let wanted = shards(rows);
    let window = Window {
        column: column.to_string(),
        column_type: col.type_name.clone(),
        after: start_after,
        from,
        through,
    };
    let planned = |shards| PlannedWindow {
        window: Some(window.clone()),
        after: resumes_after.clone(),
        rows,
        beyond: 0,
        shards,
    };
    if wanted <= 1 {
        return Ok(planned(vec![(ShardBounds::Whole, rows)]));
    }
    let stride = (rows / (wanted as u64 * 1_000)).max(1);
    let (points, _) = every_nth(
        conn,
        format!("SELECT CAST({c} AS CHAR) FROM {table} WHERE {window_sql} ORDER BY {c}"),
        &binds,
        stride,
    )
    .await?;
    let mut cuts = plan::equal_rank_cuts(&points, wanted);
    for cut in &mut cuts {
        cut.value = normalize(kind, &cut.value).map_err(Error::Message)?;
    }
    cuts.dedup_by(|a, b| a.value == b.value);
    let key = SourceColumn {
        nullable: false,
        ..col.clone()
    };
    Ok(planned(plan::key_ranges(&key, &cuts, rows)))
}

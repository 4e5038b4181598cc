//! A shard's rows: one statement over its key range (or window), read in its own consistent
//! snapshot through the binary protocol into Arrow batches.

use super::*;

/// The SELECT of one shard and its bound values.
pub fn select_statement(task: &ShardTask) -> Result<(String, Vec<Bound>)> {
    let columns: Vec<String> = task.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let mut sql = format!(
        "SELECT {} FROM {}.{}",
        columns.join(", "),
        quote_ident(&task.schema_name),
        quote_ident(&task.table_name)
    );
    let mut conditions: Vec<String> = Vec::new();
    let mut binds: Vec<Bound> = Vec::new();
    match &task.bounds {
        ShardBounds::Whole => {}
        ShardBounds::KeyRange {
            column,
            key_type,
            lower,
            upper,
            include_nulls,
        } => {
            let kind = key_kind(key_type).ok_or_else(|| {
                Error::Message(format!(
                    "shard key type \"{key_type}\" is not one shardflow cuts on"
                ))
            })?;
            let k = quote_ident(column);
            let mut range = Vec::new();
            if let Some(v) = lower {
                range.push(format!("{k} >= ?"));
                binds.push(bound(kind, v)?);
            }
            if let Some(v) = upper {
                range.push(format!("{k} < ?"));
                binds.push(bound(kind, v)?);
            }
            if !range.is_empty() {
                let range = range.join(" AND ");
                conditions.push(if *include_nulls {
                    format!("({range}) OR {k} IS NULL")
                } else {
                    range
                });
            }
        }
        ShardBounds::CtidRange { .. } => {
            return Err(Error::Message(
                "a ctid range is a PostgreSQL shard; this job reads MySQL".into(),
            ));
        }
        ShardBounds::Files { .. } => {
            return Err(Error::Message(
                "a file shard names files; this job reads MySQL".into(),
            ));
        }
    }
    if let Some(w) = &task.window {
        let kind = window_kind(&w.column, &w.column_type)?;
        let c = quote_ident(&w.column);
        if let Some(after) = &w.after {
            conditions.push(format!("{c} > ?"));
            binds.push(bound(kind, after)?);
        } else if let Some(from) = &w.from {
            conditions.push(format!("{c} >= ?"));
            binds.push(bound(kind, from)?);
        }
        conditions.push(format!("{c} <= ?"));
        binds.push(bound(kind, &w.through)?);
    }
    if !conditions.is_empty() {
        let all: Vec<String> = conditions.iter().map(|c| format!("({c})")).collect();
        sql.push_str(" WHERE ");
        sql.push_str(&all.join(" AND "));
    }
    Ok((sql, binds))
}

/// Reads one shard as Arrow batches, in its own consistent snapshot. The rows are decoded in
/// their own task and handed over a channel of `in_flight` batches, so decoding overlaps
/// Parquet encoding and memory stays at `in_flight` batches whatever the shard's size.
pub async fn extract(
    connector: &MySqlConnector,
    task: &ShardTask,
    in_flight: usize,
) -> Result<BatchStream> {
    let (sql, binds) = select_statement(task)?;
    let mut conn = connector.connect().await?;
    // A slow Parquet writer must not make the server give up on a stalled send.
    for statement in [
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET SESSION net_write_timeout = 3600",
        "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
    ] {
        sqlx::raw_sql(statement)
            .execute(&mut conn)
            .await
            .map_err(source_error)?;
    }
    let mut decoder = RowDecoder::new(&task.columns, task.batch_rows);
    let width = task.columns.len();
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight.max(1));
    let shard = task.shard_id.clone();
    tokio::spawn(async move {
        let outcome: Result<()> = async {
            {
                let query = bind_all(sqlx::query(AssertSqlSafe(sql)), &binds);
                let mut rows = query.fetch(&mut conn);
                while let Some(row) = rows.next().await {
                    let row = row.map_err(source_error)?;
                    if row.len() != width {
                        return Err(Error::Message(format!(
                            "the source sent {} of the {width} columns asked for",
                            row.len()
                        )));
                    }
                    decoder.push_row((0..width).map(|i| raw(&row, i)))?;
                    if decoder.batch_full()
                        && let Some(batch) = decoder.take_batch()?
                        && tx.send(Ok(batch)).await.is_err()
                    {
                        return Ok(()); // the reader went away; dropping the connection ends it
                    }
                }
            }
            if let Some(batch) = decoder.take_batch()? {
                let _ = tx.send(Ok(batch)).await;
            }
            sqlx::raw_sql("COMMIT")
                .execute(&mut conn)
                .await
                .map_err(source_error)?;
            for (column, n) in decoder.zero_dates() {
                tracing::warn!(shard = %shard, column, zero_dates = n, "zero dates read as NULL");
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(receiver_stream(rx))
}

/// Column `i`'s bytes as the server sent them; `None` only for SQL NULL (a zero date comes
/// through, and the decoder tells it apart). `i` is below the row's width, checked per row.
pub(super) fn raw(row: &MySqlRow, i: usize) -> Option<&[u8]> {
    let value = row.try_get_raw(i).ok()?;
    <&[u8] as sqlx::Decode<'_, MySql>>::decode(value).ok()
}

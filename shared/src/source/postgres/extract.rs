//! A shard's rows: the run's exported snapshot, one binary `COPY` over the shard's range (or
//! window) decoded into Arrow batches.

use super::*;

/// A transaction holding an exported snapshot open; every shard of the run imports it.
/// Dropping the hold ends the transaction and releases the snapshot.
pub async fn export_snapshot(connector: &PgConnector) -> Result<SnapshotHold> {
    let client = connector.connect().await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let id: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    Ok(SnapshotHold::new(id, client))
}

/// The settings a shard's COPY reads its bound values from (`current_setting`): COPY takes no
/// parameters, and values must never be pasted into SQL.
pub type BoundSettings = Vec<(&'static str, String)>;

/// The COPY statement for a shard and the bound values it reads through `current_setting`.
pub fn copy_statement(task: &ShardTask) -> Result<(String, BoundSettings)> {
    let columns: Vec<String> = task.columns.iter().map(select_item).collect();
    let mut sql = format!(
        "COPY (SELECT {} FROM {}.{}",
        columns.join(", "),
        quote_ident(&task.schema_name),
        quote_ident(&task.table_name)
    );
    let mut conditions: Vec<String> = Vec::new();
    let mut settings: BoundSettings = Vec::new();
    let (lower, upper) = match &task.bounds {
        ShardBounds::Whole => (None, None),
        ShardBounds::KeyRange {
            column,
            key_type,
            lower,
            upper,
            include_nulls,
        } => {
            let key_type = cast_type(key_type).ok_or_else(|| {
                Error::Message(format!(
                    "shard key type \"{key_type}\" is not one shardflow cuts on"
                ))
            })?;
            let k = quote_ident(column);
            let mut conds = Vec::new();
            if lower.is_some() {
                conds.push(format!(
                    "{k} >= current_setting('shardflow.lower')::{key_type}"
                ));
            }
            if upper.is_some() {
                conds.push(format!(
                    "{k} < current_setting('shardflow.upper')::{key_type}"
                ));
            }
            if !conds.is_empty() {
                let range = conds.join(" AND ");
                if *include_nulls {
                    conditions.push(format!("({range}) OR {k} IS NULL"));
                } else {
                    conditions.push(range);
                }
            }
            (lower.clone(), upper.clone())
        }
        ShardBounds::CtidRange {
            first_block,
            end_block,
        } => {
            conditions.push("ctid >= current_setting('shardflow.lower')::tid".into());
            if end_block.is_some() {
                conditions.push("ctid < current_setting('shardflow.upper')::tid".into());
            }
            (
                Some(format!("({first_block},0)")),
                end_block.map(|b| format!("({b},0)")),
            )
        }
        ShardBounds::Files { .. } => {
            return Err(Error::Message(
                "a file shard names files; this job reads PostgreSQL".into(),
            ));
        }
    };
    settings.extend(lower.map(|v| ("shardflow.lower", v)));
    settings.extend(upper.map(|v| ("shardflow.upper", v)));
    if let Some(w) = &task.window {
        let t = window_type(&w.column, &w.column_type)?;
        let c = quote_ident(&w.column);
        if let Some(after) = &w.after {
            conditions.push(format!("{c} > current_setting('shardflow.after')::{t}"));
            settings.push(("shardflow.after", after.clone()));
        } else if let Some(from) = &w.from {
            conditions.push(format!("{c} >= current_setting('shardflow.from')::{t}"));
            settings.push(("shardflow.from", from.clone()));
        }
        conditions.push(format!("{c} <= current_setting('shardflow.through')::{t}"));
        settings.push(("shardflow.through", w.through.clone()));
    }
    if !conditions.is_empty() {
        let all: Vec<String> = conditions.iter().map(|c| format!("({c})")).collect();
        sql.push_str(" WHERE ");
        sql.push_str(&all.join(" AND "));
    }
    sql.push_str(") TO STDOUT (FORMAT binary)");
    Ok((sql, settings))
}

pub(super) fn valid_snapshot_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Reads one shard as Arrow batches. The COPY runs in its own task and hands batches over a
/// channel of `in_flight` slots, so decoding overlaps Parquet encoding and memory stays at
/// `in_flight` batches whatever the shard's size.
pub async fn extract(
    connector: &PgConnector,
    task: &ShardTask,
    in_flight: usize,
) -> Result<BatchStream> {
    let (sql, settings) = copy_statement(task)?;
    let client = connector.connect().await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    if let Some(snapshot) = &task.snapshot {
        if !valid_snapshot_id(snapshot) {
            return Err(Error::Message(format!(
                "snapshot id {snapshot:?} is malformed"
            )));
        }
        client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
            .await
            .map_err(|e| {
                Error::Database(format!(
                    "cannot import the run's snapshot {snapshot} (the dispatcher that exported it may have stopped): {}",
                    pg_text(&e)
                ))
            })?;
    }
    // Every bound value in one round trip, with the settings that fix the text form of the
    // types read as text, whatever the server's or the role's defaults.
    let (names, values): (Vec<&str>, Vec<&str>) = settings
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain(TEXT_FORM_SETTINGS.iter().copied())
        .unzip();
    client
        .query(
            "SELECT set_config(name, value, true) FROM unnest($1::text[], $2::text[]) AS s(name, value)",
            &[&names, &values],
        )
        .await?;
    let mut decoder = CopyDecoder::new(&task.columns, task.batch_rows)?;
    let copy = client.copy_out(sql.as_str()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight.max(1));
    tokio::spawn(async move {
        let outcome: Result<()> = async {
            let mut copy = std::pin::pin!(copy);
            while let Some(chunk) = copy.next().await {
                decoder.push(&chunk?)?;
                if decoder.batch_full()
                    && let Some(batch) = decoder.take_batch()?
                    && tx.send(Ok(batch)).await.is_err()
                {
                    return Ok(()); // the reader went away; dropping the client cancels COPY
                }
            }
            decoder.finish()?;
            if let Some(batch) = decoder.take_batch()? {
                let _ = tx.send(Ok(batch)).await;
            }
            client.batch_execute("COMMIT").await?;
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(receiver_stream(rx))
}

//! Which BigQuery jobs carry a run's parts into its table, and the SQL of the one statement a
//! staged run ends with. Pure functions; the warehouse runs what they decide.

use crate::warehouse::WriteMode;

/// How the parts reach the table (the module docs of `bigquery` say why each exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// One load job into the table.
    Direct,
    /// Load jobs into a staging table, then one copy job that appends it.
    StagedCopy,
    /// Load jobs into a staging table, then one query job (MERGE, INSERT, or DELETE and INSERT
    /// in one transaction).
    StagedSql,
}

/// The route of a load of `parts` parts in `mode`, `json_columns` saying whether a column
/// must be converted by SQL on the way (a Parquet part cannot fill a JSON column).
pub fn route(mode: WriteMode, parts: usize, max_uris_per_job: usize, json_columns: bool) -> Route {
    match mode {
        WriteMode::Merge => Route::StagedSql,
        _ if json_columns => Route::StagedSql,
        _ if parts <= max_uris_per_job => Route::Direct,
        WriteMode::Append => Route::StagedCopy,
        // A copy's WRITE_TRUNCATE takes the staging table's schema; only SQL keeps the table's.
        WriteMode::Replace => Route::StagedSql,
    }
}

/// A column of the final statement: its name and whether its staged text is JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlColumn {
    pub name: String,
    pub json: bool,
}

/// A name as a GoogleSQL quoted identifier.
pub fn quoted(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// A staged column as the table holds it: JSON text parsed (`PARSE_JSON` refuses a number it
/// cannot hold exactly, in its default `exact` mode, rather than round it).
fn converted(column: &SqlColumn) -> String {
    if column.json {
        format!("PARSE_JSON({0}) AS {0}", quoted(&column.name))
    } else {
        quoted(&column.name)
    }
}

fn names(columns: &[SqlColumn]) -> String {
    columns
        .iter()
        .map(|c| quoted(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn converted_list(columns: &[SqlColumn]) -> String {
    columns.iter().map(converted).collect::<Vec<_>>().join(", ")
}

/// Appends the staged rows: `INSERT … SELECT`.
pub fn append_sql(target: &str, staged: &str, columns: &[SqlColumn]) -> String {
    format!(
        "INSERT INTO `{target}` ({}) SELECT {} FROM `{staged}`",
        names(columns),
        converted_list(columns)
    )
}

/// Replaces the table's rows with the staged ones in one transaction: readers see the old rows
/// or the new, and a failure rolls back ("A multi-statement transaction that fails triggers a
/// rollback operation, undoing all pending changes").
pub fn replace_sql(target: &str, staged: &str, columns: &[SqlColumn]) -> String {
    format!(
        "BEGIN TRANSACTION; DELETE FROM `{target}` WHERE TRUE; {}; COMMIT TRANSACTION;",
        append_sql(target, staged, columns)
    )
}

/// The one statement of a merge: of the staged rows sharing a key, the one with the greatest
/// `latest_by` (any one without it) replaces the table's rows of that key, or is inserted.
/// Keys match with `IS NOT DISTINCT FROM`, so a NULL key part is a value like any other.
pub fn merge_sql(
    target: &str,
    staged: &str,
    columns: &[SqlColumn],
    keys: &[String],
    latest_by: Option<&str>,
) -> String {
    let partition = keys
        .iter()
        .map(|k| quoted(k))
        .collect::<Vec<_>>()
        .join(", ");
    let order = latest_by.map_or("1".to_string(), |c| format!("{} DESC", quoted(c)));
    let on = keys
        .iter()
        .map(|k| format!("T.{0} IS NOT DISTINCT FROM S.{0}", quoted(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !keys.contains(&c.name))
        .map(|c| format!("{0} = S.{0}", quoted(&c.name)))
        .collect();
    let matched = if updates.is_empty() {
        String::new()
    } else {
        format!(" WHEN MATCHED THEN UPDATE SET {}", updates.join(", "))
    };
    let values = columns
        .iter()
        .map(|c| format!("S.{}", quoted(&c.name)))
        .collect::<Vec<_>>();
    format!(
        "MERGE `{target}` AS T USING (SELECT {} FROM `{staged}` WHERE TRUE QUALIFY ROW_NUMBER() \
         OVER (PARTITION BY {partition} ORDER BY {order}) = 1) AS S ON {on}{matched} \
         WHEN NOT MATCHED THEN INSERT ({}) VALUES ({})",
        converted_list(columns),
        names(columns),
        values.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use Route::*;
        use WriteMode::*;
        let cases = [
            (Replace, 3, false, Direct),
            (Append, 3, false, Direct),
            (Replace, 10_000, false, Direct),
            (Append, 10_001, false, StagedCopy),
            (Replace, 10_001, false, StagedSql),
            (Replace, 3, true, StagedSql),
            (Append, 3, true, StagedSql),
            (Append, 10_001, true, StagedSql),
            (Merge, 1, false, StagedSql),
            (Merge, 1, true, StagedSql),
        ];
        for (mode, parts, json, want) in cases {
            assert_eq!(
                route(mode, parts, 10_000, json),
                want,
                "{mode:?} {parts} {json}"
            );
        }
    }

    fn cols() -> Vec<SqlColumn> {
        vec![
            SqlColumn {
                name: "id".into(),
                json: false,
            },
            SqlColumn {
                name: "doc".into(),
                json: true,
            },
            SqlColumn {
                name: "we`ird".into(),
                json: false,
            },
        ]
    }

    #[test]
    fn append_and_replace_statements() {
        assert_eq!(
            append_sql("p.d.t", "p.d.s", &cols()),
            "INSERT INTO `p.d.t` (`id`, `doc`, `we\\`ird`) SELECT `id`, PARSE_JSON(`doc`) AS `doc`, \
             `we\\`ird` FROM `p.d.s`"
        );
        assert_eq!(
            replace_sql("p.d.t", "p.d.s", &cols()),
            "BEGIN TRANSACTION; DELETE FROM `p.d.t` WHERE TRUE; INSERT INTO `p.d.t` (`id`, `doc`, \
             `we\\`ird`) SELECT `id`, PARSE_JSON(`doc`) AS `doc`, `we\\`ird` FROM `p.d.s`; COMMIT \
             TRANSACTION;"
        );
    }

    #[test]
    fn merge_statement() {
        let sql = merge_sql("p.d.t", "p.d.s", &cols(), &["id".into()], Some("we`ird"));
        assert_eq!(
            sql,
            "MERGE `p.d.t` AS T USING (SELECT `id`, PARSE_JSON(`doc`) AS `doc`, `we\\`ird` FROM \
             `p.d.s` WHERE TRUE QUALIFY ROW_NUMBER() OVER (PARTITION BY `id` ORDER BY `we\\`ird` \
             DESC) = 1) AS S ON T.`id` IS NOT DISTINCT FROM S.`id` WHEN MATCHED THEN UPDATE SET \
             `doc` = S.`doc`, `we\\`ird` = S.`we\\`ird` WHEN NOT MATCHED THEN INSERT (`id`, `doc`, \
             `we\\`ird`) VALUES (S.`id`, S.`doc`, S.`we\\`ird`)"
        );
        // Only keys: nothing to update.
        let keys_only = merge_sql("t", "s", &cols()[..1], &["id".into()], None);
        assert!(!keys_only.contains("WHEN MATCHED"), "{keys_only}");
        assert!(keys_only.contains("ORDER BY 1"), "{keys_only}");
    }
}

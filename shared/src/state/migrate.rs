//! Versioned schema migrations of the SQL state store, for SQLite and PostgreSQL.
//!
//! Each open applies, in one transaction, the migrations the store has not recorded in
//! `shardflow_schema_migrations` (version, description, checksum, time), and refuses a store
//! whose recorded migrations this build does not know or knows differently. Not sqlx's
//! migrator: stores made before versioning (unversioned, of several shapes) must upgrade in
//! place, and sqlx can neither adopt them nor add a SQLite column only when it is missing.
//! So versions 1 to 4, which replay what the unversioned stores went through, are idempotent
//! (`IF NOT EXISTS`, `AddColumn`); later ones need not be.

use sqlx::{AnyPool, Row as _};
use twox_hash::XxHash64;

use super::sql::Backend;
use crate::{Error, Result};

/// One step of a migration, in each backend's dialect.
enum Step {
    Sql {
        sqlite: &'static str,
        postgres: &'static str,
    },
    /// `ALTER TABLE … ADD COLUMN` unless the column is there: PostgreSQL says `IF NOT EXISTS`;
    /// SQLite has no such clause, so its catalog (`pragma_table_info`) is asked first.
    AddColumn {
        table: &'static str,
        column: &'static str,
        decl: &'static str,
    },
}

struct Migration {
    version: i64,
    description: &'static str,
    steps: &'static [Step],
}

macro_rules! sql {
    ($name:literal) => {
        Step::Sql {
            sqlite: include_str!(concat!("migrations/", $name, ".sqlite.sql")),
            postgres: include_str!(concat!("migrations/", $name, ".postgres.sql")),
        }
    };
}

const fn add_column(table: &'static str, column: &'static str, decl: &'static str) -> Step {
    Step::AddColumn {
        table,
        column,
        decl,
    }
}

/// Every migration, in order. Append only: a released one is never edited or removed.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "first release: runs and shards",
        steps: &[sql!("0001_first_release")],
    },
    Migration {
        version: 2,
        description: "content checksums, staged schemas and watermarks",
        steps: &[
            add_column("shardflow_runs", "checksum", "TEXT"),
            add_column("shardflow_runs", "watermark", "TEXT"),
            add_column("shardflow_shards", "checksum", "TEXT"),
            add_column("shardflow_shards", "schema_json", "TEXT"),
            add_column("shardflow_shards", "max_value", "TEXT"),
        ],
    },
    Migration {
        version: 3,
        description: "incremental streams: one running run per stream",
        steps: &[
            add_column("shardflow_runs", "stream_key", "TEXT"),
            sql!("0003_incremental_streams"),
        ],
    },
    Migration {
        version: 4,
        description: "file streams: processed files and rows read per file",
        steps: &[
            add_column("shardflow_shards", "source_rows_json", "TEXT"),
            sql!("0004_processed_files"),
        ],
    },
    Migration {
        version: 5,
        description: "final run statuses for Django, sent until accepted",
        steps: &[sql!("0005_django_reports")],
    },
];

/// The schema version this build writes.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

const LEDGER: &str = "CREATE TABLE IF NOT EXISTS shardflow_schema_migrations (
    version     BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    checksum    TEXT NOT NULL,
    applied_at  TEXT NOT NULL
)";

/// Replicas that open a PostgreSQL store together queue on this lock instead of racing.
const POSTGRES_LOCK: i64 = 7283517;

fn step_text(step: &Step, backend: Backend) -> String {
    match (step, backend) {
        (Step::Sql { sqlite, .. }, Backend::Sqlite) => (*sqlite).to_string(),
        (Step::Sql { postgres, .. }, Backend::Postgres) => (*postgres).to_string(),
        (
            Step::AddColumn {
                table,
                column,
                decl,
            },
            _,
        ) => format!("add column {table}.{column} {decl}"),
    }
}

/// What a migration does in a backend, hashed: an applied migration edited since is caught.
fn checksum(migration: &Migration, backend: Backend) -> String {
    let mut text = migration.description.to_string();
    for step in migration.steps {
        text.push('\n');
        text.push_str(&step_text(step, backend));
    }
    format!("{:016x}", XxHash64::oneshot(0, text.as_bytes()))
}

/// A migration the store records: version and checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: i64,
    pub checksum: String,
}

/// The versions still to apply, given what the store records and what this build knows, or
/// why the store cannot be used by this build. Pure, so every case has a unit test.
pub fn pending(applied: &[Applied], known: &[Applied]) -> std::result::Result<Vec<i64>, String> {
    let newest_known = known.last().map_or(0, |k| k.version);
    for a in applied {
        match known.iter().find(|k| k.version == a.version) {
            None if a.version > newest_known => {
                return Err(format!(
                    "the state store's schema is at version {}, newer than this shardflow \
                     knows (version {newest_known}): run a shardflow at least as new as the one \
                     that upgraded it",
                    applied.iter().map(|a| a.version).max().unwrap_or(a.version)
                ));
            }
            None => {
                return Err(format!(
                    "the state store records schema migration {}, which this shardflow never \
                     had",
                    a.version
                ));
            }
            Some(k) if k.checksum != a.checksum => {
                return Err(format!(
                    "schema migration {} was applied to the state store as {} but this \
                     shardflow has it as {}: a released migration was edited",
                    a.version, a.checksum, k.checksum
                ));
            }
            Some(_) => {}
        }
    }
    Ok(known
        .iter()
        .filter(|k| !applied.iter().any(|a| a.version == k.version))
        .map(|k| k.version)
        .collect())
}

fn known(backend: Backend) -> Vec<Applied> {
    MIGRATIONS
        .iter()
        .map(|m| Applied {
            version: m.version,
            checksum: checksum(m, backend),
        })
        .collect()
}

fn state_error(what: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
    move |e| Error::State(format!("state store schema: {what}: {e}"))
}

/// Brings the store's schema to `latest_version()`; returns the versions it applied.
pub(crate) async fn migrate(pool: &AnyPool, backend: Backend) -> Result<Vec<i64>> {
    if backend == Backend::Sqlite {
        // Not allowed inside a transaction; idempotent.
        sqlx::raw_sql("PRAGMA journal_mode = WAL")
            .execute(pool)
            .await
            .map_err(state_error("journal mode"))?;
    }
    let mut tx = match backend {
        // IMMEDIATE takes the write lock now: two openers read the ledger one after the other.
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => pool.begin().await,
    }
    .map_err(state_error("begin"))?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(POSTGRES_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(state_error("lock"))?;
    }
    sqlx::raw_sql(LEDGER)
        .execute(&mut *tx)
        .await
        .map_err(state_error("ledger"))?;
    let applied = sqlx::query("SELECT version, checksum FROM shardflow_schema_migrations")
        .fetch_all(&mut *tx)
        .await
        .map_err(state_error("reading the ledger"))?
        .iter()
        .map(|row| {
            Ok(Applied {
                version: row.try_get("version")?,
                checksum: row.try_get("checksum")?,
            })
        })
        .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        .map_err(state_error("reading the ledger"))?;
    let todo = pending(&applied, &known(backend)).map_err(Error::State)?;
    for version in &todo {
        let Some(migration) = MIGRATIONS.iter().find(|m| m.version == *version) else {
            continue;
        };
        let what = format!("migration {version} ({})", migration.description);
        for step in migration.steps {
            apply(&mut tx, backend, step).await.map_err(|e| {
                Error::State(format!(
                    "state store schema: {what}: {e}; nothing was changed"
                ))
            })?;
        }
        sqlx::query(
            "INSERT INTO shardflow_schema_migrations (version, description, checksum, applied_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(migration.version)
        .bind(migration.description)
        .bind(checksum(migration, backend))
        .bind(
            chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string(),
        )
        .execute(&mut *tx)
        .await
        .map_err(state_error("recording a migration"))?;
        tracing::info!(
            version,
            description = migration.description,
            "state store schema migrated"
        );
    }
    tx.commit().await.map_err(state_error("commit"))?;
    Ok(todo)
}

async fn apply(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    step: &Step,
) -> std::result::Result<(), sqlx::Error> {
    match (step, backend) {
        (Step::Sql { sqlite, .. }, Backend::Sqlite) => {
            sqlx::raw_sql(*sqlite).execute(&mut **tx).await?;
        }
        (Step::Sql { postgres, .. }, Backend::Postgres) => {
            sqlx::raw_sql(*postgres).execute(&mut **tx).await?;
        }
        (
            Step::AddColumn {
                table,
                column,
                decl,
            },
            Backend::Postgres,
        ) => {
            // Names and types are this file's constants, never input.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {decl}"
            )))
            .execute(&mut **tx)
            .await?;
        }
        (
            Step::AddColumn {
                table,
                column,
                decl,
            },
            Backend::Sqlite,
        ) => {
            let present: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info($1) WHERE name = $2")
                    .bind(*table)
                    .bind(*column)
                    .fetch_one(&mut **tx)
                    .await?;
            if present == 0 {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {decl}"
                )))
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(version: i64, checksum: &str) -> Applied {
        Applied {
            version,
            checksum: checksum.into(),
        }
    }

    #[test]
    fn a_store_gets_the_migrations_it_lacks_and_refuses_what_it_cannot_trust() {
        let known = [at(1, "a"), at(2, "b"), at(3, "c")];
        assert_eq!(pending(&[], &known), Ok(vec![1, 2, 3]));
        assert_eq!(pending(&[at(1, "a")], &known), Ok(vec![2, 3]));
        assert_eq!(pending(&known, &known), Ok(vec![]));
        let newer = pending(&[at(1, "a"), at(2, "b"), at(3, "c"), at(4, "d")], &known).unwrap_err();
        assert!(
            newer.contains("at version 4, newer than this shardflow knows (version 3)"),
            "{newer}"
        );
        let edited = pending(&[at(1, "a"), at(2, "x")], &known).unwrap_err();
        assert!(
            edited.contains(
                "migration 2 was applied to the state store as x but this shardflow has it as b"
            ),
            "{edited}"
        );
        let unknown = pending(&[at(1, "a")], &[at(2, "b")]).unwrap_err();
        assert!(
            unknown.contains("migration 1, which this shardflow never had"),
            "{unknown}"
        );
    }

    #[test]
    fn versions_rise_by_one_and_checksums_differ_by_backend_only_where_the_sql_does() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.description);
        }
        // Version 2 is add-column steps only: the same in both dialects.
        assert_eq!(
            checksum(&MIGRATIONS[1], Backend::Sqlite),
            checksum(&MIGRATIONS[1], Backend::Postgres)
        );
        assert_ne!(
            checksum(&MIGRATIONS[0], Backend::Sqlite),
            checksum(&MIGRATIONS[0], Backend::Postgres)
        );
    }
}

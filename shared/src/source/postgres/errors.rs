//! What a PostgreSQL error means for the job: the source refusing it (the same answer on
//! every try) or the database failing (worth trying again). Decided here, at the connector,
//! so no other backend's errors pass through this rule.

use crate::Error;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // The Display of a DbError omits the detail; include it when there is one.
        match e.as_db_error() {
            Some(db) => {
                let mut text = format!("{}: {}", db.severity(), db.message());
                if let Some(detail) = db.detail() {
                    text.push_str(&format!(" ({detail})"));
                }
                if refuses_the_job(db.code().code()) {
                    Error::Source(format!("the source database refused the job: {text}"))
                } else {
                    Error::Database(text)
                }
            }
            None => Error::Database(e.to_string()),
        }
    }
}

/// SQLSTATEs that say the job or the data is wrong, so trying again gives the same answer
/// (PostgreSQL's Appendix A): invalid authorization (class 28), a missing database (3D000),
/// syntax errors and access rules (class 42: a missing table or column, a missing
/// privilege), data exceptions (class 22: a value a cast refuses), an unsupported feature
/// (0A000) and an object not in the state the query needs (55000: "materialized view … has
/// not been populated"). Lock timeouts (55P03), serialization failures (40001), shutdowns
/// (57P01) and resource limits (class 53) are retried.
pub(super) fn refuses_the_job(sqlstate: &str) -> bool {
    sqlstate.starts_with("28")
        || sqlstate.starts_with("42")
        || sqlstate.starts_with("22")
        || matches!(sqlstate, "3D000" | "0A000" | "55000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_credentials_and_databases_are_not_transient() {
        // Credentials, a missing database, table (42P01) or column (42703), a privilege, an
        // invalid timestamp (22007), an unpopulated materialized view.
        for code in [
            "28000", "28P01", "3D000", "42501", "42P01", "42703", "22007", "0A000", "55000",
        ] {
            assert!(refuses_the_job(code), "{code}");
        }
        // A server shutting down, too many connections, a serialization failure, a deadlock,
        // a lock timeout, a lost connection, a cancelled statement: retried.
        for code in [
            "57P01", "53300", "40001", "40P01", "55P03", "08006", "57014",
        ] {
            assert!(!refuses_the_job(code), "{code}");
        }
    }
}

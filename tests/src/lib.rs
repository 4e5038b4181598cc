//! End-to-end tests of shardflow live in `tests/tests/`; they talk to the real PostgreSQL on
//! 127.0.0.1:5432, MariaDB, and the emulators `tests/emulators.sh` starts (see `tests/run.sh`).
//! This library holds what the suite runs beside them: the strict BigQuery rules layer.

pub mod bq_rules;

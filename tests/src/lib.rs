//! End-to-end tests of shardflow live in `tests/tests/`; they talk to the real PostgreSQL on
//! 127.0.0.1:5432 (see `tests/run.sh`, which starts what they need).

# The benchmark table bench.wide (12 columns: bigint, integer, numeric, text, char, boolean,
# timestamp, timestamptz, date, double precision, jsonb, NULLs), created once with ROWS rows and
# reused. Sourced by the benchmarks; needs the array psql_cmd.
ensure_wide_table() {
  local rows=$1 have
  have=$("${psql_cmd[@]}" -tAc "SELECT count(*) FROM pg_class WHERE oid = to_regclass('bench.wide')")
  if [ "$have" = "1" ]; then
    have=$("${psql_cmd[@]}" -tAc "SELECT reltuples::bigint FROM pg_class WHERE oid = 'bench.wide'::regclass")
  fi
  [ "$have" = "$rows" ] && return 0
  echo "creating bench.wide with $rows rows (12 columns) ..."
  "${psql_cmd[@]}" <<SQL
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.wide (
  id bigint PRIMARY KEY, customer integer, quantity bigint, amount numeric(12,2), name text,
  code char(8), active boolean, created timestamp, updated timestamptz, day date,
  score double precision, attrs jsonb);
INSERT INTO bench.wide
SELECT i, NULLIF(i % 100000, 3), i * 7, round((i % 1000000) / 100.0, 2),
       CASE WHEN i % 10 = 0 THEN NULL ELSE 'customer name ' || i END,
       lpad((i % 99999999)::text, 8, '0'), CASE WHEN i % 9 = 0 THEN NULL ELSE i % 2 = 0 END,
       timestamp '2015-01-01' + i * interval '13 seconds',
       CASE WHEN i % 8 = 0 THEN NULL ELSE timestamptz '2015-01-01 00:00:00+00' + i * interval '11 seconds' END,
       date '2000-01-01' + i % 9000, i / 3.0,
       CASE WHEN i % 6 = 0 THEN NULL ELSE jsonb_build_object('k', i % 100, 'tag', 'x' || i % 7) END
FROM generate_series(1, $rows) AS i;
VACUUM ANALYZE bench.wide;
SQL
}

-- The sample the README's first command loads: 2,000,000 orders with skewed keys and NULLs.
-- Idempotent: recreates the table each time. Another size: psql -v rows=20000 … (the shape
-- stays: the last tenth of the keys jumps past 10^9).
\if :{?rows}
\else
\set rows 2000000
\endif
DROP TABLE IF EXISTS public.shardflow_sample_orders;
CREATE TABLE public.shardflow_sample_orders (
    order_id     bigint PRIMARY KEY,
    customer_id  integer,
    quantity     smallint,
    amount       numeric(12, 2),
    discount     real,
    weight_kg    double precision,
    is_gift      boolean,
    status       varchar(16),
    country      char(2),
    note         text,
    order_date   date,
    created_at   timestamp,
    paid_at      timestamptz,
    tracking     uuid,
    attributes   jsonb,
    raw_payload  json,
    signature    bytea
);
INSERT INTO public.shardflow_sample_orders
SELECT CASE WHEN i <= :rows * 9 / 10 THEN i ELSE 1000000000 + i::bigint * 997 END,
       NULLIF(i % 50000, 7),
       (i % 20)::smallint,
       round((i % 100000) / 7.0, 2),
       CASE WHEN i % 11 = 0 THEN NULL ELSE (i % 30) / 100.0 END,
       i / 3.0,
       CASE WHEN i % 13 = 0 THEN NULL ELSE i % 2 = 0 END,
       (ARRAY['new', 'paid', 'shipped', 'returned'])[1 + i % 4],
       CASE WHEN i % 17 = 0 THEN NULL ELSE (ARRAY['PL', 'DE', 'US', 'FR'])[1 + i % 4] END,
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'order note ' || i END,
       date '2020-01-01' + (i % 1500),
       timestamp '2020-01-01' + i * interval '17 seconds',
       CASE WHEN i % 9 = 0 THEN NULL ELSE timestamptz '2020-01-01 00:00:00+00' + i * interval '19 seconds' END,
       md5(i::text)::uuid,
       CASE WHEN i % 7 = 0 THEN NULL ELSE jsonb_build_object('i', i, 'tags', jsonb_build_array('a', i % 3)) END,
       CASE WHEN i % 8 = 0 THEN NULL ELSE json_build_object('src', 'web', 'n', i) END,
       CASE WHEN i % 6 = 0 THEN NULL ELSE decode(md5(i::text), 'hex') END
FROM generate_series(1, :rows) AS i;
ANALYZE public.shardflow_sample_orders;

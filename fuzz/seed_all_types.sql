COPY (
  SELECT true, 1::int2, 2::int4, 3::int8, 1.5::float4, 2.5::float8, 12.34::numeric(12,2),
         1234567890.0123456789::numeric(50,10), 3.14159::numeric, 'text ü😀'::text, 'varchar'::varchar(10),
         '{"a":1}'::json, '{"b":[1,2,null]}'::jsonb, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '\x0102ff'::bytea,
         '2024-02-29'::date, '2024-02-29 12:34:56.789'::timestamp, '2024-02-29 12:34:56.789+02'::timestamptz,
         '12:34:56.5'::time, 12.34::money, '1 day 2 hours'::interval, '{1,2,3}'::int4[]
  UNION ALL
  SELECT NULL, NULL, NULL, NULL, 'NaN', '-Infinity', NULL, NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL,
         'infinity', '-infinity', 'infinity', NULL, NULL, NULL, NULL
) TO STDOUT (FORMAT binary)

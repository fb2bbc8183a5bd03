\timing off
DROP TABLE IF EXISTS gen;
CREATE UNLOGGED TABLE gen AS
SELECT (i / 10000) AS b,
       gen_random_uuid() AS message_id,
       (1 + (random()*19)::int)::text AS room_id,
       1 + (random()*99999)::int AS user_id,
       'user' || i AS username,
       repeat('x', 40 + (random()*40)::int) AS message,
       (CASE WHEN random() < 0.9 THEN 0 WHEN random() < 0.5 THEN 1 ELSE 2 END)::int2 AS message_type,
       '2026-12-07 00:00:00+00'::timestamptz + (i * interval '10 microseconds') AS client_ts,
       '2026-12-07 00:00:00+00'::timestamptz + (i * interval '10 microseconds') AS server_ts,
       'n1'::text AS node_id
FROM generate_series(0, 399999) i;
CREATE INDEX ON gen (b);
ANALYZE gen;

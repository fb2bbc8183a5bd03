\pset pager off
\set last `psql postgres://postgres@127.0.0.1:5432/cfbench_10m -XAtqc "SELECT max(minute) FROM type_minute"`
\echo '=== E6: prototype: one bitmap of active users per minute (bit(100000), bit i = user i+1)'
\timing on
CREATE TABLE exp_minute_users AS
SELECT m.minute,
       (SELECT string_agg(CASE WHEN a.user_id IS NULL THEN '0' ELSE '1' END, '' ORDER BY g)
          FROM generate_series(1, 100000) g
          LEFT JOIN (SELECT DISTINCT user_id FROM messages
                      WHERE server_ts >= m.minute AND server_ts < m.minute + interval '1 minute') a
            ON a.user_id = g)::bit(100000) AS users
FROM generate_series(:'last'::timestamptz - interval '95 min', :'last'::timestamptz - interval '30 min', interval '1 minute') AS m(minute);
\timing off
ALTER TABLE exp_minute_users ADD PRIMARY KEY (minute);
VACUUM ANALYZE exp_minute_users;
SELECT count(*) AS minutes, pg_size_pretty(pg_total_relation_size('exp_minute_users')) AS size FROM exp_minute_users;
\echo '--- 60 whole minutes: bitmaps OR-ed, bits counted'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT bit_count(bit_or(users)) FROM exp_minute_users WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min');
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT bit_count(bit_or(users)) FROM exp_minute_users WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min');
\echo '--- 10 whole minutes'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT bit_count(bit_or(users)) FROM exp_minute_users WHERE minute >= (:'last'::timestamptz - interval '40 min') AND minute < (:'last'::timestamptz - interval '30 min');
\echo '--- the same 60 minutes from user_minute (as shipped: UNION semantics = distinct user ids)'
SELECT (SELECT bit_count(bit_or(users)) FROM exp_minute_users WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min')) AS from_bitmaps,
       (SELECT count(DISTINCT user_id) FROM user_minute WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min')) AS from_user_minute;
\echo '--- what a batch adds: OR one bitmap into its minute row (5000 users set)'
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) UPDATE exp_minute_users SET users = users | (SELECT users FROM exp_minute_users WHERE minute = :'last'::timestamptz - interval '60 min') WHERE minute = :'last'::timestamptz - interval '61 min';
ROLLBACK;
DROP TABLE exp_minute_users;

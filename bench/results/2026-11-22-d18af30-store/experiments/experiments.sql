SET statement_timeout = '10s'; SET plan_cache_mode = force_custom_plan;
SET statement_timeout = 0;  -- the experiments build indexes
\pset pager off
PREPARE active_users AS SELECT count(*) FROM (
    SELECT user_id FROM user_minute WHERE minute >= $3 AND minute < $4
    UNION
    SELECT user_id FROM messages WHERE server_ts >= $1 AND server_ts < $5
    UNION
    SELECT user_id FROM messages WHERE server_ts >= $6 AND server_ts < $2
) AS active;
PREPARE active_gated AS SELECT count(*) FROM (
    SELECT user_id FROM user_minute WHERE minute >= $3 AND minute < $4
    UNION
    SELECT user_id FROM messages WHERE $1::timestamptz < $5::timestamptz AND server_ts >= $1 AND server_ts < $5
    UNION
    SELECT user_id FROM messages WHERE $6::timestamptz < $2::timestamptz AND server_ts >= $6 AND server_ts < $2
) AS active;
\set last '2026-11-22 02:59:00+00'
\echo '=== E1: ACTIVE_USERS with an empty edge: a minute-aligned 10 min window (both edges empty)'
\echo '--- active_users'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'));
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'));
\echo '--- active_gated'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_gated((:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'));
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_gated((:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'));
\echo '=== E1b: ACTIVE_USERS, unaligned 1 min window (no whole minute: the right edge is empty)'
\echo '--- active_users'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'));
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'));
\echo '--- active_gated'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_gated((:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'));
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_gated((:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '29 min 17.123 s'), (:'last'::timestamptz - interval '29 min 17.123 s'));
\echo '=== E2: BRIN pages_per_range 128 (messages_ts_brin) against 16, ACTIVE_USERS 10 min unaligned (two edges)'
\timing on
CREATE INDEX IF NOT EXISTS exp_ts_brin16 ON messages USING brin (server_ts) WITH (pages_per_range = 16);
\timing off
SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class WHERE relname IN ('messages_ts_brin', 'exp_ts_brin16');
BEGIN;
DROP INDEX exp_ts_brin16;
\echo '--- pages_per_range 128 (the schema)'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '40 min 17.123 s'), (:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'));
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '40 min 17.123 s'), (:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'));
ROLLBACK;
BEGIN;
DROP INDEX messages_ts_brin;
\echo '--- pages_per_range 16'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '40 min 17.123 s'), (:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'));
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users((:'last'::timestamptz - interval '40 min 17.123 s'), (:'last'::timestamptz - interval '30 min 17.123 s'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '31 min'));
ROLLBACK;
DROP INDEX exp_ts_brin16;
\echo '=== E3: a user, rooms from messages instead of the user_rooms rollup (200 random users per pass; three passes per variant, the last two with the same users, warm)'
CREATE OR REPLACE FUNCTION pg_temp.time_user_rooms(n int, seed float8) RETURNS TABLE (source text, mean_ms float8, max_ms float8) AS $$
DECLARE t0 timestamptz; u int; ms float8; tot1 float8 := 0; tot2 float8 := 0; mx1 float8 := 0; mx2 float8 := 0; r record;
BEGIN
  PERFORM setseed(seed);
  FOR i IN 1..n LOOP
    u := 1 + floor(random() * 100000)::int;
    t0 := clock_timestamp();
    FOR r IN SELECT room_id, first_ts, last_ts, messages FROM user_rooms WHERE user_id = u ORDER BY last_ts DESC, room_id COLLATE "C" LOOP END LOOP;
    ms := extract(epoch FROM clock_timestamp() - t0) * 1000; tot1 := tot1 + ms; mx1 := greatest(mx1, ms);
    t0 := clock_timestamp();
    FOR r IN SELECT room_id, min(server_ts), max(server_ts), count(*) FROM messages WHERE user_id = u GROUP BY room_id ORDER BY max(server_ts) DESC, room_id COLLATE "C" LOOP END LOOP;
    ms := extract(epoch FROM clock_timestamp() - t0) * 1000; tot2 := tot2 + ms; mx2 := greatest(mx2, ms);
  END LOOP;
  RETURN QUERY VALUES ('user_rooms rollup (USER_ROOMS)', tot1 / n, mx1), ('GROUP BY over messages', tot2 / n, mx2);
END $$ LANGUAGE plpgsql;
SELECT * FROM pg_temp.time_user_rooms(200, 0.41);
SELECT * FROM pg_temp.time_user_rooms(200, 0.42);
SELECT * FROM pg_temp.time_user_rooms(200, 0.42);
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT room_id, min(server_ts), max(server_ts), count(*) FROM messages WHERE user_id = 4242 GROUP BY room_id ORDER BY max(server_ts) DESC, room_id COLLATE "C";
\echo '--- with a covering index (user_id, server_ts) INCLUDE (room_id) in place of messages_user_ts'
\timing on
CREATE INDEX exp_user_ts_room ON messages (user_id, server_ts) INCLUDE (room_id);
\timing off
SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class WHERE relname IN ('messages_user_ts', 'exp_user_ts_room');
BEGIN;
DROP INDEX messages_user_ts;
SELECT * FROM pg_temp.time_user_rooms(200, 0.41);
SELECT * FROM pg_temp.time_user_rooms(200, 0.42);
SELECT * FROM pg_temp.time_user_rooms(200, 0.42);
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT room_id, min(server_ts), max(server_ts), count(*) FROM messages WHERE user_id = 4242 GROUP BY room_id ORDER BY max(server_ts) DESC, room_id COLLATE "C";
ROLLBACK;
DROP INDEX exp_user_ts_room;
\echo '=== E4: where the rollup statement (ADD_ROLLUPS) spends a 5000-row batch, at 10M rows'
\echo 'the batch: the 5000 newest messages, minutes moved a day on (new minutes, as in live writing); user_rooms pairs mostly exist already'
PREPARE add_rollups AS 
WITH by_room AS (
    INSERT INTO room_minute AS r (minute, room_id, messages)
    SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::int8[])
    ON CONFLICT (minute, room_id) DO UPDATE SET messages = r.messages + EXCLUDED.messages
), by_user AS (
    INSERT INTO user_minute AS u (minute, user_id, messages)
    SELECT * FROM unnest($4::timestamptz[], $5::int4[], $6::int8[])
    ON CONFLICT (minute, user_id) DO UPDATE SET messages = u.messages + EXCLUDED.messages
), by_type AS (
    INSERT INTO type_minute AS t (minute, message_type, messages)
    SELECT * FROM unnest($7::timestamptz[], $8::int2[], $9::int8[])
    ON CONFLICT (minute, message_type) DO UPDATE SET messages = t.messages + EXCLUDED.messages
)
INSERT INTO user_rooms AS ur (user_id, room_id, first_ts, last_ts, messages)
SELECT * FROM unnest($10::int4[], $11::text[], $12::timestamptz[], $13::timestamptz[],
                     $14::int8[])
ON CONFLICT (user_id, room_id) DO UPDATE SET
    first_ts = least(ur.first_ts, EXCLUDED.first_ts),
    last_ts = greatest(ur.last_ts, EXCLUDED.last_ts),
    messages = ur.messages + EXCLUDED.messages
;
WITH b AS (SELECT * FROM messages ORDER BY server_ts DESC LIMIT 5000),
 m AS (SELECT date_trunc('minute', server_ts, 'UTC') + interval '1 day' AS minute, * FROM b),
 rm AS (SELECT minute, room_id, count(*) n FROM m GROUP BY 1, 2),
 um AS (SELECT minute, user_id, count(*) n FROM m GROUP BY 1, 2),
 tm AS (SELECT minute, message_type, count(*) n FROM m GROUP BY 1, 2),
 ur AS (SELECT user_id, room_id, min(server_ts) f, max(server_ts) l, count(*) n FROM m GROUP BY 1, 2)
SELECT
 (SELECT array_agg(minute ORDER BY minute, room_id COLLATE "C") FROM rm) AS a1,
 (SELECT array_agg(room_id ORDER BY minute, room_id COLLATE "C") FROM rm) AS a2,
 (SELECT array_agg(n ORDER BY minute, room_id COLLATE "C") FROM rm) AS a3,
 (SELECT array_agg(minute ORDER BY minute, user_id) FROM um) AS a4,
 (SELECT array_agg(user_id ORDER BY minute, user_id) FROM um) AS a5,
 (SELECT array_agg(n ORDER BY minute, user_id) FROM um) AS a6,
 (SELECT array_agg(minute ORDER BY minute, message_type) FROM tm) AS a7,
 (SELECT array_agg(message_type ORDER BY minute, message_type) FROM tm) AS a8,
 (SELECT array_agg(n ORDER BY minute, message_type) FROM tm) AS a9,
 (SELECT array_agg(user_id ORDER BY user_id, room_id COLLATE "C") FROM ur) AS a10,
 (SELECT array_agg(room_id ORDER BY user_id, room_id COLLATE "C") FROM ur) AS a11,
 (SELECT array_agg(f ORDER BY user_id, room_id COLLATE "C") FROM ur) AS a12,
 (SELECT array_agg(l ORDER BY user_id, room_id COLLATE "C") FROM ur) AS a13,
 (SELECT array_agg(n ORDER BY user_id, room_id COLLATE "C") FROM ur) AS a14
\gset
SELECT cardinality(:'a1'::text[]) AS room_minute_keys, cardinality(:'a4'::text[]) AS user_minute_keys, cardinality(:'a7'::text[]) AS type_minute_keys, cardinality(:'a10'::text[]) AS user_rooms_keys;
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE add_rollups(:'a1', :'a2', :'a3', :'a4', :'a5', :'a6', :'a7', :'a8', :'a9', :'a10', :'a11', :'a12', :'a13', :'a14');
ROLLBACK;
\echo '=== E5: active users over 1 h: UNION (as shipped) against count(DISTINCT) on user_minute alone (whole minutes)'
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT count(DISTINCT user_id) FROM user_minute WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min');
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT count(*) FROM (SELECT user_id FROM user_minute WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min') GROUP BY user_id) x;
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

\echo '=== HOT updates of the rollups (pg_stat_user_tables, since the fill)'
SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_live_tup FROM pg_stat_user_tables WHERE relname IN ('user_rooms','user_minute','room_minute','type_minute','messages') ORDER BY relname;

# Generates experiments.sql for the 10M database: the reader's and writer's statements
# verbatim from src/store/postgres.rs (of the measured commit), plus variants.
import re, subprocess, sys
rev, url, out = sys.argv[1:4]
text = subprocess.run(["git", "-C", "/work/main", "show", f"{rev}:src/store/postgres.rs"],
                      check=True, capture_output=True, text=True).stdout
def rust_str(body, raw):
    if raw:
        return body
    body = re.sub(r"\\\n\s*", "", body)
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)
c = {}
for m in re.finditer(r'const (\w+): &str =\s*(?:r#"(.*?)"#|"((?:[^"\\]|\\.)*)");', text, re.S):
    c[m.group(1)] = rust_str(m.group(2) if m.group(2) is not None else m.group(3), m.group(2) is not None)
q = lambda sql: subprocess.run(["psql", url, "-XAtqc", sql], check=True, capture_output=True, text=True).stdout.strip()
last = q("SELECT max(minute) FROM type_minute")
L = []
A = L.append
A(c["READER_SESSION"].rstrip(";") + ";")
A("SET statement_timeout = 0;  -- the experiments build indexes")
A("\\pset pager off")
A(f"PREPARE active_users AS {c['ACTIVE_USERS']};")
gated = c["ACTIVE_USERS"].replace("WHERE server_ts >= $1 AND server_ts < $5", "WHERE $1::timestamptz < $5::timestamptz AND server_ts >= $1 AND server_ts < $5") \
                         .replace("WHERE server_ts >= $6 AND server_ts < $2", "WHERE $6::timestamptz < $2::timestamptz AND server_ts >= $6 AND server_ts < $2")
assert gated != c["ACTIVE_USERS"]
A(f"PREPARE active_gated AS {gated};")
A(f"\\set last '{last}'")
A("\\echo '=== E1: ACTIVE_USERS with an empty edge: a minute-aligned 10 min window (both edges empty)'")
aligned = "(:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min')"
p_al = f"(:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min'), (:'last'::timestamptz - interval '40 min'), (:'last'::timestamptz - interval '30 min')"
for name in ("active_users", "active_gated"):
    A(f"\\echo '--- {name}'")
    for _ in range(2):
        A(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE {name}({p_al});")
A("\\echo '=== E1b: ACTIVE_USERS, unaligned 1 min window (no whole minute: the right edge is empty)'")
s = "(:'last'::timestamptz - interval '30 min 17.123 s')"
e = "(:'last'::timestamptz - interval '29 min 17.123 s')"
ws = "(:'last'::timestamptz - interval '30 min')"
p1 = f"{s}, {e}, {ws}, {ws}, {e}, {e}"
for name in ("active_users", "active_gated"):
    A(f"\\echo '--- {name}'")
    for _ in range(2):
        A(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE {name}({p1});")
A("\\echo '=== E2: BRIN pages_per_range 128 (messages_ts_brin) against 16, ACTIVE_USERS 10 min unaligned (two edges)'")
s10 = "(:'last'::timestamptz - interval '40 min 17.123 s')"
e10 = "(:'last'::timestamptz - interval '30 min 17.123 s')"
ws10 = "(:'last'::timestamptz - interval '40 min')"
we10 = "(:'last'::timestamptz - interval '31 min')"
p10 = f"{s10}, {e10}, {ws10}, {we10}, {ws10}, {we10}"
A("\\timing on")
A("CREATE INDEX IF NOT EXISTS exp_ts_brin16 ON messages USING brin (server_ts) WITH (pages_per_range = 16);")
A("\\timing off")
A("SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class WHERE relname IN ('messages_ts_brin', 'exp_ts_brin16');")
A("BEGIN;")
A("DROP INDEX exp_ts_brin16;")
A("\\echo '--- pages_per_range 128 (the schema)'")
for _ in range(2):
    A(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users({p10});")
A("ROLLBACK;")
A("BEGIN;")
A("DROP INDEX messages_ts_brin;")
A("\\echo '--- pages_per_range 16'")
for _ in range(2):
    A(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE active_users({p10});")
A("ROLLBACK;")
A("DROP INDEX exp_ts_brin16;")
A("\\echo '=== E3: a user, rooms from messages instead of the user_rooms rollup (200 random users per pass; three passes per variant, the last two with the same users, warm)'")
A("""CREATE OR REPLACE FUNCTION pg_temp.time_user_rooms(n int, seed float8) RETURNS TABLE (source text, mean_ms float8, max_ms float8) AS $$
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
END $$ LANGUAGE plpgsql;""")
A("SELECT * FROM pg_temp.time_user_rooms(200, 0.41);")
A("SELECT * FROM pg_temp.time_user_rooms(200, 0.42);")
A("SELECT * FROM pg_temp.time_user_rooms(200, 0.42);")
A("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT room_id, min(server_ts), max(server_ts), count(*) FROM messages WHERE user_id = 4242 GROUP BY room_id ORDER BY max(server_ts) DESC, room_id COLLATE \"C\";")
A("\\echo '--- with a covering index (user_id, server_ts) INCLUDE (room_id) in place of messages_user_ts'")
A("\\timing on")
A("CREATE INDEX exp_user_ts_room ON messages (user_id, server_ts) INCLUDE (room_id);")
A("\\timing off")
A("SELECT relname, pg_size_pretty(pg_relation_size(oid)) FROM pg_class WHERE relname IN ('messages_user_ts', 'exp_user_ts_room');")
A("BEGIN;")
A("DROP INDEX messages_user_ts;")
A("SELECT * FROM pg_temp.time_user_rooms(200, 0.41);")
A("SELECT * FROM pg_temp.time_user_rooms(200, 0.42);")
A("SELECT * FROM pg_temp.time_user_rooms(200, 0.42);")
A("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT room_id, min(server_ts), max(server_ts), count(*) FROM messages WHERE user_id = 4242 GROUP BY room_id ORDER BY max(server_ts) DESC, room_id COLLATE \"C\";")
A("ROLLBACK;")
A("DROP INDEX exp_user_ts_room;")
A("\\echo '=== E4: where the rollup statement (ADD_ROLLUPS) spends a 5000-row batch, at 10M rows'")
A("\\echo 'the batch: the 5000 newest messages, minutes moved a day on (new minutes, as in live writing); user_rooms pairs mostly exist already'")
A(f"PREPARE add_rollups AS {c['ADD_ROLLUPS']};")
A("""WITH b AS (SELECT * FROM messages ORDER BY server_ts DESC LIMIT 5000),
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
\\gset""")
A("SELECT cardinality(:'a1'::text[]) AS room_minute_keys, cardinality(:'a4'::text[]) AS user_minute_keys, cardinality(:'a7'::text[]) AS type_minute_keys, cardinality(:'a10'::text[]) AS user_rooms_keys;")
A("BEGIN;")
A("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE add_rollups(:'a1', :'a2', :'a3', :'a4', :'a5', :'a6', :'a7', :'a8', :'a9', :'a10', :'a11', :'a12', :'a13', :'a14');")
A("ROLLBACK;")
A("\\echo '=== E5: active users over 1 h: UNION (as shipped) against count(DISTINCT) on user_minute alone (whole minutes)'")
A("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT count(DISTINCT user_id) FROM user_minute WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min');")
A("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT count(*) FROM (SELECT user_id FROM user_minute WHERE minute >= (:'last'::timestamptz - interval '90 min') AND minute < (:'last'::timestamptz - interval '30 min') GROUP BY user_id) x;")
bm = open("bitmap.sql").read().replace("\\pset pager off\n", "")
bm = bm.split("\n", 1)[1]  # the \\set last line is replaced by the one above
A(bm)
A("\\echo '=== HOT updates of the rollups (pg_stat_user_tables, since the fill)'")
A("SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_live_tup FROM pg_stat_user_tables WHERE relname IN ('user_rooms','user_minute','room_minute','type_minute','messages') ORDER BY relname;")
open(out, "w").write("\n".join(L) + "\n")

SET statement_timeout = '10s'; SET plan_cache_mode = force_custom_plan;
\timing off
PREPARE room_first AS SELECT message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, node_id FROM messages WHERE room_id = $1 AND server_ts >= $2 AND server_ts < $3 ORDER BY server_ts, message_id LIMIT $4;
PREPARE room_last AS SELECT message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, node_id FROM messages WHERE room_id = $1 AND server_ts >= $2 AND server_ts < $3 ORDER BY server_ts DESC, message_id DESC LIMIT $4;
PREPARE user_first AS SELECT message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, node_id FROM messages WHERE user_id = $1 AND server_ts >= $2 AND server_ts < $3 ORDER BY server_ts, message_id LIMIT $4;
PREPARE user_last AS SELECT message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, node_id FROM messages WHERE user_id = $1 AND server_ts >= $2 AND server_ts < $3 ORDER BY server_ts DESC, message_id DESC LIMIT $4;
PREPARE user_rooms AS SELECT room_id, first_ts, last_ts, messages FROM user_rooms
     WHERE user_id = $1 ORDER BY last_ts DESC, room_id COLLATE "C";
PREPARE active_users AS 
WITH whole AS (
    SELECT bit_or(users) AS bits FROM (
        SELECT users FROM active_hour WHERE hour >= $7 AND hour < $8
        UNION ALL
        SELECT users FROM active_minute WHERE minute >= $3 AND minute < $7
        UNION ALL
        SELECT users FROM active_minute WHERE minute >= $8 AND minute < $4
    ) AS parts
), others AS (
    SELECT user_id FROM messages
     WHERE $1::timestamptz < $5::timestamptz AND server_ts >= $1 AND server_ts < $5
    UNION
    SELECT user_id FROM messages
     WHERE $6::timestamptz < $2::timestamptz AND server_ts >= $6 AND server_ts < $2
    UNION
    SELECT u.user_id FROM user_minute_batch AS b, unnest(b.users) AS u(user_id)
     WHERE b.strays AND b.minute >= $3 AND b.minute < $4
       AND (u.user_id < 0 OR u.user_id >= 100008)
)
SELECT coalesce(bit_count(bits), 0)
     + (SELECT count(*) FROM others
         WHERE CASE WHEN bits IS NULL OR user_id < 0 OR user_id >= 100008 THEN true
                    ELSE get_bit(bits, user_id) = 0 END)
FROM whole;
PREPARE type_counts AS SELECT GROUPING(minute), minute, message_type, sum(messages)::bigint FROM type_minute WHERE minute >= $1 AND minute < $2 GROUP BY GROUPING SETS ((minute), (message_type)) ORDER BY 1, 2, 3;
PREPARE top_users AS SELECT u.user_id, sum(u.n)::bigint AS n FROM user_minute_batch AS b, unnest(b.users, b.messages) AS u(user_id, n) WHERE b.minute >= $1 AND b.minute < $2 GROUP BY u.user_id ORDER BY n DESC, u.user_id LIMIT $3;
PREPARE top_rooms AS SELECT room_id, sum(messages)::bigint AS n FROM room_minute
     WHERE minute >= $1 AND minute < $2 GROUP BY room_id ORDER BY n DESC, room_id COLLATE "C"
     LIMIT $3;
PREPARE span_minutes AS SELECT min(minute), max(minute) FROM type_minute;
PREPARE span_edges AS SELECT (SELECT min(server_ts) FROM messages WHERE server_ts >= $1 AND server_ts < $2), (SELECT max(server_ts) FROM messages WHERE server_ts >= $3 AND server_ts < $4);
\echo '=== room window, newest 1000 of 1 h (ROOM_LAST)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE room_last('7', '2026-12-07 09:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', 1000);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE room_last('7', '2026-12-07 09:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', 1000);
\echo '=== room window, oldest 1000 of 1 h (ROOM_FIRST)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE room_first('7', '2026-12-07 09:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', 1000);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE room_first('7', '2026-12-07 09:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', 1000);
\echo '=== user history, all time, newest 1000 (USER_LAST)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE user_last(4242, '1970-01-01 00:00:00+00', '9999-12-31 23:59:59+00', 1000);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE user_last(4242, '1970-01-01 00:00:00+00', '9999-12-31 23:59:59+00', 1000);
\echo '=== user history, all time, oldest 1000 (USER_FIRST)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE user_first(4242, '1970-01-01 00:00:00+00', '9999-12-31 23:59:59+00', 1000);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE user_first(4242, '1970-01-01 00:00:00+00', '9999-12-31 23:59:59+00', 1000);
\echo '=== a user, rooms (USER_ROOMS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE user_rooms(4242);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE user_rooms(4242);
\echo '=== active users, 1 min window (ACTIVE_USERS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-07 10:27:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-07 10:27:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00');
\echo '=== active users, 10 min window (ACTIVE_USERS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-07 10:18:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:19:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:19:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-07 10:18:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 10:19:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:19:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00');
\echo '=== active users, 1 h window (ACTIVE_USERS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-07 09:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 09:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 09:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-07 09:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-07 09:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 09:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00');
\echo '=== active users, 24 h window (ACTIVE_USERS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-06 10:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-06 10:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-06 10:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-06 11:00:00.000000+00:00', '2026-12-07 10:00:00.000000+00:00');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE active_users('2026-12-06 10:28:42.877000+00:00', '2026-12-07 10:28:42.877000+00:00', '2026-12-06 10:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-06 10:29:00.000000+00:00', '2026-12-07 10:28:00.000000+00:00', '2026-12-06 11:00:00.000000+00:00', '2026-12-07 10:00:00.000000+00:00');
\echo '=== analytics, 10 min: per minute and per type (TYPE_COUNTS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE type_counts('2026-12-07 10:18:00.000000+00:00', '2026-12-07 10:29:00.000000+00:00');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE type_counts('2026-12-07 10:18:00.000000+00:00', '2026-12-07 10:29:00.000000+00:00');
\echo '=== analytics, 10 min: top users (TOP_USERS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE top_users('2026-12-07 10:18:00.000000+00:00', '2026-12-07 10:29:00.000000+00:00', 10);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE top_users('2026-12-07 10:18:00.000000+00:00', '2026-12-07 10:29:00.000000+00:00', 10);
\echo '=== analytics, 10 min: top rooms (TOP_ROOMS)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE top_rooms('2026-12-07 10:18:00.000000+00:00', '2026-12-07 10:29:00.000000+00:00', 10);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE top_rooms('2026-12-07 10:18:00.000000+00:00', '2026-12-07 10:29:00.000000+00:00', 10);
\echo '=== span: first and last minute (SPAN_MINUTES)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE span_minutes;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE span_minutes;
\echo '=== span: exact edges (SPAN_EDGES)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE span_edges('2026-12-06 11:00:00.000000+00:00', '2026-12-06 11:01:00.000000+00:00', '2026-12-07 10:59:00.000000+00:00', '2026-12-07 11:00:00.000000+00:00');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE span_edges('2026-12-06 11:00:00.000000+00:00', '2026-12-06 11:01:00.000000+00:00', '2026-12-07 10:59:00.000000+00:00', '2026-12-07 11:00:00.000000+00:00');

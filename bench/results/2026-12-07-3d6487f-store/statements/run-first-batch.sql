\timing on
BEGIN;
INSERT INTO messages SELECT message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, node_id FROM gen WHERE b=0 ORDER BY message_id;
SELECT count(*) FROM (SELECT date_trunc('minute',server_ts,'UTC'), user_id, count(*) FROM gen WHERE b=0 GROUP BY 1,2 ORDER BY 1,2) x;
INSERT INTO user_minute AS u SELECT date_trunc('minute',server_ts,'UTC'), user_id, count(*) FROM gen WHERE b=0 GROUP BY 1,2 ORDER BY 1,2 ON CONFLICT (minute,user_id) DO UPDATE SET messages = u.messages + EXCLUDED.messages;
INSERT INTO um_log SELECT date_trunc('minute',server_ts,'UTC'), user_id, count(*) FROM gen WHERE b=0 GROUP BY 1,2 ORDER BY 1,2;
INSERT INTO user_rooms AS ur SELECT user_id, room_id, min(server_ts), max(server_ts), count(*) FROM gen WHERE b=0 GROUP BY 1,2 ORDER BY user_id, room_id COLLATE "C" ON CONFLICT (user_id, room_id) DO UPDATE SET first_ts = least(ur.first_ts, EXCLUDED.first_ts), last_ts = greatest(ur.last_ts, EXCLUDED.last_ts), messages = ur.messages + EXCLUDED.messages;
INSERT INTO room_minute AS r SELECT date_trunc('minute',server_ts,'UTC'), room_id, count(*) FROM gen WHERE b=0 GROUP BY 1,2 ORDER BY 1, room_id COLLATE "C" ON CONFLICT (minute, room_id) DO UPDATE SET messages = r.messages + EXCLUDED.messages;
COMMIT;
BEGIN;
INSERT INTO messages SELECT message_id, room_id, user_id, username, message, message_type, client_ts, server_ts, node_id FROM gen WHERE b=1 ORDER BY message_id;
SELECT count(*) FROM (SELECT date_trunc('minute',server_ts,'UTC'), user_id, count(*) FROM gen WHERE b=1 GROUP BY 1,2 ORDER BY 1,2) x;

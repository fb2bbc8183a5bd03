\timing on
SELECT minute, count(*) AS rows, sum(cardinality(users)) AS entries, pg_size_pretty(sum(pg_column_size(users)+pg_column_size(messages))) FROM user_minute_batch GROUP BY 1 ORDER BY 1;
SELECT pg_size_pretty(pg_total_relation_size('user_minute_batch'));
BEGIN;
WITH due AS (
    SELECT minute FROM user_minute_batch
    WHERE minute >= '-infinity' AND minute < 'infinity'
    GROUP BY minute HAVING count(*) > 1
    ORDER BY minute LIMIT 1
), old AS (
    DELETE FROM user_minute_batch AS b USING due WHERE b.minute = due.minute
    RETURNING b.minute, b.users, b.messages
)
INSERT INTO user_minute_batch (minute, users, messages, strays)
SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(n ORDER BY user_id),
       bool_or(user_id < 0 OR user_id >= 100008)
FROM (SELECT old.minute, u.user_id, sum(u.n)::int8 AS n
      FROM old, unnest(old.users, old.messages) AS u(user_id, n)
      GROUP BY old.minute, u.user_id) AS c
GROUP BY minute;
COMMIT;
BEGIN;
WITH due AS (
    SELECT minute FROM user_minute_batch
    WHERE minute >= '-infinity' AND minute < 'infinity'
    GROUP BY minute HAVING count(*) > 1
    ORDER BY minute LIMIT 1
), old AS (
    DELETE FROM user_minute_batch AS b USING due WHERE b.minute = due.minute
    RETURNING b.minute, b.users, b.messages
)
INSERT INTO user_minute_batch (minute, users, messages, strays)
SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(n ORDER BY user_id),
       bool_or(user_id < 0 OR user_id >= 100008)
FROM (SELECT old.minute, u.user_id, sum(u.n)::int8 AS n
      FROM old, unnest(old.users, old.messages) AS u(user_id, n)
      GROUP BY old.minute, u.user_id) AS c
GROUP BY minute;
COMMIT;
BEGIN;
WITH due AS (
    SELECT minute FROM user_minute_batch
    WHERE minute >= '-infinity' AND minute < 'infinity'
    GROUP BY minute HAVING count(*) > 1
    ORDER BY minute LIMIT 1
), old AS (
    DELETE FROM user_minute_batch AS b USING due WHERE b.minute = due.minute
    RETURNING b.minute, b.users, b.messages
)
INSERT INTO user_minute_batch (minute, users, messages, strays)
SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(n ORDER BY user_id),
       bool_or(user_id < 0 OR user_id >= 100008)
FROM (SELECT old.minute, u.user_id, sum(u.n)::int8 AS n
      FROM old, unnest(old.users, old.messages) AS u(user_id, n)
      GROUP BY old.minute, u.user_id) AS c
GROUP BY minute;
COMMIT;
BEGIN;
WITH due AS (
    SELECT minute FROM user_minute_batch
    WHERE minute >= '-infinity' AND minute < 'infinity'
    GROUP BY minute HAVING count(*) > 1
    ORDER BY minute LIMIT 1
), old AS (
    DELETE FROM user_minute_batch AS b USING due WHERE b.minute = due.minute
    RETURNING b.minute, b.users, b.messages
)
INSERT INTO user_minute_batch (minute, users, messages, strays)
SELECT minute, array_agg(user_id ORDER BY user_id), array_agg(n ORDER BY user_id),
       bool_or(user_id < 0 OR user_id >= 100008)
FROM (SELECT old.minute, u.user_id, sum(u.n)::int8 AS n
      FROM old, unnest(old.users, old.messages) AS u(user_id, n)
      GROUP BY old.minute, u.user_id) AS c
GROUP BY minute;
COMMIT;
SELECT minute, count(*) AS rows, sum(cardinality(users)) AS entries FROM user_minute_batch GROUP BY 1 ORDER BY 1;
VACUUM user_minute_batch;
SELECT pg_size_pretty(pg_total_relation_size('user_minute_batch'));

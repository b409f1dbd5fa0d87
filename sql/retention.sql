--
-- retention: the settings of history retention and stale consumers,
-- spool.consumer_status, a detached processor, and nonces removed by
-- retention (signers 'r-*', consumers 'ret-*', processors 'ret_*').
--

-- The settings and their defaults.
SELECT name, setting, unit, context, vartype, enumvals
  FROM pg_settings
 WHERE name IN ('spool.dead_letters_retention', 'spool.gaps_retention',
				'spool.outbox_dead_retention', 'spool.nonce_history_retention',
				'spool.operations_retention', 'spool.retention_batch_size', 'spool.retention_interval', 'spool.max_retention',
				'spool.max_retention_action')
 ORDER BY name;
SHOW spool.max_retention;
SHOW spool.nonce_history_retention;

-- Bad values are refused and change nothing.
ALTER SYSTEM SET spool.max_retention_action = 'delete';
ALTER SYSTEM SET spool.dead_letters_retention = '-1';
ALTER SYSTEM SET spool.nonce_history_retention = 'forever';
ALTER SYSTEM SET spool.retention_batch_size = 0;
SET spool.max_retention = '1 h';
SELECT name, setting FROM pg_settings
 WHERE name IN ('spool.max_retention', 'spool.max_retention_action',
				'spool.dead_letters_retention', 'spool.retention_batch_size')
 ORDER BY name;

-- The time-column indexes the batched removal uses.
SELECT indexrelid::regclass AS index, pg_get_indexdef(indexrelid) LIKE '%' || a.attname || '%' AS on_time_column
  FROM pg_index i
  JOIN (VALUES ('spool.dead_letters_at', 'at'), ('spool.gaps_at', 'at'),
			   ('spool.outbox_dead_failed_at', 'failed_at'),
			   ('spool.nonce_store_consumed_at', 'updated_at')) a(idx, attname)
	ON i.indexrelid = a.idx::regclass
 ORDER BY 1;

-- spool.consumer_status: a registered consumer and a processor, both caught
-- up with an empty spool part after them, so neither is stale.
SELECT spool.register_consumer('ret-c1') = (SELECT next_cursor - 1 FROM spool.spool_state) AS at_end;
CREATE ROLE regress_ret_admin NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_ret_admin2 NOLOGIN IN ROLE spool_admin;
CREATE FUNCTION public.ret_h(state jsonb, entries spool.entries[]) RETURNS spool.step
LANGUAGE sql IMMUTABLE AS $$ SELECT ROW(state, ARRAY[]::spool.output[])::spool.step $$;
SET ROLE regress_ret_admin;
SELECT spool.create_processor('ret_p', 'ret_h(jsonb,spool.entries[])');
RESET ROLE;
SELECT kind, name, owner IS NOT NULL AS has_owner, cursor = (SELECT next_cursor - 1 FROM spool.spool_state) AS at_end,
	   lag, moved_at <= now() AS moved, behind_since, stale, detached_at
  FROM spool.consumer_status WHERE name IN ('ret-c1', 'ret_p') ORDER BY kind, name;
-- Committing a cursor that does not move it keeps moved_at; moving it sets it.
UPDATE spool.consumers SET moved_at = '2000-01-01' WHERE name = 'ret-c1';
SELECT spool.commit_consumer('ret-c1', 0) >= 0 AS committed;
SELECT moved_at = '2000-01-01' AS not_moved FROM spool.consumers WHERE name = 'ret-c1';
SELECT spool.commit_consumer('ret-c1', (SELECT next_cursor FROM spool.spool_state)) > 0 AS committed;
SELECT moved_at > '2000-01-01' AS moved FROM spool.consumers WHERE name = 'ret-c1';
-- Ahead of the spool it is not stale, however old moved_at is.
UPDATE spool.consumers SET moved_at = '2000-01-01' WHERE name = 'ret-c1';
SELECT stale FROM spool.consumer_status WHERE name = 'ret-c1';
SELECT spool.drop_consumer('ret-c1');

-- A processor detached by spool.max_retention_action = 'drop' (as the
-- promoter does it) shows without a cursor and cannot be started.
WITH d AS (DELETE FROM spool.consumers WHERE name = 'processor:ret_p' RETURNING 1)
UPDATE spool.processors SET detached_at = now() WHERE name = 'ret_p' AND EXISTS (SELECT FROM d);
SELECT kind, name, cursor, lag, stale, detached_at IS NOT NULL AS detached
  FROM spool.consumer_status WHERE name = 'ret_p';
SET ROLE regress_ret_admin;
SELECT try($$SELECT spool.start_processor('ret_p')$$);
-- Another admin learns nothing about it but that it is not theirs.
SET ROLE regress_ret_admin2;
SELECT try($$SELECT spool.start_processor('ret_p')$$);
-- Unknown processors are still reported as such.
SELECT try($$SELECT spool.start_processor('ret_nope')$$);
RESET ROLE;
SELECT enabled FROM spool.processors WHERE name = 'ret_p';
-- Dropping and creating it again is the way back.
SET ROLE regress_ret_admin;
SELECT spool.drop_processor('ret_p');
SELECT spool.create_processor('ret_p', 'ret_h(jsonb,spool.entries[])');
SELECT spool.start_processor('ret_p');
SELECT spool.stop_processor('ret_p');
SELECT spool.drop_processor('ret_p');
RESET ROLE;
DROP FUNCTION public.ret_h(jsonb, spool.entries[]);
DROP ROLE regress_ret_admin, regress_ret_admin2;

-- Nonces: retention removes consumed rows only; a removed nonce is never
-- handed out again, marking it used again is a harmless repeat, releasing
-- it is refused, and its request id is forgotten.
SELECT owner, token FROM spool.lease_acquire('signer:r-a', 'node1', '1 h');
SELECT spool.nonce_allocate('r-a', 'node1', 1, 'rq-' || i) AS nonce FROM generate_series(0, 3) i;
SELECT spool.nonce_mark_used('r-a', 0, 'node1', 1);
SELECT spool.nonce_mark_used('r-a', 3, 'node1', 1);
SELECT spool.nonce_mark_recyclable('r-a', 1, 'node1', 1);
-- What the retention batch does, with a zero retention.
DELETE FROM spool.nonce_store WHERE signer = 'r-a' AND state = 'consumed'
   AND updated_at < now() - make_interval(secs => 0) + interval '1 h';
SELECT nonce, state FROM spool.nonces WHERE signer = 'r-a' ORDER BY nonce;
SELECT spool.nonce_mark_used('r-a', 3, 'node1', 1);
SELECT try($$SELECT spool.nonce_mark_recyclable('r-a', 3, 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('r-a', 4, 'node1', 1)$$);
-- The released one first, then new ones above every removed one.
SELECT spool.nonce_allocate('r-a', 'node1', 1) AS reused;
SELECT spool.nonce_allocate('r-a', 'node1', 1) AS new;
-- The request id of removed nonce 0 no longer finds it: a new nonce.
SELECT spool.nonce_allocate('r-a', 'node1', 1, 'rq-0') AS after_removal;
SELECT spool.nonce_allocate('r-a', 'node1', 1, 'rq-2') AS still_known;

--
-- processor_ops: the SQL surface of alter_processor and rewind_processor.
-- Bad arguments are rejected with their SQLSTATE and change nothing (a
-- fingerprint of the processors, checkpoints, consumers, rewinds and leases,
-- read as the superuser, is compared after each one).  Processors are never started here, and the
-- spool's head and the processor's progress are moved by hand inside
-- transactions that are rolled back.
--
CREATE ROLE regress_ops_admin NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_ops_admin2 NOLOGIN IN ROLE spool_admin;
CREATE FUNCTION public.ops_h(state jsonb, entries spool.entries[]) RETURNS spool.step
	LANGUAGE sql AS $$SELECT ROW(state, '{}')::spool.step$$;
GRANT EXECUTE ON FUNCTION public.ops_h(jsonb, spool.entries[]) TO regress_ops_admin, regress_ops_admin2;

CREATE FUNCTION public.ops_state() RETURNS text
LANGUAGE sql SECURITY DEFINER AS $$
	SELECT md5(concat_ws('|',
		(SELECT string_agg(p.name || p.options::text || p.enabled, ',' ORDER BY p.name) FROM spool.processors p),
		(SELECT string_agg(c::text, ',' ORDER BY c.processor)
		   FROM (SELECT processor, token, committed_cursor, state, state_cursor, state_hash, start_cursor, epoch
				   FROM spool.processor_checkpoints) c),
		(SELECT string_agg(c.name || c.committed_cursor, ',' ORDER BY c.name) FROM spool.consumers c),
		(SELECT count(*) FROM spool.processor_rewinds),
		(SELECT string_agg(l.resource || l.token, ',' ORDER BY l.resource) FROM spool.lease_store l)))
$$;

SET ROLE regress_ops_admin;
SELECT spool.create_processor('ops1', 'ops_h(jsonb,spool.entries[])',
	'{"replicas": 2, "batch_size": 100, "handler": {"a": null, "b": 1}}');
SELECT options FROM spool.processors WHERE name = 'ops1';
SELECT public.ops_state() AS before \gset

--
-- alter_processor: bad input, SP001 unless said otherwise; nothing changes.
--
SELECT try($$SELECT spool.alter_processor(NULL, '{}')$$);
SELECT try($$SELECT spool.alter_processor('', '{}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', NULL)$$);
SELECT try($$SELECT spool.alter_processor('ops1', '[]')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '3')$$);
-- unknown processor: SP004
SELECT try($$SELECT spool.alter_processor('nope', '{"batch_size": 10}')$$);
-- unknown options, even with a null value
SELECT try($$SELECT spool.alter_processor('ops1', '{"batchsize": 10}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"bogus": null}')$$);
-- options that define the fold or who runs it cannot change
SELECT try($$SELECT spool.alter_processor('ops1', '{"handler": {"b": 2}}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"sources": ["x"]}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"start": "latest"}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"run_as": "regress_ops_admin"}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"batch_size": 10, "handler": null}')$$);
-- values are checked as by create_processor
SELECT try($$SELECT spool.alter_processor('ops1', '{"batch_size": 0}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"batch_size": 100001}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"batch_size": "ten"}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"replicas": 0}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"replicas": 9}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"lease_ttl": "50 ms"}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"lease_ttl": "2 parsecs"}')$$);
SELECT try($$SELECT spool.alter_processor('ops1', '{"checkpoint_every": -1}')$$);
SELECT public.ops_state() = :'before' AS unchanged;

-- Another admin may not alter it: 42501, nothing changed.
SET ROLE regress_ops_admin2;
SELECT try($$SELECT spool.alter_processor('ops1', '{"batch_size": 10}')$$);
SET ROLE spool_client;
SELECT try($$SELECT spool.alter_processor('ops1', '{"batch_size": 10}')$$);
SET ROLE regress_ops_admin;
SELECT public.ops_state() = :'before' AS unchanged;

-- Valid changes: merged over the stored options, checked and normalized;
-- null resets one to its default; the rest (handler settings with their
-- nested nulls, the checkpoint) stays.
SELECT spool.alter_processor('ops1', '{"batch_size": 500, "lease_ttl": "2 s", "checkpoint_every": 1000, "replicas": 3}');
SELECT options FROM spool.processors WHERE name = 'ops1';
SELECT spool.alter_processor('ops1', '{"lease_ttl": null, "checkpoint_every": null}');
SELECT options FROM spool.processors WHERE name = 'ops1';
SELECT spool.alter_processor('ops1', '{}');
SELECT committed_cursor, state_cursor, token, epoch FROM spool.processor_checkpoints WHERE processor = 'ops1';
SELECT public.ops_state() AS before \gset

--
-- rewind_processor: bad input; nothing changes.
--
SELECT try($$SELECT spool.rewind_processor(NULL, 0)$$);
SELECT try($$SELECT spool.rewind_processor('ops1', NULL)$$);
SELECT try($$SELECT spool.rewind_processor('ops1', -1)$$);
SELECT try($$SELECT spool.rewind_processor('ops1', 0, NULL)$$);
SELECT try($$SELECT spool.rewind_processor('ops1', 0, 'replay')$$);
SELECT try($$SELECT spool.rewind_processor('ops1', 0, 'EMIT')$$);
SELECT try($$SELECT spool.rewind_processor('nope', 0)$$);
-- beyond the spool's head (empty here: its head is 0)
SELECT try($$SELECT spool.rewind_processor('ops1', 5)$$);
SELECT public.ops_state() = :'before' AS unchanged;
SET ROLE regress_ops_admin2;
SELECT try($$SELECT spool.rewind_processor('ops1', 0)$$);
SET ROLE spool_client;
SELECT try($$SELECT spool.rewind_processor('ops1', 0)$$);
SET ROLE regress_ops_admin;
SELECT public.ops_state() = :'before' AS unchanged;

-- With progress (moved by hand in a transaction): the spool's head at 100,
-- the processor committed up to 80 with a snapshot at 50, started at 10.
RESET ROLE;
BEGIN;
UPDATE spool.spool_state SET next_cursor = 101;
UPDATE spool.processor_checkpoints SET committed_cursor = 80, state_cursor = 50,
	state = '{"n": 40}', state_hash = 42, start_cursor = 10
 WHERE processor = 'ops1';
UPDATE spool.consumers SET committed_cursor = 50 WHERE name = 'processor:ops1';
SELECT public.ops_state() AS before \gset
SET ROLE regress_ops_admin;
SELECT try($$SELECT spool.rewind_processor('ops1', 101)$$);
SELECT try($$SELECT spool.rewind_processor('ops1', 90)$$);
SELECT try($$SELECT spool.rewind_processor('ops1', 9)$$);
SELECT public.ops_state() = :'before' AS unchanged;
-- Retention dropped cursors 1 to 20: a rewind below the snapshot would
-- replay from the start (10) and is refused; one at or above it is fine.
RESET ROLE;
INSERT INTO spool.segment_info (segment, lo, hi, sealed_at, dropped_at)
	VALUES (100000, 1, 21, now(), now());
SELECT public.ops_state() AS before \gset
SET ROLE regress_ops_admin;
SELECT try($$SELECT spool.rewind_processor('ops1', 30)$$);
SELECT public.ops_state() = :'before' AS unchanged;
-- 'suppress' at or above the snapshot: the snapshot stays, the committed
-- cursor stays, a new gate token and epoch.
SELECT spool.rewind_processor('ops1', 60);
SELECT committed_cursor, state, state_cursor, state_hash, token > 0 AS new_token, epoch
  FROM spool.processor_checkpoints WHERE processor = 'ops1';
-- 'emit' back to 55: the committed cursor goes back; the snapshot at 50 stays.
SELECT spool.rewind_processor('ops1', 55, 'emit');
SELECT committed_cursor, state, state_cursor, state_hash, epoch
  FROM spool.processor_checkpoints WHERE processor = 'ops1';
SELECT processor, epoch, from_cursor, to_cursor, replay_from, outputs, by_role
  FROM spool.processor_rewinds ORDER BY id;
-- The gate's lease is held by the rewind (an owner name no worker holds).
SELECT owner ~ '^rewind:ops1:[0-9]+$' AS rewind_owner, token = (SELECT token FROM spool.processor_checkpoints WHERE processor = 'ops1') AS same_token
  FROM spool.leases WHERE resource = 'processor:ops1';
-- Below the snapshot, once retention kept everything after the start: the
-- state is rebuilt from the start, and the consumer keeps the entries.
RESET ROLE;
DELETE FROM spool.segment_info WHERE segment = 100000;
SET ROLE regress_ops_admin;
SELECT spool.rewind_processor('ops1', 20, 'emit');
SELECT committed_cursor, state, state_cursor, state_hash, epoch
  FROM spool.processor_checkpoints WHERE processor = 'ops1';
SELECT committed_cursor FROM spool.consumers WHERE name = 'processor:ops1';
SELECT rewinds FROM spool.processor_status WHERE processor = 'ops1';
ROLLBACK;

-- On an idle processor (nothing spooled), a rewind to 0 works.
SET ROLE regress_ops_admin;
SELECT spool.rewind_processor('ops1', 0);
SELECT epoch, committed_cursor, state_cursor FROM spool.processor_checkpoints WHERE processor = 'ops1';

-- Clean up.
RESET ROLE;
SELECT spool.drop_processor('ops1');
SELECT count(*) AS rewinds_left FROM spool.processor_rewinds;
DROP FUNCTION public.ops_state();
DROP FUNCTION public.ops_h(jsonb, spool.entries[]);
DROP ROLE regress_ops_admin, regress_ops_admin2;

--
-- processors: the SQL surface of create/start/stop/drop_processor,
-- processor_status, current_replica() and handler_settings().  Bad arguments
-- are rejected with their SQLSTATE and change nothing; valid processors are
-- stored with normalized options, a checkpoint row and a spool consumer.
--
-- The launcher runs in this database, so a started processor may get
-- workers at any moment: nothing below depends on them (a processor is
-- stopped right after it is started, and only the rows written by the SQL
-- functions themselves are shown).
--

-- Roles: two admins, an unprivileged role the first admin belongs to, and a
-- client (which has USAGE on the schema but may not manage processors).
CREATE ROLE regress_proc_admin NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_proc_admin2 NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_proc_runner NOLOGIN;
GRANT regress_proc_runner TO regress_proc_admin;
CREATE ROLE regress_proc_client NOLOGIN IN ROLE spool_client;
CREATE ROLE regress_proc_plain NOLOGIN;

-- Handlers: a valid one, one nobody but its owner may execute, and functions
-- that do not fit the contract handler(jsonb, spool.entries[]) RETURNS spool.step.
CREATE FUNCTION public.proc_h(state jsonb, entries spool.entries[]) RETURNS spool.step
	LANGUAGE sql AS $$SELECT ROW(state, '{}')::spool.step$$;
CREATE FUNCTION public.proc_h_private(state jsonb, entries spool.entries[]) RETURNS spool.step
	LANGUAGE sql AS $$SELECT ROW(state, '{}')::spool.step$$;
REVOKE EXECUTE ON FUNCTION public.proc_h_private(jsonb, spool.entries[]) FROM PUBLIC;
CREATE FUNCTION public.proc_bad_args(state jsonb, entries jsonb) RETURNS spool.step
	LANGUAGE sql AS $$SELECT ROW(state, '{}')::spool.step$$;
CREATE FUNCTION public.proc_bad_args2(state text, entries spool.entries[]) RETURNS spool.step
	LANGUAGE sql AS $$SELECT ROW(state::jsonb, '{}')::spool.step$$;
CREATE FUNCTION public.proc_bad_nargs(state jsonb) RETURNS spool.step
	LANGUAGE sql AS $$SELECT ROW(state, '{}')::spool.step$$;
CREATE FUNCTION public.proc_bad_ret(state jsonb, entries spool.entries[]) RETURNS jsonb
	LANGUAGE sql AS $$SELECT state$$;
CREATE PROCEDURE public.proc_bad_proc(state jsonb, entries spool.entries[])
	LANGUAGE sql AS $$SELECT 1$$;
CREATE FUNCTION public.proc_bad_srf(state jsonb, entries spool.entries[]) RETURNS SETOF spool.step
	LANGUAGE sql AS $$SELECT ROW(state, '{}')::spool.step$$;

-- Two sources to read from (nobody listens on the broker address; the
-- probe's warning is hidden).
SET client_min_messages = error;
SELECT spool.create_source('proc_src1', '127.0.0.1:1', '{t1}');
SELECT spool.create_source('proc_src2', '127.0.0.1:1', '{t2}');
RESET client_min_messages;

-- Outside a processor replica there is no replica number and no settings.
SELECT spool.current_replica() AS replica, spool.handler_settings() AS settings;

--
-- Bad arguments, as a member of spool_admin: SP001 unless said otherwise.
--
SET ROLE regress_proc_admin;
-- Names: NULL, empty, too long (48 bytes at most), characters outside
-- letters, digits, '_', '.' and '-'.
SELECT try($$SELECT spool.create_processor(NULL, 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('', 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor(repeat('n', 49), 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor(repeat('n', 201), 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('bad name', 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('bad/name', 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('bad''name', 'proc_h(jsonb,spool.entries[])')$$);
-- Handlers: NULL, no such function (SP004), and every kind of wrong signature.
SELECT try($$SELECT spool.create_processor('p', NULL)$$);
SELECT try($$SELECT spool.create_processor('p', 0)$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_bad_args(jsonb,jsonb)')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_bad_args2(text,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_bad_nargs(jsonb)')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_bad_ret(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_bad_proc(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_bad_srf(jsonb,spool.entries[])')$$);
-- The full error, with its hint.
SELECT spool.create_processor('p', 'proc_bad_ret(jsonb,spool.entries[])');
-- Options: NULL, not an object, unknown keys (the stored name "lease_ttl_ms"
-- is not an input option).
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', NULL)$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '[]')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '"x"')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', 'null')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"colour": "red"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl_ms": 5000}')$$);
SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replica": 2}');
-- replicas: 1 to 8.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replicas": 0}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replicas": 9}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replicas": -1}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replicas": 1.5}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replicas": "two"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"replicas": null}')$$);
-- batch_size: 1 to 100000.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"batch_size": 0}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"batch_size": 100001}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"batch_size": "1000"}')$$);
-- lease_ttl: an interval or milliseconds, at least 100 ms, at most spool.lease_max_ttl.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": "50 ms"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": 99}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": 0}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": "-5 s"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": true}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": "2 days"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": "1 mon"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": 86400001}')$$);
-- A string that is not an interval is a bad option like any other (SP001).
DO $$
BEGIN
	PERFORM spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"lease_ttl": "soon"}');
EXCEPTION WHEN OTHERS THEN
	RAISE NOTICE 'lease_ttl "soon": %', SQLSTATE;
END
$$;
-- checkpoint_every: 1 to 1000000000.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"checkpoint_every": 0}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"checkpoint_every": 1000000001}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"checkpoint_every": "often"}')$$);
-- start: "earliest", "latest" or a cursor.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"start": "middle"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"start": "EARLIEST"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"start": -1}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"start": 1.5}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"start": true}')$$);
-- sources: a non-empty array of existing sources (SP004 for an unknown one),
-- each listed once.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": []}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": "proc_src1"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": {"proc_src1": true}}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": [1]}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": [""]}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": ["nope"]}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": ["proc_src1", "nope"]}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"sources": ["proc_src1", "proc_src1"]}')$$);
-- run_as: a role name (SP004 when there is none) that the caller belongs to
-- (42501 otherwise).
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": ""}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": 10}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_nobody"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_admin2"}')$$);
-- The role the handler runs as must be allowed to execute it (42501).
SELECT try($$SELECT spool.create_processor('p', 'proc_h_private(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h_private(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner"}')$$);
-- handler settings must be an object.
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"handler": 1}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"handler": [1]}')$$);
RESET ROLE;

-- A superuser must name the role the handler runs as.
SELECT replace(try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])')$$),
			   '"' || current_user || '"', '"<superuser>"') AS try;
-- ... and that role must be allowed to execute the handler.
SELECT try($$SELECT spool.create_processor('p', 'proc_h_private(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner"}')$$);
-- window_alert is executable by spool_admin and spool_client only.
SELECT try($$SELECT spool.create_processor('p', 'spool.window_alert(jsonb,spool.entries[])',
	'{"run_as": "regress_proc_runner", "handler": {"key": "a", "aggregate": "count",
	  "window": {"type": "count", "size": 5}, "threshold": 3, "target": "t"}}')$$);

-- Nothing was stored by any of the rejected calls.
SELECT (SELECT count(*) FROM spool.processors) AS processors,
	   (SELECT count(*) FROM spool.processor_checkpoints) AS checkpoints,
	   (SELECT count(*) FROM spool.consumers WHERE name LIKE 'processor:%') AS consumers;

--
-- spool.window_alert needs its settings in options.handler, and each one is
-- checked when the processor is created (SP001).
--
SET ROLE regress_proc_admin;
SELECT try($$SELECT spool.create_processor('p', 'spool.window_alert(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('p', 'spool.window_alert(jsonb,spool.entries[])', '{"handler": null}')$$);
SELECT try($$SELECT spool.create_processor('p', 'spool.window_alert(jsonb,spool.entries[])', '{"handler": {}}')$$);
RESET ROLE;

-- wa_check(settings): create (and drop again) a window_alert processor with
-- these handler settings; 'ok' or the error.
CREATE FUNCTION public.wa_check(settings jsonb) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM spool.create_processor('wa_check', 'spool.window_alert(jsonb,spool.entries[])',
								   jsonb_build_object('handler', settings));
	PERFORM spool.drop_processor('wa_check');
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

SET ROLE regress_proc_admin;
-- Each row changes one thing in valid settings (the first row).
WITH base(b) AS (
	SELECT '{"key": "addr", "value": "amt", "window": {"type": "count", "size": 10},
			 "threshold": 100, "target": "alerts"}'::jsonb
), tumbling(t) AS (
	SELECT b || '{"window": {"type": "tumbling", "size": "1 minute"}}' FROM base
)
SELECT change, wa_check(s) AS result
  FROM base, tumbling, LATERAL (VALUES
	('none', b),
	('no key', b - 'key'),
	('no window', b - 'window'),
	('no threshold', b - 'threshold'),
	('no target', b - 'target'),
	('unknown setting', b || '{"colour": "red"}'),
	('sum without value', b - 'value'),
	('count without value', b - 'value' || '{"aggregate": "count"}'),
	('min without value', b - 'value' || '{"aggregate": "min"}'),
	('aggregate avg', b || '{"aggregate": "avg"}'),
	('aggregate 1', b || '{"aggregate": 1}'),
	('aggregate max', b || '{"aggregate": "max"}'),
	('op ==', b || '{"op": "=="}'),
	('op =>', b || '{"op": "=>"}'),
	('op <', b || '{"op": "<"}'),
	('key empty', b || '{"key": ""}'),
	('key a..b', b || '{"key": "a..b"}'),
	('key .a', b || '{"key": ".a"}'),
	('key []', b || '{"key": []}'),
	('key [1]', b || '{"key": [1]}'),
	('key 1', b || '{"key": 1}'),
	('key ["a", "b"]', b || '{"key": ["a", "b"]}'),
	('value a.', b || '{"value": "a."}'),
	('threshold "100"', b || '{"threshold": "100"}'),
	('threshold null', b || '{"threshold": null}'),
	('target ""', b || '{"target": ""}'),
	('target 201 bytes', b || jsonb_build_object('target', repeat('t', 201))),
	('window 10', b || '{"window": 10}'),
	('window no type', b || '{"window": {"size": 10}}'),
	('window no size', b || '{"window": {"type": "count"}}'),
	('window extra key', b || '{"window": {"type": "count", "size": 10, "slide": 1}}'),
	('window type hopping', b || '{"window": {"type": "hopping", "size": 10}}'),
	('count size 0', b || '{"window": {"type": "count", "size": 0}}'),
	('count size 1.5', b || '{"window": {"type": "count", "size": 1.5}}'),
	('count size 100001', b || '{"window": {"type": "count", "size": 100001}}'),
	('count size 100000', b || '{"window": {"type": "count", "size": 100000}}'),
	('count size "10"', b || '{"window": {"type": "count", "size": "10"}}'),
	('count size "1 minute"', b || '{"window": {"type": "count", "size": "1 minute"}}'),
	('count with time', b || '{"time": "ts"}'),
	('count with time kafka_ts', b || '{"time": "kafka_ts"}'),
	('tumbling', t),
	('tumbling with time', t || '{"time": "ts"}'),
	('tumbling with time path', t || '{"time": ["meta", "ts"]}'),
	('tumbling time ""', t || '{"time": ""}'),
	('tumbling 1 month', t || '{"window": {"type": "tumbling", "size": "1 month"}}'),
	('tumbling 1 year', t || '{"window": {"type": "tumbling", "size": "1 year"}}'),
	('tumbling -1 minute', t || '{"window": {"type": "tumbling", "size": "-1 minute"}}'),
	('tumbling 0 s', t || '{"window": {"type": "tumbling", "size": "0 s"}}'),
	('tumbling 367 days', t || '{"window": {"type": "tumbling", "size": "367 days"}}'),
	('tumbling 366 days', t || '{"window": {"type": "tumbling", "size": "366 days"}}'),
	('tumbling 60 (seconds)', t || '{"window": {"type": "tumbling", "size": 60}}'),
	('tumbling 0 (seconds)', t || '{"window": {"type": "tumbling", "size": 0}}'),
	('tumbling -60 (seconds)', t || '{"window": {"type": "tumbling", "size": -60}}'),
	('tumbling true', t || '{"window": {"type": "tumbling", "size": true}}'),
	('sliding 5 minutes', b || '{"window": {"type": "sliding", "size": "5 minutes"}}'),
	('sliding 1 month', b || '{"window": {"type": "sliding", "size": "1 mon"}}'),
	('sliding -5 minutes', b || '{"window": {"type": "sliding", "size": "-5 minutes"}}')
  ) v(change, s);
-- A time window size that is not an interval is a bad setting (SP001).
DO $$
BEGIN
	PERFORM spool.create_processor('p', 'spool.window_alert(jsonb,spool.entries[])',
		'{"handler": {"key": "a", "value": "v", "window": {"type": "tumbling", "size": "soon"},
		  "threshold": 1, "target": "t"}}');
EXCEPTION WHEN OTHERS THEN
	RAISE NOTICE 'window.size "soon": %', SQLSTATE;
END
$$;
-- The full error for a bad setting, with its detail and hint.
SELECT spool.create_processor('p', 'spool.window_alert(jsonb,spool.entries[])',
	'{"handler": {"key": "a", "value": "v", "window": {"type": "count", "size": 5},
	  "threshold": 1, "target": "t", "colour": "red"}}');
RESET ROLE;
SELECT count(*) AS processors FROM spool.processors;

--
-- Valid processors.
--
SET ROLE regress_proc_admin;
-- Defaults: every source, 2 replicas, batches of 1000, a 5 s lease, a
-- snapshot every 10000 entries, from the earliest entry.
SELECT spool.create_processor('p1', 'proc_h(jsonb,spool.entries[])');
-- Every option given; lease_ttl in milliseconds; handler settings are kept
-- as they are for any handler; start at cursor 42.
SELECT spool.create_processor('p2', 'proc_h(jsonb,spool.entries[])',
	'{"sources": ["proc_src2", "proc_src1"], "replicas": 8, "batch_size": 100000,
	  "lease_ttl": 1500, "checkpoint_every": 1000000000, "start": 42,
	  "run_as": "regress_proc_runner", "handler": {"anything": [1, 2]}}');
-- lease_ttl as an interval (100 ms is the least), "sources": null means every
-- source, run_as may name the caller itself.
SELECT spool.create_processor('p3.x_y-z', 'proc_h(jsonb,spool.entries[])',
	'{"sources": null, "replicas": 1, "batch_size": 1, "lease_ttl": "100 ms",
	  "checkpoint_every": 1, "start": "earliest", "run_as": "regress_proc_admin"}');
-- A 48-byte name; "latest" when the spool is empty is cursor 0.
SELECT spool.create_processor(repeat('n', 48), 'proc_h(jsonb,spool.entries[])',
	'{"lease_ttl": "2.5 s", "start": "latest"}');
-- The built-in handler with its settings (checked, then stored as given).
SELECT spool.create_processor('alerts', 'spool.window_alert(jsonb,spool.entries[])',
	'{"sources": ["proc_src1"], "replicas": 3, "lease_ttl": "2 s",
	  "handler": {"key": "from", "value": "amount", "aggregate": "sum",
				  "window": {"type": "sliding", "size": "5 minutes"}, "time": "ts",
				  "threshold": 1000000, "op": ">", "target": "alerts"}}');
-- Names are unique: SP010, before or after other valid options.
SELECT try($$SELECT spool.create_processor('p1', 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.create_processor('p1', 'proc_h(jsonb,spool.entries[])', '{"replicas": 1, "start": 7}')$$);
RESET ROLE;
-- A superuser names the role the handler runs as.
SELECT spool.create_processor('p_su', 'proc_h(jsonb,spool.entries[])',
	'{"run_as": "regress_proc_runner", "lease_ttl": "1 min", "start": 5}');
-- spool.lease_max_ttl bounds lease_ttl.
SET spool.lease_max_ttl = '10 s';
SELECT try($$SELECT spool.create_processor('p_ttl', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "11 s"}')$$);
SELECT try($$SELECT spool.create_processor('p_ttl', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": 10001}')$$);
SELECT spool.create_processor('p_ttl', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "10 s"}');
RESET spool.lease_max_ttl;

-- The stored rows: normalized options with every default filled in; the
-- handler runs as run_as (the creator by default); all created stopped.
SELECT name, handler, run_as,
	   CASE WHEN owner = 10::oid::regrole THEN '(bootstrap superuser)' ELSE owner::text END AS owner,
	   enabled
  FROM spool.processors ORDER BY name COLLATE "C";
SELECT name, options FROM spool.processors ORDER BY name COLLATE "C";
-- A checkpoint row per processor at its start cursor ('earliest' is 0), no
-- token, no snapshot yet.
SELECT processor, token, committed_cursor, state, state_cursor, state_hash, outputs, batches
  FROM spool.processor_checkpoints ORDER BY processor COLLATE "C";
-- ... and a spool consumer 'processor:<name>' at the same cursor.
SELECT name, committed_cursor FROM spool.consumers
 WHERE name LIKE 'processor:%' ORDER BY name COLLATE "C";
-- Stopped processors: one row each, role 'stopped', no replica.
SELECT processor, replica, pid, role, cursor, committed_cursor, gate_token, snapshot_cursor
  FROM spool.processor_status ORDER BY processor COLLATE "C";

-- "latest" is the spool's last cursor when the processor is created (the
-- spool's next cursor is moved by hand, inside a transaction rolled back).
BEGIN;
UPDATE spool.spool_state SET next_cursor = 101;
SELECT spool.create_processor('p_latest', 'proc_h(jsonb,spool.entries[])',
	'{"run_as": "regress_proc_runner", "start": "latest"}');
SELECT options->'start' AS start FROM spool.processors WHERE name = 'p_latest';
SELECT committed_cursor, state_cursor FROM spool.processor_checkpoints WHERE processor = 'p_latest';
SELECT committed_cursor FROM spool.consumers WHERE name = 'processor:p_latest';
ROLLBACK;

--
-- start, stop, drop: SP001 for a bad name, SP004 for an unknown processor,
-- 42501 unless the caller owns it (or is a superuser).
--
SET ROLE regress_proc_admin;
SELECT try($$SELECT spool.start_processor(NULL)$$);
SELECT try($$SELECT spool.start_processor('')$$);
SELECT try($$SELECT spool.start_processor(repeat('n', 201))$$);
SELECT try($$SELECT spool.start_processor('nope')$$);
SELECT try($$SELECT spool.stop_processor(NULL)$$);
SELECT try($$SELECT spool.stop_processor('')$$);
SELECT try($$SELECT spool.stop_processor('nope')$$);
SELECT try($$SELECT spool.drop_processor(NULL)$$);
SELECT try($$SELECT spool.drop_processor('')$$);
SELECT try($$SELECT spool.drop_processor('nope')$$);
-- Names are exact.
SELECT try($$SELECT spool.start_processor('P1')$$);
SELECT try($$SELECT spool.start_processor(' p1')$$);
RESET ROLE;
-- Another admin may not touch p1.
SET ROLE regress_proc_admin2;
SELECT try($$SELECT spool.start_processor('p1')$$);
SELECT try($$SELECT spool.stop_processor('p1')$$);
SELECT try($$SELECT spool.drop_processor('p1')$$);
SELECT try($$SELECT spool.drop_processor('p_su')$$);
RESET ROLE;
-- Nor may roles without spool_admin, even spool_client (which may read the
-- processors).
SET ROLE regress_proc_client;
SELECT try($$SELECT spool.create_processor('p9', 'proc_h(jsonb,spool.entries[])')$$);
SELECT try($$SELECT spool.start_processor('p1')$$);
SELECT try($$SELECT spool.stop_processor('p1')$$);
SELECT try($$SELECT spool.drop_processor('p1')$$);
SELECT name, enabled FROM spool.processors WHERE name = 'p1';
RESET ROLE;
-- A role with no spool role cannot even see the schema.
SET ROLE regress_proc_plain;
SELECT try($$SELECT spool.create_processor('p9', 0)$$);
SELECT try($$SELECT spool.stop_processor('p1')$$);
RESET ROLE;
SELECT name, enabled FROM spool.processors ORDER BY name COLLATE "C";

-- The owner starts and stops p1 (start twice is harmless); 'enabled' follows.
SET ROLE regress_proc_admin;
SELECT spool.start_processor('p1');
SELECT spool.start_processor('p1');
SELECT name, enabled FROM spool.processors WHERE name = 'p1';
SELECT spool.stop_processor('p1');
SELECT name, enabled FROM spool.processors WHERE name = 'p1';
SELECT processor, role FROM spool.processor_status WHERE processor = 'p1' GROUP BY 1, 2;
-- Stopping a stopped processor is harmless.
SELECT spool.stop_processor('p1');
RESET ROLE;
-- A superuser may start and stop anyone's processor.
SELECT spool.start_processor('p2');
SELECT spool.stop_processor('p2');
SELECT name, enabled FROM spool.processors ORDER BY name COLLATE "C";
SELECT processor, role FROM spool.processor_status GROUP BY 1, 2 ORDER BY processor COLLATE "C";

-- Dropping removes the processor, its checkpoint and its consumer row; its
-- outbox rows stay.  Outbox rows need a target; two rows enqueued to it
-- stand for outputs of p1 and p2, marked (by hand, as a superuser) the way
-- a replica writes them: processor, cursor and token.
SELECT spool.create_target('alerts', 'notify', '{"channel": "regress_alerts"}');
SELECT spool.enqueue('alerts', 'k1', '{"n": 1}') AS out1 \gset
SELECT spool.enqueue('alerts', 'k2', '{"n": 2}') AS out2 \gset
UPDATE spool.outbox_store SET processor = 'p1', cursor = 3, token = 1 WHERE id = :out1;
UPDATE spool.outbox_store SET processor = 'p2', cursor = 4, token = 1 WHERE id = :out2;
SET ROLE regress_proc_admin;
SELECT spool.drop_processor('p1');
RESET ROLE;
SELECT name FROM spool.processors ORDER BY name COLLATE "C";
SELECT processor FROM spool.processor_checkpoints ORDER BY processor COLLATE "C";
SELECT name FROM spool.consumers WHERE name LIKE 'processor:%' ORDER BY name COLLATE "C";
SELECT target, key, payload, processor, cursor FROM spool.outbox ORDER BY id;
-- It is gone: start, stop and drop now fail with SP004.
SET ROLE regress_proc_admin;
SELECT try($$SELECT spool.start_processor('p1')$$);
SELECT try($$SELECT spool.stop_processor('p1')$$);
SELECT try($$SELECT spool.drop_processor('p1')$$);
RESET ROLE;
-- The name is free again.
SELECT spool.create_processor('p1', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "start": 9}');
SELECT name, run_as, options->'start' AS start FROM spool.processors WHERE name = 'p1';
SELECT committed_cursor FROM spool.consumers WHERE name = 'processor:p1';

-- Durations (docs/sql-reference.md#durations): lease_ttl takes an interval
-- with its unit, or a bare number (a JSON number or a string holding only
-- one) of milliseconds; it is stored in milliseconds.
BEGIN;
SELECT spool.create_processor('d1', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "1500ms"}');
SELECT spool.create_processor('d2', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "1 min"}');
SELECT spool.create_processor('d3', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "250"}');
SELECT name, options->'lease_ttl' AS lease_ttl FROM spool.processors WHERE name LIKE 'd_' ORDER BY name;
ROLLBACK;
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "2 parsecs"}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": 250.5}')$$);
SELECT try($$SELECT spool.create_processor('p', 'proc_h(jsonb,spool.entries[])', '{"run_as": "regress_proc_runner", "lease_ttl": "99"}')$$);

-- A superuser drops the rest, whoever owns them.
SELECT spool.drop_processor(name) FROM spool.processors ORDER BY name COLLATE "C";
SELECT (SELECT count(*) FROM spool.processors) AS processors,
	   (SELECT count(*) FROM spool.processor_checkpoints) AS checkpoints,
	   (SELECT count(*) FROM spool.consumers WHERE name LIKE 'processor:%') AS consumers,
	   (SELECT count(*) FROM spool.outbox_store) AS outbox_rows;

-- spool.standby_processors: off by default, a reload setting; it only acts on
-- a hot standby (test/t/029_standby_processors.pl).
SELECT setting, context, vartype FROM pg_settings WHERE name = 'spool.standby_processors';

-- Clean up (the target goes with its rows).
SELECT spool.drop_target('alerts', force => true);
SELECT spool.drop_source('proc_src1');
SELECT spool.drop_source('proc_src2');
DROP FUNCTION public.wa_check(jsonb);
DROP FUNCTION public.proc_h(jsonb, spool.entries[]);
DROP FUNCTION public.proc_h_private(jsonb, spool.entries[]);
DROP FUNCTION public.proc_bad_args(jsonb, jsonb);
DROP FUNCTION public.proc_bad_args2(text, spool.entries[]);
DROP FUNCTION public.proc_bad_nargs(jsonb);
DROP FUNCTION public.proc_bad_ret(jsonb, spool.entries[]);
DROP PROCEDURE public.proc_bad_proc(jsonb, spool.entries[]);
DROP FUNCTION public.proc_bad_srf(jsonb, spool.entries[]);
DROP ROLE regress_proc_admin, regress_proc_admin2, regress_proc_runner, regress_proc_client,
	regress_proc_plain;

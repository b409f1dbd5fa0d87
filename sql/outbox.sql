--
-- outbox: the SQL surface of the outbox (docs/outbox.md): create_target,
-- alter_target and drop_target with their option checks, enqueue and
-- enqueue_barrier, the views spool.outbox and spool.outbox_status, parked
-- rows, dead letters and redrive, and who may call what.  Bad arguments are rejected with their
-- SQLSTATE and change nothing.
--
-- The launcher runs in this database, so a committed target gets its
-- dispatcher workers at once and delivers in the background.  Nothing below
-- depends on when that happens: valid options are checked in transactions
-- that are rolled back (no workers), and where a delivery is checked,
-- ob_wait() polls for it, bounded, and only says whether it came.
--

-- Roles: an admin (member of spool_admin) and a role it belongs to that
-- sql targets run as; a second admin the first one does not belong to; a
-- client; a role with nothing.
CREATE ROLE regress_ob_admin NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_ob_admin2 NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_ob_runner NOLOGIN;
GRANT regress_ob_runner TO regress_ob_admin;
CREATE ROLE regress_ob_client NOLOGIN IN ROLE spool_client;
CREATE ROLE regress_ob_plain NOLOGIN;

-- What sql targets deliver into: one row per call, in call order (n), with
-- the role the function ran as.
CREATE TABLE public.ob_delivered (
	n			bigserial PRIMARY KEY,
	target		text NOT NULL,
	outbox_id	bigint,
	key			text,
	payload		jsonb,
	role		name NOT NULL
);
-- ob_flaky and ob_picky fail while their switch says so.
CREATE TABLE public.ob_switch (name text PRIMARY KEY, fail boolean NOT NULL);
INSERT INTO public.ob_switch VALUES ('flaky', true), ('picky', true);
GRANT SELECT, INSERT ON public.ob_delivered, public.ob_switch TO regress_ob_runner;
GRANT USAGE ON SEQUENCE public.ob_delivered_n_seq TO regress_ob_runner;

-- Delivery functions: fn(payload jsonb, key text, outbox_id bigint).
CREATE FUNCTION public.ob_deliver(payload jsonb, key text, outbox_id bigint) RETURNS void
	LANGUAGE sql AS $$
	INSERT INTO public.ob_delivered (target, outbox_id, key, payload, role)
	VALUES ('ob_sql', outbox_id, key, payload, current_user)
$$;
CREATE FUNCTION public.ob_flaky(payload jsonb, key text, outbox_id bigint) RETURNS void
	LANGUAGE plpgsql AS $$
BEGIN
	IF (SELECT fail FROM public.ob_switch WHERE name = 'flaky') THEN
		RAISE EXCEPTION 'ob_flaky refuses row %', payload->>'n';
	END IF;
	INSERT INTO public.ob_delivered (target, outbox_id, key, payload, role)
	VALUES ('ob_flaky', outbox_id, key, payload, current_user);
END $$;
-- ob_picky refuses only rows with "picky": true.
CREATE FUNCTION public.ob_picky(payload jsonb, key text, outbox_id bigint) RETURNS void
	LANGUAGE plpgsql AS $$
BEGIN
	IF (payload->>'picky')::boolean AND (SELECT fail FROM public.ob_switch WHERE name = 'picky') THEN
		RAISE EXCEPTION 'ob_picky refuses row %', payload->>'n';
	END IF;
	INSERT INTO public.ob_delivered (target, outbox_id, key, payload, role)
	VALUES ('ob_picky', outbox_id, key, payload, current_user);
END $$;
CREATE FUNCTION public.ob_always_fails(payload jsonb, key text, outbox_id bigint) RETURNS void
	LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'ob_always_fails refuses row %', payload->>'n';
END $$;
-- ... and functions that do not fit: wrong types, wrong order, too few or
-- too many arguments, STRICT, a procedure, one nobody but its owner may run.
CREATE FUNCTION public.ob_bad_types(payload text, key text, outbox_id bigint) RETURNS void
	LANGUAGE sql AS $$SELECT$$;
CREATE FUNCTION public.ob_bad_order(key text, payload jsonb, outbox_id bigint) RETURNS void
	LANGUAGE sql AS $$SELECT$$;
CREATE FUNCTION public.ob_bad_id(payload jsonb, key text, outbox_id int) RETURNS void
	LANGUAGE sql AS $$SELECT$$;
CREATE FUNCTION public.ob_bad_nargs(payload jsonb, key text) RETURNS void
	LANGUAGE sql AS $$SELECT$$;
CREATE FUNCTION public.ob_bad_nargs4(payload jsonb, key text, outbox_id bigint, extra int)
	RETURNS void LANGUAGE sql AS $$SELECT$$;
CREATE FUNCTION public.ob_strict(payload jsonb, key text, outbox_id bigint) RETURNS void
	LANGUAGE sql STRICT AS $$SELECT$$;
CREATE PROCEDURE public.ob_proc(payload jsonb, key text, outbox_id bigint)
	LANGUAGE sql AS $$SELECT 1$$;
CREATE FUNCTION public.ob_private(payload jsonb, key text, outbox_id bigint) RETURNS void
	LANGUAGE sql AS $$SELECT$$;
REVOKE EXECUTE ON FUNCTION public.ob_private(jsonb, text, bigint) FROM PUBLIC;

-- target_check(name, kind, options): create the target and undo it again
-- (a subtransaction rolled back: no dispatcher ever starts); 'ok' or
-- 'SQLSTATE: message'.
CREATE FUNCTION public.target_check(p_name text, p_kind text, p_options jsonb) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM spool.create_target(p_name, p_kind, p_options);
	RAISE EXCEPTION 'created' USING ERRCODE = 'ZZ000';
EXCEPTION
	WHEN SQLSTATE 'ZZ000' THEN
		RETURN 'ok';
	WHEN OTHERS THEN
		RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- ob_wait(query): poll a boolean query until it is true, at most 60 s;
-- whether it became true.  For asynchronous deliveries.
CREATE FUNCTION public.ob_wait(q text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
	done boolean;
	deadline timestamptz := clock_timestamp() + interval '60 s';
BEGIN
	LOOP
		EXECUTE q INTO done;
		IF done THEN
			RETURN true;
		END IF;
		IF clock_timestamp() > deadline THEN
			RETURN false;
		END IF;
		PERFORM pg_sleep(0.05);
	END LOOP;
END
$$;

--
-- create_target: bad arguments, as a member of spool_admin.  SP001 unless
-- said otherwise.
--
SET ROLE regress_ob_admin;
-- Names: NULL, empty, too long (48 bytes at most), characters outside
-- letters, digits, '_', '.' and '-'.
SELECT target_check(NULL, 'notify', '{"channel": "c"}');
SELECT target_check('', 'notify', '{"channel": "c"}');
SELECT target_check(repeat('n', 49), 'notify', '{"channel": "c"}');
SELECT target_check(repeat('n', 48), 'notify', '{"channel": "c"}');
SELECT target_check('bad name', 'notify', '{"channel": "c"}');
SELECT target_check('bad/name', 'notify', '{"channel": "c"}');
-- Kinds: sql, notify or kafka.
SELECT target_check('t', NULL, '{"channel": "c"}');
SELECT target_check('t', '', '{"channel": "c"}');
SELECT target_check('t', 'http', '{"channel": "c"}');
SELECT target_check('t', 'NOTIFY', '{"channel": "c"}');
-- Options: NULL, not an object, unknown keys, keys of another kind.
SELECT target_check('t', 'notify', NULL);
SELECT target_check('t', 'notify', '[]');
SELECT target_check('t', 'notify', '"x"');
SELECT target_check('t', 'notify', 'null');
SELECT target_check('t', 'notify', '{"channel": "c", "colour": "red"}');
SELECT target_check('t', 'notify', '{"channel": "c", "Shards": 2}');
SELECT target_check('t', 'notify', '{"channel": "c", "function": "public.ob_deliver"}');
SELECT target_check('t', 'notify', '{"channel": "c", "topic": "x"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "channel": "c"}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "x", "run_as": "regress_ob_runner"}');
-- shards: 1 to 16, an integer.
SELECT target_check('t', 'notify', '{"channel": "c", "shards": 0}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": 17}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": -1}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": 1.5}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": "2"}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": null}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": true}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": 1}');
SELECT target_check('t', 'notify', '{"channel": "c", "shards": 16}');
-- batch_size: 1 to 10000.
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": 0}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": 10001}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": -5}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": 2.5}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": "100"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": [100]}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": 1}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_size": 10000}');
-- retry_limit: 0 to 100.
SELECT target_check('t', 'notify', '{"channel": "c", "retry_limit": -1}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_limit": 101}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_limit": 0.5}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_limit": "3"}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_limit": 0}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_limit": 100}');
-- batch_interval: an interval from 0 to 1 minute.
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "-1 ms"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "61 s"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "1 day"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "1 mon"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "soon"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": ""}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": true}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": null}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "0"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "1 min"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "250 ms"}');
-- retry_backoff and retry_backoff_max: intervals.
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff": "-1 s"}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff": "soon"}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff": false}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff_max": "-1 s"}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff_max": "later"}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff_max": {}}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff": "1 s", "retry_backoff_max": "1 min"}');
-- Durations (docs/sql-reference.md#durations): an interval with its unit,
-- or a bare number (a JSON number or a string holding only one) of
-- milliseconds; stored as text with a unit.
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": "5 parsecs"}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": 60001}');
SELECT target_check('t', 'notify', '{"channel": "c", "batch_interval": 2.5}');
SELECT target_check('t', 'notify', '{"channel": "c", "retry_backoff": "0"}');
BEGIN;
SELECT spool.create_target('d1', 'notify',
	'{"channel": "c", "batch_interval": "250ms", "retry_backoff": 1500, "retry_backoff_max": "2h"}');
SELECT spool.create_target('d2', 'notify',
	'{"channel": "c", "batch_interval": "40", "retry_backoff": "1s", "retry_backoff_max": "PT90S"}');
SELECT name, options->'batch_interval' AS batch_interval, options->'retry_backoff' AS retry_backoff,
	   options->'retry_backoff_max' AS retry_backoff_max
  FROM spool.target_config WHERE name LIKE 'd_' ORDER BY name;
ROLLBACK;

--
-- Kind sql.
--
-- function: required, the schema-qualified name (schema.fn) of an existing
-- function fn(jsonb, text, bigint) that is not STRICT.
SELECT target_check('t', 'sql', '{}');
SELECT target_check('t', 'sql', '{"function": null}');
SELECT target_check('t', 'sql', '{"function": ""}');
SELECT target_check('t', 'sql', '{"function": 1}');
SELECT target_check('t', 'sql', '{"function": ["ob_deliver"]}');
-- Unqualified: the dispatcher resolves the name with no search_path of the caller.
SELECT target_check('t', 'sql', '{"function": "ob_deliver"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_nope"}');
SELECT target_check('t', 'sql', '{"function": "ob_nope_schema.ob_deliver"}');
SELECT split_part(target_check('t', 'sql', '{"function": "a.b.c.d"}'), ':', 1) AS sqlstate;
SELECT target_check('t', 'sql', '{"function": "public.ob_bad_types"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_bad_order"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_bad_id"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_bad_nargs"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_bad_nargs4"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_strict"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_proc"}');
-- The full error for a STRICT function, with its detail and hint.
SELECT spool.create_target('t', 'sql', '{"function": "public.ob_strict"}');
-- run_as: an existing role, one that may execute the function.
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": ""}');
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": 10}');
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": "regress_ob_nobody"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_private"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_private", "run_as": "regress_ob_runner"}');
-- A role the caller does not belong to.
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": "regress_ob_admin2"}');
-- Valid: run_as the caller (the default), or a role the caller belongs to.
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": "regress_ob_admin"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": "regress_ob_runner"}');
RESET ROLE;
-- A superuser must name the role a sql target runs as (naming a superuser
-- explicitly is allowed, as for processors).
SELECT replace(target_check('t', 'sql', '{"function": "public.ob_deliver"}'),
			   '"' || current_user || '"', '"<superuser>"') AS target_check;
SELECT split_part(target_check('t', 'sql', jsonb_build_object('function', 'public.ob_deliver', 'run_as', current_user)),
				  ':', 1) AS sqlstate;
-- ... and that role must be allowed to execute the function.
SELECT target_check('t', 'sql', '{"function": "public.ob_private", "run_as": "regress_ob_runner"}');
SELECT target_check('t', 'sql', '{"function": "public.ob_deliver", "run_as": "regress_ob_runner"}');
-- Kinds without a function need no run_as.
SELECT target_check('t', 'notify', '{"channel": "c"}');

--
-- Kind notify: channel required, 1 to 63 bytes.
--
SET ROLE regress_ob_admin;
SELECT target_check('t', 'notify', '{}');
SELECT target_check('t', 'notify', '{"channel": null}');
SELECT target_check('t', 'notify', '{"channel": ""}');
SELECT target_check('t', 'notify', '{"channel": 5}');
SELECT target_check('t', 'notify', jsonb_build_object('channel', repeat('c', 64)));
SELECT target_check('t', 'notify', jsonb_build_object('channel', repeat('c', 63)));
-- 63 bytes of two-byte characters is too long at 32 characters.
SELECT target_check('t', 'notify', jsonb_build_object('channel', repeat('é', 32)));
SELECT target_check('t', 'notify', jsonb_build_object('channel', repeat('é', 31)));

--
-- Kind kafka: brokers and topic required; kafka holds librdkafka producer
-- properties, checked now; enable.idempotence cannot be turned off.
--
SELECT target_check('t', 'kafka', '{}');
SELECT target_check('t', 'kafka', '{"topic": "out"}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1"}');
SELECT target_check('t', 'kafka', '{"brokers": "", "topic": "out"}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": ""}');
SELECT target_check('t', 'kafka', '{"brokers": 9092, "topic": "out"}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": ["out"]}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": "linger.ms=5"}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"no.such.property": "1"}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"linger.ms": "soon"}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"linger.ms": -1}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"acks": "some"}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"linger.ms": [5]}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"enable.idempotence": "false"}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"enable.idempotence": false}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"linger.ms": 5}}');
SELECT target_check('t', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "out", "kafka": {"linger.ms": "5", "acks": "all", "enable.idempotence": "true"}}');
RESET ROLE;

-- Nothing was stored by any of the calls above.
SELECT count(*) AS targets FROM spool.targets;

--
-- Valid targets of every kind, in a transaction rolled back: the stored
-- options have every default filled in; owner and run_as.
--
BEGIN;
SET ROLE regress_ob_admin;
SELECT spool.create_target('v_sql', 'sql', '{"function": "public.ob_deliver"}');
SELECT spool.create_target('v_sql_all', 'sql',
	'{"function": "public.ob_deliver", "run_as": "regress_ob_runner", "shards": 16,
	  "batch_size": 10000, "batch_interval": "1 min", "retry_limit": 0,
	  "retry_backoff": "1 s", "retry_backoff_max": "1 h"}');
SELECT spool.create_target('v_notify', 'notify', '{"channel": "ob_channel"}');
SELECT spool.create_target('v_kafka', 'kafka',
	'{"brokers": "127.0.0.1:1", "topic": "orders.out", "kafka": {"linger.ms": 5}}');
SELECT spool.create_target(repeat('n', 48), 'notify',
	'{"channel": "c", "shards": 2, "batch_size": 1, "batch_interval": "0", "retry_limit": 100}');
-- Names are unique (SP010), whatever the kind.
SELECT try($$SELECT spool.create_target('v_sql', 'sql', '{"function": "public.ob_deliver"}')$$);
SELECT try($$SELECT spool.create_target('v_sql', 'notify', '{"channel": "c"}')$$);
SELECT try($$SELECT spool.create_target('v_kafka', 'notify', '{"channel": "c"}')$$);
-- alter_target: options merged over the stored ones (a null resets one to
-- its default) and checked as at create; the shard count stays.
SELECT spool.alter_target('v_sql_all', '{"batch_size": 500, "retry_limit": null, "shards": 16}');
SELECT spool.alter_target('v_notify', '{"channel": "ob_channel2", "batch_interval": "1 s"}');
SELECT spool.alter_target('v_kafka', '{"topic": "orders.out2", "kafka": null}');
SELECT try($$SELECT spool.alter_target('v_sql_all', '{"shards": 4}')$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', '{"batch_size": 0}')$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', '{"channel": "c"}')$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', '{"function": "public.ob_strict"}')$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', '{"function": null}')$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', '{"run_as": "regress_ob_admin2"}')$$);
SELECT try($$SELECT spool.alter_target('v_kafka', '{"kafka": {"enable.idempotence": false}}')$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', NULL)$$);
SELECT try($$SELECT spool.alter_target('v_sql_all', '[1]')$$);
SELECT try($$SELECT spool.alter_target('no_such', '{}')$$);
SELECT try($$SELECT spool.alter_target(NULL, '{}')$$);
-- Only members of the owner may alter it; a client may not call it at all.
SET ROLE regress_ob_admin2;
SELECT try($$SELECT spool.alter_target('v_sql', '{"batch_size": 1}')$$);
SET ROLE regress_ob_client;
SELECT try($$SELECT spool.alter_target('v_sql', '{"batch_size": 1}')$$);
RESET ROLE;
SELECT name, kind, owner FROM spool.targets
 WHERE name LIKE 'v\_%' OR name LIKE 'nnn%' ORDER BY name COLLATE "C";
SELECT name, options FROM spool.targets
 WHERE name LIKE 'v\_%' OR name LIKE 'nnn%' ORDER BY name COLLATE "C";
-- One status row per target and shard.
SELECT target, count(*) AS shards, min(shard), max(shard)
  FROM spool.outbox_status WHERE target LIKE 'v\_%' OR target LIKE 'nnn%'
 GROUP BY target ORDER BY target COLLATE "C";
ROLLBACK;
SELECT count(*) AS targets FROM spool.targets;

--
-- The targets used below (committed: they deliver in the background).
--
SET ROLE regress_ob_admin;
SELECT spool.create_target('ob_events', 'notify', '{"channel": "ob_events"}');
SELECT spool.create_target('ob_sharded', 'notify', '{"channel": "ob_sharded", "shards": 4}');
SELECT spool.create_target('ob_sql', 'sql', '{"function": "public.ob_deliver", "run_as": "regress_ob_runner"}');
SELECT try($$SELECT spool.create_target('ob_sql', 'sql', '{"function": "public.ob_deliver"}')$$);
-- Writing into a target needs its owner's grant (spool.grant_target).
SELECT spool.grant_target('ob_events', 'regress_ob_client');
SELECT spool.grant_target('ob_events', 'regress_ob_client');
SELECT name, writers FROM spool.target_config WHERE name LIKE 'ob\_%' ORDER BY name COLLATE "C";
RESET ROLE;

--
-- enqueue and enqueue_barrier: bad arguments.  An unknown target is SP004;
-- the payload must not be NULL (SP001); the key may be NULL.
--
SET ROLE regress_ob_client;
SELECT try($$SELECT spool.enqueue('ob_nope', 'k', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue('OB_EVENTS', 'k', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue('', 'k', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue(NULL, 'k', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue('ob_events', 'k', NULL)$$);
SELECT try($$SELECT spool.enqueue_barrier('ob_nope')$$);
SELECT try($$SELECT spool.enqueue_barrier('')$$);
SELECT try($$SELECT spool.enqueue_barrier(NULL)$$);
RESET ROLE;
SELECT count(*) AS rows FROM spool.outbox WHERE target LIKE 'ob\_%';

-- The columns of spool.outbox.
SELECT id, target, shard, key, payload, barrier, processor, cursor, token, created_at, delivered
  FROM spool.outbox LIMIT 0;

-- enqueue returns the new row's id; ids increase, within a transaction and
-- from one transaction to the next; the row is in spool.outbox as given.
SET ROLE regress_ob_client;
BEGIN;
SELECT spool.enqueue('ob_events', 'account:42', '{"op": "debit", "amount": 10}') AS id1 \gset
SELECT spool.enqueue('ob_events', NULL, '{"op": "audit"}') AS id2 \gset
COMMIT;
SELECT spool.enqueue('ob_events', 'account:42', '{"op": "credit", "amount": 5}') AS id3 \gset
RESET ROLE;
SELECT :id1 < :id2 AND :id2 < :id3 AS ids_increase;
SELECT id = :id1 AS is_id1, target, shard, key, payload, barrier, processor, cursor, token,
	   created_at IS NOT NULL AS has_created_at
  FROM spool.outbox WHERE id IN (:id1, :id2, :id3) ORDER BY id;

-- A rolled-back enqueue leaves no row (its id is not reused).
BEGIN;
SELECT spool.enqueue('ob_events', 'rolled-back', '{"n": 0}') AS id_rb \gset
SELECT count(*) AS rows_inside FROM spool.outbox WHERE id = :id_rb;
ROLLBACK;
SELECT count(*) AS rows_after FROM spool.outbox WHERE id = :id_rb OR key = 'rolled-back';
-- ... and so does one rolled back to a savepoint.
BEGIN;
SAVEPOINT s;
SELECT spool.enqueue('ob_events', 'rolled-back', '{"n": 0}') AS id_sp \gset
ROLLBACK TO SAVEPOINT s;
SELECT spool.enqueue('ob_events', 'kept', '{"n": 1}') AS id_kept \gset
COMMIT;
SELECT key, payload FROM spool.outbox WHERE id IN (:id_sp, :id_kept) ORDER BY id;
SELECT :id_kept > :id_sp AS ids_increase;

-- A transaction that enqueued cannot be prepared (two-phase commit).
-- (This instance may also have max_prepared_transactions = 0; the outbox's
-- refusal comes first, like NOTIFY's would with prepared transactions on.)
BEGIN;
SELECT spool.enqueue('ob_events', 'prepared', '{"n": 0}') AS id_prep \gset
PREPARE TRANSACTION 'regress_ob_prepare';
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
SELECT count(*) AS rows FROM spool.outbox WHERE id = :id_prep OR key = 'prepared';
SELECT count(*) AS prepared FROM pg_prepared_xacts WHERE gid = 'regress_ob_prepare';

-- Shards: each row's shard is in [0, shards); a key always maps to the same
-- shard (all NULL keys form one key); 10 keys spread over more than one shard.
WITH e AS (
	SELECT i, spool.enqueue('ob_sharded', CASE WHEN i % 11 = 0 THEN NULL ELSE 'k' || (i % 10) END,
							jsonb_build_object('i', i)) AS id
	  FROM generate_series(1, 60) i
)
SELECT count(*) AS enqueued, count(*) FILTER (WHERE id <= prev) AS not_increasing
  FROM (SELECT id, lag(id) OVER (ORDER BY i) AS prev FROM e) x;
SELECT count(*) AS rows,
	   count(*) FILTER (WHERE shard < 0 OR shard >= 4 OR shard IS NULL) AS out_of_range,
	   count(DISTINCT shard) > 1 AS spread,
	   (SELECT count(*) FROM (SELECT key FROM spool.outbox WHERE target = 'ob_sharded'
							  GROUP BY key HAVING count(DISTINCT shard) > 1) k) AS keys_on_two_shards,
	   count(*) FILTER (WHERE key IS NULL) AS null_keys
  FROM spool.outbox WHERE target = 'ob_sharded';
-- enqueue_barrier returns the barrier's id: a row with barrier = true, after
-- every row enqueued before it.
SELECT spool.enqueue_barrier('ob_sharded') AS bar_id \gset
SELECT target, key, barrier, processor, id > (SELECT max(id) FROM spool.outbox
											   WHERE target = 'ob_sharded' AND NOT barrier) AS after_rows
  FROM spool.outbox WHERE id = :bar_id;
SELECT count(*) FILTER (WHERE barrier) AS barriers, count(*) FILTER (WHERE NOT barrier) AS rows
  FROM spool.outbox WHERE target = 'ob_sharded';

--
-- Delivery (asynchronous, so only whether it came, within 60 s).
--
-- notify: every row of ob_events and ob_sharded (the barrier too) is
-- delivered.
SELECT ob_wait($$SELECT bool_and(delivered) AND count(*) = 65
				   FROM spool.outbox WHERE target IN ('ob_events', 'ob_sharded')$$) AS notify_delivered;
SELECT target, count(*) AS rows, bool_and(delivered) AS delivered
  FROM spool.outbox WHERE target IN ('ob_events', 'ob_sharded') GROUP BY target ORDER BY target;
-- sql: fn(payload, key, id) as run_as, a barrier as fn('{"barrier": true}',
-- NULL, id); per key in id order; the barrier after every earlier row and
-- before every later one.
BEGIN;
SELECT spool.enqueue('ob_sql', 'k1', '{"n": 1}') AS s1 \gset
SELECT spool.enqueue('ob_sql', 'k2', '{"n": 2}') AS s2 \gset
SELECT spool.enqueue('ob_sql', NULL, '{"n": 3}') AS s3 \gset
SELECT spool.enqueue_barrier('ob_sql') AS sb \gset
SELECT spool.enqueue('ob_sql', 'k1', '{"n": 4}') AS s4 \gset
COMMIT;
SELECT ob_wait($$SELECT count(*) = 5 FROM public.ob_delivered WHERE target = 'ob_sql'$$) AS sql_delivered;
SELECT outbox_id = CASE p WHEN '1' THEN :s1 WHEN '2' THEN :s2 WHEN '3' THEN :s3 WHEN '4' THEN :s4
						   ELSE :sb END AS id_matches,
	   key, payload, role
  FROM public.ob_delivered, LATERAL (SELECT coalesce(payload->>'n', 'barrier') AS p) x
 WHERE target = 'ob_sql' ORDER BY outbox_id;
-- Delivery order: the barrier after rows 1-3 and before row 4.
SELECT (SELECT n FROM public.ob_delivered WHERE outbox_id = :sb) >
	   (SELECT max(n) FROM public.ob_delivered WHERE outbox_id IN (:s1, :s2, :s3)) AS barrier_after_earlier,
	   (SELECT n FROM public.ob_delivered WHERE outbox_id = :sb) <
	   (SELECT n FROM public.ob_delivered WHERE outbox_id = :s4) AS barrier_before_later;
-- The marks commit with the calls: every row is delivered, nothing is left.
SELECT count(*) AS rows, bool_and(delivered) AS delivered FROM spool.outbox WHERE target = 'ob_sql';
SELECT ob_wait($$SELECT barriers = 1 AND flushes_barrier >= 1 FROM spool.outbox_status
				  WHERE target = 'ob_sql'$$) AS barrier_counted;
SELECT target, shard, position >= :s4 AS position_past_last, backlog, waiting, blocked_keys,
	   barriers, flushes_barrier > 0 AS flushed_for_barrier, dead_letters
  FROM spool.outbox_status WHERE target = 'ob_sql';

--
-- Failures: parked rows, retries, dead letters, redrive.
--
SET ROLE regress_ob_admin;
-- ob_stuck's function always fails, and it retries only after an hour.
SELECT spool.create_target('ob_stuck', 'sql',
	'{"function": "public.ob_always_fails", "run_as": "regress_ob_runner", "retry_limit": 100,
	  "retry_backoff": "1 h", "retry_backoff_max": "1 h"}');
-- ob_picky's function fails for some rows only; it retries soon.
SELECT spool.create_target('ob_picky', 'sql',
	'{"function": "public.ob_picky", "run_as": "regress_ob_runner", "retry_limit": 100,
	  "retry_backoff": "10 ms", "retry_backoff_max": "100 ms"}');
-- ob_flaky's function fails while ob_switch says so; two retries, then
-- dead letters.
SELECT spool.create_target('ob_flaky', 'sql',
	'{"function": "public.ob_flaky", "run_as": "regress_ob_runner", "retry_limit": 2,
	  "retry_backoff": "10 ms", "retry_backoff_max": "20 ms"}');
RESET ROLE;
BEGIN;
SELECT spool.enqueue('ob_stuck', 'a', '{"n": 1}') > 0 AS enqueued;
SELECT spool.enqueue('ob_stuck', 'a', '{"n": 2}') > 0 AS enqueued;
SELECT spool.enqueue('ob_stuck', 'b', '{"n": 3}') > 0 AS enqueued;
COMMIT;
-- a/1 and b/3 fail and are parked; a/2 waits behind a/1 without an attempt.
SELECT ob_wait($$SELECT count(*) = 3 AND count(*) FILTER (WHERE attempts >= 1) >= 2
				   FROM spool.outbox_retry WHERE target = 'ob_stuck'$$) AS parked;
SELECT key, payload, attempts
  FROM spool.outbox_retry WHERE target = 'ob_stuck' ORDER BY id;
SELECT ob_wait($$SELECT waiting = 3 AND blocked_keys = 2 FROM spool.outbox_status
				  WHERE target = 'ob_stuck'$$) AS status_shows_parked;
SELECT target, shard, waiting, blocked_keys, dead_letters,
	   last_error LIKE '%ob_always_fails refuses row%' AS shows_row_error
  FROM spool.outbox_status WHERE target = 'ob_stuck';
-- None of them is delivered.
SELECT count(*) AS rows, count(*) FILTER (WHERE delivered) AS delivered
  FROM spool.outbox WHERE target = 'ob_stuck';


-- ob_picky: p/1 fails, so p/2 waits behind it without being tried; q/3, of
-- another key, is delivered.
BEGIN;
SELECT spool.enqueue('ob_picky', 'p', '{"n": 1, "picky": true}') AS p1 \gset
SELECT spool.enqueue('ob_picky', 'p', '{"n": 2}') AS p2 \gset
SELECT spool.enqueue('ob_picky', 'q', '{"n": 3}') AS p3 \gset
COMMIT;
SELECT ob_wait($$SELECT EXISTS (SELECT FROM public.ob_delivered WHERE target = 'ob_picky' AND key = 'q')
				   AND EXISTS (SELECT FROM spool.outbox_retry WHERE target = 'ob_picky' AND attempts >= 2)$$)
	AS picky_parked;
SELECT key, payload FROM public.ob_delivered WHERE target = 'ob_picky' ORDER BY n;
SELECT key, payload, attempts > 0 AS attempted
  FROM spool.outbox_retry WHERE target = 'ob_picky' ORDER BY id;
-- Once p/1 goes through, p/2 follows: each row once, per key in id order.
UPDATE public.ob_switch SET fail = false WHERE name = 'picky';
SELECT ob_wait($$SELECT NOT EXISTS (SELECT FROM spool.outbox_retry WHERE target = 'ob_picky')
				   AND (SELECT bool_and(delivered) FROM spool.outbox WHERE target = 'ob_picky')$$)
	AS picky_delivered;
SELECT outbox_id = CASE payload->>'n' WHEN '1' THEN :p1 WHEN '2' THEN :p2 ELSE :p3 END AS id_matches,
	   key, payload
  FROM public.ob_delivered WHERE target = 'ob_picky' ORDER BY n;

-- ob_flaky: every row fails and goes to dead letters once its retry_limit
-- (2) retries have failed too, one key after the other.
BEGIN;
SELECT spool.enqueue('ob_flaky', 'x', '{"n": 1}') AS f1 \gset
SELECT spool.enqueue('ob_flaky', 'x', '{"n": 2}') AS f2 \gset
SELECT spool.enqueue('ob_flaky', 'y', '{"n": 3}') AS f3 \gset
COMMIT;
SELECT ob_wait($$SELECT count(*) = 3 FROM spool.outbox_dead WHERE target = 'ob_flaky'$$) AS dead;
SELECT id = CASE payload->>'n' WHEN '1' THEN :f1 WHEN '2' THEN :f2 ELSE :f3 END AS id_kept,
	   target, key, payload, attempts, last_error LIKE '%ob_flaky refuses row%' AS error_kept
  FROM spool.outbox_dead WHERE target = 'ob_flaky' ORDER BY id;
SELECT count(*) AS parked FROM spool.outbox_retry WHERE target = 'ob_flaky';
SELECT ob_wait($$SELECT dead_letters = 3 FROM spool.outbox_status WHERE target = 'ob_flaky'$$)
	AS status_dead_letters;

-- redrive: an unknown id, a delivered row, a parked row are errors.
SELECT try($$SELECT spool.redrive(-1)$$) LIKE '%: %' AS unknown_id_refused;
SELECT try(format('SELECT spool.redrive(%s)', :s1)) LIKE '%: %' AS delivered_row_refused;
SELECT try(format('SELECT spool.redrive(%s)', (SELECT min(id) FROM spool.outbox_retry
												WHERE target = 'ob_stuck'))) LIKE '%: %' AS parked_row_refused;
-- The full error for a negative id.
SELECT spool.redrive(-1);
-- Mend the function and put the dead rows back: they are delivered, with
-- their outbox ids, and leave the dead letters.
UPDATE public.ob_switch SET fail = false WHERE name = 'flaky';
SET ROLE regress_ob_admin;
SELECT spool.redrive(:f1);
SELECT spool.redrive(:f2);
SELECT spool.redrive(:f3);
-- A row is redriven once.
SELECT try(format('SELECT spool.redrive(%s)', :f1)) LIKE '%: %' AS redriven_twice_refused;
RESET ROLE;
SELECT ob_wait($$SELECT count(*) = 3 FROM public.ob_delivered WHERE target = 'ob_flaky'$$) AS redriven_delivered;
SELECT outbox_id = CASE payload->>'n' WHEN '1' THEN :f1 WHEN '2' THEN :f2 ELSE :f3 END AS id_kept,
	   key, payload, role
  FROM public.ob_delivered WHERE target = 'ob_flaky' ORDER BY outbox_id;
-- Per key in id order: x/1 before x/2.
SELECT (SELECT n FROM public.ob_delivered WHERE outbox_id = :f1)
	   < (SELECT n FROM public.ob_delivered WHERE outbox_id = :f2) AS key_order_kept;
SELECT (SELECT count(*) FROM spool.outbox_dead WHERE target = 'ob_flaky') AS dead,
	   (SELECT count(*) FROM spool.outbox_retry WHERE target = 'ob_flaky') AS parked,
	   (SELECT bool_and(delivered) FROM spool.outbox WHERE target = 'ob_flaky') AS delivered;

--
-- spool.outbox_status: one row per target and shard, its columns.
--
SELECT target, shard, kind FROM spool.outbox_status ORDER BY target COLLATE "C", shard;
SELECT target, shard, state, position, backlog, waiting, blocked_keys, oldest_undelivered_age,
	   delivered, flushes_size, flushes_interval, flushes_barrier, flushes_close,
	   batch_p50_le, batch_p99_le, batch_max, flush_ms_p50_le, flush_ms_p99_le, flush_ms_max,
	   barriers, barrier_drain_ms_last, barrier_drain_ms_p50_le, barrier_drain_ms_max,
	   retries, dead_letters, last_error, last_error_at
  FROM spool.outbox_status LIMIT 0;
SELECT count(*) FILTER (WHERE state NOT IN ('idle', 'delivering', 'barrier', 'retrying', 'error', 'stopped'))
	   AS unknown_states
  FROM spool.outbox_status;
-- The dispatchers report what they delivered (rows since the server
-- started; barriers are counted in barriers).
SELECT ob_wait($$SELECT sum(delivered) = 64 AND sum(barriers) = 1 FROM spool.outbox_status
				  WHERE target IN ('ob_events', 'ob_sharded')$$) AS notify_counted;
SELECT ob_wait($$SELECT delivered = 4 AND barriers = 1 FROM spool.outbox_status
				  WHERE target = 'ob_sql'$$) AS sql_counted;

-- spool.metrics() exports the same figures, with histograms: per series
-- (ob_sql's here), cumulative buckets ending at le="+Inf", which equals
-- <name>_count.
WITH lines AS (SELECT l FROM regexp_split_to_table(spool.metrics(), E'\n') l),
	 hist AS (SELECT substring(l FROM '^# TYPE ([a-z_]+) histogram$') AS name
				FROM lines WHERE l ~ '^# TYPE [a-z_]+ histogram$'),
	 bucket AS (SELECT h.name, replace(trim(BOTH ',' FROM regexp_replace(m[1], 'le="[^"]*"', '')), ',,', ',') AS series,
					   substring(m[1] FROM 'le="([^"]*)"') AS le, m[2]::float8 AS v
				  FROM hist h, lines,
					   LATERAL regexp_match(l, '^' || h.name || '_bucket\{(.*)\} (\S+)$') m
				 WHERE m IS NOT NULL AND l LIKE '%target="ob\_sql"%'),
	 count_ AS (SELECT h.name, m[1] AS series, m[2]::float8 AS v
				  FROM hist h, lines,
					   LATERAL regexp_match(l, '^' || h.name || '_count\{(.*)\} (\S+)$') m
				 WHERE m IS NOT NULL AND l LIKE '%target="ob\_sql"%'),
	 ordered AS (SELECT *, lag(v) OVER (PARTITION BY name, series
										ORDER BY CASE le WHEN '+Inf' THEN 'Infinity' ELSE le END::float8) AS prev
				   FROM bucket)
SELECT count(DISTINCT name) > 0 AS has_histograms,
	   count(*) FILTER (WHERE v < prev) AS decreasing_buckets,
	   (SELECT count(*) FROM (SELECT name, series FROM bucket GROUP BY 1, 2
							  HAVING count(*) FILTER (WHERE le = '+Inf') <> 1) x) AS series_without_inf,
	   (SELECT count(*) FROM bucket b JOIN count_ c USING (name, series)
		 WHERE b.le = '+Inf' AND b.v <> c.v) AS inf_not_count
  FROM ordered;

--
-- Privileges.
--
-- A client may enqueue to the targets it was granted, and not manage targets.
SET ROLE regress_ob_client;
SELECT try($$SELECT spool.enqueue('ob_events', 'client', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue_barrier('ob_events')$$);
SELECT try($$SELECT spool.enqueue('ob_sql', 'client', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue_barrier('ob_sql')$$);
SELECT try($$SELECT spool.create_target('ob_client', 'notify', '{"channel": "c"}')$$);
SELECT try($$SELECT spool.drop_target('ob_events')$$);
SELECT try($$SELECT spool.drop_target('ob_events', force => true)$$);
SELECT try($$SELECT spool.grant_target('ob_sql', 'regress_ob_client')$$);
SELECT try(format('SELECT spool.redrive(%s)', :f1));
SELECT count(*) AS client_rows FROM spool.outbox WHERE key = 'client';
RESET ROLE;
-- Another admin may not grant, revoke or alter the first admin's targets
-- (and so cannot write into them either).
SET ROLE regress_ob_admin2;
SELECT try($$SELECT spool.enqueue('ob_events', 'admin2', '{"n": 1}')$$);
SELECT try($$SELECT spool.grant_target('ob_events', 'regress_ob_admin2')$$);
SELECT try($$SELECT spool.revoke_target('ob_events', 'regress_ob_client')$$);
SELECT try($$SELECT spool.alter_target('ob_events', '{"batch_size": 7}')$$);
RESET ROLE;
-- grant_target and revoke_target: bad arguments, then a revoke that takes.
SET ROLE regress_ob_admin;
SELECT try($$SELECT spool.grant_target('ob_nope', 'regress_ob_client')$$);
SELECT try($$SELECT spool.grant_target('ob_events', 'regress_no_such_role')$$);
SELECT try($$SELECT spool.grant_target(NULL, 'regress_ob_client')$$);
SELECT try($$SELECT spool.grant_target('ob_events', NULL)$$);
SELECT spool.revoke_target('ob_events', 'regress_ob_client');
SELECT spool.revoke_target('ob_events', 'regress_ob_client');
RESET ROLE;
SET ROLE regress_ob_client;
SELECT try($$SELECT spool.enqueue('ob_events', 'client', '{"n": 2}')$$);
RESET ROLE;
SELECT count(*) AS client_rows FROM spool.outbox WHERE key = 'client';
-- A role with no spool role can do nothing.
SET ROLE regress_ob_plain;
SELECT try($$SELECT spool.enqueue('ob_events', 'plain', '{"n": 1}')$$);
SELECT try($$SELECT spool.enqueue_barrier('ob_events')$$);
SELECT try($$SELECT spool.create_target('ob_plain', 'notify', '{"channel": "c"}')$$);
SELECT try($$SELECT spool.drop_target('ob_events')$$);
SELECT try($$SELECT count(*) FROM spool.outbox$$);
RESET ROLE;
SELECT count(*) AS plain_rows FROM spool.outbox WHERE key = 'plain';
SELECT count(*) AS targets FROM spool.targets WHERE name IN ('ob_client', 'ob_plain');

--
-- drop_target: SP001 for a bad name, SP004 for an unknown target; refused
-- while rows are undelivered (ob_stuck's are parked), unless forced.
--
SET ROLE regress_ob_admin;
SELECT try($$SELECT spool.drop_target(NULL)$$);
SELECT try($$SELECT spool.drop_target('')$$);
SELECT try($$SELECT spool.drop_target('ob_nope')$$);
SELECT try($$SELECT spool.drop_target('ob_nope', force => true)$$);
SELECT try($$SELECT spool.drop_target('ob_stuck')$$);
SELECT try($$SELECT spool.drop_target('ob_stuck', force => false)$$);
SELECT count(*) AS status_rows FROM spool.outbox_status WHERE target = 'ob_stuck';
-- An undelivered row in the caller's own transaction counts too.
BEGIN;
SELECT spool.create_target('ob_tx', 'notify', '{"channel": "ob_tx"}');
SELECT spool.enqueue('ob_tx', 'k', '{"n": 1}') > 0 AS enqueued;
SELECT try($$SELECT spool.drop_target('ob_tx')$$);
SELECT spool.drop_target('ob_tx', force => true);
COMMIT;
SELECT spool.drop_target('ob_stuck', force => true);
RESET ROLE;
-- Its rows, parked rows and status went with it; the name is free again.
SELECT (SELECT count(*) FROM spool.outbox WHERE target IN ('ob_stuck', 'ob_tx')) AS rows,
	   (SELECT count(*) FROM spool.outbox_retry WHERE target IN ('ob_stuck', 'ob_tx')) AS parked,
	   (SELECT count(*) FROM spool.outbox_dead WHERE target IN ('ob_stuck', 'ob_tx')) AS dead,
	   (SELECT count(*) FROM spool.outbox_status WHERE target IN ('ob_stuck', 'ob_tx')) AS status_rows;
SELECT try($$SELECT spool.enqueue('ob_stuck', 'a', '{"n": 4}')$$);
SELECT target_check('ob_stuck', 'notify', '{"channel": "c"}');
-- Delivered rows do not hold a drop back.
SELECT spool.drop_target('ob_sql');
SELECT spool.drop_target('ob_flaky');
SELECT spool.drop_target('ob_picky');

-- Clean up.
SELECT spool.drop_target(name, force => true) FROM spool.targets
 WHERE name LIKE 'ob\_%' ORDER BY name COLLATE "C";
SELECT (SELECT count(*) FROM spool.targets WHERE name LIKE 'ob\_%') AS targets,
	   (SELECT count(*) FROM spool.outbox WHERE target LIKE 'ob\_%') AS rows,
	   (SELECT count(*) FROM spool.outbox_status WHERE target LIKE 'ob\_%') AS status_rows;
DROP FUNCTION public.target_check(text, text, jsonb);
DROP FUNCTION public.ob_wait(text);
DROP FUNCTION public.ob_deliver(jsonb, text, bigint);
DROP FUNCTION public.ob_flaky(jsonb, text, bigint);
DROP FUNCTION public.ob_picky(jsonb, text, bigint);
DROP FUNCTION public.ob_always_fails(jsonb, text, bigint);
DROP FUNCTION public.ob_bad_types(text, text, bigint);
DROP FUNCTION public.ob_bad_order(text, jsonb, bigint);
DROP FUNCTION public.ob_bad_id(jsonb, text, int);
DROP FUNCTION public.ob_bad_nargs(jsonb, text);
DROP FUNCTION public.ob_bad_nargs4(jsonb, text, bigint, int);
DROP FUNCTION public.ob_strict(jsonb, text, bigint);
DROP PROCEDURE public.ob_proc(jsonb, text, bigint);
DROP FUNCTION public.ob_private(jsonb, text, bigint);
DROP TABLE public.ob_delivered, public.ob_switch;
DROP ROLE regress_ob_admin, regress_ob_admin2, regress_ob_runner, regress_ob_client,
	regress_ob_plain;

-- The dispatcher settings: reload-time, with bounds.
SHOW spool.outbox_close_timeout;
SET spool.outbox_close_timeout = '1s';
ALTER SYSTEM SET spool.outbox_close_timeout = -1;
ALTER SYSTEM SET spool.outbox_poll_interval = 0;

--
-- sources: the Kafka source SQL surface without a broker.  Bad arguments are
-- rejected before anything is stored or any connection is tried; valid
-- sources are created (the broker probe only warns when nobody answers).
--

-- SP001 for bad arguments; nothing is stored.
SELECT try($$SELECT spool.create_source(NULL, '127.0.0.1:1', '{t}')$$);
SELECT try($$SELECT spool.create_source('', '127.0.0.1:1', '{t}')$$);
SELECT try($$SELECT spool.create_source('bad name', '127.0.0.1:1', '{t}')$$);
SELECT try($$SELECT spool.create_source(repeat('n', 49), '127.0.0.1:1', '{t}')$$);
SELECT try($$SELECT spool.create_source('s1', NULL, '{t}')$$);
SELECT try($$SELECT spool.create_source('s1', '', '{t}')$$);
SELECT try($$SELECT spool.create_source('s1', 'no-port', '{t}')$$);
SELECT try($$SELECT spool.create_source('s1', 'host:99999', '{t}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', NULL)$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{NULL}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{"a b"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t,t}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', NULL)$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '[]')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"colour": "red"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"format": "xml"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"format": 1}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"start": "middle"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"batch_size": 0}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"batch_ms": "fast"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"max_message_bytes": -1}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"on_gap": "ignore"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"group_id": ""}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"kafka": "x"}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"kafka": {"no.such.property": "1"}}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"kafka": {"enable.auto.commit": "true"}}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"kafka": {"group.id": "g"}}')$$);
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', '{"kafka": {"fetch.wait.max.ms": [1]}}')$$);
-- Sharing a topic with other servers: a share "i/n" or a partition list, not both.
SELECT try(format($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', %L)$$, o))
  FROM unnest(ARRAY['{"share": "0/2"}', '{"share": "3/2"}', '{"share": "1/0"}',
					'{"share": "a/b"}', '{"share": "1/2 "}', '{"share": 1}', '{"share": "1/2000"}',
					'{"partitions": []}', '{"partitions": [1, 1]}', '{"partitions": [-1]}',
					'{"partitions": ["0"]}', '{"partitions": 3}', '{"partitions": [0.5]}',
					'{"share": "1/2", "partitions": [0]}', '{"claim_timeout": "10ms"}']) AS o;
-- Several ingest workers split a source's partitions: 1 to 8 of them.
SELECT try(format($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}', %L)$$, o))
  FROM unnest(ARRAY['{"workers": 0}', '{"workers": 9}', '{"workers": "two"}', '{"workers": 1.5}']) AS o;
SELECT count(*) AS sources FROM spool.sources;

-- Valid sources: options are stored with every default filled in.  (Nobody
-- listens on the broker address, so the probe warns; the warning is hidden.)
SET client_min_messages = error;
SELECT spool.create_source('s1', '127.0.0.1:1', '{orders}');
SELECT spool.create_source('s2', '127.0.0.1:1', '{a,b}',
	'{"format": "text", "start": "latest", "batch_size": 500, "on_gap": "continue",
	  "group_id": "g2", "kafka": {"fetch.wait.max.ms": 50, "sasl.password": "hunter2",
	  "enable.ssl.certificate.verification": false}}');
SELECT spool.create_source('s_share', '127.0.0.1:1', '{t}', '{"share": "2/3", "claim_timeout": "5 s"}');
SELECT spool.create_source('s_parts', '127.0.0.1:1', '{t}', '{"partitions": [3, 0, 7], "workers": 2}');
SELECT spool.create_source('s_one', '127.0.0.1:1', '{t}', '{"workers": 1}');
RESET client_min_messages;
SELECT name, brokers, topics, options, enabled FROM spool.sources ORDER BY name;
SELECT spool.drop_source('s_share'), spool.drop_source('s_parts'), spool.drop_source('s_one');

-- Names are unique: SP010.
SELECT try($$SELECT spool.create_source('s1', '127.0.0.1:1', '{t}')$$);

-- Created stopped; start, stop and drop know only existing sources (SP004).
SELECT source, state FROM spool.source_status ORDER BY source;
SELECT try($$SELECT spool.start_source('nope')$$);
SELECT try($$SELECT spool.stop_source('nope')$$);
SELECT try($$SELECT spool.drop_source('nope')$$);
SELECT try($$SELECT spool.start_source(NULL)$$);
SELECT spool.start_source('s1');
SELECT name, enabled, stopped_reason FROM spool.sources WHERE name = 's1';
SELECT spool.stop_source('s1');
SELECT name, enabled, stopped_reason FROM spool.sources WHERE name = 's1';

-- Kafka properties are masked for roles that do not own the source.
CREATE ROLE regress_spool_admin2 NOLOGIN IN ROLE spool_admin;
SET ROLE regress_spool_admin2;
SELECT name, options->'kafka' AS kafka FROM spool.source_config WHERE name = 's2';
RESET ROLE;
SELECT name, options->'kafka'->>'sasl.password' AS password FROM spool.source_config WHERE name = 's2';
-- spool_client may not manage sources.
CREATE ROLE regress_spool_client2 NOLOGIN IN ROLE spool_client;
SET ROLE regress_spool_client2;
SELECT try($$SELECT spool.create_source('s3', '127.0.0.1:1', '{t}')$$);
SELECT try($$SELECT spool.stop_source('s1')$$);
SELECT try($$SELECT options FROM spool.sources$$);
RESET ROLE;
DROP ROLE regress_spool_admin2, regress_spool_client2;

-- Reading the spool: bad arguments, an empty spool, and waiting that times out.
SELECT try($$SELECT * FROM spool.read(NULL)$$);
SELECT try($$SELECT * FROM spool.read(-1)$$);
SELECT try($$SELECT * FROM spool.read(0, 0)$$);
SELECT try($$SELECT * FROM spool.read(0, 100001)$$);
SELECT try($$SELECT * FROM spool.read(0, 10, '2 hours')$$);
SELECT count(*) FROM spool.read(0);
SELECT count(*) FROM spool.read(0, 10, '50 ms');

-- The consumer registry: a consumer starts at the current end, never moves back.
SELECT spool.register_consumer('c1');
SELECT spool.register_consumer('c2', 42);
SELECT spool.commit_consumer('c2', 100);
SELECT spool.commit_consumer('c2', 50);
SELECT name, committed_cursor FROM spool.consumers ORDER BY name;
SELECT spool.drop_consumer('c1'), spool.drop_consumer('c1');
SELECT try($$SELECT spool.register_consumer('')$$);
SELECT try($$SELECT spool.register_consumer('c3', -1)$$);
SELECT try($$SELECT spool.commit_consumer('nope', 1)$$);
SELECT try($$SELECT spool.commit_consumer('c2', NULL)$$);

-- Dropping a source removes it and its offsets; nothing else.
SELECT spool.drop_source('s2');
SELECT name FROM spool.sources ORDER BY name;
SELECT spool.drop_source('s1');
SELECT count(*) AS sources, (SELECT count(*) FROM spool.offsets) AS offsets FROM spool.sources;

-- Durations (docs/sql-reference.md#durations): batch_ms takes an interval
-- with its unit, or a bare number (a JSON number or a string holding only
-- one) of milliseconds (processors.sql and outbox.sql show those); it is
-- stored in milliseconds.
SET client_min_messages = error;
BEGIN;
SELECT spool.create_source('d1', '127.0.0.1:1', '{t}', '{"batch_ms": "250ms"}');
SELECT name, options->'batch_ms' AS batch_ms FROM spool.sources ORDER BY name;
ROLLBACK;
RESET client_min_messages;
-- A bad unit, out of range, not whole milliseconds, not a duration: SP001,
-- with the reason in the detail.
DO $$
DECLARE
	v text;
	detail text;
BEGIN
	FOREACH v IN ARRAY ARRAY['"5 parsecs"', '"2 min"', '0', '2.5', 'true'] LOOP
		BEGIN
			PERFORM spool.create_source('d', '127.0.0.1:1', '{t}',
										jsonb_build_object('batch_ms', v::jsonb));
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
			RAISE NOTICE 'batch_ms %: %: % (%)', v, SQLSTATE, SQLERRM, detail;
		END;
	END LOOP;
END
$$;

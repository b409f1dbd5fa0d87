--
-- source_ops: alter_source, seek_source and replay_dead_letter without a
-- broker.  Bad arguments, unknown objects, other roles' sources and
-- forbidden Kafka settings are refused and change nothing.  (The running
-- worker's side, and seeks the brokers must answer, are TAP test 022.)
--

SET client_min_messages = error;	-- nobody listens: the probe's WARNING is hidden
SELECT spool.create_source('op1', '127.0.0.1:1', '{t1,t2}',
	'{"batch_size": 100, "kafka": {"sasl.password": "pw1", "fetch.wait.max.ms": 50}}');
RESET client_min_messages;

-- alter_source: SP001 for bad input, SP004 for an unknown source; nothing changes.
SELECT try($$SELECT spool.alter_source(NULL)$$);
SELECT try($$SELECT spool.alter_source('nope', NULL, '{}')$$);
SELECT try($$SELECT spool.alter_source('op1', '', NULL)$$);
SELECT try($$SELECT spool.alter_source('op1', 'no-port', NULL)$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '[]')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '"x"')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"colour": "red"}')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"batch_size": 0}')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"format": "xml"}')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"kafka": "x"}')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"kafka": {"no.such.property": "1"}}')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"kafka": {"bootstrap.servers": "127.0.0.1:2"}}')$$);
SELECT try($$SELECT spool.alter_source('op1', NULL, '{"kafka": {"enable.auto.commit": true}}')$$);
SELECT brokers, options, config_version FROM spool.sources WHERE name = 'op1';

-- Options merge over the stored ones; "kafka" merges property by property
-- (null removes one; the password stays); the version moves each time.
SELECT spool.alter_source('op1', NULL,
	'{"batch_size": 500, "format": "text", "kafka": {"fetch.wait.max.ms": null, "client.rack": "r1"}}');
SELECT options, config_version FROM spool.sources WHERE name = 'op1';
-- A JSON null resets an option to its default; brokers alone keep the options.
SELECT spool.alter_source('op1', options => '{"batch_size": null}');
SET client_min_messages = error;
SELECT spool.alter_source('op1', '127.0.0.1:2');
RESET client_min_messages;
SELECT brokers, options->>'batch_size' AS batch_size, options->'kafka' AS kafka, config_version
  FROM spool.sources WHERE name = 'op1';

-- seek_source: bad input SP001, unknown source or topic SP004.
SELECT try($$SELECT spool.seek_source(NULL, 't1', 0, 5)$$);
SELECT try($$SELECT spool.seek_source('nope', 't1', 0, 5)$$);
SELECT try($$SELECT spool.seek_source('op1', 'zz', 0, 5)$$);
SELECT try($$SELECT spool.seek_source('op1', NULL, 0, 5)$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', NULL, 5)$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', -1, 5)$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0)$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, 5, now())$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, -5)$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, to_time => 'infinity')$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, to_time => '1960-01-01')$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, 5, allow_rewind => NULL)$$);

-- Going back over what is durable is refused without allow_rewind, before
-- the brokers are asked; nothing changes.
INSERT INTO spool.offsets VALUES ('op1', 't1', 0, 100, now());
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, 40)$$);
SELECT try($$SELECT spool.seek_source('op1', 't1', 0, 99)$$);
SELECT count(*) AS seeks FROM spool.source_seeks;
SELECT next_offset FROM spool.offsets WHERE source = 'op1';
SELECT config_version FROM spool.sources WHERE name = 'op1';
-- Every partition with a stored offset is in source_status, worker or not.
SELECT source, topic, kafka_partition, next_offset, state FROM spool.source_status
 WHERE source = 'op1';

-- replay_dead_letter: SP001, SP004; a request is recorded once, a replayed
-- dead letter is not replayed again.
SELECT try($$SELECT spool.replay_dead_letter(NULL)$$);
SELECT try($$SELECT spool.replay_dead_letter(-1)$$);
SELECT try($$SELECT spool.replay_dead_letter(424242)$$);
INSERT INTO spool.dead_letters (source, topic, kafka_partition, kafka_offset, payload, error)
	VALUES ('op1', 't1', 0, 7, '\x00', 'bad'), ('op1', 't1', 0, 8, NULL, 'too big'),
		   ('gone', 't1', 0, 9, NULL, 'too big');
SELECT min(id) AS dl, min(id) + 1 AS dl_done, min(id) + 2 AS dl_gone FROM spool.dead_letters
 WHERE source IN ('op1', 'gone') \gset
UPDATE spool.dead_letters SET replayed_at = now(), replay_cursor = 12 WHERE id = :dl_done;
SELECT spool.replay_dead_letter(:dl);
SELECT spool.replay_dead_letter(:dl);
SELECT kafka_offset, replay_requested_at IS NOT NULL AS requested, replayed_at IS NOT NULL AS replayed
  FROM spool.dead_letters WHERE id = :dl;
SELECT regexp_replace(try($$SELECT spool.replay_dead_letter($$ || :dl_done || $$)$$), 'letter \d+', 'letter N') AS try;
SELECT regexp_replace(try($$SELECT spool.replay_dead_letter($$ || :dl_gone || $$)$$), 'letter \d+', 'letter N') AS try;

-- Another role's source: a second spool_admin may not alter, seek or
-- replay it (42501), a role without spool_admin may not call the functions
-- at all; and the owner cannot get a forbidden librdkafka property or
-- broker past the policy.  Nothing changes.
CREATE ROLE regress_ops_a NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_ops_b NOLOGIN IN ROLE spool_admin;
CREATE ROLE regress_ops_plain NOLOGIN;
SET ROLE regress_ops_a;
SET client_min_messages = error;
SELECT spool.create_source('op_a', '127.0.0.1:1', '{t1}', '{"kafka": {"sasl.password": "secret-a"}}');
RESET client_min_messages;
SELECT try($$SELECT spool.alter_source('op_a', NULL, '{"kafka": {"ssl.ca.location": "/etc/passwd"}}')$$);
SELECT try($$SELECT spool.alter_source('op_a', NULL, '{"kafka": {"plugin.library.paths": "/tmp/x.so"}}')$$);
SELECT try($$SELECT spool.alter_source('op_a', NULL, '{"kafka": {"sasl.kerberos.kinit.cmd": "touch /tmp/x"}}')$$);
SELECT try($$SELECT spool.alter_source('op_a', NULL, '{"kafka": {"sasl.mechanisms": "GSSAPI"}}')$$);
SELECT try($$SELECT spool.alter_source('op_a', 'evil.example:9092')$$);
SELECT try($$SELECT spool.alter_source('op_a', '127.0.0.1:1,evil.example:9092')$$);
RESET ROLE;
INSERT INTO spool.dead_letters (source, topic, kafka_partition, kafka_offset, payload, error)
	VALUES ('op_a', 't1', 0, 3, NULL, 'too big') RETURNING id AS dl_a \gset
SET ROLE regress_ops_b;
SELECT try($$SELECT spool.alter_source('op_a', NULL, '{"batch_size": 1}')$$);
SELECT try($$SELECT spool.alter_source('op_a', '127.0.0.1:2')$$);
SELECT try($$SELECT spool.seek_source('op_a', 't1', 0, 0)$$);
SELECT try($$SELECT spool.seek_source('op_a', 't1', 0, 0, allow_rewind => true)$$);
SELECT try($$SELECT spool.replay_dead_letter($$ || :dl_a || $$)$$);
SELECT name, options->'kafka' AS kafka FROM spool.source_config WHERE name = 'op_a';
SET ROLE regress_ops_plain;
SELECT try($$SELECT spool.alter_source('op_a')$$);
SELECT try($$SELECT spool.seek_source('op_a', 't1', 0, 0)$$);
SELECT try($$SELECT spool.replay_dead_letter($$ || :dl_a || $$)$$);
RESET ROLE;
SELECT brokers, options, config_version FROM spool.sources WHERE name = 'op_a';
SELECT count(*) AS seeks FROM spool.source_seeks;
SELECT replay_requested_at IS NULL AS not_requested FROM spool.dead_letters WHERE id = :dl_a;

SELECT spool.drop_source('op_a');
SELECT spool.drop_source('op1');
DELETE FROM spool.dead_letters WHERE source IN ('op1', 'op_a', 'gone');
DROP ROLE regress_ops_a, regress_ops_b, regress_ops_plain;

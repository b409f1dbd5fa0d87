--
-- databases: pipelines run only in the database named by spool.database
-- (contrib_regression here); anywhere else they are refused at once instead
-- of being accepted and never run.
--
SHOW spool.database;
CREATE DATABASE spool_other_db;
\c spool_other_db
SET client_min_messages = warning;
CREATE EXTENSION spool_ext;
RESET client_min_messages;
\set VERBOSITY default
SELECT spool.create_source('s1', '127.0.0.1:9092', ARRAY['t1']);
SELECT spool.create_processor('p1', 'spool.window_alert(jsonb, spool.entries[])'::regprocedure,
                              '{"handler": {"key": "k", "value": "v", "threshold": 1}}');
SELECT spool.create_target('t1', 'notify', '{"channel": "c1"}');
-- Starting refuses too, before it looks the object up (one restored from a dump).
SELECT spool.start_source('s1');
SELECT spool.start_processor('p1');
\set VERBOSITY terse
-- Nothing was created.
SELECT (SELECT count(*) FROM spool.sources) AS sources,
       (SELECT count(*) FROM spool.processors) AS processors,
       (SELECT count(*) FROM spool.targets) AS targets;
-- Leases and basic-mode nonces are not pipelines: they work in any database.
SELECT (spool.lease_acquire('db:other', 'me')).token AS token;
\c contrib_regression
DROP DATABASE spool_other_db;

--
-- security: roles, privileges and SECURITY DEFINER hygiene (resources 'sec:*').
--

-- The extension's roles exist, cannot log in, and spool_admin includes spool_client.
SELECT rolname, rolcanlogin, rolsuper FROM pg_roles
 WHERE rolname IN ('spool_admin', 'spool_client') ORDER BY rolname COLLATE "C";
SELECT pg_has_role('spool_admin', 'spool_client', 'MEMBER') AS admin_is_client,
       pg_has_role('spool_client', 'spool_admin', 'MEMBER') AS client_is_admin;

-- PUBLIC has no USAGE on the schema, no EXECUTE on any function and no
-- privilege on any table or view of the extension.
SELECT has_schema_privilege('public', 'spool', 'USAGE') AS public_usage;
SELECT p.oid::regprocedure AS public_can_execute
  FROM pg_proc p WHERE p.pronamespace = 'spool'::regnamespace
   AND has_function_privilege('public', p.oid, 'EXECUTE');
SELECT c.relname AS public_has_privilege
  FROM pg_class c WHERE c.relnamespace = 'spool'::regnamespace
   AND c.relkind IN ('r', 'v', 'm', 'S', 'p')
   AND has_table_privilege('public', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER');
-- No ACL entry of any object of the extension names PUBLIC.
SELECT count(*) AS public_acl_entries
  FROM (SELECT proacl AS acl FROM pg_proc WHERE pronamespace = 'spool'::regnamespace
        UNION ALL
        SELECT relacl FROM pg_class WHERE relnamespace = 'spool'::regnamespace
        UNION ALL
        SELECT nspacl FROM pg_namespace WHERE nspname = 'spool') o,
       aclexplode(o.acl) a
 WHERE a.grantee = 0;

-- What spool_client may execute: the lease and nonce API, nothing internal.
SELECT p.oid::regprocedure AS function,
       has_function_privilege('spool_client', p.oid, 'EXECUTE') AS client_execute
  FROM pg_proc p WHERE p.pronamespace = 'spool'::regnamespace
 ORDER BY p.proname COLLATE "C";
-- What spool_client may read: the views and the spool's records (dead letters,
-- gaps, consumers), never the internal tables behind them.
SELECT c.relname, c.relkind,
       has_table_privilege('spool_client', c.oid, 'SELECT') AS client_select,
       has_table_privilege('spool_client', c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') AS client_write
  FROM pg_class c WHERE c.relnamespace = 'spool'::regnamespace AND c.relkind IN ('r', 'v', 'p')
 ORDER BY c.relname COLLATE "C";

-- No C function runs as its owner: each one notes its caller, checks that
-- role's rights, and does its own work as the extension with search_path
-- pinned (src/privs.c).  The only SECURITY DEFINER functions are SQL ones
-- that read status for everyone, and they pin search_path.
SELECT p.oid::regprocedure AS function, l.lanname, p.prosecdef, p.proconfig
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'spool'::regnamespace AND (p.prosecdef OR p.proconfig IS NOT NULL)
 ORDER BY p.proname COLLATE "C";
SELECT count(*) AS secdef_without_pinned_search_path
  FROM pg_proc p WHERE p.pronamespace = 'spool'::regnamespace AND p.prosecdef
   AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false);

-- A plain role can neither call the API nor read the views.
CREATE ROLE regress_spool_plain;
CREATE ROLE regress_spool_client IN ROLE spool_client;
CREATE ROLE regress_spool_client2 IN ROLE spool_client;
SET ROLE regress_spool_plain;
SELECT try($$SELECT spool.lease_acquire('sec:a', 'plain', '1 min')$$);
SELECT try($$SELECT spool.lease_renew('sec:a', 'plain', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_release('sec:a', 'plain', 1)$$);
SELECT try($$SELECT spool.fence('sec:a', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('sec-s', 'plain', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('sec-s', 0, 'plain', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('sec-s', 0, 'plain', 1)$$);
SELECT try($$SELECT spool.nonce_request('sec-s')$$);
SELECT try($$SELECT * FROM spool.leases$$);
SELECT try($$SELECT * FROM spool.nonces$$);
SELECT try($$SELECT * FROM spool.nonce_workers$$);
RESET ROLE;
-- Even with USAGE on the schema, EXECUTE is still missing for a plain role.
GRANT USAGE ON SCHEMA spool TO regress_spool_plain;
SET ROLE regress_spool_plain;
SELECT try($$SELECT spool.lease_acquire('sec:a', 'plain', '1 min')$$);
SELECT try($$SELECT * FROM spool.leases$$);
RESET ROLE;
REVOKE USAGE ON SCHEMA spool FROM regress_spool_plain;
SELECT count(*) AS sec_rows FROM spool.lease_store WHERE resource LIKE 'sec:%';

-- A member of spool_client can use the whole lease and nonce API.
SET ROLE regress_spool_client;
SELECT owner, token FROM spool.lease_acquire('sec:a', 'client', '1 min');
SELECT spool.lease_renew('sec:a', 'client', 1, '1 min') > now() AS renewed;
BEGIN;
SELECT spool.fence('sec:a', 1);
COMMIT;
SELECT spool.lease_release('sec:a', 'client', 1) AS released;
SELECT token FROM spool.lease_acquire('signer:sec-s', 'client', '1 min');
SELECT spool.nonce_allocate('sec-s', 'client', 1) AS nonce FROM generate_series(1, 2);
SELECT spool.nonce_mark_used('sec-s', 0, 'client', 1);
SELECT spool.nonce_mark_recyclable('sec-s', 1, 'client', 1);
SELECT resource, owner, token, live FROM spool.leases WHERE resource LIKE '%sec%' ORDER BY resource COLLATE "C";
SELECT signer, nonce, state, owner FROM spool.nonces WHERE signer = 'sec-s' ORDER BY nonce;
SELECT count(*) >= 0 AS can_read_workers FROM spool.nonce_workers;
-- ... but cannot touch the tables behind the views or internal functions.
SELECT try($$SELECT * FROM spool.lease_store$$);
SELECT try($$SELECT * FROM spool.nonce_store$$);
SELECT try($$SELECT * FROM spool.nonce_signer$$);
SELECT try($$UPDATE spool.lease_store SET token = 0$$);
SELECT try($$INSERT INTO spool.lease_store (resource, owner, token) VALUES ('sec:forged', 'client', 100)$$);
SELECT try($$DELETE FROM spool.nonce_store$$);
SELECT try($$UPDATE spool.nonce_signer SET next_nonce = 0$$);
SELECT try($$SELECT spool._launcher_wakeup()$$);
SELECT try($$SELECT * FROM spool._staging()$$);
SELECT try($$SELECT * FROM spool.staging$$);
-- A client cannot raise the lease limits (superuser-only settings).
SELECT try($$SET spool.lease_max_ttl = '365 d'$$);
SELECT try($$SET spool.lease_wait_timeout = '10 min'$$);
RESET ROLE;

-- A lease belongs to the role that first took it: another client can
-- neither take it (not even once it has expired), nor renew, release or
-- fence it, nor use its signer, whatever owner name and token it gives.
-- The errors name the role, never the owner or the token.
SET ROLE regress_spool_client2;
SELECT try($$SELECT spool.lease_acquire('signer:sec-s', 'intruder', '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('signer:sec-s', 'client', '1 min')$$);
SELECT try($$SELECT spool.lease_renew('signer:sec-s', 'client', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_release('signer:sec-s', 'client', 1)$$);
SELECT try($$SELECT spool.fence('signer:sec-s', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('sec-s', 'client', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('sec-s', 1, 'client', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('sec-s', 0, 'client', 1)$$);
SELECT try($$SELECT spool.lease_acquire('sec:a', 'intruder', '1 min')$$);
SELECT try($$SELECT spool.lease_renew('sec:a', 'client', 1, '1 min')$$);
SELECT try($$SELECT spool.fence('sec:a', 1)$$);
-- Its tokens are hidden from it (owners still show).
SELECT resource, owner, token, role FROM spool.leases WHERE resource LIKE '%sec%' ORDER BY resource COLLATE "C";
SELECT signer, nonce, state, owner, token FROM spool.nonces WHERE signer = 'sec-s' ORDER BY nonce;
RESET ROLE;
-- Nothing moved.
SELECT resource, owner, token, grants FROM spool.lease_store
 WHERE resource LIKE 'sec:%' OR resource = 'signer:sec-s' ORDER BY resource COLLATE "C";
SELECT nonce, state FROM spool.nonce_store WHERE signer = 'sec-s' ORDER BY nonce;
-- The first client still sees its tokens, and can take its expired lease again.
SET ROLE regress_spool_client;
SELECT resource, owner, token, role FROM spool.leases WHERE resource LIKE '%sec%' ORDER BY resource COLLATE "C";
SELECT owner, token FROM spool.lease_acquire('sec:a', 'client-again', '1 min');
RESET ROLE;

-- Members of a lease's role share it: a group role takes it, its members use it.
CREATE ROLE regress_spool_group IN ROLE spool_client;
GRANT regress_spool_group TO regress_spool_client, regress_spool_client2;
SET ROLE regress_spool_group;
SELECT owner, token FROM spool.lease_acquire('sec:g', 'node-1', '1 min');
RESET ROLE;
SET ROLE regress_spool_client2;
SELECT spool.lease_renew('sec:g', 'node-1', 1, '1 min') > now() AS member_renewed;
SELECT spool.lease_release('sec:g', 'node-1', 1) AS member_released;
SELECT owner, token FROM spool.lease_acquire('sec:g', 'node-2', '1 min');
SELECT token, role FROM spool.leases WHERE resource = 'sec:g';
RESET ROLE;

-- Lease names of the extension's own workers are reserved, whatever the
-- caller: 'processor:' and 'spool:'.
SET ROLE regress_spool_client;
SELECT try($$SELECT spool.lease_acquire('processor:p1', 'x', '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('spool:anything', 'x', '1 min')$$);
SELECT try($$SELECT spool.lease_renew('processor:p1', 'x', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_release('processor:p1', 'x', 1)$$);
SELECT try($$SELECT spool.fence('processor:p1', 1)$$);
RESET ROLE;
SELECT try($$SELECT spool.lease_acquire('processor:p1', 'superuser', '1 min')$$);
SELECT count(*) AS reserved_rows FROM spool.lease_store WHERE resource LIKE 'processor:%' OR resource LIKE 'spool:%';
-- A lease of the extension's workers (role 0) is out of every client's reach.
INSERT INTO spool.lease_store (resource, owner, token, expires_at, role)
	VALUES ('signer:sec-internal', 'nonce-worker:0:1', 7, now() + interval '1 min', 0);
SET ROLE regress_spool_client;
SELECT try($$SELECT spool.lease_acquire('signer:sec-internal', 'x', '1 min')$$);
SELECT try($$SELECT spool.lease_renew('signer:sec-internal', 'nonce-worker:0:1', 7, '1 min')$$);
SELECT try($$SELECT spool.fence('signer:sec-internal', 7)$$);
SELECT resource, owner, token, role FROM spool.leases WHERE resource = 'signer:sec-internal';
RESET ROLE;
DELETE FROM spool.lease_store WHERE resource = 'signer:sec-internal';

-- Consumers belong to the role that registered them; processors' consumers
-- are reached only through their processors.
CREATE ROLE regress_spool_admin1 IN ROLE spool_admin;
CREATE ROLE regress_spool_admin2 IN ROLE spool_admin;
SET ROLE regress_spool_admin1;
SELECT spool.register_consumer('sec-reader', 0);
SELECT try($$SELECT spool.register_consumer('processor:p1', 0)$$);
SELECT try($$SELECT spool.commit_consumer('processor:p1', 100)$$);
SELECT try($$SELECT spool.drop_consumer('processor:p1')$$);
RESET ROLE;
SET ROLE regress_spool_admin2;
SELECT try($$SELECT spool.register_consumer('sec-reader', 5)$$);
SELECT try($$SELECT spool.commit_consumer('sec-reader', 100)$$);
SELECT try($$SELECT spool.drop_consumer('sec-reader')$$);
RESET ROLE;
SELECT name, committed_cursor, owner FROM spool.consumers WHERE name = 'sec-reader';
SET ROLE regress_spool_admin1;
SELECT spool.commit_consumer('sec-reader', 3);
SELECT spool.drop_consumer('sec-reader');
RESET ROLE;

-- Sources belong to their creator: another admin can neither start, stop nor
-- drop one.
SET ROLE regress_spool_admin1;
SELECT spool.create_source('sec-src', '127.0.0.1:1', '{t}');
RESET ROLE;
SET ROLE regress_spool_admin2;
SELECT try($$SELECT spool.start_source('sec-src')$$);
SELECT try($$SELECT spool.stop_source('sec-src')$$);
SELECT try($$SELECT spool.drop_source('sec-src')$$);
RESET ROLE;
SELECT name, enabled, owner FROM spool.sources WHERE name = 'sec-src';

-- librdkafka properties: a non-superuser gets an allow-list (tuning, and
-- TLS/SASL with inline material).  Nothing that names a file, a command, a
-- library, an endpoint or a mock cluster, and no GSSAPI (it runs kinit); the
-- check comes before librdkafka sees any property (some act when set).
-- Brokers must be in spool.kafka_allowed_brokers.
SET ROLE regress_spool_admin1;
SELECT p AS property, try(format('SELECT spool.create_source(%L, %L, %L, %L)',
		'sec-k', '127.0.0.1:1', '{t}', jsonb_build_object('kafka', jsonb_build_object(p, v)))) AS result
  FROM (VALUES ('sasl.kerberos.kinit.cmd', 'touch /tmp/spool_ext_pwned'),
			   ('sasl.kerberos.keytab', '/etc/passwd'),
			   ('sasl.kerberos.principal', 'x; touch /tmp/spool_ext_pwned'),
			   ('sasl.mechanisms', 'GSSAPI'),
			   ('sasl.mechanism', 'GSSAPI'),
			   ('plugin.library.paths', '/tmp/evil.so'),
			   ('ssl.engine.location', '/tmp/evil.so'),
			   ('ssl.providers', 'legacy'),
			   ('ssl.ca.location', '/etc/passwd'),
			   ('ssl.key.location', '/etc/ssl/private/server.key'),
			   ('ssl.certificate.location', '/etc/passwd'),
			   ('ssl.crl.location', '/etc/passwd'),
			   ('ssl.keystore.location', '/etc/passwd'),
			   ('sasl.oauthbearer.method', 'oidc'),
			   ('sasl.oauthbearer.token.endpoint.url', 'http://127.0.0.1:9/token'),
			   ('offset.store.path', '/tmp/offsets'),
			   ('test.mock.num.brokers', '3'),
			   ('debug', 'all'),
			   ('no.such.property', 'x')) AS x(p, v)
 ORDER BY p COLLATE "C";
-- Allowed: tuning and inline TLS/SASL (no error from the policy; the brokers
-- are unreachable, so create_source only warns).
SELECT spool.create_source('sec-ok', '127.0.0.1:1', '{t}',
	'{"kafka": {"security.protocol": "sasl_plaintext", "sasl.mechanisms": "SCRAM-SHA-512",
	            "sasl.username": "u", "sasl.password": "p", "fetch.wait.max.ms": 50}}');
SELECT try($$SELECT spool.create_source('sec-k', '10.0.0.1:9092', '{t}')$$);
SELECT try($$SELECT spool.create_source('sec-k', '127.0.0.1:1,kafka.example.com:9092', '{t}')$$);
-- The same rules for kafka targets, at create and alter time.
SELECT try($$SELECT spool.create_target('sec-kt', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "t",
	"kafka": {"sasl.kerberos.kinit.cmd": "touch /tmp/spool_ext_pwned"}}')$$);
SELECT try($$SELECT spool.create_target('sec-kt', 'kafka', '{"brokers": "10.1.1.1:9092", "topic": "t"}')$$);
SELECT spool.create_target('sec-kt', 'kafka', '{"brokers": "127.0.0.1:1", "topic": "t",
	"kafka": {"linger.ms": 5}}');
SELECT try($$SELECT spool.alter_target('sec-kt', '{"kafka": {"ssl.ca.location": "/etc/passwd"}}')$$);
SELECT try($$SELECT spool.alter_target('sec-kt', '{"brokers": "10.1.1.1:9092"}')$$);
SELECT options->'kafka' AS kafka, options->>'brokers' AS brokers FROM spool.target_config WHERE name = 'sec-kt';
SELECT spool.drop_target('sec-kt');
SELECT spool.drop_source('sec-ok');
RESET ROLE;
SELECT count(*) AS sources_created FROM spool.sources WHERE name = 'sec-k';
-- A superuser may set what the allow-list leaves out.
SELECT spool.create_source('sec-su', '127.0.0.1:2', '{t}', '{"kafka": {"statistics.interval.ms": 0}}');
SELECT spool.drop_source('sec-su');
-- spool.kafka_allowed_brokers itself is set by a superuser in postgresql.conf.
SELECT try($$SET spool.kafka_allowed_brokers = '*'$$);
SELECT setting, context FROM pg_settings WHERE name = 'spool.kafka_allowed_brokers';

-- A client's own objects cannot hijack the functions, even ahead of pg_catalog
-- on its search_path: they run with search_path = pg_catalog, pg_temp.  Were
-- the caller's path used, clock_timestamp() would never let the lease expire.
CREATE SCHEMA regress_spool_evil AUTHORIZATION regress_spool_client;
SET ROLE regress_spool_client;
CREATE TABLE regress_spool_evil.lease_store (resource text, owner text, token bigint);
CREATE FUNCTION regress_spool_evil.clock_timestamp() RETURNS timestamptz
	LANGUAGE sql AS $$SELECT 'infinity'::timestamptz$$;
SET search_path = regress_spool_evil, pg_catalog, public;
SELECT clock_timestamp() AS hijacked_clock;
SELECT owner, token FROM spool.lease_acquire('sec:c', 'client', '200 ms');
SELECT pg_sleep(0.4);
SELECT owner, token FROM spool.lease_acquire('sec:c', 'other', '1 min');
SELECT count(*) AS evil_rows FROM regress_spool_evil.lease_store;
RESET search_path;
RESET ROLE;

-- The rows written by the clients are where they belong.
SELECT resource, owner, token, grants FROM spool.lease_store
 WHERE resource LIKE 'sec:%' OR resource = 'signer:sec-s' ORDER BY resource COLLATE "C";

SELECT spool.drop_source('sec-src');
DROP SCHEMA regress_spool_evil CASCADE;
DROP ROLE regress_spool_plain;
DROP ROLE regress_spool_group;
DROP ROLE regress_spool_client;
DROP ROLE regress_spool_client2;
DROP ROLE regress_spool_admin1;
DROP ROLE regress_spool_admin2;

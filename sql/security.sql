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

-- Every function that runs as the extension owner pins search_path; those are
-- exactly the client-callable ones.
SELECT p.oid::regprocedure AS function, p.prosecdef, p.proconfig
  FROM pg_proc p WHERE p.pronamespace = 'spool'::regnamespace
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
-- A client cannot raise the lease limits (superuser-only settings).
SELECT try($$SET spool.lease_max_ttl = '365 d'$$);
SELECT try($$SET spool.lease_wait_timeout = '10 min'$$);
RESET ROLE;

-- Another client cannot take, renew or release the first client's lease.
SET ROLE regress_spool_client2;
SELECT spool.lease_acquire('signer:sec-s', 'intruder', '1 min') IS NULL AS refused;
SELECT try($$SELECT spool.lease_renew('signer:sec-s', 'intruder', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_release('signer:sec-s', 'intruder', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('sec-s', 'intruder', 1)$$);
RESET ROLE;

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

DROP SCHEMA regress_spool_evil CASCADE;
DROP ROLE regress_spool_plain;
DROP ROLE regress_spool_client;
DROP ROLE regress_spool_client2;

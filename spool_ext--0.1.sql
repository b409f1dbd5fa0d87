/* spool_ext--0.1.sql: leases with fencing tokens and the per-signer nonce allocator */

\echo Use "CREATE EXTENSION spool_ext" to load this file. \quit

-- Roles are cluster-wide: create them once, keep them across DROP EXTENSION.
DO $roles$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'spool_admin') THEN
		CREATE ROLE spool_admin NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'spool_client') THEN
		CREATE ROLE spool_client NOLOGIN;
	END IF;
END
$roles$;

REVOKE ALL ON SCHEMA @extschema@ FROM PUBLIC;
GRANT USAGE ON SCHEMA @extschema@ TO spool_admin, spool_client;

------------------------------------------------------------------------------
-- Leases and fencing
------------------------------------------------------------------------------

CREATE TYPE @extschema@.lease AS (
	resource	text,
	owner		text,
	token		bigint,
	expires_at	timestamptz
);

-- One row per resource, never deleted: the token only grows, also across
-- restarts.  Low fillfactor keeps renewals HOT.
CREATE TABLE @extschema@.lease_store (
	resource	text PRIMARY KEY CHECK (resource <> ''),
	owner		text,
	token		bigint NOT NULL DEFAULT 0 CHECK (token >= 0),
	expires_at	timestamptz,
	granted_at	timestamptz,
	renewed_at	timestamptz,
	released_at	timestamptz,
	grants		bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE FUNCTION @extschema@.lease_acquire(resource text, owner text,
										  ttl interval DEFAULT '10 s')
RETURNS @extschema@.lease
AS 'MODULE_PATHNAME', 'spool_lease_acquire'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.lease_acquire(text, text, interval) IS
'Acquire or renew a lease; returns it with its fencing token, or NULL when another owner holds it';

CREATE FUNCTION @extschema@.lease_renew(resource text, owner text, token bigint,
										ttl interval DEFAULT '10 s')
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'spool_lease_renew'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.lease_renew(text, text, bigint, interval) IS
'Extend a held lease, keeping its token; raises SP002 when the lease was lost';

CREATE FUNCTION @extschema@.lease_release(resource text, owner text, token bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'spool_lease_release'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.lease_release(text, text, bigint) IS
'Give a lease up; true if released now, false if it had already ended';

CREATE FUNCTION @extschema@.fence(resource text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_fence'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.fence(text, bigint) IS
'Raise unless token is the current token of a live lease; no newer token is granted before this transaction ends';

CREATE VIEW @extschema@.leases AS
	SELECT resource, owner, token, expires_at,
		   coalesce(expires_at > clock_timestamp(), false) AS live,
		   granted_at, renewed_at, released_at, grants
	  FROM @extschema@.lease_store;

------------------------------------------------------------------------------
-- Nonce allocator
------------------------------------------------------------------------------

CREATE TYPE @extschema@.nonce_state AS ENUM ('allocated', 'consumed', 'released');

-- One row per signer, created by the first grant of its lease.  lease_token
-- mirrors the token of lease 'signer:' || signer and is written under this
-- row's lock by every new grant, so nonce operations fence on this row.
CREATE TABLE @extschema@.nonce_signer (
	signer		text PRIMARY KEY CHECK (signer <> ''),
	next_nonce	bigint NOT NULL DEFAULT 0 CHECK (next_nonce >= 0),
	released	bigint NOT NULL DEFAULT 0 CHECK (released >= 0),
	lease_token	bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE TABLE @extschema@.nonce_store (
	signer		text NOT NULL,
	nonce		bigint NOT NULL CHECK (nonce >= 0),
	state		@extschema@.nonce_state NOT NULL,
	owner		text NOT NULL,
	token		bigint NOT NULL,
	request_id	text,
	updated_at	timestamptz NOT NULL DEFAULT clock_timestamp(),
	PRIMARY KEY (signer, nonce)
);
CREATE UNIQUE INDEX nonce_store_request ON @extschema@.nonce_store (signer, request_id)
	WHERE request_id IS NOT NULL;
CREATE INDEX nonce_store_released ON @extschema@.nonce_store (signer, nonce)
	WHERE state = 'released';

CREATE FUNCTION @extschema@.nonce_allocate(signer text, owner text, token bigint,
										   request_id text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_nonce_allocate'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.nonce_allocate(text, text, bigint, text) IS
'Allocate the lowest released nonce of a signer, else the next new one; fenced by the signer lease';

CREATE FUNCTION @extschema@.nonce_mark_used(signer text, nonce bigint, owner text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_nonce_mark_used'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.nonce_mark_used(text, bigint, text, bigint) IS
'Mark an allocated nonce CONSUMED (final); fenced by the signer lease';

CREATE FUNCTION @extschema@.nonce_mark_recyclable(signer text, nonce bigint, owner text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_nonce_mark_recyclable'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.nonce_mark_recyclable(text, bigint, text, bigint) IS
'Give an allocated nonce back (RELEASED): it is handed out again first; fenced by the signer lease';

CREATE FUNCTION @extschema@.nonce_request(signer text, request_id text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_nonce_request'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.nonce_request(text, text) IS
'Worker-queue mode: allocate a nonce through the nonce worker that owns the signer lease; needs no lease';

CREATE VIEW @extschema@.nonces AS
	SELECT signer, nonce, state, owner, token, request_id, updated_at
	  FROM @extschema@.nonce_store;

CREATE FUNCTION @extschema@.nonce_worker_status(
	OUT worker int, OUT pid int, OUT generation bigint, OUT owner text,
	OUT queued int, OUT in_progress int, OUT served bigint, OUT batches bigint,
	OUT last_batch int, OUT takeovers bigint, OUT heartbeat timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_nonce_worker_status'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.nonce_worker_status() IS
'One row per nonce service worker slot: process, queue depth and counters';

CREATE VIEW @extschema@.nonce_workers AS
	SELECT * FROM @extschema@.nonce_worker_status();

CREATE FUNCTION @extschema@._launcher_wakeup()
RETURNS void
AS 'MODULE_PATHNAME', 'spool_launcher_wakeup'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@._launcher_wakeup() IS
'Internal: wake the spool launcher so it notices a newly created extension';

------------------------------------------------------------------------------
-- Privileges: nothing to PUBLIC; clients get the lease and nonce API.
------------------------------------------------------------------------------

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA @extschema@ FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA @extschema@ FROM PUBLIC;
GRANT spool_client TO spool_admin;
GRANT EXECUTE ON FUNCTION
	@extschema@.lease_acquire(text, text, interval),
	@extschema@.lease_renew(text, text, bigint, interval),
	@extschema@.lease_release(text, text, bigint),
	@extschema@.fence(text, bigint),
	@extschema@.nonce_allocate(text, text, bigint, text),
	@extschema@.nonce_mark_used(text, bigint, text, bigint),
	@extschema@.nonce_mark_recyclable(text, bigint, text, bigint),
	@extschema@.nonce_request(text, text),
	@extschema@.nonce_worker_status()
	TO spool_client;
GRANT SELECT ON @extschema@.leases, @extschema@.nonces, @extschema@.nonce_workers
	TO spool_client;

SELECT @extschema@._launcher_wakeup();

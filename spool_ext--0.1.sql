/* spool_ext--0.1.sql: the spool and its sources, processors, the outbox and its targets, leases with fencing tokens, and the per-signer nonce allocator */

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

-- The C functions below are SECURITY INVOKER: each one notes its caller
-- (every privilege check is made against that role), then does its own work
-- as the extension with search_path = pg_catalog, pg_temp (src/privs.c).

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
-- restarts.  Low fillfactor keeps renewals HOT.  role: the role the lease
-- belongs to since its first grant (0: spool_ext's own workers; NULL: never
-- granted); only its members use it.
CREATE TABLE @extschema@.lease_store (
	resource	text PRIMARY KEY CHECK (resource <> ''),
	owner		text,
	role		oid,
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
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.lease_acquire(text, text, interval) IS
'Acquire or renew a lease; returns it with its fencing token, or NULL when another owner holds it';

CREATE FUNCTION @extschema@.lease_renew(resource text, owner text, token bigint,
										ttl interval DEFAULT '10 s')
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'spool_lease_renew'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.lease_renew(text, text, bigint, interval) IS
'Extend a held lease, keeping its token; raises SP002 when the lease was lost';

CREATE FUNCTION @extschema@.lease_release(resource text, owner text, token bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'spool_lease_release'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.lease_release(text, text, bigint) IS
'Give a lease up; true if released now, false if it had already ended';

CREATE FUNCTION @extschema@.fence(resource text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_fence'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.fence(text, bigint) IS
'Raise unless token is the current token of a live lease; no newer token is granted before this transaction ends';

-- Tokens are shown to members of the lease's role and of spool_admin only.
CREATE VIEW @extschema@.leases AS
	SELECT resource, owner,
		   CASE WHEN (role IS NOT NULL AND role <> 0 AND pg_has_role(role, 'MEMBER'))
					 OR pg_has_role('spool_admin', 'MEMBER')
				THEN token END AS token,
		   expires_at,
		   coalesce(expires_at > clock_timestamp(), false) AS live,
		   granted_at, renewed_at, released_at, grants,
		   CASE WHEN role = 0 THEN 'spool_ext' ELSE role::regrole::text END AS role
	  FROM @extschema@.lease_store;

------------------------------------------------------------------------------
-- Nonce allocator
------------------------------------------------------------------------------

CREATE TYPE @extschema@.nonce_state AS ENUM ('allocated', 'consumed', 'released');

-- One row per signer, created by the first grant of its lease.  lease_token
-- mirrors the token of lease 'signer:' || signer and is written under this
-- row's lock by every new grant, so nonce operations fence on this row.
-- role: the role the signer belongs to (its lease's, or for a signer served
-- through spool.nonce_request, its first requester's).
CREATE TABLE @extschema@.nonce_signer (
	signer		text PRIMARY KEY CHECK (signer <> ''),
	role		oid,
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
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_allocate(text, text, bigint, text) IS
'Allocate the lowest released nonce of a signer, else the next new one; fenced by the signer lease';

CREATE FUNCTION @extschema@.nonce_mark_used(signer text, nonce bigint, owner text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_nonce_mark_used'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_mark_used(text, bigint, text, bigint) IS
'Mark an allocated nonce CONSUMED (final); fenced by the signer lease';

CREATE FUNCTION @extschema@.nonce_mark_recyclable(signer text, nonce bigint, owner text, token bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_nonce_mark_recyclable'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_mark_recyclable(text, bigint, text, bigint) IS
'Give an allocated nonce back (RELEASED): it is handed out again first; fenced by the signer lease';

CREATE FUNCTION @extschema@.nonce_request(signer text, request_id text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_nonce_request'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_request(text, text) IS
'Worker-queue mode: allocate a nonce through the nonce worker that owns the signer lease; needs no lease';

CREATE FUNCTION @extschema@.nonce_report(signer text, outcome text, nonce bigint DEFAULT NULL,
										 request_id text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_nonce_report'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_report(text, text, bigint, text) IS
'Worker-queue mode: report a nonce (by nonce or request_id) ''used'' or ''recyclable'' through the nonce worker of its signer; needs no lease';

-- Every nonce_set_next: what the chain said and what changed.
CREATE TABLE @extschema@.nonce_set_next_log (
	id			bigserial PRIMARY KEY,
	signer		text NOT NULL,
	chain_next	bigint NOT NULL,	-- the chain's pending nonce given
	old_next	bigint NOT NULL,	-- next new nonce before
	new_next	bigint NOT NULL,	-- next new nonce after
	consumed	bigint NOT NULL,	-- allocated/released nonces below chain_next made consumed
	next_out	bigint NOT NULL,	-- the nonce handed out next
	owner		text NOT NULL,
	token		bigint NOT NULL,
	at			timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION @extschema@.nonce_set_next(signer text, next_nonce bigint,
										   owner text DEFAULT NULL, token bigint DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_nonce_set_next'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_set_next(text, bigint, text, bigint) IS
'Set a signer to the chain''s pending nonce: nonces below it become consumed, none at or above it is taken from a holder; fenced by the signer lease (owner, token), or through its nonce worker when both are omitted; returns the nonce handed out next';

-- Tokens are shown to members of the signer's role and of spool_admin only.
CREATE VIEW @extschema@.nonces AS
	SELECT n.signer, n.nonce, n.state, n.owner,
		   CASE WHEN (s.role IS NOT NULL AND pg_has_role(s.role, 'MEMBER'))
					 OR pg_has_role('spool_admin', 'MEMBER')
				THEN n.token END AS token,
		   n.request_id, n.updated_at
	  FROM @extschema@.nonce_store n
	  LEFT JOIN @extschema@.nonce_signer s ON s.signer = n.signer;

CREATE FUNCTION @extschema@.nonce_worker_status(
	OUT worker int, OUT pid int, OUT generation bigint, OUT owner text,
	OUT queued int, OUT in_progress int, OUT served bigint, OUT batches bigint,
	OUT last_batch int, OUT takeovers bigint, OUT heartbeat timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_nonce_worker_status'
LANGUAGE C VOLATILE;
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
-- Kafka sources, staging, the spool and its segments
------------------------------------------------------------------------------

-- One row per source.  options holds the validated options with defaults
-- filled in; options->'kafka' may hold credentials and is never shown to
-- non-owners (see spool.source_config).
CREATE TABLE @extschema@.sources (
	name		text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,48}$'),
	brokers		text NOT NULL CHECK (brokers <> ''),
	topics		text[] NOT NULL,
	options		jsonb NOT NULL,
	enabled		boolean NOT NULL DEFAULT false,
	owner		regrole NOT NULL,
	skip_gap	boolean NOT NULL DEFAULT false,
	stopped_reason text,
	created_at	timestamptz NOT NULL DEFAULT now(),
	-- bumped by alter_source, seek_source and replay_dead_letter: the
	-- launcher restarts a running ingest worker started at another version
	config_version int NOT NULL DEFAULT 0
);

-- Where each partition resumes: written in the transaction that makes its
-- entries durable (I-3).
CREATE TABLE @extschema@.offsets (
	source		text NOT NULL REFERENCES @extschema@.sources ON DELETE CASCADE,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	next_offset	bigint NOT NULL,
	updated_at	timestamptz NOT NULL,
	PRIMARY KEY (source, topic, kafka_partition)
);

-- Written fast by the ingest workers, emptied by the promoter; after a crash
-- they are empty and the workers re-read from offsets.  Two tables take
-- turns: the workers write into the active one while the promoter moves the
-- other out whole and truncates it, so staging never holds dead tuples.
-- kind: 'm' message, 'd' dead letter, 'g' gap [kafka_offset, gap_to],
-- 'r' a replayed dead letter (dead_letter_id), re-read from Kafka or, when
-- Kafka no longer has it, built from the dead letter's key and payload
-- (replay_from 'kafka' | 'stored').
CREATE UNLOGGED TABLE @extschema@.staging_0 (
	batch_id	bigint NOT NULL,
	pos			bigint,			-- messages: position in this table, reserved per batch
	source		text NOT NULL,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	kafka_offset bigint NOT NULL,
	kind		"char" NOT NULL,
	key			bytea,
	value		jsonb,
	payload		bytea,
	headers		jsonb,
	kafka_ts	timestamptz,
	error		text,
	gap_to		bigint,
	gap_stop	boolean,
	dead_letter_id bigint,
	replay_from	text
) WITH (autovacuum_enabled = false);
CREATE UNLOGGED TABLE @extschema@.staging_1 (LIKE @extschema@.staging_0)
	WITH (autovacuum_enabled = false);
-- PostgreSQL refuses to plan a read of an UNLOGGED table on a hot standby,
-- so the views read staging and the runtime tables below through functions
-- that return no rows there (no worker runs on a standby: nothing is staged).
CREATE FUNCTION @extschema@._staging()
RETURNS SETOF @extschema@.staging_0
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF NOT pg_catalog.pg_is_in_recovery() THEN
		RETURN QUERY SELECT * FROM @extschema@.staging_0
					 UNION ALL SELECT * FROM @extschema@.staging_1;
	END IF;
END
$$;
COMMENT ON FUNCTION @extschema@._staging() IS
'Internal: the rows of spool.staging; none on a hot standby';
CREATE VIEW @extschema@.staging AS
	SELECT * FROM @extschema@._staging();
CREATE UNLOGGED SEQUENCE @extschema@.staging_batch;

-- The spool: WAL-logged, partitioned into segments by cursor range.
CREATE TABLE @extschema@.entries (
	cursor		bigint NOT NULL,
	source		text NOT NULL,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	kafka_offset bigint NOT NULL,
	key			bytea,
	value		jsonb,
	payload		bytea,
	headers		jsonb,
	kafka_ts	timestamptz,
	spooled_at	timestamptz NOT NULL,
	PRIMARY KEY (cursor)
) PARTITION BY RANGE (cursor);

-- The next cursor; its row lock serialises promotions, so cursors commit in order.
CREATE TABLE @extschema@.spool_state (
	id			int PRIMARY KEY CHECK (id = 1),
	next_cursor	bigint NOT NULL CHECK (next_cursor >= 1)
);
INSERT INTO @extschema@.spool_state VALUES (1, 1);

CREATE TABLE @extschema@.segment_info (
	segment		int PRIMARY KEY,
	lo			bigint NOT NULL,
	hi			bigint NOT NULL,		-- exclusive
	rows		bigint NOT NULL DEFAULT 0,
	created_at	timestamptz NOT NULL DEFAULT now(),
	sealed_at	timestamptz,
	dropped_at	timestamptz
);

-- Registered readers of the spool: a segment is kept until every consumer's
-- committed cursor has passed it.  owner: the role that registered it (NULL
-- for the consumers of processors, 'processor:<name>').
CREATE TABLE @extschema@.consumers (
	name		text PRIMARY KEY CHECK (name <> ''),
	committed_cursor bigint NOT NULL CHECK (committed_cursor >= 0),
	updated_at	timestamptz NOT NULL DEFAULT now(),
	owner		regrole,
	moved_at	timestamptz NOT NULL DEFAULT now()	-- committed_cursor last grew
);

CREATE TABLE @extschema@.dead_letters (
	id			bigserial PRIMARY KEY,
	source		text NOT NULL,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	kafka_offset bigint NOT NULL,
	key			bytea,
	payload		bytea,
	error		text NOT NULL,
	at			timestamptz NOT NULL DEFAULT now(),
	-- spool.replay_dead_letter: requested, then replayed (the entry's cursor)
	-- or failed again (error is the new one, the request is cleared)
	replay_requested_at timestamptz,
	replay_attempts int NOT NULL DEFAULT 0,
	replayed_at	timestamptz,
	replay_cursor bigint,
	-- how the replay got the message: 'kafka' (read again) or 'stored' (Kafka
	-- no longer had it: this row's key and payload, no headers or timestamp)
	replayed_from text CHECK (replayed_from IN ('kafka', 'stored'))
);

CREATE TABLE @extschema@.gaps (
	id			bigserial PRIMARY KEY,
	source		text NOT NULL,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	from_offset	bigint NOT NULL,
	to_offset	bigint NOT NULL,
	action		text NOT NULL CHECK (action IN ('continued', 'stopped', 'seek')),
	at			timestamptz NOT NULL DEFAULT now()
);

-- Runtime state written by the workers (lost on crash, rewritten at once).
CREATE UNLOGGED TABLE @extschema@.source_runtime (
	source		text PRIMARY KEY,
	pid			int,
	state		text NOT NULL,
	last_error	text,
	last_error_at timestamptz,
	errors		bigint NOT NULL DEFAULT 0,	-- since the server started
	updated_at	timestamptz NOT NULL
);
CREATE UNLOGGED TABLE @extschema@.partition_runtime (
	source		text NOT NULL,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	high_watermark bigint,
	position	bigint,
	msgs_per_sec float8,
	state		text NOT NULL DEFAULT 'running',	-- 'running' or 'error'
	error_since timestamptz,	-- error state since (its last error)
	updated_at	timestamptz NOT NULL,
	PRIMARY KEY (source, topic, kafka_partition)
);
-- The status views read these through functions (see spool._staging).
CREATE FUNCTION @extschema@._source_runtime()
RETURNS SETOF @extschema@.source_runtime
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
ROWS 16
AS $$
BEGIN
	IF NOT pg_catalog.pg_is_in_recovery() THEN
		RETURN QUERY SELECT * FROM @extschema@.source_runtime;
	END IF;
END
$$;
COMMENT ON FUNCTION @extschema@._source_runtime() IS
'Internal: the rows of spool.source_runtime; none on a hot standby';
CREATE FUNCTION @extschema@._partition_runtime()
RETURNS SETOF @extschema@.partition_runtime
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
ROWS 64
AS $$
BEGIN
	IF NOT pg_catalog.pg_is_in_recovery() THEN
		RETURN QUERY SELECT * FROM @extschema@.partition_runtime;
	END IF;
END
$$;
COMMENT ON FUNCTION @extschema@._partition_runtime() IS
'Internal: the rows of spool.partition_runtime; none on a hot standby';

CREATE FUNCTION @extschema@.create_source(name text, brokers text, topics text[],
										  options jsonb DEFAULT '{}')
RETURNS void
AS 'MODULE_PATHNAME', 'spool_create_source'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.create_source(text, text, text[], jsonb) IS
'Define a Kafka source (created stopped; see start_source); options are validated now';

CREATE FUNCTION @extschema@.start_source(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_start_source'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.start_source(text) IS
'Enable a source: the launcher starts its ingest worker (after a stop on a gap, the gap is accepted)';

CREATE FUNCTION @extschema@.stop_source(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_stop_source'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.stop_source(text) IS
'Disable a source: its ingest worker stops; offsets and entries stay';

CREATE FUNCTION @extschema@.drop_source(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_drop_source'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.drop_source(text) IS
'Remove a source and its offsets; its entries stay in the spool until retention removes them';

-- Operating a running source: alter, seek, replay (docs/sources.md).  Each
-- bumps config_version; the launcher restarts the ingest worker, which
-- applies pending seeks and replays at its start, once nothing of the
-- source is left in staging.
CREATE FUNCTION @extschema@.alter_source(name text, brokers text DEFAULT NULL,
										 options jsonb DEFAULT NULL)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_alter_source'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.alter_source(text, text, jsonb) IS
'Change a source''s brokers and options (merged over the stored ones; NULL: unchanged); offsets are kept and a running ingest worker restarts with the change';

-- Seeks of partitions: requested by seek_source, applied by the ingest
-- worker (state pending -> applied, or overtaken when a forward seek found
-- the partition already past to_offset).
CREATE TABLE @extschema@.source_seeks (
	id			bigserial PRIMARY KEY,
	source		text NOT NULL REFERENCES @extschema@.sources ON DELETE CASCADE,
	topic		text NOT NULL,
	kafka_partition int NOT NULL,
	to_offset	bigint NOT NULL,
	to_time		timestamptz,
	allow_rewind boolean NOT NULL,
	state		text NOT NULL DEFAULT 'pending'
				CHECK (state IN ('pending', 'applied', 'overtaken')),
	from_offset	bigint,			-- the durable next_offset the seek replaced
	direction	text CHECK (direction IN ('rewind', 'forward', 'none')),
	requested_by regrole NOT NULL,
	requested_at timestamptz NOT NULL DEFAULT now(),
	applied_at	timestamptz
);
CREATE INDEX ON @extschema@.source_seeks (source) WHERE state = 'pending';

CREATE FUNCTION @extschema@.seek_source(name text, topic text, kafka_partition int,
										to_offset bigint DEFAULT NULL,
										to_time timestamptz DEFAULT NULL,
										allow_rewind boolean DEFAULT false)
RETURNS @extschema@.source_seeks
AS 'MODULE_PATHNAME', 'spool_seek_source'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.seek_source(text, text, int, bigint, timestamptz, boolean) IS
'Move a partition of a source to an offset, or to the first offset at or after a time; going back over spooled data needs allow_rewind';

CREATE FUNCTION @extschema@.replay_dead_letter(id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_replay_dead_letter'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.replay_dead_letter(bigint) IS
'Re-read a dead letter''s message from Kafka and spool it (new cursor) if it now passes the source''s checks; else it keeps the new error';

-- Options without secrets: values under "kafka" are masked unless the caller
-- owns the source or is a superuser.
CREATE VIEW @extschema@.source_config AS
	SELECT s.name, s.brokers, s.topics,
		   CASE WHEN pg_has_role(s.owner, 'MEMBER')
					 OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
				THEN s.options
				ELSE s.options || jsonb_build_object('kafka',
						coalesce((SELECT jsonb_object_agg(k, '********')
									FROM jsonb_object_keys(s.options->'kafka') k), '{}'))
		   END AS options,
		   s.enabled, s.owner, s.stopped_reason, s.created_at
	  FROM @extschema@.sources s;

CREATE VIEW @extschema@.source_status AS
	SELECT s.name AS source, coalesce(p.topic, o.topic) AS topic,
		   coalesce(p.kafka_partition, o.kafka_partition) AS kafka_partition,
		   o.next_offset, p.high_watermark,
		   CASE WHEN p.high_watermark IS NOT NULL
				THEN greatest(p.high_watermark - coalesce(o.next_offset, p.position, 0), 0)
		   END AS lag,
		   -- per partition while the worker runs (see docs/sources.md)
		   CASE WHEN NOT s.enabled THEN 'stopped'
				WHEN r.state IN ('running', 'error') AND p.state IS NOT NULL THEN p.state
				WHEN pg_catalog.pg_is_in_recovery() THEN NULL	-- a hot standby
				ELSE coalesce(r.state, 'starting') END AS state,
		   r.last_error, r.last_error_at, p.msgs_per_sec, p.position, r.pid,
		   greatest(p.updated_at, r.updated_at) AS updated_at,
		   coalesce(r.errors, 0) AS errors, p.error_since
	  FROM @extschema@.sources s
	  LEFT JOIN @extschema@._source_runtime() r ON r.source = s.name
	  -- every partition a worker assigned or an offset was stored for
	  LEFT JOIN (@extschema@._partition_runtime() p
				 FULL JOIN @extschema@.offsets o
						ON (o.source, o.topic, o.kafka_partition) = (p.source, p.topic, p.kafka_partition))
			 ON coalesce(p.source, o.source) = s.name;

CREATE VIEW @extschema@.segments AS
	SELECT i.segment, i.lo AS min_cursor, i.hi - 1 AS max_cursor, i.rows,
		   coalesce(pg_catalog.pg_total_relation_size(
				pg_catalog.to_regclass('@extschema@.entries_' || i.segment)), 0) AS bytes,
		   CASE WHEN i.dropped_at IS NOT NULL THEN 'dropped'
				WHEN i.sealed_at IS NOT NULL THEN 'sealed'
				ELSE 'active' END AS state,
		   i.created_at, i.sealed_at, i.dropped_at
	  FROM @extschema@.segment_info i;

CREATE FUNCTION @extschema@.read(after_cursor bigint, max_entries int DEFAULT 1000,
								 wait interval DEFAULT '0 s')
RETURNS SETOF @extschema@.entries
AS 'MODULE_PATHNAME', 'spool_read'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.read(bigint, int, interval) IS
'Entries with cursor > after_cursor in cursor order; waits up to wait for the first one';

CREATE FUNCTION @extschema@.register_consumer(name text, start_cursor bigint DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_register_consumer'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.register_consumer(text, bigint) IS
'Register a spool reader (at start_cursor, default the current end); segments it has not passed are kept.  Returns its committed cursor';

CREATE FUNCTION @extschema@.commit_consumer(name text, cursor bigint)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_commit_consumer'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.commit_consumer(text, bigint) IS
'Record that a consumer has processed every entry up to cursor (never moves back); returns its committed cursor';

CREATE FUNCTION @extschema@.drop_consumer(name text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'spool_drop_consumer'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.drop_consumer(text) IS
'Unregister a consumer so it no longer holds segments back; false if there was none';

------------------------------------------------------------------------------
-- Processors: replicated deterministic handlers over the spool
------------------------------------------------------------------------------

CREATE TYPE @extschema@.output AS (
	target		text,
	key			text,
	payload		jsonb
);

CREATE TYPE @extschema@.step AS (
	state		jsonb,
	outputs		@extschema@.output[]
);

-- options holds the validated options with defaults filled in.
CREATE TABLE @extschema@.processors (
	name		text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,48}$'),
	handler		regprocedure NOT NULL,
	run_as		regrole NOT NULL,
	owner		regrole NOT NULL,
	options		jsonb NOT NULL,
	enabled		boolean NOT NULL DEFAULT false,
	created_at	timestamptz NOT NULL DEFAULT now(),
	detached_at	timestamptz		-- dropped from the spool by spool.max_retention
);

-- The output gate.  The active replica's token is written here at takeover;
-- every batch commit is a compare-and-set on (token, committed_cursor), in
-- the transaction that writes the batch's outputs.  state is the latest
-- snapshot (at state_cursor), from which a replica that starts replays.
CREATE TABLE @extschema@.processor_checkpoints (
	processor	text PRIMARY KEY REFERENCES @extschema@.processors ON DELETE CASCADE,
	token		bigint NOT NULL DEFAULT 0,
	committed_cursor bigint NOT NULL,
	state		jsonb,
	state_cursor bigint NOT NULL,
	state_hash	bigint,
	outputs		bigint NOT NULL DEFAULT 0,
	batches		bigint NOT NULL DEFAULT 0,
	updated_at	timestamptz NOT NULL DEFAULT now(),
	-- Where the fold starts (the initial state '{}' is as of this cursor), and
	-- the number of rewinds: a replica commits only in the epoch it loaded.
	start_cursor bigint NOT NULL DEFAULT 0,
	epoch		bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

-- One row per spool.rewind_processor call (processor_ops.c).
CREATE TABLE @extschema@.processor_rewinds (
	id			bigserial PRIMARY KEY,
	processor	text NOT NULL REFERENCES @extschema@.processors ON DELETE CASCADE,
	epoch		bigint NOT NULL,
	from_cursor	bigint NOT NULL,		-- the committed cursor before
	to_cursor	bigint NOT NULL,
	replay_from	bigint NOT NULL,		-- the snapshot or start the state is rebuilt from
	outputs		text NOT NULL CHECK (outputs IN ('suppress', 'emit')),
	token		bigint NOT NULL,		-- the gate's token the rewind took: later commits carry a larger one
	by_role		regrole NOT NULL,
	at			timestamptz NOT NULL DEFAULT now()
);

-- Snapshots can be megabytes; lz4 compresses them several times faster than pglz.
DO $$
BEGIN
	IF 'lz4' = ANY ((SELECT enumvals FROM pg_catalog.pg_settings
					  WHERE name = 'default_toast_compression')::text[]) THEN
		ALTER TABLE @extschema@.processor_checkpoints ALTER COLUMN state SET COMPRESSION lz4;
	END IF;
END $$;

-- The outbox: see the "Outbox and dispatch" section below.  Processor
-- outputs are inserted by the replicas through the code path of spool.enqueue.

CREATE FUNCTION @extschema@.create_processor(name text, handler regprocedure,
											 options jsonb DEFAULT '{}')
RETURNS void
AS 'MODULE_PATHNAME', 'spool_create_processor'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.create_processor(text, regprocedure, jsonb) IS
'Define a processor (created stopped; see start_processor); the handler and options are validated now';

CREATE FUNCTION @extschema@.start_processor(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_start_processor'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.start_processor(text) IS
'Enable a processor: the launcher starts its replicas';

CREATE FUNCTION @extschema@.stop_processor(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_stop_processor'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.stop_processor(text) IS
'Disable a processor: its replicas stop; the checkpoint and outputs stay';

CREATE FUNCTION @extschema@.drop_processor(name text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_drop_processor'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.drop_processor(text) IS
'Remove a processor and its checkpoint (its outbox rows stay); it no longer holds spool segments back';

CREATE FUNCTION @extschema@.alter_processor(name text, options jsonb)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_alter_processor'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.alter_processor(text, jsonb) IS
'Change replicas, batch_size, lease_ttl or checkpoint_every of a processor (merged over the stored options; null resets one); running replicas pick the change up, the checkpoint stays';

CREATE FUNCTION @extschema@.rewind_processor(name text, to_cursor bigint,
											 outputs text DEFAULT 'suppress')
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_rewind_processor'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.rewind_processor(text, bigint, text) IS
'Rebuild a processor''s state from the spool as of to_cursor and continue from there; outputs ''suppress'' (not written again up to the old committed cursor) or ''emit'' (written again after to_cursor).  Returns the new epoch';

CREATE FUNCTION @extschema@.window_alert(state jsonb, entries @extschema@.entries[])
RETURNS @extschema@.step
AS 'MODULE_PATHNAME', 'spool_window_alert'
LANGUAGE C STABLE;
COMMENT ON FUNCTION @extschema@.window_alert(jsonb, @extschema@.entries[]) IS
'Built-in handler: per-key windowed aggregate with a threshold alert (settings in state->''config'' or the processor''s handler options)';

CREATE FUNCTION @extschema@.current_replica()
RETURNS int
AS 'MODULE_PATHNAME', 'spool_current_replica'
LANGUAGE C STABLE;
COMMENT ON FUNCTION @extschema@.current_replica() IS
'Inside a processor replica: its replica number (1..replicas); NULL elsewhere';

CREATE FUNCTION @extschema@.handler_settings()
RETURNS jsonb
AS 'MODULE_PATHNAME', 'spool_handler_settings'
LANGUAGE C STABLE;
COMMENT ON FUNCTION @extschema@.handler_settings() IS
'Inside a processor replica: the processor''s options->''handler''; NULL elsewhere';

CREATE FUNCTION @extschema@.processor_runtime(
	OUT processor text, OUT replica int, OUT pid int, OUT role text,
	OUT cursor bigint, OUT committed_cursor bigint,
	OUT state_hash bigint, OUT state_hash_cursor bigint, OUT token bigint,
	OUT takeovers bigint, OUT last_takeover_at timestamptz,
	OUT last_takeover_ms float8, OUT entries bigint, OUT batches bigint,
	OUT outputs bigint, OUT hash_checks bigint, OUT hash_mismatches bigint,
	OUT errors bigint, OUT last_error text, OUT last_error_at timestamptz,
	OUT started_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_processor_runtime'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.processor_runtime() IS
'Internal: the processor replicas'' shared-memory state (see spool.processor_status)';

CREATE VIEW @extschema@.processor_status AS
	SELECT p.name AS processor, r.replica, r.pid,
		   CASE WHEN NOT p.enabled THEN 'stopped'
				WHEN pg_catalog.pg_is_in_recovery() THEN NULL	-- a hot standby
				ELSE coalesce(r.role, 'starting') END AS role,
		   r.cursor, c.committed_cursor,
		   greatest((SELECT next_cursor - 1 FROM @extschema@.spool_state) - r.cursor, 0) AS lag,
		   r.state_hash, r.state_hash_cursor, r.token, r.takeovers,
		   r.last_takeover_at, r.last_takeover_ms, r.entries, r.batches, r.outputs,
		   r.hash_checks, r.hash_mismatches, r.errors, r.last_error, r.last_error_at,
		   r.started_at, c.token AS gate_token, c.state_cursor AS snapshot_cursor,
		   c.epoch AS rewinds
	  FROM @extschema@.processors p
	  LEFT JOIN @extschema@.processor_checkpoints c ON c.processor = p.name
	  LEFT JOIN @extschema@.processor_runtime() r ON r.processor = p.name;

------------------------------------------------------------------------------
-- Outbox and dispatch (docs/outbox.md)
------------------------------------------------------------------------------

-- One row per target.  options holds the validated options with defaults
-- filled in; options->'kafka' may hold credentials (see spool.target_config).
CREATE TABLE @extschema@.targets (
	name		text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,48}$'),
	id			int NOT NULL UNIQUE,
	kind		text NOT NULL CHECK (kind IN ('sql', 'notify', 'kafka')),
	options		jsonb NOT NULL,
	owner		regrole NOT NULL,
	created_at	timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE @extschema@.target_id_seq AS int;

-- Roles the owner of a target allowed to write into it (spool.grant_target);
-- the owner's members may anyway.
CREATE TABLE @extschema@.target_grants (
	target_id	int NOT NULL REFERENCES @extschema@.targets (id) ON DELETE CASCADE,
	role		oid NOT NULL,
	PRIMARY KEY (target_id, role)
);

-- Outbox ids.  CACHE 1 matters: ids must be handed out in one global order
-- for the commit-safe horizon (src/outbox_enqueue.c) to hold.
CREATE SEQUENCE @extschema@.outbox_id_seq CACHE 1;

-- Every outbox row.  Each target is a partition, itself a ring of eight list
-- partitions ("slots", slot = (id / spool.outbox_segment_size) % 8) that are
-- truncated once every row in them is delivered: rows are inserted and never
-- updated or deleted.  shard is -1 for a barrier (it concerns every shard).
CREATE TABLE @extschema@.outbox_store (
	id			bigint NOT NULL,
	target_id	int NOT NULL,
	slot		int NOT NULL,
	shard		int NOT NULL,
	key			text,
	payload		jsonb NOT NULL,
	barrier		boolean NOT NULL DEFAULT false,
	processor	text,
	cursor		bigint,
	token		bigint,
	created_at	timestamptz NOT NULL DEFAULT now()
) PARTITION BY LIST (target_id);
CREATE INDEX outbox_store_shard_id ON @extschema@.outbox_store (shard, id);

-- Per target and shard: every row of the shard with id <= position has been
-- delivered, parked in outbox_retry or dead-lettered (for shard 0 this also
-- covers the target's barriers).  Updated once per delivered batch.
CREATE TABLE @extschema@.outbox_positions (
	target_id	int NOT NULL,
	shard		int NOT NULL,
	position	bigint NOT NULL DEFAULT 0,
	updated_at	timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (target_id, shard)
) WITH (fillfactor = 10);

-- Parked rows: a row that failed (attempts > 0) and the rows of the same key
-- that wait behind it (attempts = 0).  Copied out of outbox_store, so that
-- rotation never has to wait for a retry.
CREATE TABLE @extschema@.outbox_retry (
	id			bigint PRIMARY KEY,
	target		text NOT NULL,
	target_id	int NOT NULL,
	shard		int NOT NULL,
	key			text,
	payload		jsonb NOT NULL,
	barrier		boolean NOT NULL DEFAULT false,
	processor	text,
	cursor		bigint,
	created_at	timestamptz NOT NULL,
	attempts	int NOT NULL DEFAULT 0,
	next_attempt_at timestamptz,
	last_error	text,
	first_failed_at timestamptz
);
CREATE INDEX outbox_retry_target ON @extschema@.outbox_retry (target_id, shard, id);

-- Dead letters: rows that failed retry_limit times.  spool.redrive puts one back.
CREATE TABLE @extschema@.outbox_dead (
	id			bigint PRIMARY KEY,
	target		text NOT NULL,
	target_id	int NOT NULL,
	shard		int NOT NULL,
	key			text,
	payload		jsonb NOT NULL,
	barrier		boolean NOT NULL DEFAULT false,
	processor	text,
	cursor		bigint,
	created_at	timestamptz NOT NULL,
	attempts	int NOT NULL,
	last_error	text,
	failed_at	timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_dead_target ON @extschema@.outbox_dead (target, id);

CREATE FUNCTION @extschema@.create_target(name text, kind text, options jsonb DEFAULT '{}')
RETURNS void
AS 'MODULE_PATHNAME', 'spool_create_target'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.create_target(text, text, jsonb) IS
'Define an outbox target (kind sql, notify or kafka); its dispatchers start at commit';

CREATE FUNCTION @extschema@.drop_target(name text, force boolean DEFAULT false)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_drop_target'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.drop_target(text, boolean) IS
'Remove a target with its outbox rows, parked rows and dead letters; refused while rows are undelivered unless force';

CREATE FUNCTION @extschema@.alter_target(name text, options jsonb)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_alter_target'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.alter_target(text, jsonb) IS
'Change options of a target (merged over the current ones; null resets one), checked as at create; not shards. Its workers restart with them after commit, keeping every row';

CREATE FUNCTION @extschema@.enqueue(target text, key text, payload jsonb)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_enqueue'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.enqueue(text, text, jsonb) IS
'Write a row to the outbox in the current transaction; returns its outbox id';

CREATE FUNCTION @extschema@.enqueue_barrier(target text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_enqueue_barrier'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.enqueue_barrier(text) IS
'Write a barrier: delivered after every earlier row of the target, before every later one';

CREATE FUNCTION @extschema@.grant_target(target text, role text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_grant_target'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.grant_target(text, text) IS
'Allow role (and its members) to write into a target: spool.enqueue, enqueue_barrier and processor outputs; owner only';

CREATE FUNCTION @extschema@.revoke_target(target text, role text)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_revoke_target'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.revoke_target(text, text) IS
'Take back a grant_target; owner only';

CREATE FUNCTION @extschema@.redrive(outbox_id bigint)
RETURNS void
AS 'MODULE_PATHNAME', 'spool_redrive'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.redrive(bigint) IS
'Put a dead-lettered row back: it is retried next on its key, with its outbox id';

CREATE FUNCTION @extschema@.outbox_runtime(
	OUT target_id int, OUT shard int, OUT pid int, OUT state text,
	OUT delivered bigint, OUT flushes_size bigint, OUT flushes_interval bigint,
	OUT flushes_barrier bigint, OUT flushes_close bigint,
	OUT batch_p50_le float8, OUT batch_p99_le float8, OUT batch_max bigint,
	OUT flush_ms_p50_le float8, OUT flush_ms_p99_le float8, OUT flush_ms_max float8,
	OUT barriers bigint, OUT barrier_drain_ms_last float8,
	OUT barrier_drain_ms_p50_le float8, OUT barrier_drain_ms_max float8,
	OUT retries bigint, OUT blocked_keys int, OUT last_error text,
	OUT last_error_at timestamptz, OUT last_flush_at timestamptz,
	OUT started_at timestamptz, OUT batch_hist bigint[], OUT flush_hist bigint[],
	OUT drain_hist bigint[], OUT batch_sum bigint, OUT flush_ms_sum float8,
	OUT drain_ms_sum float8)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_outbox_runtime'
LANGUAGE C VOLATILE ROWS 16;
COMMENT ON FUNCTION @extschema@.outbox_runtime() IS
'Internal: what each dispatcher shard publishes in shared memory (see spool.outbox_status)';

-- Options without secrets: values under "kafka" are masked unless the caller
-- owns the target or is a superuser.
CREATE VIEW @extschema@.target_config AS
	SELECT t.name, t.kind,
		   CASE WHEN t.kind <> 'kafka' OR pg_has_role(t.owner, 'MEMBER')
					 OR (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
				THEN t.options
				ELSE t.options || jsonb_build_object('kafka',
						coalesce((SELECT jsonb_object_agg(k, '********')
									FROM jsonb_object_keys(t.options->'kafka') k), '{}'))
		   END AS options,
		   t.owner,
		   ARRAY(SELECT g.role::regrole FROM @extschema@.target_grants g
				  WHERE g.target_id = t.id ORDER BY 1) AS writers,
		   t.created_at
	  FROM @extschema@.targets t;

CREATE VIEW @extschema@.outbox AS
	SELECT o.id, t.name AS target, o.shard, o.key, o.payload, o.barrier,
		   o.processor, o.cursor, o.token, o.created_at,
		   (o.id <= p.position
			AND NOT EXISTS (SELECT FROM @extschema@.outbox_retry r WHERE r.id = o.id)
			AND NOT EXISTS (SELECT FROM @extschema@.outbox_dead d WHERE d.id = o.id)) AS delivered
	  FROM @extschema@.outbox_store o
	  JOIN @extschema@.targets t ON t.id = o.target_id
	  LEFT JOIN @extschema@.outbox_positions p
		ON p.target_id = o.target_id AND p.shard = greatest(o.shard, 0);

-- Behind spool.outbox_status.  A function so that it can turn JIT off: the
-- planner's estimates for the per-shard subqueries are far above
-- jit_above_cost, and compiling took seconds for a query of milliseconds.
CREATE FUNCTION @extschema@._outbox_status(
	OUT target text, OUT shard int, OUT kind text, OUT pid int, OUT state text,
	OUT "position" bigint, OUT backlog bigint, OUT waiting bigint, OUT blocked_keys int,
	OUT oldest_undelivered_age interval, OUT delivered bigint,
	OUT flushes_size bigint, OUT flushes_interval bigint, OUT flushes_barrier bigint,
	OUT flushes_close bigint, OUT batch_p50_le float8, OUT batch_p99_le float8, OUT batch_max bigint,
	OUT flush_ms_p50_le float8, OUT flush_ms_p99_le float8, OUT flush_ms_max float8,
	OUT barriers bigint, OUT barrier_drain_ms_last float8, OUT barrier_drain_ms_p50_le float8,
	OUT barrier_drain_ms_max float8, OUT retries bigint, OUT dead_letters bigint,
	OUT last_error text, OUT last_error_at timestamptz, OUT last_flush_at timestamptz,
	OUT started_at timestamptz)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
ROWS 16
AS $$
	SELECT t.name AS target, s.shard, t.kind, r.pid,
		   coalesce(r.state, 'stopped') AS state,
		   p.position,
		   b.backlog,
		   (SELECT count(*) FROM @extschema@.outbox_retry q
			 WHERE q.target_id = t.id AND q.shard = s.shard) AS waiting,
		   coalesce(r.blocked_keys, 0) AS blocked_keys,
		   clock_timestamp() - least(b.oldest,
				(SELECT min(q.created_at) FROM @extschema@.outbox_retry q
				  WHERE q.target_id = t.id AND q.shard = s.shard)) AS oldest_undelivered_age,
		   coalesce(r.delivered, 0) AS delivered,
		   coalesce(r.flushes_size, 0) AS flushes_size,
		   coalesce(r.flushes_interval, 0) AS flushes_interval,
		   coalesce(r.flushes_barrier, 0) AS flushes_barrier,
		   coalesce(r.flushes_close, 0) AS flushes_close,
		   r.batch_p50_le, r.batch_p99_le, r.batch_max,
		   r.flush_ms_p50_le, r.flush_ms_p99_le, r.flush_ms_max,
		   coalesce(r.barriers, 0) AS barriers,
		   r.barrier_drain_ms_last, r.barrier_drain_ms_p50_le, r.barrier_drain_ms_max,
		   coalesce(r.retries, 0) AS retries,
		   (SELECT count(*) FROM @extschema@.outbox_dead d
			 WHERE d.target_id = t.id AND d.shard = s.shard) AS dead_letters,
		   r.last_error, r.last_error_at, r.last_flush_at, r.started_at
	  FROM @extschema@.targets t
	  -- constant bounds: the planner then expects 16 rows, not 1000
	  CROSS JOIN LATERAL generate_series(0, 15) AS s(shard)
	  LEFT JOIN @extschema@.outbox_positions p
		ON p.target_id = t.id AND p.shard = s.shard
	  LEFT JOIN LATERAL (
		SELECT count(*) AS backlog, min(o.created_at) AS oldest
		  FROM @extschema@.outbox_store o
		 WHERE o.target_id = t.id
		   AND (o.shard = s.shard OR (s.shard = 0 AND o.shard = -1))
		   AND o.id > p.position) b ON true
	  LEFT JOIN @extschema@.outbox_runtime() r
		ON r.target_id = t.id AND r.shard = s.shard
	 WHERE s.shard < (t.options->>'shards')::int
$$;
COMMENT ON FUNCTION @extschema@._outbox_status() IS
'Internal: the rows of spool.outbox_status';

CREATE VIEW @extschema@.outbox_status AS
	SELECT * FROM @extschema@._outbox_status();

------------------------------------------------------------------------------
-- Retention of history tables and stale spool consumers (docs/operations.md)
------------------------------------------------------------------------------

-- The promoter removes history rows older than their spool.*_retention
-- setting in small batches, oldest first, through these indexes.  Consumed
-- nonces only: allocated and released ones are still needed, and
-- nonce_signer.next_nonce (never lowered) keeps removed nonces from coming
-- back.
CREATE INDEX dead_letters_at ON @extschema@.dead_letters (at);
CREATE INDEX gaps_at ON @extschema@.gaps (at);
CREATE INDEX outbox_dead_failed_at ON @extschema@.outbox_dead (failed_at);
CREATE INDEX nonce_store_consumed_at ON @extschema@.nonce_store (updated_at)
	WHERE state = 'consumed';

-- Every reader that holds spool segments back: registered consumers and
-- processors (whose consumer row is 'processor:<name>').  behind_since: when
-- the first entry it has not passed was spooled.  stale: it has entries to
-- read and neither it nor the spool in front of it moved for
-- spool.max_retention (0: never stale).
CREATE VIEW @extschema@.consumer_status AS
	SELECT x.kind, x.name, x.owner, x.cursor,
		   CASE WHEN x.cursor IS NOT NULL THEN greatest(s.spool_cursor - x.cursor, 0) END AS lag,
		   x.moved_at, b.behind_since,
		   coalesce(s.spool_cursor > x.cursor AND m.max_retention > interval '0'
					AND greatest(x.moved_at, b.behind_since) < now() - m.max_retention,
					false) AS stale,
		   x.detached_at
	  FROM (SELECT CASE WHEN p.name IS NULL THEN 'consumer' ELSE 'processor' END AS kind,
				   coalesce(p.name, c.name) AS name, coalesce(p.owner, c.owner) AS owner,
				   c.committed_cursor AS cursor, c.moved_at, p.detached_at
			  FROM @extschema@.consumers c
			  LEFT JOIN @extschema@.processors p ON c.name = 'processor:' || p.name
			UNION ALL
			SELECT 'processor', p.name, p.owner, NULL, NULL, p.detached_at
			  FROM @extschema@.processors p
			 WHERE NOT EXISTS (SELECT FROM @extschema@.consumers c
								WHERE c.name = 'processor:' || p.name)) x
	 CROSS JOIN (SELECT next_cursor - 1 AS spool_cursor FROM @extschema@.spool_state
				  WHERE id = 1) s
	 CROSS JOIN (SELECT pg_catalog.current_setting('spool.max_retention')::interval
					   AS max_retention) m
	  LEFT JOIN LATERAL (SELECT e.spooled_at AS behind_since FROM @extschema@.entries e
						  WHERE e.cursor > x.cursor ORDER BY e.cursor LIMIT 1) b ON true;

------------------------------------------------------------------------------
-- Stage numbers: histograms and counters of every stage (ingest, promoter,
-- processors, outbox), from shared memory, since the server started.
------------------------------------------------------------------------------

CREATE FUNCTION @extschema@._ingest_histograms(
	OUT stage text, OUT object text, OUT instance int, OUT histogram text, OUT unit text,
	OUT bounds float8[], OUT counts bigint[], OUT count bigint, OUT sum float8,
	OUT max float8, OUT last float8, OUT last_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_ingest_histograms'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@._ingest_histograms() IS
'Internal: the ingest workers'' and the promoter''s histograms (see spool.stage_histograms)';

CREATE FUNCTION @extschema@._ingest_counters(
	OUT source text, OUT errors bigint, OUT ended_size bigint, OUT ended_bytes bigint,
	OUT ended_time bigint, OUT ended_stop bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_ingest_counters'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@._ingest_counters() IS
'Internal: per source, errors and batches by what ended them (see spool.ingest_stats)';

CREATE FUNCTION @extschema@._processor_histograms(
	OUT stage text, OUT object text, OUT instance int, OUT histogram text, OUT unit text,
	OUT bounds float8[], OUT counts bigint[], OUT count bigint, OUT sum float8,
	OUT max float8, OUT last float8, OUT last_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'spool_processor_histograms'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@._processor_histograms() IS
'Internal: the processor replicas'' histograms (see spool.stage_histograms)';

-- One row per histogram: bounds[i] is the upper bound of bucket i, counts
-- has one more element (the values above the last bound); cumulative[i]
-- counts the values up to bounds[i], as Prometheus buckets do; base_bounds
-- and base_sum are in Prometheus' base units (seconds where unit is ms).
CREATE VIEW @extschema@.stage_histograms AS
	SELECT h.*,
		   ARRAY(SELECT sum(c) OVER (ORDER BY i)
				   FROM unnest(h.counts) WITH ORDINALITY u(c, i)
				  ORDER BY i LIMIT cardinality(h.bounds))::bigint[] AS cumulative,
		   CASE WHEN h.unit = 'ms'
				THEN ARRAY(SELECT b / 1000 FROM unnest(h.bounds) WITH ORDINALITY u(b, i) ORDER BY i)
				ELSE h.bounds END AS base_bounds,
		   CASE WHEN h.unit = 'ms' THEN h.sum / 1000 ELSE h.sum END AS base_sum
	  FROM (
	SELECT * FROM @extschema@._ingest_histograms()
	UNION ALL
	SELECT * FROM @extschema@._processor_histograms()
	UNION ALL
	SELECT 'outbox', t.name, r.shard, h.histogram, h.unit, h.bounds, h.counts,
		   (SELECT sum(c)::bigint FROM unnest(h.counts) c), h.sum, h.max, h.last, r.last_flush_at
	  FROM @extschema@.outbox_runtime() r
	  JOIN @extschema@.targets t ON t.id = r.target_id
	  CROSS JOIN LATERAL (VALUES
		('batch_rows', 'rows', ARRAY(SELECT 2.0 ^ i FROM generate_series(0, 14) i)::float8[],
		 r.batch_hist, r.batch_sum::float8, r.batch_max::float8, NULL::float8),
		('flush_ms', 'ms', ARRAY(SELECT 0.25 * 2.0 ^ i FROM generate_series(0, 15) i)::float8[],
		 r.flush_hist, r.flush_ms_sum, r.flush_ms_max, NULL),
		('barrier_drain_ms', 'ms', ARRAY(SELECT 2.0 ^ i FROM generate_series(0, 16) i)::float8[],
		 r.drain_hist, r.drain_ms_sum, r.barrier_drain_ms_max, r.barrier_drain_ms_last))
		AS h(histogram, unit, bounds, counts, sum, max, last)
	 WHERE h.histogram <> 'barrier_drain_ms' OR r.shard = 0) h;

-- The upper bound of the bucket holding the q-quantile, capped at max:
-- "at most this", not an exact quantile.  NULL when the histogram is empty.
CREATE FUNCTION @extschema@._hist_le(bounds float8[], counts bigint[], q float8, max float8)
RETURNS float8
LANGUAGE sql IMMUTABLE
AS $$
	SELECT least(coalesce(min(bounds[i]) FILTER (WHERE acc >= q * total), max), max)
	  FROM (SELECT i, sum(counts[i]) OVER (ORDER BY i) AS acc,
				   (SELECT sum(c) FROM unnest(counts) c) AS total
			  FROM generate_series(1, cardinality(counts)) i) x
	 WHERE total > 0
$$;
COMMENT ON FUNCTION @extschema@._hist_le(float8[], bigint[], float8, float8) IS
'Internal: the bucket bound holding a quantile of a stage histogram';

CREATE VIEW @extschema@.ingest_stats AS
	SELECT c.source, h.count AS batches,
		   c.ended_size, c.ended_bytes, c.ended_time, c.ended_stop, c.errors,
		   h.sum::bigint AS rows,
		   @extschema@._hist_le(h.bounds, h.counts, 0.5, h.max) AS rows_p50_le,
		   @extschema@._hist_le(h.bounds, h.counts, 0.99, h.max) AS rows_p99_le,
		   h.max::bigint AS rows_max,
		   @extschema@._hist_le(b.bounds, b.counts, 0.5, b.max) AS batch_ms_p50_le,
		   @extschema@._hist_le(b.bounds, b.counts, 0.99, b.max) AS batch_ms_p99_le,
		   b.max AS batch_ms_max,
		   @extschema@._hist_le(w.bounds, w.counts, 0.5, w.max) AS stage_ms_p50_le,
		   @extschema@._hist_le(w.bounds, w.counts, 0.99, w.max) AS stage_ms_p99_le,
		   w.max AS stage_ms_max,
		   h.last_at AS last_batch_at
	  FROM @extschema@._ingest_counters() c
	  JOIN @extschema@._ingest_histograms() h
		ON h.stage = 'ingest' AND h.object = c.source AND h.histogram = 'batch_rows'
	  JOIN @extschema@._ingest_histograms() b
		ON b.stage = 'ingest' AND b.object = c.source AND b.histogram = 'batch_ms'
	  JOIN @extschema@._ingest_histograms() w
		ON w.stage = 'ingest' AND w.object = c.source AND w.histogram = 'stage_ms';

CREATE VIEW @extschema@.promoter_status AS
	SELECT (SELECT next_cursor - 1 FROM @extschema@.spool_state) AS cursor,
		   h.count AS promotions, h.sum::bigint AS entries,
		   @extschema@._hist_le(h.bounds, h.counts, 0.5, h.max) AS rows_p50_le,
		   @extschema@._hist_le(h.bounds, h.counts, 0.99, h.max) AS rows_p99_le,
		   h.max::bigint AS rows_max,
		   @extschema@._hist_le(b.bounds, b.counts, 0.5, b.max) AS batch_ms_p50_le,
		   @extschema@._hist_le(b.bounds, b.counts, 0.99, b.max) AS batch_ms_p99_le,
		   b.max AS batch_ms_max,
		   l.last AS lag_ms_last,
		   @extschema@._hist_le(l.bounds, l.counts, 0.5, l.max) AS lag_ms_p50_le,
		   @extschema@._hist_le(l.bounds, l.counts, 0.99, l.max) AS lag_ms_p99_le,
		   l.max AS lag_ms_max,
		   h.last_at AS last_promotion_at
	  FROM @extschema@._ingest_histograms() h
	  JOIN @extschema@._ingest_histograms() b ON b.stage = 'promoter' AND b.histogram = 'batch_ms'
	  JOIN @extschema@._ingest_histograms() l ON l.stage = 'promoter' AND l.histogram = 'lag_ms'
	 WHERE h.stage = 'promoter' AND h.histogram = 'batch_rows';

CREATE VIEW @extschema@.processor_stats AS
	SELECT e.object AS processor, e.instance AS replica, e.count AS batches,
		   e.sum::bigint AS entries,
		   @extschema@._hist_le(e.bounds, e.counts, 0.5, e.max) AS entries_p50_le,
		   e.max::bigint AS entries_max,
		   @extschema@._hist_le(b.bounds, b.counts, 0.5, b.max) AS batch_ms_p50_le,
		   @extschema@._hist_le(b.bounds, b.counts, 0.99, b.max) AS batch_ms_p99_le,
		   b.max AS batch_ms_max,
		   @extschema@._hist_le(h.bounds, h.counts, 0.5, h.max) AS handler_ms_p50_le,
		   @extschema@._hist_le(h.bounds, h.counts, 0.99, h.max) AS handler_ms_p99_le,
		   h.max AS handler_ms_max,
		   c.count AS commits,
		   @extschema@._hist_le(c.bounds, c.counts, 0.5, c.max) AS commit_ms_p50_le,
		   @extschema@._hist_le(c.bounds, c.counts, 0.99, c.max) AS commit_ms_p99_le,
		   c.max AS commit_ms_max,
		   s.count AS snapshots,
		   @extschema@._hist_le(s.bounds, s.counts, 0.5, s.max) AS snapshot_ms_p50_le,
		   s.max AS snapshot_ms_max,
		   e.last_at AS last_batch_at
	  FROM @extschema@._processor_histograms() e
	  JOIN @extschema@._processor_histograms() b
		ON (b.object, b.instance, b.histogram) = (e.object, e.instance, 'batch_ms')
	  JOIN @extschema@._processor_histograms() h
		ON (h.object, h.instance, h.histogram) = (e.object, e.instance, 'handler_ms')
	  JOIN @extschema@._processor_histograms() c
		ON (c.object, c.instance, c.histogram) = (e.object, e.instance, 'commit_ms')
	  JOIN @extschema@._processor_histograms() s
		ON (s.object, s.instance, s.histogram) = (e.object, e.instance, 'snapshot_ms')
	 WHERE e.histogram = 'batch_entries';

------------------------------------------------------------------------------
-- Metrics in the Prometheus text format
------------------------------------------------------------------------------

-- One sample line: name{labels} value, label values escaped as Prometheus wants.
CREATE FUNCTION @extschema@._metric(name text, labels text[], value numeric)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
	SELECT name
		|| CASE WHEN cardinality(labels) = 0 THEN '' ELSE
			'{' || (SELECT string_agg(labels[i] || '="'
						|| replace(replace(replace(coalesce(labels[i + 1], ''), '\', '\\'), '"', '\"'), E'\n', '\n')
						|| '"', ',' ORDER BY i)
					  FROM generate_series(1, cardinality(labels), 2) i) || '}' END
		|| ' ' || coalesce(value::text, 'NaN')
$$;
COMMENT ON FUNCTION @extschema@._metric(text, text[], numeric) IS
'Internal: one Prometheus sample line; labels are name, value pairs';

-- Histogram sample lines: cumulative buckets (le = bounds[i] * scale), +Inf,
-- _sum and _count, as Prometheus wants them.
CREATE FUNCTION @extschema@._histogram(name text, labels text[], bounds float8[],
									   counts bigint[], total float8, scale float8)
RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
	SELECT array_agg(l ORDER BY ord) FROM (
		SELECT i AS ord, @extschema@._metric(name || '_bucket',
				labels || ARRAY['le', (bounds[i] * scale)::text],
				(SELECT sum(c) FROM unnest(counts[1:i]) c)) AS l
		  FROM generate_series(1, cardinality(bounds)) i
		UNION ALL
		SELECT 1000, @extschema@._metric(name || '_bucket', labels || ARRAY['le', '+Inf'],
				(SELECT sum(c) FROM unnest(counts) c))
		UNION ALL
		SELECT 1001, @extschema@._metric(name || '_sum', labels, (total * scale)::numeric)
		UNION ALL
		SELECT 1002, @extschema@._metric(name || '_count', labels,
				(SELECT sum(c) FROM unnest(counts) c))) x
$$;
COMMENT ON FUNCTION @extschema@._histogram(text, text[], float8[], bigint[], float8, float8) IS
'Internal: the sample lines of one Prometheus histogram';

CREATE FUNCTION @extschema@.metrics()
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
	WITH st AS MATERIALIZED (SELECT * FROM @extschema@.outbox_status),
	rt AS MATERIALIZED (SELECT * FROM @extschema@.outbox_runtime()),
	sh AS MATERIALIZED (SELECT * FROM @extschema@._ingest_histograms()
						UNION ALL SELECT * FROM @extschema@._processor_histograms()),
	m(ord, name, type, help, lines) AS (
		VALUES
		(1, 'spool_cursor', 'gauge', 'Last committed spool cursor.',
		 ARRAY(SELECT @extschema@._metric('spool_cursor', '{}', next_cursor - 1)
				 FROM @extschema@.spool_state)),
		(2, 'spool_source_up', 'gauge', 'Source state: 1 running, 0 otherwise (state label says which; error when any partition is).',
		 ARRAY(SELECT @extschema@._metric('spool_source_up',
					ARRAY['source', source, 'state', state], (state = 'running')::int)
				 FROM (SELECT source, CASE WHEN bool_or(state = 'error') THEN 'error' ELSE min(state) END AS state
						 FROM @extschema@.source_status GROUP BY source) x ORDER BY source)),
		(3, 'spool_source_lag', 'gauge', 'Kafka messages not yet durable in the spool, per partition.',
		 ARRAY(SELECT @extschema@._metric('spool_source_lag',
					ARRAY['source', source, 'topic', topic, 'partition', kafka_partition::text], lag)
				 FROM @extschema@.source_status WHERE topic IS NOT NULL ORDER BY source, topic, kafka_partition)),
		(4, 'spool_source_next_offset', 'gauge', 'Next Kafka offset to make durable, per partition.',
		 ARRAY(SELECT @extschema@._metric('spool_source_next_offset',
					ARRAY['source', source, 'topic', topic, 'partition', kafka_partition::text], next_offset)
				 FROM @extschema@.source_status WHERE topic IS NOT NULL ORDER BY source, topic, kafka_partition)),
		(5, 'spool_dead_letters', 'gauge', 'Messages in spool.dead_letters, per source.',
		 ARRAY(SELECT @extschema@._metric('spool_dead_letters', ARRAY['source', source], count(*))
				 FROM @extschema@.dead_letters GROUP BY source ORDER BY source)),
		(6, 'spool_gaps', 'gauge', 'Retention gaps recorded in spool.gaps, per source.',
		 ARRAY(SELECT @extschema@._metric('spool_gaps', ARRAY['source', source], count(*))
				 FROM @extschema@.gaps GROUP BY source ORDER BY source)),
		(7, 'spool_segments', 'gauge', 'Spool segments by state.',
		 ARRAY(SELECT @extschema@._metric('spool_segments', ARRAY['state', state], count(*))
				 FROM @extschema@.segments GROUP BY state ORDER BY state)),
		(8, 'spool_processor_active', 'gauge', '1 for the replica holding the output gate, 0 otherwise (role label).',
		 ARRAY(SELECT @extschema@._metric('spool_processor_active',
					ARRAY['processor', processor, 'replica', replica::text, 'role', role], (role = 'active')::int)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(9, 'spool_processor_lag', 'gauge', 'Spool entries after the replica''s cursor.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_lag',
					ARRAY['processor', processor, 'replica', replica::text], lag)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(10, 'spool_processor_committed_cursor', 'gauge', 'Outputs exist for every entry up to this cursor.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_committed_cursor', ARRAY['processor', processor],
					committed_cursor)
				 FROM @extschema@.processor_checkpoints ORDER BY processor)),
		(11, 'spool_processor_takeovers_total', 'counter', 'Output gates taken over by the replica.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_takeovers_total',
					ARRAY['processor', processor, 'replica', replica::text], takeovers)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(12, 'spool_processor_last_takeover_seconds', 'gauge', 'Latency of the replica''s last takeover.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_last_takeover_seconds',
					ARRAY['processor', processor, 'replica', replica::text], (last_takeover_ms / 1000)::numeric)
				 FROM @extschema@.processor_status WHERE last_takeover_ms IS NOT NULL ORDER BY processor, replica)),
		(13, 'spool_processor_entries_total', 'counter', 'Entries the replica applied.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_entries_total',
					ARRAY['processor', processor, 'replica', replica::text], entries)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(14, 'spool_processor_outputs_total', 'counter', 'Outputs the replica committed.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_outputs_total',
					ARRAY['processor', processor, 'replica', replica::text], outputs)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(15, 'spool_processor_errors_total', 'counter', 'Errors that made the replica exit.',
		 ARRAY(SELECT @extschema@._metric('spool_processor_errors_total',
					ARRAY['processor', processor, 'replica', replica::text], errors)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(16, 'spool_processor_hash_mismatches_total', 'counter', 'State hash mismatches seen by the replica (non-deterministic handler).',
		 ARRAY(SELECT @extschema@._metric('spool_processor_hash_mismatches_total',
					ARRAY['processor', processor, 'replica', replica::text], hash_mismatches)
				 FROM @extschema@.processor_status WHERE replica IS NOT NULL ORDER BY processor, replica)),
		(17, 'spool_nonce_worker_queued', 'gauge', 'Requests waiting for the nonce worker.',
		 ARRAY(SELECT @extschema@._metric('spool_nonce_worker_queued', ARRAY['worker', worker::text], queued)
				 FROM @extschema@.nonce_workers ORDER BY worker)),
		(18, 'spool_nonce_worker_served_total', 'counter', 'Requests the nonce worker slot served.',
		 ARRAY(SELECT @extschema@._metric('spool_nonce_worker_served_total', ARRAY['worker', worker::text], served)
				 FROM @extschema@.nonce_workers ORDER BY worker)),
		(19, 'spool_nonce_worker_takeovers_total', 'counter', 'Times the nonce worker slot got a new process.',
		 ARRAY(SELECT @extschema@._metric('spool_nonce_worker_takeovers_total', ARRAY['worker', worker::text], takeovers)
				 FROM @extschema@.nonce_workers ORDER BY worker)),
		(20, 'spool_leases_live', 'gauge', 'Leases held and not expired.',
		 ARRAY(SELECT @extschema@._metric('spool_leases_live', '{}', count(*))
				 FROM @extschema@.lease_store WHERE expires_at > clock_timestamp())),
		(21, 'spool_outbox_backlog', 'gauge', 'Outbox rows of the shard not yet delivered (parked rows not included).',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_backlog',
					ARRAY['target', target, 'shard', shard::text], backlog)
				 FROM st ORDER BY target, shard)),
		(22, 'spool_outbox_waiting', 'gauge', 'Parked rows of the shard: failed, or waiting behind a failed row of their key.',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_waiting',
					ARRAY['target', target, 'shard', shard::text], waiting)
				 FROM st ORDER BY target, shard)),
		(23, 'spool_outbox_oldest_undelivered_seconds', 'gauge', 'Age of the oldest undelivered row of the shard (0 when none).',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_oldest_undelivered_seconds',
					ARRAY['target', target, 'shard', shard::text],
					coalesce(extract(epoch FROM oldest_undelivered_age), 0))
				 FROM st ORDER BY target, shard)),
		(24, 'spool_outbox_delivered_total', 'counter', 'Rows the shard delivered since the server started.',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_delivered_total',
					ARRAY['target', target, 'shard', shard::text], delivered)
				 FROM st ORDER BY target, shard)),
		(25, 'spool_outbox_flushes_total', 'counter', 'Batches flushed, by what triggered the flush.',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_flushes_total',
					ARRAY['target', target, 'shard', shard::text, 'reason', x.reason], x.n)
				 FROM st, LATERAL (VALUES ('size', flushes_size), ('interval', flushes_interval),
									 ('barrier', flushes_barrier), ('close', flushes_close)) x(reason, n)
				 ORDER BY target, shard, x.reason)),
		(26, 'spool_outbox_retries_total', 'counter', 'Failed delivery attempts that will be retried.',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_retries_total',
					ARRAY['target', target, 'shard', shard::text], retries)
				 FROM st ORDER BY target, shard)),
		(27, 'spool_outbox_dead_letters', 'gauge', 'Rows of the shard in spool.outbox_dead.',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_dead_letters',
					ARRAY['target', target, 'shard', shard::text], dead_letters)
				 FROM st ORDER BY target, shard)),
		(28, 'spool_outbox_barriers_total', 'counter', 'Barriers delivered.',
		 ARRAY(SELECT @extschema@._metric('spool_outbox_barriers_total',
					ARRAY['target', target, 'shard', shard::text], barriers)
				 FROM st ORDER BY target, shard)),
		(29, 'spool_outbox_batch_rows', 'histogram', 'Rows per flushed batch.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_outbox_batch_rows',
					ARRAY['target', t.name, 'shard', r.shard::text],
					ARRAY(SELECT 2.0 ^ i FROM generate_series(0, 14) i)::float8[],
					r.batch_hist, r.batch_sum, 1))
				 FROM rt r JOIN @extschema@.targets t ON t.id = r.target_id)),
		(30, 'spool_outbox_flush_seconds', 'histogram', 'Time to deliver and commit one batch.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_outbox_flush_seconds',
					ARRAY['target', t.name, 'shard', r.shard::text],
					ARRAY(SELECT 0.25 * 2.0 ^ i FROM generate_series(0, 15) i)::float8[],
					r.flush_hist, r.flush_ms_sum, 0.001))
				 FROM rt r JOIN @extschema@.targets t ON t.id = r.target_id)),
		(31, 'spool_outbox_barrier_drain_seconds', 'histogram', 'From a barrier becoming deliverable to its delivery.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_outbox_barrier_drain_seconds',
					ARRAY['target', t.name, 'shard', r.shard::text],
					ARRAY(SELECT 2.0 ^ i FROM generate_series(0, 16) i)::float8[],
					r.drain_hist, r.drain_ms_sum, 0.001))
				 FROM rt r JOIN @extschema@.targets t ON t.id = r.target_id WHERE r.shard = 0)),
		(32, 'spool_source_errors_total', 'counter', 'Errors the source''s ingest worker recorded (broker, partition, metadata).',
		 ARRAY(SELECT @extschema@._metric('spool_source_errors_total', ARRAY['source', source], errors)
				 FROM @extschema@._ingest_counters() ORDER BY source)),
		(33, 'spool_ingest_batches_total', 'counter', 'Batches staged, by what ended the batch.',
		 ARRAY(SELECT @extschema@._metric('spool_ingest_batches_total',
					ARRAY['source', source, 'reason', x.reason], x.n)
				 FROM @extschema@._ingest_counters(),
					  LATERAL (VALUES ('size', ended_size), ('bytes', ended_bytes),
									  ('time', ended_time), ('stop', ended_stop)) x(reason, n)
				 ORDER BY source, x.reason)),
		(34, 'spool_ingest_batch_rows', 'histogram', 'Rows per staged batch.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_ingest_batch_rows', ARRAY['source', object],
					bounds, counts, sum, 1)) FROM sh WHERE stage = 'ingest' AND histogram = 'batch_rows')),
		(35, 'spool_ingest_batch_seconds', 'histogram', 'From a batch''s first message to its commit into staging.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_ingest_batch_seconds', ARRAY['source', object],
					bounds, counts, sum, 0.001)) FROM sh WHERE stage = 'ingest' AND histogram = 'batch_ms')),
		(36, 'spool_ingest_stage_seconds', 'histogram', 'The transaction writing a batch into staging.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_ingest_stage_seconds', ARRAY['source', object],
					bounds, counts, sum, 0.001)) FROM sh WHERE stage = 'ingest' AND histogram = 'stage_ms')),
		(37, 'spool_promoter_batch_entries', 'histogram', 'Entries made durable per promotion.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_promoter_batch_entries', '{}',
					bounds, counts, sum, 1)) FROM sh WHERE stage = 'promoter' AND histogram = 'batch_rows')),
		(38, 'spool_promoter_batch_seconds', 'histogram', 'The promotion transaction.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_promoter_batch_seconds', '{}',
					bounds, counts, sum, 0.001)) FROM sh WHERE stage = 'promoter' AND histogram = 'batch_ms')),
		(39, 'spool_promoter_lag_seconds', 'histogram', 'From the oldest staged batch of a promotion to its promotion.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_promoter_lag_seconds', '{}',
					bounds, counts, sum, 0.001)) FROM sh WHERE stage = 'promoter' AND histogram = 'lag_ms')),
		(40, 'spool_processor_batch_entries', 'histogram', 'Entries per processed batch.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_processor_batch_entries',
					ARRAY['processor', object, 'replica', instance::text], bounds, counts, sum, 1))
				 FROM sh WHERE stage = 'processor' AND histogram = 'batch_entries')),
		(41, 'spool_processor_batch_seconds', 'histogram', 'A batch''s transaction, from reading to commit.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_processor_batch_seconds',
					ARRAY['processor', object, 'replica', instance::text], bounds, counts, sum, 0.001))
				 FROM sh WHERE stage = 'processor' AND histogram = 'batch_ms')),
		(42, 'spool_processor_handler_seconds', 'histogram', 'The handler''s part of a batch.',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_processor_handler_seconds',
					ARRAY['processor', object, 'replica', instance::text], bounds, counts, sum, 0.001))
				 FROM sh WHERE stage = 'processor' AND histogram = 'handler_ms')),
		(43, 'spool_processor_commit_seconds', 'histogram', 'Writing the outputs, the gate check and the commit (active replica).',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_processor_commit_seconds',
					ARRAY['processor', object, 'replica', instance::text], bounds, counts, sum, 0.001))
				 FROM sh WHERE stage = 'processor' AND histogram = 'commit_ms')),
		(44, 'spool_processor_snapshot_seconds', 'histogram', 'Building and hashing a state snapshot (checkpoint).',
		 ARRAY(SELECT unnest(@extschema@._histogram('spool_processor_snapshot_seconds',
					ARRAY['processor', object, 'replica', instance::text], bounds, counts, sum, 0.001))
				 FROM sh WHERE stage = 'processor' AND histogram = 'snapshot_ms')),
		(45, 'spool_consumer_stale', 'gauge', '1 for a spool consumer or processor that has not moved for spool.max_retention while the spool did.',
		 ARRAY(SELECT @extschema@._metric('spool_consumer_stale',
					ARRAY['kind', kind, 'consumer', name], stale::int)
				 FROM @extschema@.consumer_status ORDER BY kind, name)),
		(46, 'spool_consumer_lag', 'gauge', 'Spool entries after the cursor a consumer or processor holds segments back at.',
		 ARRAY(SELECT @extschema@._metric('spool_consumer_lag',
					ARRAY['kind', kind, 'consumer', name], lag)
				 FROM @extschema@.consumer_status WHERE cursor IS NOT NULL ORDER BY kind, name))
	)
	SELECT string_agg('# HELP ' || name || ' ' || help || E'\n# TYPE ' || name || ' ' || type
					  || CASE WHEN cardinality(lines) > 0 THEN E'\n' || array_to_string(lines, E'\n') ELSE '' END,
					  E'\n' ORDER BY ord) || E'\n'
	  FROM m
$$;
COMMENT ON FUNCTION @extschema@.metrics() IS
'The spool''s counters and gauges in the Prometheus text exposition format';

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
	@extschema@.nonce_report(text, text, bigint, text),
	@extschema@.nonce_set_next(text, bigint, text, bigint),
	@extschema@.nonce_worker_status()
	TO spool_client;
GRANT SELECT ON @extschema@.leases, @extschema@.nonces, @extschema@.nonce_workers
	TO spool_client;
GRANT SELECT ON @extschema@.nonce_set_next_log TO spool_admin;
GRANT EXECUTE ON FUNCTION
	@extschema@.create_source(text, text, text[], jsonb),
	@extschema@.start_source(text),
	@extschema@.stop_source(text),
	@extschema@.drop_source(text),
	@extschema@.alter_source(text, text, jsonb),
	@extschema@.seek_source(text, text, int, bigint, timestamptz, boolean),
	@extschema@.replay_dead_letter(bigint),
	@extschema@.register_consumer(text, bigint),
	@extschema@.commit_consumer(text, bigint),
	@extschema@.drop_consumer(text),
	@extschema@.create_processor(text, regprocedure, jsonb),
	@extschema@.start_processor(text),
	@extschema@.stop_processor(text),
	@extschema@.drop_processor(text)
	TO spool_admin;
GRANT EXECUTE ON FUNCTION
	@extschema@.alter_processor(text, jsonb),
	@extschema@.rewind_processor(text, bigint, text)
	TO spool_admin;
GRANT SELECT ON @extschema@.processor_rewinds TO spool_admin;
GRANT EXECUTE ON FUNCTION
	@extschema@.window_alert(jsonb, @extschema@.entries[]),
	@extschema@.current_replica(),
	@extschema@.handler_settings(),
	@extschema@.processor_runtime()
	TO spool_admin, spool_client;
GRANT EXECUTE ON FUNCTION @extschema@.read(bigint, int, interval) TO spool_admin, spool_client;
GRANT EXECUTE ON FUNCTION @extschema@.metrics() TO spool_admin, spool_client;
GRANT EXECUTE ON FUNCTION
	@extschema@.enqueue(text, text, jsonb),
	@extschema@.enqueue_barrier(text)
	TO spool_client;
GRANT EXECUTE ON FUNCTION
	@extschema@.create_target(text, text, jsonb),
	@extschema@.drop_target(text, boolean),
	@extschema@.alter_target(text, jsonb),
	@extschema@.grant_target(text, text),
	@extschema@.revoke_target(text, text),
	@extschema@.redrive(bigint)
	TO spool_admin;
GRANT EXECUTE ON FUNCTION @extschema@.outbox_runtime(), @extschema@._outbox_status()
	TO spool_admin, spool_client;
GRANT EXECUTE ON FUNCTION @extschema@._source_runtime(), @extschema@._partition_runtime()
	TO spool_admin, spool_client;
GRANT SELECT ON @extschema@.outbox_status, @extschema@.target_config
	TO spool_admin, spool_client;
GRANT EXECUTE ON FUNCTION @extschema@._ingest_histograms(), @extschema@._ingest_counters(),
	@extschema@._processor_histograms(), @extschema@._hist_le(float8[], bigint[], float8, float8)
	TO spool_admin, spool_client;
GRANT SELECT ON @extschema@.stage_histograms, @extschema@.ingest_stats,
	@extschema@.promoter_status, @extschema@.processor_stats
	TO spool_admin, spool_client;
-- Parked rows and dead letters hold payloads, which may be business data.
GRANT SELECT ON @extschema@.outbox_retry, @extschema@.outbox_dead TO spool_admin;
GRANT SELECT ON @extschema@.entries, @extschema@.dead_letters, @extschema@.gaps,
	@extschema@.source_status, @extschema@.segments, @extschema@.source_config,
	@extschema@.consumers, @extschema@.consumer_status, @extschema@.processors,
	@extschema@.source_seeks,
	@extschema@.processor_status, @extschema@.outbox
	TO spool_admin, spool_client;
-- Checkpoints hold processor state, which may be business data.
GRANT SELECT ON @extschema@.processor_checkpoints TO spool_admin;

SELECT @extschema@._launcher_wakeup();

/* spool_ext--0.1--0.2.sql: update a 0.1 catalog to 0.2 (also the second step of a fresh 0.2 install) */

\echo Use "ALTER EXTENSION spool_ext UPDATE TO '0.2'" to load this file. \quit

-- A fresh install runs spool_ext--0.1.sql and then this file, so a fresh
-- catalog and an updated one are made by the same statements.  Every block
-- below must also work on a 0.1 catalog that holds data and whose workers
-- run (ALTER EXTENSION UPDATE takes no lock that stops them).

------------------------------------------------------------------------------
-- DROP EXTENSION: the lease token floor
------------------------------------------------------------------------------

-- The highest lease token this database had when the extension was
-- (re)created, read from the replication origin every grant advances
-- (spool_ext_tokens_<database oid>), which DROP EXTENSION does not remove.
-- Grants issue at least floor + 1, so tokens never go back across a
-- DROP/CREATE.  One row; not dumped (a restore brings its tokens in
-- spool.lease_store).
CREATE TABLE @extschema@.token_floor (
	one			boolean PRIMARY KEY DEFAULT true CHECK (one),
	floor		bigint NOT NULL CHECK (floor >= 0),
	origin		text,
	set_at		timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE @extschema@.token_floor IS
'The highest lease token of this database before the extension was created (kept in replication origin "origin"); grants issue more';

CREATE FUNCTION @extschema@._token_floor_init()
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_token_floor_init'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@._token_floor_init() IS
'Internal (superuser): keep this database''s highest lease token in its replication origin and copy it into spool.token_floor; returns the floor';
REVOKE ALL ON FUNCTION @extschema@._token_floor_init() FROM PUBLIC;
REVOKE ALL ON @extschema@.token_floor FROM PUBLIC;
GRANT SELECT ON @extschema@.token_floor TO spool_admin;

SELECT @extschema@._token_floor_init();

------------------------------------------------------------------------------
-- Sources sharing a topic with other servers (options "share", "partitions")
------------------------------------------------------------------------------

-- The offsets of a partition another server consumed before this one took
-- it over are recorded as a gap with action 'handover'.
ALTER TABLE @extschema@.gaps DROP CONSTRAINT gaps_action_check;
ALTER TABLE @extschema@.gaps ADD CONSTRAINT gaps_action_check
	CHECK (action IN ('continued', 'stopped', 'seek', 'handover'));

------------------------------------------------------------------------------
-- Retention of the operations logs (spool.operations_retention)
------------------------------------------------------------------------------

-- Retention removes the oldest rows first, through these indexes.
CREATE INDEX nonce_set_next_log_at ON @extschema@.nonce_set_next_log (at);
CREATE INDEX source_seeks_requested_at ON @extschema@.source_seeks (requested_at)
	WHERE state <> 'pending';
CREATE INDEX processor_rewinds_at ON @extschema@.processor_rewinds (at);

------------------------------------------------------------------------------
-- Versions: the workers run only when the library and the catalog agree
------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.library_version()
RETURNS text
AS 'MODULE_PATHNAME', 'spool_library_version'
LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.library_version() IS
'The version of the spool_ext library the server has loaded; the workers run only while it equals the extension''s version in pg_extension';
REVOKE ALL ON FUNCTION @extschema@.library_version() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.library_version() TO spool_admin, spool_client;

------------------------------------------------------------------------------
-- Nonces: a report and the next request in one worker commit (docs/nonces.md)
------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.nonce_report_and_request(signer text, outcome text,
													 nonce bigint DEFAULT NULL,
													 reported_request_id text DEFAULT NULL,
													 request_id text DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'spool_nonce_report_and_request'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.nonce_report_and_request(text, text, bigint, text, text) IS
'Worker-queue mode: report a nonce (by nonce or reported_request_id) ''used'' or ''recyclable'' and request the next one, in one commit of the signer''s nonce worker; no nonce is handed out if the report fails';
REVOKE ALL ON FUNCTION @extschema@.nonce_report_and_request(text, text, bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.nonce_report_and_request(text, text, bigint, text, text)
	TO spool_client;

------------------------------------------------------------------------------
-- Standby processors: replicas on a hot standby (spool.standby_processors)
------------------------------------------------------------------------------

-- On a hot standby the role column shows the replicas running there
-- ('starting', 'standby'), NULL for a processor none runs for; the columns
-- are unchanged.
CREATE OR REPLACE VIEW @extschema@.processor_status AS
	SELECT p.name AS processor, r.replica, r.pid,
		   CASE WHEN NOT p.enabled THEN 'stopped'
				WHEN pg_catalog.pg_is_in_recovery() THEN r.role	-- a hot standby
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
-- Segments: the promoter's per-batch lookups read only the live segments
------------------------------------------------------------------------------

-- Every promotion looks up the top segment (max(hi), max(segment)) and the
-- live segments its cursors fall in (hi above the range's start); segment_info
-- keeps a row for each segment ever made, so without an index on hi each of
-- these read them all.
CREATE INDEX segment_info_hi ON @extschema@.segment_info (hi);

-- Keep this last: the launcher looks again once the update commits.
SELECT @extschema@._launcher_wakeup();

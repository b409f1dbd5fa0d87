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

-- Keep this last: the launcher looks again once the update commits.
SELECT @extschema@._launcher_wakeup();

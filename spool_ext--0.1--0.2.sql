/* spool_ext--0.1--0.2.sql: update a 0.1 catalog to 0.2 (also the second step of a fresh 0.2 install) */

\echo Use "ALTER EXTENSION spool_ext UPDATE TO '0.2'" to load this file. \quit

-- A fresh install runs spool_ext--0.1.sql and then this file, so a fresh
-- catalog and an updated one are made by the same statements.  Every block
-- below must also work on a 0.1 catalog that holds data and whose workers
-- run (ALTER EXTENSION UPDATE takes no lock that stops them).

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

-- Keep this last: the launcher looks again once the update commits.
SELECT @extschema@._launcher_wakeup();

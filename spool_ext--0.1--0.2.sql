/* spool_ext--0.1--0.2.sql: update a 0.1 catalog to 0.2 (also the second step of a fresh 0.2 install) */

\echo Use "ALTER EXTENSION spool_ext UPDATE TO '0.2'" to load this file. \quit

-- A fresh install runs spool_ext--0.1.sql and then this file, so a fresh
-- catalog and an updated one are made by the same statements.  Every block
-- below must also work on a 0.1 catalog that holds data and whose workers
-- run (ALTER EXTENSION UPDATE takes no lock that stops them).

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

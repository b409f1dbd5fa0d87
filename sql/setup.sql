--
-- setup: create the extension and the helpers shared by the later files.
--
CREATE EXTENSION spool_ext;

-- The extension's objects exist where the contract says.
SELECT extname, extversion, extnamespace::regnamespace AS schema
  FROM pg_extension WHERE extname = 'spool_ext';
-- The library loaded is of the catalog's version (its workers run).
SELECT spool.library_version() = extversion AS library_matches
  FROM pg_extension WHERE extname = 'spool_ext';

-- try(stmt): run stmt and report 'ok' or 'SQLSTATE: message'.  An error is
-- caught in a subtransaction, so whatever stmt did is undone either way.
CREATE FUNCTION public.try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- spool_state(): a fingerprint of every lease and nonce row, to assert that
-- a rejected call changed nothing.
CREATE FUNCTION public.spool_state() RETURNS text
LANGUAGE sql AS $$
	SELECT md5(concat_ws('|',
		(SELECT string_agg(l::text, ',' ORDER BY l.resource) FROM spool.lease_store l),
		(SELECT string_agg(s::text, ',' ORDER BY s.signer) FROM spool.nonce_signer s),
		(SELECT string_agg(n::text, ',' ORDER BY n.signer, n.nonce) FROM spool.nonce_store n)))
$$;

-- A fresh database has no leases and no nonces.
SELECT count(*) AS leases FROM spool.leases;
SELECT count(*) AS nonces FROM spool.nonces;

--
-- drop_extension: DROP EXTENSION spool_ext and CREATE again (docs/operations.md,
-- "Dropping the extension").  Runs last: it replaces the catalog.
--
-- The token floor: every grant records the database's highest token in a
-- replication origin, and CREATE EXTENSION copies it into spool.token_floor.
SELECT origin = 'spool_ext_tokens_' || d.oid AS origin_named_after_database
  FROM spool.token_floor, pg_database d WHERE d.datname = current_database();
SELECT pg_replication_origin_progress(origin, false) - '0/0'::pg_lsn
       = (SELECT max(token) FROM spool.lease_store) AS origin_holds_highest_token
  FROM spool.token_floor;

CREATE ROLE regress_drop_plain;
CREATE ROLE regress_drop_admin IN ROLE spool_admin;
CREATE ROLE regress_drop_client IN ROLE spool_client;

-- Only a superuser moves the floor or reads it (spool_admin reads it).
SET ROLE regress_drop_plain;
SELECT spool._token_floor_init();
SELECT pg_replication_origin_advance('spool_ext_tokens_' || oid, '0/FFFFFFFF')
  FROM pg_database WHERE datname = current_database();
SET spool.allow_drop_with_nonces = on;
RESET ROLE;
SET ROLE regress_drop_client;
SELECT spool._token_floor_init();
SELECT floor FROM spool.token_floor;
UPDATE spool.token_floor SET floor = 0;
RESET ROLE;
SET ROLE regress_drop_admin;
SELECT spool._token_floor_init();
SELECT count(*) AS admin_reads_floor FROM spool.token_floor;
UPDATE spool.token_floor SET floor = 0;
RESET ROLE;

-- Tokens no grant here recorded (as after pg_restore): DROP EXTENSION
-- records them before it drops the table.
UPDATE spool.lease_store SET token = token + 1000
 WHERE resource = (SELECT resource FROM spool.lease_store ORDER BY token DESC LIMIT 1);
CREATE TEMP VIEW origin_vs_tokens AS
	SELECT pg_replication_origin_progress(origin, false) - '0/0'::pg_lsn AS progress,
	       (SELECT max(token) FROM spool.lease_store) AS max_token
	  FROM spool.token_floor;
SELECT progress < max_token AS not_recorded_yet FROM origin_vs_tokens;

-- A role that may not drop the extension gets PostgreSQL's own error, not
-- the seatbelt's (it learns nothing about signers), and writes nothing.
SET ROLE regress_drop_plain;
DROP EXTENSION spool_ext;
DROP SCHEMA spool CASCADE;
RESET ROLE;
SELECT progress < max_token AS plain_role_recorded_nothing FROM origin_vs_tokens;

-- The seatbelt: signers hold nonce state (earlier tests handed nonces out).
SELECT count(*) > 0 AS signers_with_nonces FROM spool.nonce_signer WHERE next_nonce > 0;
-- (The number of signers depends on the tests before this one.)
CREATE FUNCTION pg_temp.drop_error(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, '[0-9]+', 'N');
END
$$;
SELECT pg_temp.drop_error('DROP EXTENSION spool_ext CASCADE');
SELECT pg_temp.drop_error('DROP SCHEMA spool CASCADE');
SELECT pg_temp.drop_error('DROP EXTENSION IF EXISTS spool_ext CASCADE');
SELECT count(*) AS still_installed FROM pg_extension WHERE extname = 'spool_ext';
SELECT progress < max_token AS refused_drop_recorded_nothing FROM origin_vs_tokens;

-- Saved next nonces, to restore after CREATE EXTENSION.
CREATE TEMP TABLE saved_nonces AS SELECT signer, next_nonce FROM spool.nonce_signer;
CREATE TEMP TABLE before_drop AS SELECT max(token) AS max_token FROM spool.lease_store;

-- Dropped in a transaction that rolls back: nothing changes.
BEGIN;
SET LOCAL spool.allow_drop_with_nonces = on;
SET LOCAL client_min_messages = warning;
DROP EXTENSION spool_ext CASCADE;
ROLLBACK;
SELECT count(*) AS still_installed FROM pg_extension WHERE extname = 'spool_ext';
-- The floor is not transactional: it stays where the tokens are.
SELECT progress = max_token AS recorded_by_the_drop FROM origin_vs_tokens;
DROP VIEW origin_vs_tokens;

SET spool.allow_drop_with_nonces = on;
SET client_min_messages = warning;
DROP EXTENSION spool_ext CASCADE;
RESET client_min_messages;
RESET spool.allow_drop_with_nonces;
CREATE EXTENSION spool_ext;

-- The new catalog starts above every token of the old one.
SELECT f.floor >= b.max_token AS floor_covers_old_tokens FROM spool.token_floor f, before_drop b;
SELECT (spool.lease_acquire('regress-drop', 'me')).token > max_token AS first_token_above_floor,
       (spool.lease_acquire('regress-drop', 'me')).token = (SELECT floor + 1 FROM spool.token_floor)
         AS first_token_is_floor_plus_one
  FROM before_drop;
SELECT spool.lease_release('regress-drop', 'me', (SELECT floor + 1 FROM spool.token_floor));
SELECT (spool.lease_acquire('regress-drop', 'me')).token = (SELECT floor + 2 FROM spool.token_floor)
       AS next_grant_counts_on;
-- A second grant raised the origin's progress; init again only raises the floor.
SELECT spool._token_floor_init() - max_token >= 2 AS init_raises_floor FROM before_drop;
SELECT floor >= (SELECT max_token FROM before_drop) + 2 AS floor_raised FROM spool.token_floor;

-- Nonces start again at 0 after a drop: the repair is nonce_set_next from
-- the saved (or the chain's) next nonce.
SELECT count(*) AS signers_left FROM spool.nonce_signer;
CREATE TEMP TABLE repaired AS
	SELECT signer, next_nonce, (spool.lease_acquire('signer:' || signer, 'repair')).token
	  FROM saved_nonces WHERE next_nonce > 0;
SELECT bool_and(spool.nonce_set_next(signer, next_nonce, 'repair', token) = next_nonce) AS restored
  FROM repaired;
SELECT bool_and(s.next_nonce = r.next_nonce) AS next_nonces_back,
       bool_and(spool.nonce_allocate(r.signer, 'repair', r.token) = r.next_nonce) AS allocates_next
  FROM spool.nonce_signer s JOIN repaired r USING (signer);

DROP ROLE regress_drop_plain, regress_drop_admin, regress_drop_client;

--
-- lease: acquire, renew, release and fence on one session (resources 'lease:*').
--

-- A free lease is granted with token 1 and a future expiry.
SELECT resource, owner, token, expires_at > clock_timestamp() AS live
  FROM spool.lease_acquire('lease:a', 'alice', '1 min');
SELECT expires_at AS a_exp1 FROM spool.leases WHERE resource = 'lease:a' \gset

-- The same owner re-acquiring its live lease renews it: same token, later expiry.
SELECT owner, token, expires_at > :'a_exp1'::timestamptz AS extended
  FROM spool.lease_acquire('lease:a', 'alice', '1 h');

-- Another owner is refused (NULL) while the lease is live; the row is untouched.
SELECT spool.lease_acquire('lease:a', 'bob', '1 min') IS NULL AS refused;
SELECT owner, token, live, grants FROM spool.leases WHERE resource = 'lease:a';

-- The default ttl is 10 s.
SELECT token, expires_at - clock_timestamp() BETWEEN '9 s' AND '10 s' AS ten_seconds
  FROM spool.lease_acquire('lease:a', 'alice');

-- lease_renew keeps the token and returns the new expiry, which the view shows.
SELECT spool.lease_renew('lease:a', 'alice', 1, '1 h') AS a_exp2 \gset
SELECT :'a_exp2'::timestamptz - clock_timestamp() BETWEEN '59 min' AND '1 h' AS one_hour,
       expires_at = :'a_exp2'::timestamptz AS view_agrees, token, renewed_at IS NOT NULL AS renewed
  FROM spool.leases WHERE resource = 'lease:a';
-- Its ttl also defaults to 10 s.
SELECT spool.lease_renew('lease:a', 'alice', 1) - clock_timestamp() BETWEEN '9 s' AND '10 s' AS ten_seconds;

-- Renewal with the wrong owner or token is refused (SP002) and changes nothing.
SELECT try($$SELECT spool.lease_renew('lease:a', 'bob', 1, '1 h')$$);
SELECT try($$SELECT spool.lease_renew('lease:a', 'alice', 2, '1 h')$$);
SELECT owner, token, expires_at - clock_timestamp() < '10 s' AS unchanged
  FROM spool.leases WHERE resource = 'lease:a';

-- fence with the current token of a live lease succeeds inside a transaction.
BEGIN;
SELECT spool.fence('lease:a', 1);
COMMIT;
-- fence with any other token is rejected (SP003).
SELECT try($$SELECT spool.fence('lease:a', 0)$$);
SELECT try($$SELECT spool.fence('lease:a', 2)$$);

-- Release: true the first time, false on a repeat; the lease is then free.
SELECT spool.lease_release('lease:a', 'alice', 1) AS released;
SELECT spool.lease_release('lease:a', 'alice', 1) AS released_again;
SELECT owner, token, live, released_at IS NOT NULL AS has_released_at
  FROM spool.leases WHERE resource = 'lease:a';
-- A released lease cannot be fenced or renewed any more.
SELECT try($$SELECT spool.fence('lease:a', 1)$$);
SELECT try($$SELECT spool.lease_renew('lease:a', 'alice', 1)$$);

-- A released lease is granted anew to another owner with token + 1.
SELECT owner, token FROM spool.lease_acquire('lease:a', 'bob', '1 min');
-- The old holder's repeated release is now an error: the lease is bob's.
SELECT try($$SELECT spool.lease_release('lease:a', 'alice', 1)$$);
-- bob's stale-token release is an error too (SP002), and nothing changed.
SELECT try($$SELECT spool.lease_release('lease:a', 'bob', 1)$$);
SELECT owner, token, live FROM spool.leases WHERE resource = 'lease:a';

-- Expiry: a lease with a short ttl stops being live.
SELECT owner, token FROM spool.lease_acquire('lease:b', 'carol', '200 ms');
SELECT pg_sleep(0.4);
SELECT owner, token, live FROM spool.leases WHERE resource = 'lease:b';
-- Once expired, fence (SP003) and renew (SP002) fail, and release is a harmless false.
SELECT try($$SELECT spool.fence('lease:b', 1)$$);
SELECT try($$SELECT spool.lease_renew('lease:b', 'carol', 1, '1 min')$$);
SELECT spool.lease_release('lease:b', 'carol', 1) AS released;
SELECT owner, token, live, released_at IS NULL AS never_released
  FROM spool.leases WHERE resource = 'lease:b';

-- An expired lease is granted anew to another owner with token + 1 ...
SELECT owner, token FROM spool.lease_acquire('lease:b', 'dave', '200 ms');
-- ... and the old holder is now refused with both fence and renew.
SELECT try($$SELECT spool.fence('lease:b', 1)$$);
SELECT try($$SELECT spool.lease_renew('lease:b', 'carol', 1, '1 min')$$);
-- The same owner re-acquiring its own EXPIRED lease gets a new token too.
SELECT pg_sleep(0.4);
SELECT owner, token FROM spool.lease_acquire('lease:b', 'dave', '1 min');
-- dave's previous token is stale now, even for dave.
SELECT try($$SELECT spool.fence('lease:b', 2)$$);
SELECT try($$SELECT spool.lease_renew('lease:b', 'dave', 2, '1 min')$$);
SELECT try($$SELECT spool.lease_release('lease:b', 'dave', 2)$$);
SELECT owner, token, live, grants FROM spool.leases WHERE resource = 'lease:b';

-- Tokens strictly increase by one per grant, whoever gets it.
DO $$
DECLARE
	prev bigint := 0;
	l spool.lease;
BEGIN
	FOR i IN 1..6 LOOP
		l := spool.lease_acquire('lease:c', 'owner' || (i % 2), '1 min');
		IF l.token <> prev + 1 THEN
			RAISE EXCEPTION 'grant % got token %, expected %', i, l.token, prev + 1;
		END IF;
		prev := l.token;
		PERFORM spool.lease_release('lease:c', l.owner, l.token);
	END LOOP;
END
$$;
SELECT owner, token, grants, live FROM spool.leases WHERE resource = 'lease:c';

-- A grant and a fence in the same transaction; the fence sees the new token.
BEGIN;
SELECT token AS d_token FROM spool.lease_acquire('lease:d', 'erin', '1 min') \gset
SELECT :d_token AS d_token;
SELECT spool.fence('lease:d', :d_token);
COMMIT;
-- A grant rolled back never happened: the next grant reuses the token.
BEGIN;
SELECT owner, token FROM spool.lease_acquire('lease:e', 'frank', '1 min');
ROLLBACK;
SELECT count(*) AS rows_after_rollback FROM spool.leases WHERE resource = 'lease:e';
SELECT owner, token FROM spool.lease_acquire('lease:e', 'gina', '1 min');

-- The boundary ttl of spool.lease_max_ttl (1 day) is accepted.
SELECT owner, token, expires_at - clock_timestamp() > '23 h 59 min' AS one_day
  FROM spool.lease_acquire('lease:f', 'hank', '1 day');
-- Resources and owners of exactly 200 bytes are accepted.
SELECT length(owner) AS owner_len, token
  FROM spool.lease_acquire(repeat('r', 200), repeat('o', 200), '1 min');

-- The view lists every lease of this file.
SELECT left(resource, 12) AS resource, left(owner, 12) AS owner, token, live FROM spool.leases
 WHERE resource LIKE 'lease:%' OR resource = repeat('r', 200)
 ORDER BY resource COLLATE "C";

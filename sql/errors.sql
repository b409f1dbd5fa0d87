--
-- errors: every bad argument and error path, with its SQLSTATE, and proof that
-- nothing changed (resources 'err:*', signers 'err-*').
--
-- SP001 invalid argument, SP002 lease not held, SP003 fence rejected,
-- SP004 unknown lease/signer, SP005 unknown nonce, SP006 bad nonce transition.

-- Fixtures: a live lease, an expired lease, a lease taken over by another
-- owner, a live signer with nonces in every state, an expired signer and a
-- stolen signer.
SELECT token FROM spool.lease_acquire('err:live', 'e1', '1 h');
SELECT token FROM spool.lease_acquire('err:exp', 'e1', '200 ms');
SELECT token FROM spool.lease_acquire('err:stolen', 'e1', '200 ms');
SELECT token FROM spool.lease_acquire('signer:err-s', 'e1', '1 h');
SELECT spool.nonce_allocate('err-s', 'e1', 1) FROM generate_series(1, 3);
SELECT spool.nonce_mark_used('err-s', 1, 'e1', 1);
SELECT spool.nonce_mark_recyclable('err-s', 2, 'e1', 1);
SELECT token FROM spool.lease_acquire('signer:err-x', 'e1', '500 ms');
SELECT spool.nonce_allocate('err-x', 'e1', 1);
SELECT token FROM spool.lease_acquire('signer:err-st', 'e1', '500 ms');
SELECT spool.nonce_allocate('err-st', 'e1', 1);
SELECT pg_sleep(0.7);
SELECT token FROM spool.lease_acquire('err:stolen', 'e2', '1 h');
SELECT token FROM spool.lease_acquire('signer:err-st', 'e2', '1 h');
SELECT resource, owner, token, live FROM spool.leases
 WHERE resource LIKE 'err:%' OR resource LIKE 'signer:err-%' ORDER BY resource COLLATE "C";
SELECT signer, nonce, state, owner, token FROM spool.nonces
 WHERE signer LIKE 'err-%' ORDER BY signer COLLATE "C", nonce;

SELECT spool_state() AS state0 \gset

-- lease_acquire: bad arguments are SP001.
SELECT try($$SELECT spool.lease_acquire(NULL, 'e1', '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('', 'e1', '1 min')$$);
SELECT try($$SELECT spool.lease_acquire(repeat('x', 201), 'e1', '1 min')$$);
-- The limit is in bytes: 101 two-byte characters are too long.
SELECT try($$SELECT spool.lease_acquire(repeat(U&'\00e9', 101), 'e1', '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', NULL, '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', '', '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', repeat('o', 201), '1 min')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', NULL)$$);
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', '0 s')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', '-1 s')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', '1 day 1 s')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', '1 mon')$$);
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', '25 h')$$);
-- Bad arguments on an existing live lease change it neither (no renewal).
SELECT try($$SELECT spool.lease_acquire('err:live', 'e1', '0 s')$$);
SELECT try($$SELECT spool.lease_acquire('err:live', 'e1', '2 days')$$);
-- spool.lease_max_ttl sets the limit.
SET spool.lease_max_ttl = '1 h';
SELECT try($$SELECT spool.lease_acquire('err:new', 'e1', '61 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 1, '61 min')$$);
RESET spool.lease_max_ttl;
SELECT count(*) AS err_new_rows FROM spool.lease_store WHERE resource = 'err:new';
SELECT spool_state() = :'state0' AS unchanged;

-- lease_renew: SP001 for bad arguments, SP004 unknown, SP002 not held.
SELECT try($$SELECT spool.lease_renew(NULL, 'e1', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('', 'e1', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew(repeat('x', 201), 'e1', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', NULL, 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', '', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', repeat('o', 201), 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', NULL, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', -1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 1, NULL)$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 1, '0 s')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 1, '-5 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 1, '2 days')$$);
SELECT try($$SELECT spool.lease_renew('err:nope', 'e1', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e2', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 2, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:live', 'e1', 0, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:exp', 'e1', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:stolen', 'e1', 1, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:stolen', 'e1', 2, '1 min')$$);
SELECT try($$SELECT spool.lease_renew('err:stolen', 'e2', 1, '1 min')$$);
SELECT spool_state() = :'state0' AS unchanged;

-- lease_release: SP001 for bad arguments, SP004 unknown, SP002 not held.
SELECT try($$SELECT spool.lease_release(NULL, 'e1', 1)$$);
SELECT try($$SELECT spool.lease_release('', 'e1', 1)$$);
SELECT try($$SELECT spool.lease_release(repeat('x', 201), 'e1', 1)$$);
SELECT try($$SELECT spool.lease_release('err:live', NULL, 1)$$);
SELECT try($$SELECT spool.lease_release('err:live', '', 1)$$);
SELECT try($$SELECT spool.lease_release('err:live', repeat('o', 201), 1)$$);
SELECT try($$SELECT spool.lease_release('err:live', 'e1', NULL)$$);
SELECT try($$SELECT spool.lease_release('err:live', 'e1', -1)$$);
SELECT try($$SELECT spool.lease_release('err:nope', 'e1', 1)$$);
SELECT try($$SELECT spool.lease_release('err:live', 'e2', 1)$$);
SELECT try($$SELECT spool.lease_release('err:live', 'e1', 2)$$);
SELECT try($$SELECT spool.lease_release('err:stolen', 'e1', 1)$$);
SELECT try($$SELECT spool.lease_release('err:stolen', 'e2', 1)$$);
-- Releasing an expired lease with its own owner and token is a harmless false.
SELECT spool.lease_release('err:exp', 'e1', 1) AS released;
SELECT spool_state() = :'state0' AS unchanged;

-- fence: SP001 for bad arguments, SP004 unknown, SP003 stale or expired.
SELECT try($$SELECT spool.fence(NULL, 1)$$);
SELECT try($$SELECT spool.fence('', 1)$$);
SELECT try($$SELECT spool.fence(repeat('x', 201), 1)$$);
SELECT try($$SELECT spool.fence('err:live', NULL)$$);
SELECT try($$SELECT spool.fence('err:live', -1)$$);
SELECT try($$SELECT spool.fence('err:nope', 1)$$);
SELECT try($$SELECT spool.fence('err:live', 0)$$);
SELECT try($$SELECT spool.fence('err:live', 2)$$);
SELECT try($$SELECT spool.fence('err:exp', 1)$$);
SELECT try($$SELECT spool.fence('err:stolen', 1)$$);
-- A fence error aborts the transaction: the write after it never lands.
CREATE TEMP TABLE fenced_writes (note text);
BEGIN;
SELECT spool.fence('err:stolen', 1);
INSERT INTO fenced_writes VALUES ('stale write');
COMMIT;
SELECT count(*) AS stale_writes FROM fenced_writes;
SELECT spool_state() = :'state0' AS unchanged;

-- nonce_allocate: SP001 for bad arguments.
SELECT try($$SELECT spool.nonce_allocate(NULL, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('', 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_allocate(repeat('s', 201), 'e1', 1)$$);
-- A signer must leave room for its lease name 'signer:' || signer (200 bytes).
SELECT try($$SELECT spool.nonce_allocate(repeat('s', 194), 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_request(repeat('s', 194))$$);
SELECT try($$SELECT spool.nonce_allocate(repeat('s', 193), 'e1', 1)$$);
SELECT try($$SELECT spool.lease_acquire('signer:' || repeat('s', 194), 'e1', '1 min')$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', NULL, 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', '', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', repeat('o', 201), 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e1', NULL)$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e1', -1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e1', 1, '')$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e1', 1, repeat('q', 201))$$);
-- SP004: the signer never had a lease (an ordinary lease does not count).
SELECT try($$SELECT spool.nonce_allocate('err-nope', 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-nope', 'e1', 1, 'rq')$$);
SELECT try($$SELECT spool.nonce_allocate('err:live', 'e1', 1)$$);
-- SP003: token not current, or lease expired; SP002: wrong owner.
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e1', 2)$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e1', 0)$$);
SELECT try($$SELECT spool.nonce_allocate('err-x', 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-st', 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-st', 'e1', 1, 'rq')$$);
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e2', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('err-st', 'e1', 2)$$);
-- The hole (nonce 2) is not taken by a rejected caller either.
SELECT try($$SELECT spool.nonce_allocate('err-s', 'e2', 1, 'rq')$$);
SELECT spool_state() = :'state0' AS unchanged;

-- nonce_mark_used / nonce_mark_recyclable: SP001 for bad arguments.
SELECT try($$SELECT spool.nonce_mark_used(NULL, 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used(repeat('s', 201), 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', NULL, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', -1, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, NULL, 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, '', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, repeat('o', 201), 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, 'e1', NULL)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, 'e1', -1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable(NULL, 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable(repeat('s', 201), 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', NULL, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', -1, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 0, NULL, 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 0, '', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 0, repeat('o', 201), 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 0, 'e1', NULL)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 0, 'e1', -1)$$);
-- SP004 unknown signer; SP005 a nonce never allocated.
SELECT try($$SELECT spool.nonce_mark_used('err-nope', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-nope', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 3, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 99, 'e1', 1)$$);
-- SP006: CONSUMED is final; RELEASED cannot be used.
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 1, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 2, 'e1', 1)$$);
-- SP003 / SP002: the lease checks come before the nonce's own state.
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, 'e1', 2)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-s', 0, 'e2', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-s', 0, 'e2', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-x', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-x', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('err-st', 0, 'e1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('err-st', 0, 'e1', 1)$$);
SELECT spool_state() = :'state0' AS unchanged;

-- Errors carry their SQLSTATE to the client too.
\set VERBOSITY sqlstate
SELECT spool.lease_acquire('', 'e1');
SELECT spool.lease_renew('err:stolen', 'e1', 1);
SELECT spool.fence('err:stolen', 1);
SELECT spool.fence('err:nope', 1);
SELECT spool.nonce_mark_used('err-s', 42, 'e1', 1);
SELECT spool.nonce_mark_used('err-s', 2, 'e1', 1);
\set VERBOSITY default

-- The fixtures are exactly as they were.
SELECT spool_state() = :'state0' AS unchanged;
SELECT resource, owner, token, live FROM spool.leases
 WHERE resource LIKE 'err:%' OR resource LIKE 'signer:err-%' ORDER BY resource COLLATE "C";
SELECT signer, nonce, state, owner, token FROM spool.nonces
 WHERE signer LIKE 'err-%' ORDER BY signer COLLATE "C", nonce;

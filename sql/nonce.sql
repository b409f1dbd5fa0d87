--
-- nonce: the per-signer nonce allocator on one session (signers 'n-*').
--

-- The signer lease is the lease 'signer:' || signer.
SELECT owner, token FROM spool.lease_acquire('signer:n-a', 'node1', '1 h');

-- New nonces start at 0 and go up by one.
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS nonce FROM generate_series(1, 3);
SELECT signer, nonce, state, owner, token, request_id IS NULL AS no_request_id
  FROM spool.nonces WHERE signer = 'n-a' ORDER BY nonce;

-- A request id gets a nonce once; repeating the request returns the same one.
SELECT spool.nonce_allocate('n-a', 'node1', 1, 'req-1') AS first;
SELECT spool.nonce_allocate('n-a', 'node1', 1, 'req-1') AS repeat;
SELECT nonce, state, request_id FROM spool.nonces
 WHERE signer = 'n-a' AND request_id IS NOT NULL ORDER BY nonce;
-- A different request id gets a different nonce.
SELECT spool.nonce_allocate('n-a', 'node1', 1, 'req-2') AS other;

-- mark_used: ALLOCATED -> CONSUMED; a repeat is harmless.
SELECT spool.nonce_mark_used('n-a', 1, 'node1', 1);
SELECT spool.nonce_mark_used('n-a', 1, 'node1', 1);
-- mark_recyclable: ALLOCATED -> RELEASED; a repeat is harmless.
SELECT spool.nonce_mark_recyclable('n-a', 0, 'node1', 1);
SELECT spool.nonce_mark_recyclable('n-a', 2, 'node1', 1);
SELECT spool.nonce_mark_recyclable('n-a', 2, 'node1', 1);
SELECT nonce, state FROM spool.nonces WHERE signer = 'n-a' ORDER BY nonce;
-- The signer's counters agree with the rows.
SELECT next_nonce, released,
       released = (SELECT count(*) FROM spool.nonce_store
                    WHERE signer = 'n-a' AND state = 'released') AS released_agrees
  FROM spool.nonce_signer WHERE signer = 'n-a';

-- CONSUMED is final, and a RELEASED nonce cannot be used (SP006); nothing changes.
SELECT try($$SELECT spool.nonce_mark_recyclable('n-a', 1, 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('n-a', 2, 'node1', 1)$$);
SELECT nonce, state FROM spool.nonces WHERE signer = 'n-a' AND nonce IN (1, 2) ORDER BY nonce;

-- Released nonces are handed out again lowest first, then new ones follow.
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS reused_0;
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS reused_2;
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS new_5;
SELECT nonce, state FROM spool.nonces WHERE signer = 'n-a' ORDER BY nonce;
SELECT next_nonce, released FROM spool.nonce_signer WHERE signer = 'n-a';

-- A reused nonce can be consumed normally.
SELECT spool.nonce_mark_used('n-a', 0, 'node1', 1);

-- A request id whose nonce was released gets a fresh nonce (the lowest hole),
-- and the released row forgets the id.
SELECT spool.nonce_mark_recyclable('n-a', 4, 'node1', 1);   -- req-2
SELECT spool.nonce_mark_recyclable('n-a', 3, 'node1', 1);   -- req-1
SELECT spool.nonce_allocate('n-a', 'node1', 1, 'req-2') AS req2_again;
SELECT spool.nonce_allocate('n-a', 'node1', 1, 'req-2') AS req2_repeat;
SELECT nonce, state, request_id FROM spool.nonces
 WHERE signer = 'n-a' AND nonce IN (3, 4) ORDER BY nonce;

-- A rolled back allocation loses no nonce: the next allocation gets it again.
BEGIN;
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS in_rolled_back_tx;
ROLLBACK;
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS after_rollback;
BEGIN;
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS new_in_rolled_back_tx;
ROLLBACK;
SELECT spool.nonce_allocate('n-a', 'node1', 1) AS new_after_rollback;
SELECT nonce, state FROM spool.nonces WHERE signer = 'n-a' ORDER BY nonce;
SELECT next_nonce, released FROM spool.nonce_signer WHERE signer = 'n-a';

-- Signers are independent: another signer starts at 0.
SELECT token FROM spool.lease_acquire('signer:n-b', 'node1', '1 h');
SELECT spool.nonce_allocate('n-b', 'node1', 1) AS n_b_first;
-- ... and the same request id may be used on both signers.
SELECT spool.nonce_allocate('n-b', 'node1', 1, 'req-1') AS n_b_req1;

-- A takeover: node1's lease expires and node2 gets token 2.
SELECT token FROM spool.lease_acquire('signer:n-c', 'node1', '500 ms');
SELECT spool.nonce_allocate('n-c', 'node1', 1) AS before_expiry;
SELECT pg_sleep(0.7);
-- The expired holder can no longer allocate or mark (SP003).
SELECT try($$SELECT spool.nonce_allocate('n-c', 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_mark_used('n-c', 0, 'node1', 1)$$);
SELECT owner, token FROM spool.lease_acquire('signer:n-c', 'node2', '1 h');
-- The old token is rejected as not current (SP003), also with its request id.
SELECT try($$SELECT spool.nonce_allocate('n-c', 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_allocate('n-c', 'node1', 1, 'r')$$);
SELECT try($$SELECT spool.nonce_mark_recyclable('n-c', 0, 'node1', 1)$$);
-- node1 using node2's token is the wrong owner (SP002).
SELECT try($$SELECT spool.nonce_allocate('n-c', 'node1', 2)$$);
-- node2 continues the sequence and may settle node1's nonce.
SELECT spool.nonce_allocate('n-c', 'node2', 2) AS node2_first;
SELECT spool.nonce_mark_used('n-c', 0, 'node2', 2);
SELECT nonce, state, owner, token FROM spool.nonces WHERE signer = 'n-c' ORDER BY nonce;
SELECT signer, lease_token FROM spool.nonce_signer WHERE signer = 'n-c';

-- After node2 releases the lease its token no longer allocates (SP003).
SELECT spool.lease_release('signer:n-c', 'node2', 2) AS released;
SELECT try($$SELECT spool.nonce_allocate('n-c', 'node2', 2)$$);
SELECT count(*) AS n_c_nonces FROM spool.nonces WHERE signer = 'n-c';

-- A signer that never had a lease is unknown (SP004).
SELECT try($$SELECT spool.nonce_allocate('n-none', 'node1', 1)$$);
-- An ordinary lease named like a signer prefix is not a signer lease.
SELECT token FROM spool.lease_acquire('signer:', 'node1', '1 h');
SELECT count(*) AS signer_rows FROM spool.nonce_signer WHERE signer = '';

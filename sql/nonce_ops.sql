--
-- nonce_ops: worker-queue reports (spool.nonce_report) and keeping signers
-- in step with the chain (spool.nonce_set_next), signers 'no-*'.
--

-- Worker-queue mode: four nonces for one signer.
SELECT spool.nonce_request('no-q', 'q-' || g) AS nonce FROM generate_series(0, 3) g;

-- Used by nonce, and again (a harmless repeat); both return the nonce.
SELECT spool.nonce_report('no-q', 'used', 0) AS used_0;
SELECT spool.nonce_report('no-q', 'used', nonce => 0) AS used_0_again;
-- Recyclable by request id, and again.
SELECT spool.nonce_report('no-q', 'recyclable', request_id => 'q-1') AS recycled_1;
SELECT spool.nonce_report('no-q', 'recyclable', request_id => 'q-1') AS recycled_1_again;
SELECT spool.nonce_report('no-q', 'recyclable', 3) AS recycled_3;
SELECT nonce, state, request_id FROM spool.nonces WHERE signer = 'no-q' ORDER BY nonce;
-- Released nonces are handed out again, lowest first, then new ones.
SELECT spool.nonce_request('no-q', 'q-4') AS reuses_1;
SELECT spool.nonce_request('no-q', 'q-5') AS reuses_3;
SELECT spool.nonce_request('no-q', 'q-6') AS new_4;
-- A late repeat of the report on q-1's allocation: nonce 1 now belongs to
-- q-4, so q-1 holds no nonce (SP005) and q-4's nonce stays allocated.
SELECT try($$SELECT spool.nonce_report('no-q', 'recyclable', request_id => 'q-1')$$);
SELECT nonce, state, request_id FROM spool.nonces WHERE signer = 'no-q' ORDER BY nonce;
SELECT next_nonce, released FROM spool.nonce_signer WHERE signer = 'no-q';

-- Errors: state machine (SP006), unknown (SP005), bad input (SP001); nothing changes.
SELECT try($$SELECT spool.nonce_report('no-q', 'recyclable', 0)$$);
SELECT spool.nonce_report('no-q', 'recyclable', 2);
SELECT try($$SELECT spool.nonce_report('no-q', 'used', 2)$$);
SELECT spool.nonce_request('no-q', 'q-7') AS reuses_2;
SELECT spool_state() AS before \gset
SELECT try($$SELECT spool.nonce_report('no-q', 'used', 99)$$);
SELECT try($$SELECT spool.nonce_report('no-q', 'used', request_id => 'nope')$$);
SELECT try($$SELECT spool.nonce_report('no-none', 'used', 0)$$);
SELECT try($$SELECT spool.nonce_report('no-q', 'sent', 0)$$);
SELECT try($$SELECT spool.nonce_report('no-q', NULL, 0)$$);
SELECT try($$SELECT spool.nonce_report(NULL, 'used', 0)$$);
SELECT try($$SELECT spool.nonce_report('', 'used', 0)$$);
SELECT try($$SELECT spool.nonce_report('no-q', 'used')$$);
SELECT try($$SELECT spool.nonce_report('no-q', 'used', 0, 'q-0')$$);
SELECT try($$SELECT spool.nonce_report('no-q', 'used', -1)$$);
SELECT try($$SELECT spool.nonce_report('no-q', 'used', request_id => '')$$);
SELECT spool_state() = :'before' AS unchanged;

-- In a repeatable read transaction, the report finds the nonce the worker
-- committed after the transaction's snapshot.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) > 0 AS snapshot_taken FROM spool.nonces;
SELECT spool.nonce_request('no-q', 'q-rr') AS rr_nonce \gset
SELECT spool.nonce_report('no-q', 'used', :rr_nonce) = :rr_nonce AS reported;
SELECT spool.nonce_report('no-q', 'used', request_id => 'q-rr') = :rr_nonce AS reported_by_id;
COMMIT;
SELECT state FROM spool.nonces WHERE signer = 'no-q' AND request_id = 'q-rr';

-- A signer in basic mode: a report through the workers is refused (SP008).
SELECT token FROM spool.lease_acquire('signer:no-b', 'node1', '1 h');
SELECT spool.nonce_allocate('no-b', 'node1', 1) AS nonce FROM generate_series(0, 5);
SELECT try($$SELECT spool.nonce_report('no-b', 'used', 0)$$);

-- nonce_set_next, basic mode.  0 used, 2 and 4 given back, 1 3 5 allocated.
SELECT spool.nonce_mark_used('no-b', 0, 'node1', 1);
SELECT spool.nonce_mark_recyclable('no-b', 2, 'node1', 1);
SELECT spool.nonce_mark_recyclable('no-b', 4, 'node1', 1);
-- Backwards (chain at 3, we are at 6): 1 and 2 are on chain (consumed); at
-- and above 3 nothing is taken from a holder: 3 and 5 stay allocated, 4 is
-- handed out next.
SELECT spool.nonce_set_next('no-b', 3, 'node1', 1) AS next_out;
SELECT nonce, state FROM spool.nonces WHERE signer = 'no-b' ORDER BY nonce;
SELECT next_nonce, released FROM spool.nonce_signer WHERE signer = 'no-b';
SELECT spool.nonce_allocate('no-b', 'node1', 1) AS gets_4;
SELECT spool.nonce_allocate('no-b', 'node1', 1) AS gets_6;
-- Marking a nonce the chain took: used is a repeat, recyclable is refused.
SELECT spool.nonce_mark_used('no-b', 1, 'node1', 1);
SELECT try($$SELECT spool.nonce_mark_recyclable('no-b', 2, 'node1', 1)$$);
-- Forwards (a transaction sent outside, a restore): chain at 10.
SELECT spool.nonce_mark_recyclable('no-b', 5, 'node1', 1);
SELECT spool.nonce_set_next('no-b', 10, 'node1', 1) AS next_out;
SELECT spool.nonce_allocate('no-b', 'node1', 1) AS gets_10;
SELECT nonce, state FROM spool.nonces WHERE signer = 'no-b' ORDER BY nonce;
SELECT next_nonce, released FROM spool.nonce_signer WHERE signer = 'no-b';
-- The same value again changes nothing but is recorded.
SELECT spool.nonce_set_next('no-b', 10, 'node1', 1) AS next_out;
SELECT signer, chain_next, old_next, new_next, consumed, next_out, owner, token
  FROM spool.nonce_set_next_log WHERE signer = 'no-b' ORDER BY id;

-- Bad input and wrong holders: clear errors, nothing changed.
SELECT spool_state() AS before \gset
SELECT try($$SELECT spool.nonce_set_next('no-b', NULL, 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_set_next('no-b', -1, 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_set_next(NULL, 1, 'node1', 1)$$);
SELECT try($$SELECT spool.nonce_set_next('no-b', 1, 'node1')$$);
SELECT try($$SELECT spool.nonce_set_next('no-b', 1, NULL, 1)$$);
SELECT try($$SELECT spool.nonce_set_next('no-b', 1, 'node1', 2)$$);
SELECT try($$SELECT spool.nonce_set_next('no-b', 1, 'node2', 1)$$);
SELECT try($$SELECT spool.nonce_set_next('no-none', 1, 'node1', 1)$$);
-- Omitting owner and token routes the call to the workers, which refuse a
-- signer a client holds (SP008).
SELECT try($$SELECT spool.nonce_set_next('no-b', 1)$$);
SELECT spool_state() = :'before' AS unchanged;
SELECT count(*) AS log_rows FROM spool.nonce_set_next_log WHERE signer = 'no-b';

-- nonce_set_next through the workers: no-q is at 6 with nothing released.
SELECT spool.nonce_set_next('no-q', 20) AS next_out;
SELECT spool.nonce_request('no-q', 'q-20') AS gets_20;
SELECT count(*) FILTER (WHERE state = 'consumed') AS consumed,
       count(*) FILTER (WHERE state = 'allocated') AS allocated
  FROM spool.nonces WHERE signer = 'no-q';
SELECT chain_next, old_next, new_next, consumed, next_out, owner LIKE 'nonce-worker:%' AS by_worker
  FROM spool.nonce_set_next_log WHERE signer = 'no-q';
-- A signer's first call may be set_next: it starts at the chain's nonce.
SELECT spool.nonce_set_next('no-new', 7) AS next_out;
SELECT spool.nonce_request('no-new') AS gets_7;

-- Roles: another role's signer can be neither reported on nor set (42501),
-- in either mode; nothing changes.
CREATE ROLE regress_nops_a IN ROLE spool_client;
CREATE ROLE regress_nops_b IN ROLE spool_client;
SET ROLE regress_nops_a;
SELECT spool.nonce_request('no-ra', 'ra-0') AS a_nonce;
SELECT token FROM spool.lease_acquire('signer:no-rb', 'a-node', '1 h');
RESET ROLE;
SELECT spool_state() AS before \gset
SET ROLE regress_nops_b;
SELECT try($$SELECT spool.nonce_report('no-ra', 'recyclable', 0)$$);
SELECT try($$SELECT spool.nonce_report('no-ra', 'used', request_id => 'ra-0')$$);
SELECT try($$SELECT spool.nonce_set_next('no-ra', 5)$$);
SELECT try($$SELECT spool.nonce_set_next('no-rb', 5, 'a-node', 1)$$);
SELECT try($$SELECT * FROM spool.nonce_set_next_log$$);
RESET ROLE;
SELECT spool_state() = :'before' AS unchanged;
SET ROLE regress_nops_a;
SELECT spool.nonce_report('no-ra', 'used', 0) AS a_reports;
SELECT spool.nonce_set_next('no-rb', 5, 'a-node', 1) AS a_sets;
RESET ROLE;

-- nonce_report_and_request: a report and the next nonce in one worker
-- commit.  Signer 'no-c', nonces 0..2 allocated.
SELECT spool.nonce_request('no-c', 'c-' || g) AS nonce FROM generate_series(0, 2) g;
-- 0 used (by nonce), and a new nonce.
SELECT spool.nonce_report_and_request('no-c', 'used', 0, request_id => 'c-3') AS gets_3;
-- 1 given back (by request id): it goes to this very call.
SELECT spool.nonce_report_and_request('no-c', 'recyclable', reported_request_id => 'c-1',
                                      request_id => 'c-4') AS gets_1;
-- Repeats of committed calls (their request ids hold nonces) return the
-- same nonces and report nothing again.
SELECT spool.nonce_report_and_request('no-c', 'used', 0, request_id => 'c-3') AS again_3;
SELECT spool.nonce_report_and_request('no-c', 'recyclable', reported_request_id => 'c-1',
                                      request_id => 'c-4') AS again_1;
SELECT spool.nonce_report_and_request('no-c', 'recyclable', 1, request_id => 'c-4') AS again_1_by_nonce;
-- Without a request id (an 'auto:' one).
SELECT spool.nonce_report_and_request('no-c', 'used', 2) AS gets_4;
SELECT nonce, state, CASE WHEN request_id LIKE 'auto:%' THEN 'auto' ELSE request_id END AS request_id
  FROM spool.nonces WHERE signer = 'no-c' ORDER BY nonce;
SELECT next_nonce, released FROM spool.nonce_signer WHERE signer = 'no-c';

-- A report that fails fails the call, and no nonce is handed out: the state
-- machine in the worker (SP006), unknown nonces and request ids (SP005),
-- bad input (SP001), a signer in basic mode (SP008).
SELECT spool_state() AS before \gset
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'recyclable', 0, request_id => 'c-x')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'recyclable', 0)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', 99, request_id => 'c-x')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', reported_request_id => 'nope')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-none', 'used', 0)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'sent', 3)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', NULL, 3)$$);
SELECT try($$SELECT spool.nonce_report_and_request(NULL, 'used', 3)$$);
SELECT try($$SELECT spool.nonce_report_and_request('', 'used', 3)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', 3, 'c-3')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', -1)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', 3, request_id => '')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', reported_request_id => '')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', reported_request_id => 'c-3',
                                                   request_id => 'c-3')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-b', 'used', 3)$$);
SELECT spool_state() = :'before' AS unchanged;
SELECT count(*) AS c_x_nonces FROM spool.nonces WHERE request_id = 'c-x';

-- Roles: another role's signer (42501, nothing changes), whether the report
-- names a nonce it has, one it lacks, or the request id repeats one of its
-- calls; a role outside spool_client may not call it at all.
CREATE ROLE regress_nops_c;
SELECT spool_state() AS before \gset
SET ROLE regress_nops_b;
SELECT try($$SELECT spool.nonce_report_and_request('no-ra', 'used', 0, request_id => 'rb-1')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-ra', 'recyclable', 0)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-ra', 'used', 7)$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-ra', 'used', reported_request_id => 'nope')$$);
SELECT try($$SELECT spool.nonce_report_and_request('no-ra', 'used', 7, request_id => 'ra-0')$$);
SET ROLE regress_nops_c;
SELECT try($$SELECT spool.nonce_report_and_request('no-c', 'used', 3)$$);
RESET ROLE;
SELECT spool_state() = :'before' AS unchanged;
SET ROLE regress_nops_a;
SELECT spool.nonce_request('no-ra', 'ra-1') AS a_nonce;
SELECT spool.nonce_report_and_request('no-ra', 'used', 1, request_id => 'ra-2') AS a_next;
RESET ROLE;
DROP ROLE regress_nops_c;

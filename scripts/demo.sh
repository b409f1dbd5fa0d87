#!/usr/bin/env bash
# The main job, end to end: install what is missing, build, start a throwaway
# PostgreSQL with spool_ext and the test Kafka cluster, ingest a Kafka stream
# into the spool (showing lag per partition live, through a server crash),
# fold it through a processor with 2 replicas (terminating the active
# mid-stream: the standby takes over, outputs exactly once) whose alerts the
# outbox delivers to a SQL function, show the transactional outbox (an
# application's change and its event in one transaction, delivered as
# NOTIFY to a listening session), then show leases, fencing and the nonce
# allocator surviving a stalled owner, a terminated worker and a stalled
# worker.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"

tree=$(prepare_build_tree "$here")
work=$(mktemp -d /tmp/spool_ext-demo.XXXXXX)
PORT=${SPOOL_DEMO_PORT:-54339}
cleanup() {
	[ -n "${stopped_pid:-}" ] && kill -CONT "$stopped_pid" 2>/dev/null || true
	stop_kafka
	stop_server "$work"
	rm -rf "$work" "$tree"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
sql() { as_user "$PG_BIN/psql" -X -q -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
val() { sql -At -c "$1"; }

say "Starting a throwaway PostgreSQL 15 with shared_preload_libraries = 'spool_ext'"
start_server "$work" "$PORT" "spool.nonce_workers = 2
spool.nonce_stall_timeout = '3s'"
sql -c "CREATE EXTENSION spool_ext"
echo "server running on $work port $PORT; extension created"
start_kafka "$work" "$tree" --brokers 1 --topic orders:8
echo "test Kafka cluster (librdkafka mock, real protocol) at $KAFKA_BOOTSTRAP, topic orders with 8 partitions"

say "A. Kafka -> spool: a source consumes the topic into the WAL-logged spool"
sql -c "SELECT spool.create_source('orders', '$KAFKA_BOOTSTRAP', '{orders}', '{\"batch_ms\": 50}')" \
    -c "SELECT spool.start_source('orders')"
status() {
	sql -c "SELECT kafka_partition AS part, next_offset AS durable, high_watermark AS high, lag,
	               state, round(msgs_per_sec) AS \"msg/s\"
	          FROM spool.source_status WHERE source = 'orders' ORDER BY 1"
}
echo "-- producing 120000 messages (~200-byte JSON) while we watch the spool fill:"
kafka "produce orders 120000 -1 200 0" >/dev/null &
producer=$!
for _ in 1 2 3 4; do
	sleep 0.7
	status
done
wait "$producer"
produced=120000
echo "one message is not JSON: it becomes a dead letter, the stream goes on"
kafka "produce_one orders 0 bad {not json" >/dev/null

say "B. A backend is killed with SIGKILL mid-stream: PostgreSQL restarts everything"
kafka "produce orders 20000 -1 200 $produced" >/dev/null
produced=$((produced + 20000))
victim=$(val "SELECT pid FROM pg_stat_activity WHERE backend_type = 'spool promoter'")
echo "kill -9 $victim (the promoter); staging (UNLOGGED) is emptied by crash recovery and re-read from Kafka"
kill -9 "$victim"
for _ in $(seq 1 100); do val "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
kafka "produce orders 20000 -1 200 $produced" >/dev/null
produced=$((produced + 20000))
for _ in $(seq 1 300); do
	n=$(val "SELECT count(*) FROM spool.entries" 2>/dev/null || echo 0)
	[ "$n" -ge "$produced" ] && break
	sleep 0.2
done
status
sql -c "SELECT count(*) AS entries, count(DISTINCT (kafka_partition, kafka_offset)) AS distinct_offsets,
               min(cursor) AS first_cursor, max(cursor) AS last_cursor,
               count(DISTINCT value->>'seq') AS distinct_seq,
               $produced AS produced
          FROM spool.entries"
sql -c "SELECT topic, kafka_partition, kafka_offset, error FROM spool.dead_letters"
sql -c "SELECT segment, min_cursor, max_cursor, rows, state FROM spool.segments ORDER BY segment"

say "C. A processor with 2 replicas folds the spool through spool.window_alert"
sql -c "CREATE ROLE demo_app; GRANT spool_admin TO demo_app"
echo "its alerts go to the outbox target 'alerts': a SQL function (run as demo_app) that inserts into alerts_delivered,"
echo "called in the dispatcher's transaction that also marks the row delivered (exactly once), 2 dispatcher shards:"
sql >/dev/null <<'SQL'
CREATE TABLE alerts_delivered (
	n			bigserial PRIMARY KEY,
	outbox_id	bigint NOT NULL,
	key			text,
	payload		jsonb,
	at			timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION deliver_alert(payload jsonb, key text, outbox_id bigint) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO public.alerts_delivered (outbox_id, key, payload) VALUES (outbox_id, key, payload)
$$;
GRANT INSERT ON alerts_delivered TO demo_app;
GRANT USAGE ON SEQUENCE alerts_delivered_n_seq TO demo_app;
SELECT spool.create_target('alerts', 'sql',
	'{"function": "public.deliver_alert", "run_as": "demo_app", "shards": 2}');
SQL
sql -c "SELECT name, kind, options FROM spool.target_config WHERE name = 'alerts'"
echo "per key (the message's amount, 1000 keys), the sum of its last 3 seqs; one alert when it crosses 483000"
sql -c "SELECT spool.create_processor('alerts', 'spool.window_alert(jsonb, spool.entries[])', '{
          \"run_as\": \"demo_app\", \"sources\": [\"orders\"], \"replicas\": 2,
          \"batch_size\": 200, \"lease_ttl\": \"2 s\", \"checkpoint_every\": 20000,
          \"handler\": {\"key\": \"amount\", \"value\": \"seq\", \"aggregate\": \"sum\",
                      \"window\": {\"type\": \"count\", \"size\": 3},
                      \"threshold\": 483000, \"target\": \"alerts\"}}')" \
    -c "SELECT spool.start_processor('alerts')"
pstatus() {
	sql -c "SELECT replica, pid, role, cursor, committed_cursor AS committed, token, takeovers,
	               round(last_takeover_ms::numeric, 1) AS takeover_ms, state_hash_cursor AS hash_at,
	               state_hash, outputs
	          FROM spool.processor_status WHERE processor = 'alerts' ORDER BY replica"
}
for _ in $(seq 1 300); do
	[ "$(val "SELECT count(*) FROM spool.processor_status WHERE processor = 'alerts'
	            AND cursor >= (SELECT max(cursor) FROM spool.entries)")" -eq 2 ] && break
	sleep 0.1
done
echo "both replicas computed the same state (equal hashes at equal cursors); only the active wrote outputs:"
pstatus

say "D. 40000 more messages stream in and the active replica is terminated mid-stream"
kafka "produce orders 40000 -1 100 $produced" >/dev/null &
producer=$!
for _ in $(seq 1 100); do
	# about half of this stream's alerts (seqs 162000..162999) are out: terminate now
	[ "$(val "SELECT coalesce(max(committed_cursor), 0) FROM spool.processor_status WHERE processor = 'alerts'")" -gt $((produced + 2500)) ] && break
	sleep 0.02
done
old=$(val "SELECT pid FROM spool.processor_status WHERE processor = 'alerts' AND role = 'active'")
echo "SELECT pg_terminate_backend($old)  -- the active replica"
val "SELECT pg_terminate_backend($old)" >/dev/null
ostatus() {
	sql -c "SELECT target, shard, state, position, backlog, flushes_size, flushes_interval,
	               round(batch_p50_le::numeric, 1) AS batch_p50_le, round(flush_ms_p50_le::numeric, 2) AS flush_ms_p50_le
	          FROM spool.outbox_status ORDER BY target, shard"
}
echo "meanwhile the outbox dispatchers deliver the alerts already written:"
ostatus
for _ in $(seq 1 100); do
	new=$(val "SELECT pid FROM spool.processor_status WHERE processor = 'alerts' AND role = 'active'")
	[ -n "$new" ] && [ "$new" != "$old" ] && break
	sleep 0.05
done
wait "$producer"
produced=$((produced + 40000))
for _ in $(seq 1 300); do
	[ "$(val "SELECT count(*) FROM spool.processor_status WHERE processor = 'alerts'
	            AND role IN ('active', 'standby') AND cursor >= (SELECT max(cursor) FROM spool.entries)")" -eq 2 ] && break
	sleep 0.1
done
val "SELECT format('replica %s (pid %s) took over with token %s, %s ms after the active exited',
                   replica, pid, token, round(last_takeover_ms::numeric, 1))
       FROM spool.processor_status WHERE processor = 'alerts' AND role = 'active'"
echo "the terminated replica was restarted by the launcher and is a standby again:"
pstatus
echo "alerts in the outbox, written by which token, against an independent computation from the spool:"
sql -c "SELECT token, count(*) AS alerts, min(id), max(id) FROM spool.outbox WHERE processor = 'alerts' GROUP BY 1 ORDER BY 1"
sql -c "WITH s AS (SELECT value->>'amount' AS k,
                          sum((value->>'seq')::bigint) OVER (PARTITION BY value->>'amount'
                              ORDER BY (value->>'seq')::bigint ROWS 2 PRECEDING) AS s3
                     FROM spool.entries),
             expected AS (SELECT DISTINCT k FROM s WHERE s3 >= 483000)
        SELECT (SELECT count(*) FROM expected) AS expected_alerts,
               (SELECT count(*) FROM spool.outbox WHERE processor = 'alerts') AS outbox_alerts,
               (SELECT count(DISTINCT key) FROM spool.outbox WHERE processor = 'alerts') AS distinct_keys,
               (SELECT count(*) FROM expected e WHERE NOT EXISTS
                   (SELECT 1 FROM spool.outbox o WHERE o.processor = 'alerts' AND o.key = e.k)) AS missing"
for _ in $(seq 1 200); do
	[ "$(val "SELECT count(*) FILTER (WHERE NOT delivered) FROM spool.outbox WHERE target = 'alerts'")" -eq 0 ] && break
	sleep 0.1
done
echo "every alert was delivered to the SQL function once (alerts_delivered), with its outbox id:"
sql -c "SELECT (SELECT count(*) FROM spool.outbox WHERE target = 'alerts') AS outbox_rows,
               (SELECT count(*) FILTER (WHERE delivered) FROM spool.outbox WHERE target = 'alerts') AS delivered,
               count(*) AS function_calls, count(DISTINCT outbox_id) AS distinct_ids,
               (SELECT count(*) FROM spool.outbox o WHERE o.target = 'alerts'
                   AND NOT EXISTS (SELECT 1 FROM alerts_delivered d WHERE d.outbox_id = o.id)) AS not_called
          FROM alerts_delivered"
sql -c "SELECT n, outbox_id, key, payload->>'sum' AS sum, payload->>'cursor' AS cursor FROM alerts_delivered ORDER BY n LIMIT 3"
ostatus

say "E. The transactional outbox: an application's change and its event commit together"
sql >/dev/null <<'SQL'
CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);
INSERT INTO accounts VALUES (1, 100), (2, 100);
SELECT spool.create_target('events', 'notify', '{"channel": "account_events"}');
SQL
echo "target 'events' (kind notify, channel account_events); a client session LISTENs for 4 s:"
{
	echo "LISTEN account_events;"
	for _ in $(seq 1 16); do echo "SELECT pg_sleep(0.25);"; done
} > "$work/listen.sql"
chmod 644 "$work/listen.sql"
as_user timeout 20 "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -f "$work/listen.sql" > "$work/listen.out" 2>&1 &
listener=$!
for _ in $(seq 1 50); do
	[ "$(val "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(0.25)%'")" -gt 0 ] && break
	sleep 0.1
done
# transfer AMOUNT END: the application's transaction, moving AMOUNT from
# account 1 to 2 and enqueueing its two events, ended by COMMIT or ROLLBACK.
transfer() {
	cat <<SQL
BEGIN;
UPDATE accounts SET balance = balance - $1 WHERE id = 1;
UPDATE accounts SET balance = balance + $1 WHERE id = 2;
SELECT spool.enqueue('events', 'account:1', '{"op": "debit", "amount": $1}');
SELECT spool.enqueue('events', 'account:2', '{"op": "credit", "amount": $1}');
$2;
SQL
}
transfer 30 COMMIT | sed '$s/$/       -- the events become deliverable at this commit, and not before/'
transfer 30 COMMIT | sql -o /dev/null
echo "a second transfer of 500 is rolled back (it would overdraw account 1): its events vanish with it"
transfer 500 ROLLBACK | sql -o /dev/null
echo "one more debit, then a barrier (delivered after every earlier event of the target):"
sql <<'SQL'
BEGIN;
UPDATE accounts SET balance = balance - 5 WHERE id = 2;
SELECT spool.enqueue('events', 'account:2', '{"op": "debit", "amount": 5}') \g /dev/null
COMMIT;
SELECT spool.enqueue_barrier('events') \g /dev/null
SQL
wait "$listener" || true
sql -c "SELECT id, balance FROM accounts ORDER BY id"
sql -c "SELECT id, key, payload, barrier, delivered FROM spool.outbox WHERE target = 'events' ORDER BY id"
echo "what the LISTENing session received (one NOTIFY per event, sent when the dispatcher's transaction committed):"
sed -n 's/^Asynchronous notification "account_events" with payload "\(.*\)" received from server process with PID [0-9]*\.$/  account_events: \1/p' "$work/listen.out"
ostatus

say "F. Leases with fencing tokens: node-a takes the signer lease for 0xa11ce"
sql -c "SELECT resource, owner, token FROM spool.lease_acquire('signer:0xa11ce', 'node-a', '2 s')"
echo "node-a allocates three nonces and sends the first transaction:"
sql -c "SELECT spool.nonce_allocate('0xa11ce', 'node-a', 1, 'tx-a1') AS a1,
               spool.nonce_allocate('0xa11ce', 'node-a', 1, 'tx-a2') AS a2,
               spool.nonce_allocate('0xa11ce', 'node-a', 1, 'tx-a3') AS a3"
sql -c "SELECT spool.nonce_mark_used('0xa11ce', 0, 'node-a', 1)"
echo "node-b tries to take over while node-a's lease is live: it gets NULL"
sql -c "SELECT coalesce((spool.lease_acquire('signer:0xa11ce', 'node-b', '10 s')).token::text, 'NULL (held by node-a)') AS node_b"

say "G. node-a stalls (a GC pause, a frozen VM) past its 2 s TTL; node-b takes over"
sleep 2.5
sql -c "SELECT resource, owner, token FROM spool.lease_acquire('signer:0xa11ce', 'node-b', '30 s')"
echo "node-b gives nonce 2 back (its transaction was never sent) and allocates: the hole is reused first"
sql -c "SELECT spool.nonce_mark_recyclable('0xa11ce', 2, 'node-b', 2)"
sql -c "SELECT spool.nonce_allocate('0xa11ce', 'node-b', 2, 'tx-b1') AS b1, spool.nonce_allocate('0xa11ce', 'node-b', 2, 'tx-b2') AS b2"

say "H. node-a wakes up and carries on with its old token: every write is rejected"
for q in "SELECT spool.nonce_allocate('0xa11ce', 'node-a', 1)" \
         "SELECT spool.nonce_mark_used('0xa11ce', 1, 'node-a', 1)" \
         "SELECT spool.lease_renew('signer:0xa11ce', 'node-a', 1)"; do
	echo "node-a> $q"
	{ sql -c "$q" 2>&1 || true; } | sed -n 's/^ERROR: */   rejected: /p'
done
sql -c "SELECT signer, nonce, state, owner, token, request_id FROM spool.nonces WHERE signer = '0xa11ce' ORDER BY nonce"

say "I. Worker-queue mode: 8 clients call spool.nonce_request on 4 signers, no lease needed"
cat > "$work/queue.sql" <<'SQL'
\set s random(1, 4)
SELECT spool.nonce_request('0xfeed' || :s, 'req-' || :client_id || '-' || random());
SQL
chmod 644 "$work/queue.sql"
as_user "$PG_BIN/pgbench" -n -h "$work" -p "$PORT" -c 8 -j 2 -T 10 -f "$work/queue.sql" postgres > "$work/pgbench.out" 2>&1 &
bench=$!
sql -c "SELECT worker, pid IS NOT NULL AS running, generation, owner FROM spool.nonce_workers ORDER BY worker"
sleep 2
victim=$(val "SELECT pid FROM spool.nonce_workers WHERE worker = 0")
echo "terminating nonce worker 0 (pid $victim) under load"
val "SELECT pg_terminate_backend($victim)" >/dev/null
sleep 3
stopped_pid=$(val "SELECT pid FROM spool.nonce_workers WHERE worker = 1")
echo "stalling nonce worker 1 (pid $stopped_pid) with SIGSTOP under load"
kill -STOP "$stopped_pid"
# Continued once the load's 10 s are over at the latest: a worker stopped
# inside one of its short holds of the nonce lock holds every nonce request
# up (as any stopped PostgreSQL process holding a lock does), and pgbench
# would then never finish.
( sleep 8; kill -CONT "$stopped_pid" 2>/dev/null ) &
unstall=$!
wait "$bench" || true
kill -CONT "$stopped_pid" 2>/dev/null || true	# (continued already, it may have exited)
kill "$unstall" 2>/dev/null || true
echo "load finished; the stalled worker was continued and exits on its own"
grep -E "^(number of transactions actually processed|number of failed|tps)" "$work/pgbench.out" || cat "$work/pgbench.out"

say "J. What happened to the nonce workers"
sql -c "SELECT worker, pid, generation, owner, served, batches, takeovers FROM spool.nonce_workers ORDER BY worker"
sql -c "SELECT resource, owner, token, grants FROM spool.leases WHERE resource LIKE 'signer:0xfeed%' ORDER BY resource"
sql -c "SELECT signer, count(*) AS nonces, max(nonce) AS max_nonce,
               count(DISTINCT nonce) = count(*) AS no_duplicates,
               max(nonce) + 1 = count(*) AS gap_free
          FROM spool.nonces WHERE signer LIKE '0xfeed%' GROUP BY signer ORDER BY signer"
echo "server log lines from spool_ext:"
grep -E "spool (nonce worker|launcher)|terminating backend|replacing|re-queued|was replaced" "$work/log" | sed 's/^/  /' | tail -n 12
say "Done. (The server is stopped and its files removed.)"

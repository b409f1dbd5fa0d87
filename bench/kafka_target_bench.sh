#!/usr/bin/env bash
# Benchmark: the kafka target against `kcat -P` of the same rows into the
# test Kafka cluster (librdkafka's mock, 1 broker, on 127.0.0.1), side by
# side in one run.  Rows: N rows on KEYS keys with ~130-byte jsonb payloads;
# the messages kcat sends are the very texts the dispatcher sends (key, and
# the payload as jsonb text), read out of the outbox after the run.
# Cases, each RUNS times, interleaved, each into a fresh topic of 8
# partitions:
#   kcat: kcat -P -K '\t' -X enable.idempotence=true -X linger.ms=1 (the
#     producer settings of the target) of a file of N "key<TAB>value"
#     lines; rows/s = N / wall time of the kcat process (it exits once every
#     message is acknowledged);
#   target, idempotent (the default mode) and transactional ("transactional":
#     true), each with 1 and with 4 shards, batch_size BATCH: N rows written
#     with spool.enqueue in ONE transaction while the dispatchers run; rows/s
#     = N / (the time every shard's position covered its rows - the commit
#     of that transaction).  The wait polls the shards' positions every
#     5 ms (spool.outbox_status counts the backlog row by row: polled that
#     often it took most of a core from the run it measured), and checks
#     spool.outbox_status once, after.  The rows are marked delivered only after Kafka
#     acknowledged (idempotent) or committed (transactional) them.
# Each case checks that the topic holds N messages (sum of high watermarks).
# At the end: a side-by-side table with medians and ratios to kcat, and the
# CPU each case used per row (from /proc: the producing process, its main
# thread where a dispatcher reads and renders rows, and the test cluster),
# beside what two cores allow per row at that rate.
# CPU_DEBUG=1 logs the raw CPU readings of each target run.
#
# Usage: bash bench/kafka_target_bench.sh [N] [RUNS]   (defaults 100000, 3)
# Environment:
#   KEYS=K    distinct keys (default 10000)
#   BATCH=B   the targets' batch_size (default 1000, the option's default)
#   PARTS=P   partitions of each topic (default 8)
#   CASES="kcat idem1 ..."  the cases to run (default all; kcat must be one)
#   SPOOL_BENCH_PORT  server port (default 54359; unix socket only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-100000}
RUNS=${2:-3}
KEYS=${KEYS:-10000}
BATCH=${BATCH:-1000}
PARTS=${PARTS:-8}
[ "$N" -ge 1000 ] && [ "$RUNS" -ge 1 ] && [ "$KEYS" -ge 1 ] && [ "$BATCH" -ge 1 ] ||
	{ echo "usage: $0 [N >= 1000] [RUNS >= 1]  (KEYS, BATCH >= 1)" >&2; exit 2; }
bench_start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-kafka-bench.XXXXXX)
PORT=${SPOOL_BENCH_PORT:-54359}
server_up=0
on_exit() {
	local rc=$?
	[ "$server_up" = 1 ] && stop_server "$work"
	stop_kafka
	keep_failed_log "$rc" "$work" kafka_target_bench
	rm -rf "$work" "$tree"
}
trap on_exit EXIT

start_kafka "$work" "$tree"
start_server "$work" "$PORT" "shared_buffers = 512MB
max_wal_size = 4GB
spool.nonce_workers = 0
spool.outbox_segment_size = 1000000"
server_up=1
sql() { as_user "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
log() { echo "$*" >&2; }
now() { date +%s.%N; }
WAIT_S=$((N / 200 > 120 ? N / 200 : 120))

sql -c "CREATE EXTENSION spool_ext"
read -r -a CASES <<< "${CASES:-kcat idem1 idem4 txn1 txn4}"
declare -A label=([kcat]="kcat -P (idempotent producer)" [idem1]="target, idempotent, 1 shard"
	[idem4]="target, idempotent, 4 shards" [txn1]="target, transactional, 1 shard"
	[txn4]="target, transactional, 4 shards")
declare -A rate stat cpu_main cpu_all cpu_mock
topic_n=0

# Messages in topic: the sum of its partitions' high watermarks.
count_topic() {
	local t=$1 p sum=0 hi
	for p in $(seq 0 $((PARTS - 1))); do
		hi=$(kafka wmarks "$t" "$p" | awk '$1 == "OK" {print $3}')
		sum=$((sum + ${hi:-0}))
	done
	echo "$sum"
}

# new_topic: a fresh topic of 8 partitions, named in $T.
new_topic() {
	topic_n=$((topic_n + 1))
	T="bench$topic_n"
	[ "$(kafka topic "$T" "$PARTS")" = OK ] || { log "could not create topic $T"; exit 1; }
}

# The rows (kcat's input; the targets enqueue the same).
sql <<SQL
CREATE TABLE bench_rows AS
SELECT 'key' || (g % $KEYS) AS key,
       jsonb_build_object('g', g, 'k', 'key' || (g % $KEYS), 'amount', g % 1000,
                          'note', repeat('x', 60), 'ts', 1796596169000 + g) AS payload
  FROM generate_series(1, $N) g;
SQL
sql -c "COPY (SELECT key || E'\t' || payload::text FROM bench_rows ORDER BY key) TO STDOUT" > "$work/rows.tsv"
log "rows: $N, $(wc -c < "$work/rows.tsv") bytes of key<TAB>value"

# cpu_s PID [main]: CPU seconds (user + system) used so far by every thread
# of process PID, or by its main thread only.
# (/proc/PID/stat counts the threads that have exited too.)
cpu_s() {
	local f=/proc/$1/stat
	[ "${2:-}" = main ] && f=/proc/$1/task/$1/stat
	sed 's/.*) //' "$f" 2> /dev/null |
		awk -v hz="$(getconf CLK_TCK)" '{t += $12 + $13} END {printf "%.3f\n", t / hz}'
}
# per_row CPU_SECONDS: microseconds per row.
per_row() { echo "($1) * 1000000 / $N" | bc -l; }

run_kcat() {
	local r=$1 t t0 t1 got m0 m1
	new_topic
	t=$T
	m0=$(cpu_s "$KAFKA_PID")
	t0=$(now)
	( TIMEFORMAT='%U %S'
	  time kcat -P -b "$KAFKA_BOOTSTRAP" -t "$t" -K $'\t' -X enable.idempotence=true -X linger.ms=1 \
		-l "$work/rows.tsv" 2> "$work/kcat.err" ) 2> "$work/kcat.time" || { cat "$work/kcat.err" >&2; exit 1; }
	t1=$(now)
	m1=$(cpu_s "$KAFKA_PID")
	got=$(count_topic "$t")
	[ "$got" = "$N" ] || { log "kcat run $r: topic $t holds $got of $N messages"; exit 1; }
	rate[kcat,$r]=$(echo "$N / ($t1 - $t0)" | bc -l)
	cpu_all[kcat,$r]=$(per_row "$(awk '{print $1 + $2}' "$work/kcat.time")")
	cpu_mock[kcat,$r]=$(per_row "$m1 - $m0")
}

run_target() {
	local c=$1 r=$2 t name shards txn t0 t1 got res pids p m0 m1 cpu0_main cpu0_all cpu1_main cpu1_all
	new_topic
	t=$T
	name="${c}_$r"
	shards=${c: -1}
	txn=false
	[ "${c#txn}" != "$c" ] && txn=true
	sql -c "SELECT spool.create_target('$name', 'kafka', '{\"brokers\": \"$KAFKA_BOOTSTRAP\", \"topic\": \"$t\",
		\"shards\": $shards, \"batch_size\": $BATCH, \"transactional\": $txn}')" >/dev/null
	# Every shard running (its producer started) before the rows come.
	for _ in $(seq 1 3000); do
		[ "$(sql -c "SELECT count(*) FROM spool.outbox_status WHERE target = '$name' AND state = 'idle'")" = "$shards" ] && break
		sleep 0.01
	done
	pids=$(sql -c "SELECT string_agg(pid::text, ' ') FROM spool.outbox_status WHERE target = '$name'")
	read -r -a pids <<< "$pids"
	cpu0_main=0 cpu0_all=0
	for p in "${pids[@]}"; do
		cpu0_main=$(echo "$cpu0_main + $(cpu_s "$p" main)" | bc -l)
		cpu0_all=$(echo "$cpu0_all + $(cpu_s "$p")" | bc -l)
	done
	m0=$(cpu_s "$KAFKA_PID")
	# The last row of each shard, noted before the commit: the wait polls
	# only the shards' positions (a few rows), not spool.outbox_status,
	# whose backlog counts every row above the position and took most of a
	# core when polled every 5 ms during the run.
	t0=$(sql <<SQL
BEGIN;
SELECT count(spool.enqueue('$name', key, payload)) FROM bench_rows \gset
DROP TABLE IF EXISTS bench_last;
CREATE TABLE bench_last AS
SELECT s.shard, max(o.id) AS last_id
  FROM spool.targets t JOIN spool.outbox_store o ON o.target_id = t.id
  CROSS JOIN LATERAL (SELECT greatest(o.shard, 0) AS shard) s
 WHERE t.name = '$name' GROUP BY s.shard;
COMMIT;
SELECT extract(epoch FROM clock_timestamp());
SQL
)
	res=$(sql <<SQL
DO \$\$
DECLARE
	deadline timestamptz := clock_timestamp() + interval '$WAIT_S s';
BEGIN
	LOOP
		EXIT WHEN NOT EXISTS (
			SELECT FROM bench_last l JOIN spool.targets t ON t.name = '$name'
			  LEFT JOIN spool.outbox_positions p ON p.target_id = t.id AND p.shard = l.shard
			 WHERE coalesce(p.position, 0) < l.last_id);
		IF clock_timestamp() > deadline THEN
			RAISE EXCEPTION 'timeout: %', (SELECT string_agg(state || ' backlog ' || backlog || ' ' || coalesce(last_error, ''), '; ')
											 FROM spool.outbox_status WHERE target = '$name');
		END IF;
		PERFORM pg_sleep(0.005);
	END LOOP;
END \$\$;
SELECT extract(epoch FROM clock_timestamp());
SQL
)
	t1=$res
	m1=$(cpu_s "$KAFKA_PID")
	cpu1_main=0 cpu1_all=0
	for p in "${pids[@]}"; do
		cpu1_main=$(echo "$cpu1_main + $(cpu_s "$p" main)" | bc -l)
		cpu1_all=$(echo "$cpu1_all + $(cpu_s "$p")" | bc -l)
	done
	[ -n "${CPU_DEBUG:-}" ] && log "pids ${pids[*]}: main $cpu0_main -> $cpu1_main, all $cpu0_all -> $cpu1_all, mock $m0 -> $m1"
	cpu_main[$c,$r]=$(per_row "$cpu1_main - $cpu0_main")
	cpu_all[$c,$r]=$(per_row "$cpu1_all - $cpu0_all")
	cpu_mock[$c,$r]=$(per_row "$m1 - $m0")
	# Covered means delivered: nothing left, nothing parked for a retry.
	[ "$(sql -c "SELECT sum(backlog) = 0 AND sum(waiting) = 0 FROM spool.outbox_status WHERE target = '$name'")" = t ] ||
		{ log "$name: positions cover every row, but rows are left or waiting"; exit 1; }
	got=$(count_topic "$t")
	[ "$got" = "$N" ] || { log "$name: topic $t holds $got of $N messages"; exit 1; }
	rate[$c,$r]=$(echo "$N / ($t1 - $t0)" | bc -l)
	# Where the time went: flushes and their sizes and times (summed / worst over the shards).
	stat[$c,$r]=$(sql -c "SELECT format('flushes %s (size %s, interval %s), batch p50 <= %s max %s, flush ms p50 <= %s p99 <= %s max %s',
		sum(flushes_size + flushes_interval + flushes_barrier + flushes_close), sum(flushes_size), sum(flushes_interval),
		max(batch_p50_le), max(batch_max), max(flush_ms_p50_le), max(flush_ms_p99_le), round(max(flush_ms_max)::numeric, 1))
		FROM spool.outbox_status WHERE target = '$name'")
	sql -c "SELECT spool.drop_target('$name', force => true)" >/dev/null
}

for r in $(seq 1 "$RUNS"); do
	for c in "${CASES[@]}"; do
		if [ "$c" = kcat ]; then run_kcat "$r"; else run_target "$c" "$r"; fi
		log "run $r, $c: $(printf '%.0f' "${rate[$c,$r]}") rows/s ${stat[$c,$r]:-}"
	done
done

declare -A M
for c in "${CASES[@]}"; do
	vals=()
	for r in $(seq 1 "$RUNS"); do vals+=("${rate[$c,$r]}"); done
	M[$c]=$(median "${vals[@]}")
	bench_result "kafka_$c" "${M[$c]}" higher
done

echo
echo "kafka target vs kcat -P, $N rows ($KEYS keys, ~130-byte payloads), batch_size $BATCH, $RUNS runs, test Kafka (librdkafka mock, 1 broker, topics of 8 partitions)"
echo "machine: $(nproc) cores; load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| case | runs | median rows/s | min | max | vs kcat -P |"
echo "|------|-----:|--------------:|----:|----:|-----------:|"
for c in "${CASES[@]}"; do
	vals=()
	for r in $(seq 1 "$RUNS"); do vals+=("${rate[$c,$r]}"); done
	lo=$(printf '%s\n' "${vals[@]}" | sort -g | head -1)
	hi=$(printf '%s\n' "${vals[@]}" | sort -g | tail -1)
	printf '| %s | %d | %.0f | %.0f | %.0f | %s |\n' "${label[$c]}" "$RUNS" "${M[$c]}" "$lo" "$hi" \
		"$([ "$c" = kcat ] && echo baseline || printf '%.2fx' "$(echo "${M[$c]} / ${M[kcat]}" | bc -l)")"
done
# Where the CPU went, per row: the producing process (kcat, or the shards'
# dispatchers: their main threads, where PostgreSQL reads and renders the
# rows, and all threads, with librdkafka's) and the test cluster.  Two cores
# give at most 2 / rate of CPU per row.
echo
echo "CPU per row, microseconds (median over runs; CPU time from /proc, 10 ms ticks)"
echo
echo "| case | producer, main thread | producer, all threads | test cluster | total | 2 cores at this rate allow |"
echo "|------|----------------------:|----------------------:|-------------:|------:|---------------------------:|"
for c in "${CASES[@]}"; do
	mains=() alls=() mocks=() tots=()
	for r in $(seq 1 "$RUNS"); do
		[ "$c" != kcat ] && mains+=("${cpu_main[$c,$r]}")
		alls+=("${cpu_all[$c,$r]}")
		mocks+=("${cpu_mock[$c,$r]}")
		tots+=("$(echo "${cpu_all[$c,$r]} + ${cpu_mock[$c,$r]}" | bc -l)")
	done
	printf '| %s | %s | %.2f | %.2f | %.2f | %.2f |\n' "${label[$c]}" \
		"$([ "$c" = kcat ] && echo - || printf '%.2f' "$(median "${mains[@]}")")" \
		"$(median "${alls[@]}")" "$(median "${mocks[@]}")" "$(median "${tots[@]}")" \
		"$(echo "2000000 / ${M[$c]}" | bc -l)"
done
if [ -n "${M[idem1]:-}" ]; then
	r=$(echo "${M[idem1]} / ${M[kcat]}" | bc -l)
	echo
	printf '| goal (issue 14) | measured | result |\n|---|---|---|\n| default mode >= 0.8x kcat -P, 1 shard | %.2fx | %s |\n' \
		"$r" "$([ "$(echo "$r >= 0.8" | bc -l)" = 1 ] && echo met || echo "NOT met")"
fi
echo
echo "total run time of this benchmark: $(($(date +%s) - bench_start)) s"

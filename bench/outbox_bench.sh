#!/usr/bin/env bash
# Benchmark: the outbox (issue 5) against a classic queue table, side by side
# on one throwaway server in one run.  The outbox delivers to a sql target
# whose function, bench_sink(payload jsonb, key text, outbox_id bigint), inserts
# the row into the table sink with clock_timestamp() as delivered_at.  The
# baseline is a table q (id bigserial, key, payload) drained by sessions that
# loop over
#     WITH c AS (SELECT id FROM q ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1000)
#     DELETE FROM q USING c WHERE q.id = c.id RETURNING ...
# and call the same bench_sink for every row (one transaction per batch, as
# role bench_app like the target's run_as; a drainer that finds q empty
# sleeps 10 ms).  The drainers run with enable_seqscan, enable_hashjoin and
# enable_mergejoin off: their plan is cached while q is empty (it is
# truncated before each case), and the plan for an empty q reads all of q
# per batch (a hash join over a scan of q); off, every batch is an index
# scan of q's primary key and 1000 index lookups, the plan a queue with
# statistics gets.  Cases, each RUNS times, interleaved:
#   throughput, rows/s: N rows (KEYS keys, ~130-byte jsonb payloads) written
#     in ONE transaction (spool.enqueue, or INSERT INTO q) while the
#     dispatchers / drainers are running, so that they start on a full
#     backlog when it commits; rows/s = N / (max(delivered_at) - the commit
#     of that transaction, clock_timestamp() read right after COMMIT);
#       outbox with 1 and with 4 shards, queue with 1 and with 4 drainers;
#   latency, ms: pgbench offers RATE rows/s for DURATION s (CLIENTS clients,
#     one enqueue / insert per transaction); each payload carries
#     clock_timestamp() of its statement, so latency = delivered_at - that
#     (it includes the enqueuing commit's WAL flush); per run the median and
#     p99 over all rows; outbox with 4 shards, queue with 4 drainers;
#   each of the above also while another session holds an old snapshot
#     (REPEATABLE READ, one read of an unrelated table, then pg_sleep), taken
#     before the rows are written and held until they are all delivered.
# Every case checks exactly once (N distinct ids in sink) and counts per-key
# order violations (a key's rows delivered out of id order).  At the end:
# spool.outbox_status of every target (flushes by reason, batch and flush
# time percentiles: cumulative over the RUNS runs of each case) and a
# markdown table with medians, ratios and the issue's targets.
#
# Usage: bash bench/outbox_bench.sh [N] [RUNS]   (defaults 200000, 3)
# Environment:
#   RATE=R              offered rate of the latency cases, rows/s (default 5000)
#   DURATION=S          seconds of offered load per latency case (default 20)
#   CLIENTS=C           pgbench clients in the latency cases (default 16)
#   KEYS=K              distinct keys (default 10000)
#   WAIT_S=S            bound on every wait for a backlog to drain (default
#                       max(120, N / 500))
#   SKIP_OUTBOX=1       only the queue-table baseline (checks the script
#                       without the outbox; the outbox rows print as -)
#   SPOOL_BENCH_INSTALLED=1  use the installed spool_ext, do not build it
#   SPOOL_BENCH_PORT    server port (default 54357; unix socket only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-200000}
RUNS=${2:-3}
RATE=${RATE:-5000}
DURATION=${DURATION:-20}
CLIENTS=${CLIENTS:-16}
KEYS=${KEYS:-10000}
WAIT_S=${WAIT_S:-$((N / 500 > 120 ? N / 500 : 120))}
SKIP_OUTBOX=${SKIP_OUTBOX:-0}
[ "$N" -ge 1000 ] && [ "$RUNS" -ge 1 ] && [ "$RATE" -ge 1 ] && [ "$DURATION" -ge 1 ] &&
	[ "$CLIENTS" -ge 1 ] && [ "$KEYS" -ge 1 ] ||
	{ echo "usage: $0 [N >= 1000] [RUNS >= 1]  (RATE, DURATION, CLIENTS, KEYS >= 1)" >&2; exit 2; }
bench_start=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=
[ "${SPOOL_BENCH_INSTALLED:-0}" = 1 ] || tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-outbox-bench.XXXXXX)
PORT=${SPOOL_BENCH_PORT:-54357}
server_up=0
SNAP_PID=
DRAINER_PIDS=()
cleanup() {
	local p
	for p in "${DRAINER_PIDS[@]}" $SNAP_PID; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	DRAINER_PIDS=()
	SNAP_PID=
	[ "$server_up" = 1 ] && stop_server "$work"
	server_up=0
}
on_exit() {
	local rc=$?
	cleanup
	keep_failed_log "$rc" "$work" outbox_bench
	rm -rf "$work" ${tree:+"$tree"}
}
trap on_exit EXIT

start_server "$work" "$PORT" "shared_buffers = 1GB
max_wal_size = 4GB
max_worker_processes = 32
spool.nonce_workers = 0
spool.outbox_segment_size = 100000"
server_up=1
sql() { as_user "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
pgbench() { as_user "$PG_BIN/pgbench" -h "$work" -p "$PORT" "$@" postgres; }
log() { echo "$*" >&2; }
now() { date +%s.%N; }

# diag: what every backend is doing and where the outbox stands (on a timeout).
diag() {
	echo "---- pg_stat_activity:"
	sql -P pager=off -F ' | ' -c "SELECT pid, backend_type, application_name, state, wait_event_type || ':' || wait_event AS wait,
	             backend_xid, backend_xmin, round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_s, left(query, 70) AS query
	        FROM pg_stat_activity WHERE backend_type NOT IN ('checkpointer', 'background writer', 'walwriter',
	             'autovacuum launcher', 'logical replication launcher') AND pid <> pg_backend_pid() ORDER BY pid" || true
	if [ "$SKIP_OUTBOX" != 1 ]; then
		echo "---- spool.outbox_status:"
		sql -P pager=off -F ' | ' -c "SELECT * FROM spool.outbox_status ORDER BY target, shard" || true
	fi
	for f in "$work"/drain*.out; do
		[ -s "$f" ] && { echo "---- $(basename "$f"):"; cat "$f"; }
	done
	echo "---- server log, last 20 lines:"
	tail -n 20 "$work/log" || true
}

sql <<SQL
CREATE EXTENSION spool_ext;
-- The target's function and the drainers run as this role.
CREATE ROLE bench_app NOLOGIN;
CREATE TABLE sink (seq bigserial, outbox_id bigint NOT NULL, key text, payload jsonb,
                   delivered_at timestamptz NOT NULL);
CREATE FUNCTION bench_sink(payload jsonb, key text, outbox_id bigint) RETURNS void
LANGUAGE plpgsql AS \$\$
BEGIN
	INSERT INTO public.sink (outbox_id, key, payload, delivered_at)
	VALUES (bench_sink.outbox_id, bench_sink.key, bench_sink.payload, clock_timestamp());
END \$\$;
GRANT INSERT ON sink TO bench_app;
GRANT USAGE ON SEQUENCE sink_seq_seq TO bench_app;

-- What the old snapshot reads: nothing the outbox or the queue touches.
CREATE TABLE bench_unrelated AS SELECT g FROM generate_series(1, 1000) g;

-- The baseline queue and its drainers.
CREATE TABLE q (id bigserial PRIMARY KEY, key text, payload jsonb NOT NULL);
CREATE TABLE bench_progress (drainer int PRIMARY KEY, n bigint NOT NULL);
CREATE TABLE bench_ctl (stop boolean NOT NULL);
INSERT INTO bench_ctl VALUES (false);
GRANT SELECT, UPDATE, DELETE ON q TO bench_app;
GRANT SELECT, UPDATE ON bench_progress TO bench_app;
GRANT SELECT ON bench_ctl TO bench_app;

-- A drainer: one transaction per batch of up to 1000 rows; sleeps 10 ms when
-- q is empty; returns when it finds q empty after bench_ctl.stop was set,
-- or after timeout_s.  Its count of delivered rows is in bench_progress,
-- updated in the batch's transaction.
CREATE PROCEDURE bench_drain(me int, timeout_s float8)
LANGUAGE plpgsql AS \$\$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	got bigint;
BEGIN
	LOOP
		WITH c AS (SELECT id FROM q ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1000),
			 d AS (DELETE FROM q USING c WHERE q.id = c.id RETURNING q.id, q.key, q.payload)
		SELECT count(bench_sink(d.payload, d.key, d.id)) INTO got FROM d;
		IF got > 0 THEN
			UPDATE bench_progress SET n = n + got WHERE drainer = me;
		END IF;
		COMMIT;
		EXIT WHEN clock_timestamp() > deadline;
		IF got = 0 THEN
			EXIT WHEN (SELECT stop FROM bench_ctl);
			PERFORM pg_sleep(0.01);
			COMMIT;
		END IF;
	END LOOP;
END \$\$;

-- The waits are procedures that commit after every poll: a plain function
-- would hold its statement's snapshot for the whole wait, an old snapshot
-- of its own that keeps the queue's deleted rows.

-- Until the drainers have delivered expected rows; result 'ok', or what
-- was seen after timeout_s or when fewer than drainers drainers are left.
CREATE PROCEDURE bench_wait_queue(expected bigint, drainers int, timeout_s float8, INOUT result text DEFAULT NULL)
LANGUAGE plpgsql AS \$\$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	done bigint;
BEGIN
	LOOP
		SELECT sum(n) INTO done FROM bench_progress;
		IF done >= expected THEN
			result := 'ok';
			RETURN;
		END IF;
		IF clock_timestamp() > deadline THEN
			result := format('timeout after %s s: drainers delivered %s of %s rows', timeout_s, done, expected);
			RETURN;
		END IF;
		IF (SELECT count(*) FROM pg_stat_activity
			 WHERE application_name = 'bench_drain' AND query LIKE 'CALL%' AND state = 'active') < drainers THEN
			result := format('a drainer is gone after it delivered %s of %s rows (see its output)', done, expected);
			RETURN;
		END IF;
		COMMIT;
		PERFORM pg_sleep(0.01);
		COMMIT;
	END LOOP;
END \$\$;
SQL

if [ "$SKIP_OUTBOX" != 1 ]; then
	# Targets, one per case, so that each case's outbox_status figures are its own.
	sql <<'SQL'
SELECT spool.create_target('out1', 'sql', '{"function": "public.bench_sink", "run_as": "bench_app", "shards": 1}');
SELECT spool.create_target('out4', 'sql', '{"function": "public.bench_sink", "run_as": "bench_app", "shards": 4}');
SELECT spool.create_target('out1_snap', 'sql', '{"function": "public.bench_sink", "run_as": "bench_app", "shards": 1}');
SELECT spool.create_target('out4_snap', 'sql', '{"function": "public.bench_sink", "run_as": "bench_app", "shards": 4}');
SELECT spool.create_target('lat4', 'sql', '{"function": "public.bench_sink", "run_as": "bench_app", "shards": 4}');
SELECT spool.create_target('lat4_snap', 'sql', '{"function": "public.bench_sink", "run_as": "bench_app", "shards": 4}');

-- Until target t has backlog 0 on every shard and sink holds expected rows;
-- result 'ok' (with a note if outbox_status showed backlog 0 for more than
-- 0.5 s while rows were missing from sink), or what was seen after timeout_s.
CREATE PROCEDURE bench_wait_outbox(t text, expected bigint, timeout_s float8, INOUT result text DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	b bigint;
	n bigint;
	zero_since timestamptz;
	note text := '';
	st text;
BEGIN
	LOOP
		SELECT sum(backlog) INTO b FROM spool.outbox_status WHERE target = t;
		IF b = 0 THEN
			SELECT count(*) INTO n FROM sink;
			IF n >= expected THEN
				result := 'ok' || note;
				RETURN;
			END IF;
			zero_since := coalesce(zero_since, clock_timestamp());
			IF note = '' AND clock_timestamp() - zero_since > interval '0.5 s' THEN
				note := format(' (outbox_status showed backlog 0 for over 0.5 s while sink had %s of %s rows)', n, expected);
			END IF;
		ELSE
			zero_since := NULL;
		END IF;
		IF clock_timestamp() > deadline THEN
			SELECT string_agg(format('shard %s: %s, backlog %s, waiting %s, position %s, delivered %s, last_error %s',
									 shard, state, backlog, waiting, position, delivered, last_error), '; ' ORDER BY shard)
			  INTO st FROM spool.outbox_status WHERE target = t;
			result := format('timeout after %s s: sink has %s of %s rows; %s', timeout_s,
							 (SELECT count(*) FROM sink), expected, st);
			RETURN;
		END IF;
		COMMIT;
		-- every 10 ms; while status says done but sink disagrees, every 100 ms (count(*) costs)
		PERFORM pg_sleep(CASE WHEN b = 0 THEN 0.1 ELSE 0.01 END);
		COMMIT;
	END LOOP;
END $$;
SQL
fi

PAD=$(printf 'x%.0s' $(seq 1 64))
cat > "$work/lat_outbox.sql" <<SQL
\\set k random(1, $KEYS)
SELECT spool.enqueue(:target::text, 'k' || :k::int, jsonb_build_object('k', :k::int, 'at', clock_timestamp(), 'pad', '$PAD'));
SQL
cat > "$work/lat_queue.sql" <<SQL
\\set k random(1, $KEYS)
INSERT INTO q (key, payload) VALUES ('k' || :k::int, jsonb_build_object('k', :k::int, 'at', clock_timestamp(), 'pad', '$PAD'));
SQL
chmod 644 "$work"/*.sql
[ "$(id -u)" -eq 0 ] && chown "$RUN_AS" "$work"/*.sql
ROWS_SQL="FROM generate_series(1, $N) g"
PAYLOAD_SQL="jsonb_build_object('k', g % $KEYS, 'at', clock_timestamp(), 'pad', '$PAD')"

# ---------------------------------------------------------------------------
# The old snapshot, the drainers
# ---------------------------------------------------------------------------
SNAP_MAX_S=3600
SNAP_XMIN=
# start_old_snapshot: a session holds a REPEATABLE READ snapshot (read of
# bench_unrelated only) until end_old_snapshot.
start_old_snapshot() {
	printf '%s\n' "SET application_name = 'bench_old_snapshot';" "BEGIN ISOLATION LEVEL REPEATABLE READ;" \
		"SELECT count(*) FROM bench_unrelated;" "SELECT pg_sleep($SNAP_MAX_S);" |
		as_user "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres >/dev/null 2>&1 &
	SNAP_PID=$!
	for _ in $(seq 1 1000); do
		SNAP_XMIN=$(sql -c "SELECT backend_xmin FROM pg_stat_activity
		                     WHERE application_name = 'bench_old_snapshot' AND wait_event = 'PgSleep'")
		[ -n "$SNAP_XMIN" ] && return 0
		sleep 0.01
	done
	echo "the old-snapshot session did not start in 10 s"
	diag
	exit 1
}
# end_old_snapshot: check that it held its snapshot throughout, end it.
end_old_snapshot() {
	local x
	x=$(sql -c "SELECT backend_xmin FROM pg_stat_activity WHERE application_name = 'bench_old_snapshot'")
	[ "$x" = "$SNAP_XMIN" ] || { echo "the old snapshot (xmin $SNAP_XMIN) did not last the case (now: '$x')"; exit 1; }
	sql -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'bench_old_snapshot'" >/dev/null
	wait "$SNAP_PID" 2>/dev/null || true
	SNAP_PID=
}

# start_drainers D: D drainers, waiting on an empty q.
start_drainers() {
	local d n
	sql -c "UPDATE bench_ctl SET stop = false" -c "TRUNCATE bench_progress" \
		-c "INSERT INTO bench_progress SELECT g, 0 FROM generate_series(1, $1) g"
	DRAINER_PIDS=()
	for d in $(seq 1 "$1"); do
		sql -c "SET application_name = 'bench_drain'" -c "SET ROLE bench_app" -c "SET enable_seqscan = off" \
			-c "SET enable_hashjoin = off" -c "SET enable_mergejoin = off" \
			-c "CALL bench_drain($d, $((WAIT_S + DURATION + 60)))" > "$work/drain$d.out" 2>&1 &
		DRAINER_PIDS+=($!)
	done
	for _ in $(seq 1 1000); do
		n=$(sql -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bench_drain' AND query LIKE 'CALL%'")
		[ "$n" -eq "$1" ] && return 0
		sleep 0.01
	done
	echo "$1 drainers did not start in 10 s"
	diag
	exit 1
}
stop_drainers() {
	local p d=0 rc=0
	sql -c "UPDATE bench_ctl SET stop = true"
	for p in "${DRAINER_PIDS[@]}"; do
		d=$((d + 1))
		wait "$p" || { rc=1; echo "drainer $d failed:"; cat "$work/drain$d.out"; }
	done
	DRAINER_PIDS=()
	[ "$rc" -eq 0 ] || exit 1
}

# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------
# check_sink EXPECTED: "rows distinct_ids max_delivered_epoch mid_delivered_epoch order_violations"
# (mid: when the EXPECTED/2-th row was delivered)
check_sink() {
	sql -F ' ' -c "SELECT count(*), count(DISTINCT outbox_id), extract(epoch FROM max(delivered_at)),
	                      (SELECT extract(epoch FROM delivered_at) FROM sink ORDER BY delivered_at OFFSET $(($1 / 2 - 1)) LIMIT 1),
	                      (SELECT count(*) FROM (SELECT outbox_id < lag(outbox_id) OVER (PARTITION BY key ORDER BY seq) AS bad
	                                               FROM sink) s WHERE bad)
	                 FROM sink"
}

# settle CASE KIND SNAP RES N WHAT: the end of a case.  Stop unless the wait's
# result RES is ok; stop the drainers and the old snapshot; stop unless the sink
# holds N rows with N distinct ids (exactly once; WHAT names where N came from).
# Sets SINK to check_sink's line.
settle() {
	local c=$1 kind=$2 snap=$3 res=$4 n=$5 what=$6 rows ids
	if [ "${res:0:2}" != ok ]; then
		echo "$c run $run: $res"
		diag
		exit 1
	fi
	[ "$kind" = queue ] && stop_drainers
	[ "$snap" = 1 ] && end_old_snapshot
	SINK=$(check_sink "$n")
	read -r rows ids _ <<<"$SINK"
	[ "$rows" -eq "$n" ] && [ "$ids" -eq "$n" ] ||
		{ echo "$c run $run: sink has $rows rows, $ids distinct ids, $what $n (exactly once)"; exit 1; }
}

declare -A tp tp_h1 tp_h2 lat_med lat_p99 lat_max lat_tps lat_lag viol
# throughput CASE KIND(outbox|queue) WIDTH(shards|drainers) SNAP(0|1)
throughput() {
	local c=$1 kind=$2 width=$3 snap=$4 out t_begin t_commit res t_end t_mid v target=
	sql -c "TRUNCATE sink, q RESTART IDENTITY" -c "CHECKPOINT"
	[ "$snap" = 1 ] && start_old_snapshot
	if [ "$kind" = outbox ]; then
		target=out$width
		[ "$snap" = 1 ] && target=${target}_snap
		t_begin=$(now)
		mapfile -t out < <(sql -c "BEGIN" \
			-c "SELECT count(spool.enqueue('$target', 'k' || g % $KEYS, $PAYLOAD_SQL)) $ROWS_SQL" \
			-c "COMMIT" -c "SELECT extract(epoch FROM clock_timestamp())" \
			-c "CALL bench_wait_outbox('$target', $N, $WAIT_S)")
	else
		start_drainers "$width"
		t_begin=$(now)
		mapfile -t out < <(sql -c "BEGIN" \
			-c "INSERT INTO q (key, payload) SELECT 'k' || g % $KEYS, $PAYLOAD_SQL $ROWS_SQL" \
			-c "COMMIT" -c "SELECT extract(epoch FROM clock_timestamp())" \
			-c "CALL bench_wait_queue($N, $width, $WAIT_S)")
	fi
	# the last two lines: the commit time and the wait's result
	t_commit=
	res="no answer (psql printed: ${out[*]:-nothing})"
	if [ "${#out[@]}" -ge 2 ]; then
		t_commit=${out[-2]}
		res=${out[-1]}
	fi
	settle "$c" "$kind" "$snap" "$res" "$N" expected
	read -r _ _ t_end t_mid v <<<"$SINK"
	tp[$c,$run]=$(echo "$N / ($t_end - $t_commit)" | bc -l)
	tp_h1[$c,$run]=$(echo "($N / 2) / ($t_mid - $t_commit)" | bc -l)
	tp_h2[$c,$run]=$(echo "($N / 2) / ($t_end - $t_mid)" | bc -l)
	viol[$c,$run]=$v
	log "$(printf '  run %d %-22s %8.0f rows/s (%.2f s; first half %6.0f rows/s, second half %6.0f rows/s); written in %.2f s; key order violations %s%s' \
		"$run" "$c" "${tp[$c,$run]}" "$(echo "$t_end - $t_commit" | bc -l)" "${tp_h1[$c,$run]}" "${tp_h2[$c,$run]}" \
		"$(echo "$t_commit - $t_begin" | bc -l)" "$v" "${res#ok}")"
}

# latency CASE KIND(outbox|queue) SNAP(0|1): 4 shards / 4 drainers
latency() {
	local c=$1 kind=$2 snap=$3 script target= out x tps lag res v med p99 mx
	sql -c "TRUNCATE sink, q RESTART IDENTITY" -c "CHECKPOINT"
	[ "$snap" = 1 ] && start_old_snapshot
	if [ "$kind" = outbox ]; then
		target=lat4
		[ "$snap" = 1 ] && target=lat4_snap
		script=$work/lat_outbox.sql
	else
		start_drainers 4
		script=$work/lat_queue.sql
	fi
	out=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -R "$RATE" -T "$DURATION" ${target:+-D target="$target"} -f "$script" 2>&1) ||
		{ echo "$c run $run: pgbench failed:"; echo "$out"; diag; exit 1; }
	x=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
	tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
	lag=$(echo "$out" | sed -n 's/^rate limit schedule lag: avg \([0-9.]*\).*/\1/p')
	[ -n "$x" ] && [ -n "$tps" ] || { echo "$c run $run: no pgbench figures:"; echo "$out"; exit 1; }
	if [ "$kind" = outbox ]; then
		res=$(sql -c "CALL bench_wait_outbox('$target', $x, $WAIT_S)")
	else
		res=$(sql -c "CALL bench_wait_queue($x, 4, $WAIT_S)")
	fi
	settle "$c" "$kind" "$snap" "$res" "$x" "pgbench wrote"
	read -r _ _ _ _ v <<<"$SINK"
	read -r med p99 mx < <(sql -F ' ' -c "
		SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(percentile_disc(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2), round(max(ms)::numeric, 2)
		  FROM (SELECT extract(epoch FROM delivered_at - (payload->>'at')::timestamptz) * 1000 AS ms FROM sink) s")
	lat_med[$c,$run]=$med
	lat_p99[$c,$run]=$p99
	lat_max[$c,$run]=$mx
	lat_tps[$c,$run]=$tps
	lat_lag[$c,$run]=${lag:-0}
	viol[$c,$run]=$v
	log "$(printf '  run %d %-22s median %7.2f ms  p99 %7.2f ms  max %8.2f ms; %s rows at %.0f rows/s (schedule lag avg %s ms); key order violations %s%s' \
		"$run" "$c" "$med" "$p99" "$mx" "$x" "$tps" "${lag:-?}" "$v" "${res#ok}")"
}

TP_CASES=(out1 q1 out4 q4 out1_snap q1_snap out4_snap q4_snap)
LAT_CASES=(lat_out lat_q lat_out_snap lat_q_snap)
log
log "outbox bench: N=$N rows, $KEYS keys, RUNS=$RUNS; latency at $RATE rows/s for $DURATION s, $CLIENTS pgbench clients"
for run in $(seq 1 "$RUNS"); do
	for c in "${TP_CASES[@]}"; do
		case $c in out*) [ "$SKIP_OUTBOX" = 1 ] && continue; kind=outbox ;; *) kind=queue ;; esac
		w=${c//[^0-9]/}
		snap=0
		[ "${c%_snap}" != "$c" ] && snap=1
		throughput "$c" "$kind" "$w" "$snap"
	done
	for c in "${LAT_CASES[@]}"; do
		case $c in lat_out*) [ "$SKIP_OUTBOX" = 1 ] && continue; kind=outbox ;; *) kind=queue ;; esac
		snap=0
		[ "${c%_snap}" != "$c" ] && snap=1
		latency "$c" "$kind" "$snap"
	done
done

PGVER=$(sql -c "SHOW server_version")
STATUS=
if [ "$SKIP_OUTBOX" != 1 ]; then
	STATUS=$(sql -P pager=off -P footer=off -c "\\pset format aligned" -c "\\pset tuples_only off" -c "
		SELECT target, shard, state, delivered, flushes_size AS f_size, flushes_interval AS f_interval,
		       flushes_barrier AS f_barrier, flushes_close AS f_close, batch_p50_le, batch_p99_le, batch_max,
		       flush_ms_p50_le, flush_ms_p99_le, flush_ms_max, retries, dead_letters
		  FROM spool.outbox_status ORDER BY target <> 'out4', target, shard")
fi
LOG_ERRORS=$(grep -E '(ERROR|FATAL|PANIC):' "$work/log" | grep -vc 'terminating connection due to administrator command' || true)
LOG_ERRORS_SAMPLE=$(grep -E '(ERROR|FATAL|PANIC):' "$work/log" | grep -v 'terminating connection due to administrator command' | head -5 || true)
cleanup

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
# vals ARRAY CASE: the RUNS values of CASE
vals() {
	local -n a=$1
	local r
	for r in $(seq 1 "$RUNS"); do echo "${a[$2,$r]:-}"; done
}
med() { median $(vals "$1" "$2"); }
lo() { vals "$1" "$2" | sed '/^$/d' | sort -g | head -1; }
hi() { vals "$1" "$2" | sed '/^$/d' | sort -g | tail -1; }
sumv() { vals "$1" "$2" | awk '{s += $1} END {print s + 0}'; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && printf '%.2fx' "$(echo "$1 / $2" | bc -l)" || echo "-"; }
fmt0() { [ -n "$1" ] && printf '%.0f' "$1" || echo "-"; }
fmt2() { [ -n "$1" ] && printf '%.2f' "$1" || echo "-"; }
ok() { [ -n "$1" ] && { [ "$(echo "$1" | bc -l)" = 1 ] && echo "met" || echo "NOT met"; } || echo "-"; }
declare -A M
for c in "${TP_CASES[@]}"; do M[$c]=$(med tp "$c"); done
for c in "${LAT_CASES[@]}"; do
	M[$c,med]=$(med lat_med "$c")
	M[$c,p99]=$(med lat_p99 "$c")
done
for c in "${TP_CASES[@]}"; do
	[ -n "${M[$c]}" ] && bench_result "throughput, $c, rows/s" "${M[$c]}" higher
done
for c in "${LAT_CASES[@]}"; do
	[ -n "${M[$c,med]}" ] && bench_result "latency, $c, median ms" "${M[$c,med]}" lower
	[ -n "${M[$c,p99]}" ] && bench_result "latency, $c, p99 ms" "${M[$c,p99]}" lower
done
label() {
	case $1 in
		out1) echo "outbox, sql target, 1 shard" ;;
		out4) echo "outbox, sql target, 4 shards" ;;
		q1) echo "skip-locked queue, 1 drainer" ;;
		q4) echo "skip-locked queue, 4 drainers" ;;
		lat_out) echo "outbox, sql target, 4 shards" ;;
		lat_q) echo "skip-locked queue, 4 drainers" ;;
		*_snap) echo "$(label "${1%_snap}"), old snapshot" ;;
	esac
}
base_of() { case $1 in out*) echo "q${1:3}" ;; lat_out*) echo "lat_q${1#lat_out}" ;; *) echo "" ;; esac; }

echo
echo "Outbox vs skip-locked queue table, $(nproc) cores, PostgreSQL $PGVER, $(date -u +%Y-%m-%d); N=$N rows, $KEYS keys, RUNS=$RUNS"
echo "server: shared_buffers 1GB, max_wal_size 4GB, max_worker_processes 32, spool.outbox_segment_size 100000, fsync and synchronous_commit on;"
echo "targets: batch_size 1000, batch_interval 10ms (defaults); queue: batches of 1000 through q's primary key (enable_seqscan/hashjoin/mergejoin"
echo "off in the drainers), a drainer polls every 10 ms while q is empty"
echo "machine load average (1/5/15 min) at start: $load_start, at end: $(cut -d' ' -f1-3 /proc/loadavg);" \
	"other PostgreSQL servers running at the end: $(($(ps -C postgres -o args= | grep -c -- ' -D ' || true)))" \
	"(the machine may be shared with concurrently running tests)"
echo
echo "throughput, rows/s = N / (max(delivered_at) - commit of the transaction that wrote all N rows):"
printf '%-44s %9s %9s %9s %11s %11s %11s %10s\n' "case" "median" "min" "max" "1st half" "2nd half" "vs queue" "vs no snap"
for c in "${TP_CASES[@]}"; do
	b=$(base_of "$c")
	ns=
	[ "${c%_snap}" != "$c" ] && ns=${M[${c%_snap}]}
	printf '%-44s %9s %9s %9s %11s %11s %11s %10s\n' "$(label "$c")" "$(fmt0 "${M[$c]}")" "$(fmt0 "$(lo tp "$c")")" "$(fmt0 "$(hi tp "$c")")" \
		"$(fmt0 "$(med tp_h1 "$c")")" "$(fmt0 "$(med tp_h2 "$c")")" \
		"$([ -n "$b" ] && ratio "${M[$c]}" "${M[$b]}" || echo "(base)")" "$([ -n "$ns" ] && ratio "${M[$c]}" "$ns" || echo "")"
done
echo "(1st / 2nd half: rows/s over the first and the second N/2 rows delivered, medians)"
echo
echo "latency, ms, $RATE rows/s offered by pgbench for $DURATION s ($CLIENTS clients): delivered_at - clock_timestamp() of the writing statement:"
printf '%-44s %9s %9s %9s %10s %9s %8s %12s %12s\n' "case" "median" "p99" "max p99" "max" "tps got" "lag ms" "p99 vs queue" "p99 vs no snap"
for c in "${LAT_CASES[@]}"; do
	b=$(base_of "$c")
	ns=
	[ "${c%_snap}" != "$c" ] && ns=${M[${c%_snap},p99]}
	printf '%-44s %9s %9s %9s %10s %9s %8s %12s %12s\n' "$(label "$c")" "$(fmt2 "${M[$c,med]}")" "$(fmt2 "${M[$c,p99]}")" \
		"$(fmt2 "$(hi lat_p99 "$c")")" "$(fmt2 "$(hi lat_max "$c")")" "$(fmt0 "$(med lat_tps "$c")")" "$(fmt2 "$(med lat_lag "$c")")" \
		"$([ -n "$b" ] && ratio "${M[$c,p99]}" "${M[$b,p99]}" || echo "(base)")" "$([ -n "$ns" ] && ratio "${M[$c,p99]}" "$ns" || echo "")"
done
echo "(median and p99: per run over all rows, then the median over the runs; max p99 / max: the worst run; latency ratios > 1 are slower;"
echo " tps got / lag ms: the rate pgbench reached and its average schedule lag, medians)"
short=$(for c in "${LAT_CASES[@]}"; do for r in $(seq 1 "$RUNS"); do
	t=${lat_tps[$c,$r]:-}
	[ -n "$t" ] && [ "$(echo "$t < 0.95 * $RATE" | bc -l)" = 1 ] && printf ' %s run %s: %.0f rows/s;' "$c" "$r" "$t"
done; done; true)
[ -n "$short" ] && echo "NOTE: the offered rate was not reached (below 95% of $RATE rows/s) in:$short"
echo
printf 'per-key order violations (a key'"'"'s row delivered after a later id of the same key), summed over the runs:'
for c in "${TP_CASES[@]}" "${LAT_CASES[@]}"; do
	[ -n "$(vals viol "$c" | sed '/^$/d')" ] && printf ' %s %s;' "$c" "$(sumv viol "$c")"
done
echo
echo "exactly once: every case delivered each of its rows once (checked per run: rows = distinct ids = rows written)"
echo "server log: $LOG_ERRORS ERROR/FATAL/PANIC lines (not counting the old-snapshot sessions' ends by pg_terminate_backend)"
[ -n "$LOG_ERRORS_SAMPLE" ] && echo "$LOG_ERRORS_SAMPLE" | sed 's/^/  /'
if [ -n "$STATUS" ]; then
	echo
	echo "spool.outbox_status at the end (cumulative over the $RUNS runs of each case; out4 = the 4-shard throughput case):"
	echo "$STATUS"
fi

# The summary and the issue's targets.
p99_no=${M[lat_out,p99]:-}
p99_snap=${M[lat_out_snap,p99]:-}
echo
echo "| case | runs | median | vs baseline (queue) | vs no snapshot |"
echo "|------|-----:|-------:|--------------------:|---------------:|"
for c in "${TP_CASES[@]}"; do
	b=$(base_of "$c")
	ns=
	[ "${c%_snap}" != "$c" ] && ns=${M[${c%_snap}]}
	printf '| %s, rows/s | %d | %s | %s | %s |\n' "$(label "$c")" "$RUNS" "$(fmt0 "${M[$c]}")" \
		"$([ -n "$b" ] && ratio "${M[$c]}" "${M[$b]}" || echo "baseline")" "$([ -n "$ns" ] && ratio "${M[$c]}" "$ns" || echo "-")"
done
for c in "${LAT_CASES[@]}"; do
	b=$(base_of "$c")
	ns=
	[ "${c%_snap}" != "$c" ] && ns=${M[${c%_snap},p99]}
	printf '| %s, latency median / p99 ms at %s rows/s | %d | %s / %s | %s | %s |\n' "$(label "$c")" "$RATE" "$RUNS" \
		"$(fmt2 "${M[$c,med]}")" "$(fmt2 "${M[$c,p99]}")" \
		"$([ -n "$b" ] && echo "p99 $(ratio "${M[$c,p99]}" "${M[$b,p99]}")" || echo "baseline")" \
		"$([ -n "$ns" ] && echo "p99 $(ratio "${M[$c,p99]}" "$ns")" || echo "-")"
done
echo
echo "| target (issue 5) | measured | result |"
echo "|------------------|----------|--------|"
printf '| sql target >= 50000 rows/s, 1 shard | %s | %s |\n' "$(fmt0 "${M[out1]}")" "$(ok "${M[out1]:+${M[out1]} >= 50000}")"
printf '| sql target >= 50000 rows/s, 4 shards | %s | %s |\n' "$(fmt0 "${M[out4]}")" "$(ok "${M[out4]:+${M[out4]} >= 50000}")"
printf '| p99 < 50 ms at %s rows/s offered | %s ms | %s |\n' "$RATE" "$(fmt2 "$p99_no")" "$(ok "${p99_no:+$p99_no < 50}")"
for w in 1 4; do
	a=${M[out${w}_snap]:-}
	b=${M[out$w]:-}
	r=
	[ -n "$a" ] && [ -n "$b" ] && r=$(echo "$a / $b" | bc -l)
	printf '| old snapshot >= 0.8x, throughput %d shard%s | %s | %s |\n' "$w" "$([ "$w" -gt 1 ] && echo s)" \
		"$([ -n "$r" ] && printf '%.2fx' "$r" || echo -)" "$(ok "${r:+$r >= 0.8}")"
done
r=
[ -n "$p99_no" ] && [ -n "$p99_snap" ] && r=$(echo "$p99_no / $p99_snap" | bc -l)
printf '| old snapshot >= 0.8x, latency (p99 without / p99 with) | %s | %s |\n' \
	"$([ -n "$r" ] && printf '%.2fx (p99 %s ms with)' "$r" "$(fmt2 "$p99_snap")" || echo -)" "$(ok "${r:+$r >= 0.8}")"
echo
echo "total run time of this benchmark: $(($(date +%s) - bench_start)) s"

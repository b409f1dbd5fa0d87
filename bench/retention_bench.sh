#!/usr/bin/env bash
# Benchmark: removing old consumed nonces (spool.nonce_history_retention),
# side by side on one throwaway server in one run:
#   removal alone   N old rows removed by the promoter's batched retention
#                   (spool.retention_batch_size rows per transaction) vs one
#                   plain DELETE of the same rows: rows per second, and the
#                   size of spool.nonce_store with its indexes before/after
#   under load      pgbench nonce_allocate tps (basic mode, 100 signers)
#                   over SECONDS with nothing else running, with the batched
#                   removal of ROWS rows starting with it, and with the plain
#                   DELETE of ROWS rows starting with it (so each figure is the
#                   whole cost of removing ROWS rows, spread over the window)
# Prints each run, the median of RUNS runs, and the ratio to the baseline.
#
# Usage: bash bench/retention_bench.sh [RUNS] [SECONDS] [ROWS] [CLIENTS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SECS=${2:-10}
ROWS=${3:-200000}
CLIENTS=${4:-4}
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-bench.XXXXXX)
PORT=${SPOOL_BENCH_PORT:-54331}
export PGHOST=$work PGPORT=$PORT PGUSER=$RUN_AS PGDATABASE=postgres
cleanup() {
	stop_server "$work"
	rm -rf "$work" "$tree"
}
trap cleanup EXIT
start_server "$work" "$PORT" "shared_buffers = 256MB
spool.nonce_history_retention = 0
spool.retention_interval = '200ms'
spool.nonce_workers = 0"
psql() { as_user env PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER="$PGUSER" PGDATABASE="$PGDATABASE" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
pgbench() { as_user env PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER="$PGUSER" PGDATABASE="$PGDATABASE" "$PG_BIN/pgbench" "$@"; }
now() { date +%s.%N; }

psql -c "CREATE EXTENSION spool_ext" -c "CREATE EXTENSION pgstattuple" \
	-c "SELECT count(spool.lease_acquire('signer:live-' || g, 'bench', '1 day')) FROM generate_series(1, 100) g" >/dev/null
cat > "$work/alloc.sql" <<'SQL'
\set s random(1, 100)
SELECT spool.nonce_allocate('live-' || :s, 'bench', 1);
SQL
chmod 644 "$work"/*.sql; [ "$(id -u)" -eq 0 ] && chown "$RUN_AS" "$work"/*.sql

# ROWS consumed nonces of 1000 old signers, last changed 2 h ago or more,
# one every 0.1 ms (as if consumed at 10000 per second).
load() {
	psql -c "INSERT INTO spool.nonce_store (signer, nonce, state, owner, token, request_id, updated_at)
	         SELECT 'old-$1-' || (g % 1000), g / 1000, 'consumed', 'bench', 1, 'rq-' || g,
	                now() - interval '2 h' - (($ROWS - g) * interval '100 us')
	           FROM generate_series(0, $ROWS - 1) g" -c "VACUUM ANALYZE spool.nonce_store" -c "CHECKPOINT"
}
size() { psql -Atc "SELECT pg_total_relation_size('spool.nonce_store')"; }
# Dead tuples in the heap now (pgstattuple reads the table; the statistics
# of the promoter's deletes may not be flushed yet).
dead() { psql -Atc "SELECT dead_tuple_count FROM pgstattuple('spool.nonce_store')"; }
left() { psql -Atc "SELECT count(*) FROM spool.nonce_store WHERE state = 'consumed' AND signer LIKE 'old-%'"; }
retention() {	# on | off
	local v=0; [ "$1" = on ] && v="'1h'"
	psql -c "ALTER SYSTEM SET spool.nonce_history_retention = $v" -c "SELECT pg_reload_conf()" >/dev/null
}
wait_removed() {
	while [ "$(left)" != 0 ]; do sleep 0.05; done
}
tps_of() { sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1; }

declare -A r
for run in $(seq 1 "$RUNS"); do
	# Removal alone: batched, timed from the first batch (not from the
	# reload, which waits for the next retention pass) to the last.
	load "b$run"; s0=$(size)
	retention on
	while [ "$(left)" = "$ROWS" ]; do sleep 0.01; done
	t0=$(now); n0=$(left); wait_removed; t1=$(now); retention off
	r[batched_rps,$run]=$(echo "$n0 / ($t1 - $t0)" | bc -l)
	r[dead_batched,$run]=$(dead)
	# Space: VACUUM, then load as many rows again; the growth says whether
	# the removed rows' space was reused.
	psql -c "VACUUM spool.nonce_store" >/dev/null
	load "b${run}x"; r[growth_batched,$run]=$(( $(size) - s0 ))
	psql -c "DELETE FROM spool.nonce_store WHERE signer LIKE 'old-%'" -c "VACUUM spool.nonce_store" >/dev/null
	# Removal alone: one plain DELETE of the same rows.
	load "d$run"; s0=$(size)
	t0=$(now)
	psql -c "DELETE FROM spool.nonce_store WHERE state = 'consumed' AND updated_at < now() - interval '1 h'"
	t1=$(now)
	r[delete_rps,$run]=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
	r[dead_delete,$run]=$(dead)
	psql -c "VACUUM spool.nonce_store" >/dev/null
	load "d${run}x"; r[growth_delete,$run]=$(( $(size) - s0 ))
	psql -c "DELETE FROM spool.nonce_store WHERE signer LIKE 'old-%'" -c "VACUUM spool.nonce_store" >/dev/null
	r[size,$run]=$s0
	printf '  run %d alone: batched %8.0f rows/s, DELETE %8.0f rows/s; dead tuples %s / %s; growth on reload %s / %s bytes\n' \
		"$run" "${r[batched_rps,$run]}" "${r[delete_rps,$run]}" "${r[dead_batched,$run]}" \
		"${r[dead_delete,$run]}" "${r[growth_batched,$run]}" "${r[growth_delete,$run]}" >&2

	# Under load: nothing else.
	r[tps_base,$run]=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECS" -f "$work/alloc.sql" 2>&1 | tps_of)
	# Under load: the batched removal.
	load "lb$run"
	retention on
	r[tps_batched,$run]=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECS" -f "$work/alloc.sql" 2>&1 | tps_of)
	r[left_batched,$run]=$(left)
	wait_removed; retention off
	psql -c "VACUUM spool.nonce_store" >/dev/null
	# Under load: the plain DELETE, started with pgbench.
	load "ld$run"
	(psql -c "DELETE FROM spool.nonce_store WHERE state = 'consumed' AND updated_at < now() - interval '1 h'") &
	del=$!
	r[tps_delete,$run]=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECS" -f "$work/alloc.sql" 2>&1 | tps_of)
	wait $del
	psql -c "VACUUM spool.nonce_store" >/dev/null
	printf '  run %d load: %8.0f tps alone, %8.0f with batched (%s rows left at the end), %8.0f with DELETE\n' \
		"$run" "${r[tps_base,$run]}" "${r[tps_batched,$run]}" "${r[left_batched,$run]}" "${r[tps_delete,$run]}" >&2
done

med() { median $(for i in $(seq 1 "$RUNS"); do echo "${r[$1,$i]}"; done); }
echo
echo "removing $ROWS old consumed nonces, batch size 1000, $RUNS runs, load: pgbench $CLIENTS clients ${SECS}s, $(nproc) cores, $(date -u +%Y-%m-%d)"
printf '%-46s %14s %12s\n' "case" "median" "ratio"
bd=$(med delete_rps); bb=$(med batched_rps)
printf '%-46s %10.0f r/s %11.2fx\n' "removal alone: one plain DELETE" "$bd" 1
printf '%-46s %10.0f r/s %11.2fx\n' "removal alone: batched retention (promoter)" "$bb" "$(echo "$bb / $bd" | bc -l)"
printf '%-46s %10.1f MB\n' "nonce_store + indexes with the rows loaded" "$(echo "$(med size) / 1048576" | bc -l)"
dd=$(med dead_delete); db=$(med dead_batched)
printf '%-46s %10.0f    %11.2fx\n' "dead tuples right after: plain DELETE" "$dd" 1
printf '%-46s %10.0f    %11.2fx\n' "dead tuples right after: batched" "$db" "$(echo "$db / $dd" | bc -l)"
printf '%-46s %10.1f MB\n' "growth, same rows again after VACUUM: DELETE" "$(echo "$(med growth_delete) / 1048576" | bc -l)"
printf '%-46s %10.1f MB\n' "growth, same rows again after VACUUM: batched" "$(echo "$(med growth_batched) / 1048576" | bc -l)"
tb=$(med tps_base)
for k in tps_base tps_batched tps_delete; do
	case $k in
		tps_base) l="nonce_allocate, nothing else" ;;
		tps_batched) l="nonce_allocate, batched removal running" ;;
		tps_delete) l="nonce_allocate, plain DELETE running" ;;
	esac
	v=$(med $k)
	printf '%-46s %10.0f tps %11.2fx\n' "$l" "$v" "$(echo "$v / $tb" | bc -l)"
	bench_result "$l, tps" "$v" higher
done
bench_result "removal alone: one plain DELETE, rows/s" "$bd" higher
bench_result "removal alone: batched retention, rows/s" "$bb" higher
echo "rows left by the batched removal when each loaded run ended: $(for i in $(seq 1 "$RUNS"); do printf '%s ' "${r[left_batched,$i]}"; done)"

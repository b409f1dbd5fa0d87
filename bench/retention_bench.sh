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

psql -c "CREATE EXTENSION spool_ext" \
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
	# Removal alone: batched.
	load "b$run"; r[size_before,$run]=$(size)
	t0=$(now); retention on; wait_removed; t1=$(now); retention off
	r[batched_rps,$run]=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
	r[size_batched,$run]=$(size)
	psql -c "VACUUM spool.nonce_store" >/dev/null
	r[vac_batched,$run]=$(size)
	# Removal alone: one plain DELETE of the same rows.
	load "d$run"
	t0=$(now)
	psql -c "DELETE FROM spool.nonce_store WHERE state = 'consumed' AND updated_at < now() - interval '1 h'"
	t1=$(now)
	r[delete_rps,$run]=$(echo "$ROWS / ($t1 - $t0)" | bc -l)
	r[size_delete,$run]=$(size)
	psql -c "VACUUM spool.nonce_store" >/dev/null
	r[vac_delete,$run]=$(size)
	printf '  run %d alone: batched %8.0f rows/s, DELETE %8.0f rows/s; size %s -> %s (batched), %s (DELETE)\n' \
		"$run" "${r[batched_rps,$run]}" "${r[delete_rps,$run]}" "${r[size_before,$run]}" \
		"${r[size_batched,$run]}" "${r[size_delete,$run]}" >&2

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
sb=$(med size_before)
printf '%-46s %10.1f MB %11.2fx\n' "nonce_store + indexes, loaded" "$(echo "$sb / 1048576" | bc -l)" 1
for k in size_delete vac_delete size_batched vac_batched; do
	case $k in
		size_delete) l="after the plain DELETE" ;;
		vac_delete) l="after the plain DELETE and VACUUM" ;;
		size_batched) l="after the batched removal" ;;
		vac_batched) l="after the batched removal and VACUUM" ;;
	esac
	v=$(med $k)
	printf '%-46s %10.1f MB %11.2fx\n' "$l" "$(echo "$v / 1048576" | bc -l)" "$(echo "$v / $sb" | bc -l)"
done
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

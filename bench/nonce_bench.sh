#!/usr/bin/env bash
# Benchmark: nonce allocation throughput with pgbench (16 clients), side by
# side on one throwaway server in one run:
#   naive     UPDATE counter SET n = n + 1 ... RETURNING (the baseline)
#   basic     spool.nonce_allocate, fenced by the signer lease
#   queue     spool.nonce_request, worker-queue mode (batched by nonce workers)
#   qreport   spool.nonce_request, then spool.nonce_report of that nonce (9 in
#             10 'used', 1 in 10 'recyclable'): one pgbench transaction is
#             both calls, i.e. a nonce's whole life in worker-queue mode
#   qcombo    the same life with one call per nonce: each client reports its
#             previous nonce and takes the next in one spool.nonce_report_and_request
#             (skipped when the extension built has no such function)
# each on one hot signer/row and spread over 100 signers/rows.
# Prints tps per run, the median of RUNS runs, and the ratio to the baseline.
#
# Usage: bash bench/nonce_bench.sh [RUNS] [SECONDS] [CLIENTS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
SECS=${2:-10}
CLIENTS=${3:-16}
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-bench.XXXXXX)
PORT=${SPOOL_BENCH_PORT:-54329}
export PGHOST=$work PGPORT=$PORT PGUSER=$RUN_AS PGDATABASE=postgres
cleanup() {
	stop_server "$work"
	rm -rf "$work" "$tree"
}
trap cleanup EXIT
start_server "$work" "$PORT" "shared_buffers = 256MB
spool.nonce_workers = 2"
psql() { as_user env PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER="$PGUSER" PGDATABASE="$PGDATABASE" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
pgbench() { as_user env PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER="$PGUSER" PGDATABASE="$PGDATABASE" "$PG_BIN/pgbench" "$@"; }

psql -c "CREATE EXTENSION spool_ext" \
	-c "CREATE TABLE bench_counter (id int PRIMARY KEY, n bigint NOT NULL) WITH (fillfactor = 50)" \
	-c "INSERT INTO bench_counter SELECT g, 0 FROM generate_series(1, 100) g"

cat > "$work/naive_hot.sql" <<'SQL'
UPDATE bench_counter SET n = n + 1 WHERE id = 1 RETURNING n;
SQL
cat > "$work/naive_spread.sql" <<'SQL'
\set id random(1, 100)
UPDATE bench_counter SET n = n + 1 WHERE id = :id RETURNING n;
SQL
cat > "$work/basic_hot.sql" <<'SQL'
SELECT spool.nonce_allocate('PREFIX-hot', 'bench', 1);
SQL
cat > "$work/basic_spread.sql" <<'SQL'
\set s random(1, 100)
SELECT spool.nonce_allocate('PREFIX-' || :s, 'bench', 1);
SQL
cat > "$work/queue_hot.sql" <<'SQL'
SELECT spool.nonce_request('PREFIX-hot');
SQL
cat > "$work/queue_spread.sql" <<'SQL'
\set s random(1, 100)
SELECT spool.nonce_request('PREFIX-' || :s);
SQL
cat > "$work/qreport_hot.sql" <<'SQL'
\set r random(1, 10)
SELECT spool.nonce_request('PREFIX-hot') AS n \gset
SELECT spool.nonce_report('PREFIX-hot', CASE WHEN :r = 1 THEN 'recyclable' ELSE 'used' END, :n);
SQL
cat > "$work/qreport_spread.sql" <<'SQL'
\set s random(1, 100)
\set r random(1, 10)
SELECT spool.nonce_request('PREFIX-' || :s) AS n \gset
SELECT spool.nonce_report('PREFIX-' || :s, CASE WHEN :r = 1 THEN 'recyclable' ELSE 'used' END, :n);
SQL
cat > "$work/qcombo_hot.sql" <<'SQL'
\set r random(1, 10)
\if :prev < 0
SELECT spool.nonce_request('PREFIX-hot') AS prev \gset
\else
SELECT spool.nonce_report_and_request('PREFIX-hot', CASE WHEN :r = 1 THEN 'recyclable' ELSE 'used' END, :prev) AS prev \gset
\endif
SQL
# A client keeps its signer, so that it always has a nonce of it to report.
cat > "$work/qcombo_spread.sql" <<'SQL'
\set r random(1, 10)
\if :prev < 0
\set s random(1, 100)
SELECT spool.nonce_request('PREFIX-' || :s) AS prev \gset
\else
SELECT spool.nonce_report_and_request('PREFIX-' || :s, CASE WHEN :r = 1 THEN 'recyclable' ELSE 'used' END, :prev) AS prev \gset
\endif
SQL
chmod 644 "$work"/*.sql; [ "$(id -u)" -eq 0 ] && chown "$RUN_AS" "$work"/*.sql

modes=(naive basic queue qreport)
[ "$(psql -Atc "SELECT to_regprocedure('spool.nonce_report_and_request(text,text,bigint,text,text)') IS NOT NULL")" = t ] &&
	modes+=(qcombo)
cases=()
for scope in hot spread; do for mode in "${modes[@]}"; do cases+=("${mode}_$scope"); done; done
declare -A tps
for run in $(seq 1 "$RUNS"); do
	for c in "${cases[@]}"; do
		prefix="r${run}${c}"
		# Basic mode needs the signer leases; fresh signers get token 1.
		[ "${c%%_*}" = basic ] && psql -c "SELECT spool.lease_acquire('signer:${prefix}-hot', 'bench', '1 hour'),
		                count(spool.lease_acquire('signer:${prefix}-' || g, 'bench', '1 hour'))
		           FROM generate_series(1, 100) g" >/dev/null
		psql -c "CHECKPOINT" >/dev/null
		sed "s/PREFIX/$prefix/" "$work/$c.sql" > "$work/run.sql"
		out=$(pgbench -n -M prepared -c "$CLIENTS" -j 2 -T "$SECS" -D prev=-1 -f "$work/run.sql" 2>&1)
		t=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
		[ -n "$t" ] || { echo "$out" >&2; exit 1; }
		tps[$c,$run]=$t
		printf '  run %d %-13s %10.0f tps\n' "$run" "$c" "$t" >&2
	done
done

# Correctness spot check: no nonce handed out twice for any signer.
dups=$(psql -Atc "SELECT count(*) FROM (SELECT signer, nonce FROM spool.nonces GROUP BY 1, 2 HAVING count(*) > 1) d")
# Every nonce of the qreport cases was reported: none is left allocated.
unreported=$(psql -Atc "SELECT count(*) FROM spool.nonces WHERE signer LIKE '%qreport%' AND state = 'allocated'")
# qcombo: each client's last nonce of a run is left allocated, no other.
combo_left=$(psql -Atc "SELECT count(*) FROM spool.nonces WHERE signer LIKE '%qcombo%' AND state = 'allocated'")
gaps=$(psql -Atc "SELECT count(*) FROM (SELECT signer FROM spool.nonces GROUP BY signer HAVING max(nonce) + 1 <> count(*)) g")


echo
echo "nonce allocation, pgbench -M prepared, $CLIENTS clients, ${SECS}s per case, $RUNS runs, $(nproc) cores, $(date -u +%Y-%m-%d)"
printf '%-42s %10s %10s %10s   %s\n' "case" "median tps" "min" "max" "vs naive"
for scope in hot spread; do
	base=$(median $(for r in $(seq 1 "$RUNS"); do echo "${tps[naive_$scope,$r]}"; done))
	for mode in "${modes[@]}"; do
		c=${mode}_$scope
		vals=$(for r in $(seq 1 "$RUNS"); do echo "${tps[$c,$r]}"; done)
		m=$(median $vals)
		lo=$(printf '%s\n' $vals | sort -g | head -1)
		hi=$(printf '%s\n' $vals | sort -g | tail -1)
		case $mode in
			naive) label="naive UPDATE counter" ;;
			basic) label="nonce_allocate (basic, fenced)" ;;
			queue) label="nonce_request (worker queue)" ;;
			qreport) label="request + report (worker queue)" ;;
			qcombo) label="report_and_request (worker queue)" ;;
		esac
		[ "$scope" = hot ] && label="$label, 1 hot" || label="$label, 100"
		printf '%-42s %10.0f %10.0f %10.0f   %6.2fx\n' "$label" "$m" "$lo" "$hi" "$(echo "$m / $base" | bc -l)"
		bench_result "$label, tps" "$m" higher
	done
done
echo "duplicate (signer, nonce) pairs: $dups; signers with gaps: $gaps; request + report: nonces left unreported: $unreported"
[[ " ${modes[*]} " == *" qcombo "* ]] &&
	echo "report_and_request: nonces left allocated: $combo_left (the last one of each client and run, at most $((2 * CLIENTS * RUNS)))"
echo "(request + report: one transaction is a nonce_request and a nonce_report, so its tps counts nonces whose whole life went through the workers)"

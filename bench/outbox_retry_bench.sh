#!/usr/bin/env bash
# Benchmark: draining parked rows once their key recovers.  A sql target
# (one shard, retry_backoff 50ms) whose function fails for the keys listed in
# a table; N rows are enqueued on KEYS keys while every key fails, so the
# first row of each key is parked and the rest wait behind it; then the keys
# recover.  Figure: rows/s = N / (the moment every row is delivered - the
# moment the keys recovered), and the number of delivering transactions
# (the function records txid_current()).  RUNS runs; prints each run and the
# medians.  Compare builds with bench/compare.sh (the figures are recorded
# with bench_result).
#
# Usage: bash bench/outbox_retry_bench.sh [N] [KEYS] [RUNS]   (defaults 20000, 1, 3)
#   SPOOL_BENCH_PORT  server port (default 54361; unix socket only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-20000}
KEYS=${2:-1}
RUNS=${3:-3}
[ "$N" -ge 1 ] && [ "$KEYS" -ge 1 ] && [ "$RUNS" -ge 1 ] || { echo "usage: $0 [N] [KEYS] [RUNS]" >&2; exit 2; }
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-bench.XXXXXX)
PORT=${SPOOL_BENCH_PORT:-54361}
cleanup() {
	stop_server "$work"
	rm -rf "$work" "$tree"
}
trap cleanup EXIT
start_server "$work" "$PORT" "shared_buffers = 256MB
spool.nonce_workers = 0"
sql() { as_user "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
WAIT_S=$((N / 100 > 300 ? N / 100 : 300))

sql <<'SQL'
CREATE EXTENSION spool_ext;
CREATE TABLE fail_keys (key text PRIMARY KEY);
CREATE TABLE delivered (outbox_id bigint NOT NULL, xid bigint NOT NULL,
                        at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION deliver(payload jsonb, key text, outbox_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	IF EXISTS (SELECT 1 FROM public.fail_keys f WHERE f.key = $2) THEN
		RAISE EXCEPTION 'key % fails', $2;
	END IF;
	INSERT INTO public.delivered (outbox_id, xid) VALUES ($3, txid_current());
END $$;
CREATE ROLE bench_deliverer;
GRANT SELECT ON fail_keys TO bench_deliverer;
GRANT INSERT ON delivered TO bench_deliverer;
SQL

declare -a rates txns
for r in $(seq 1 "$RUNS"); do
	t="rb$r"
	sql -c "SELECT spool.create_target('$t', 'sql', '{\"function\": \"public.deliver\", \"run_as\": \"bench_deliverer\",
		\"retry_limit\": 100, \"retry_backoff\": \"50ms\", \"retry_backoff_max\": \"200ms\"}')" >/dev/null
	sql -c "TRUNCATE delivered" -c "INSERT INTO fail_keys SELECT 'k' || g FROM generate_series(1, $KEYS) g"
	sql -c "SELECT count(spool.enqueue('$t', 'k' || (1 + g % $KEYS), jsonb_build_object('g', g)))
	          FROM generate_series(1, $N) g" >/dev/null
	for _ in $(seq 1 $((WAIT_S * 10))); do
		[ "$(sql -c "SELECT count(*) FROM spool.outbox_retry r JOIN spool.targets t ON t.id = r.target_id
		             WHERE t.name = '$t'")" = "$N" ] && break
		sleep 0.1
	done
	t0=$(sql -c "DELETE FROM fail_keys" -c "SELECT extract(epoch FROM clock_timestamp())")
	t1=$(sql <<SQL
DO \$\$
DECLARE deadline timestamptz := clock_timestamp() + interval '$WAIT_S s';
BEGIN
	WHILE (SELECT count(*) FROM delivered) < $N LOOP
		IF clock_timestamp() > deadline THEN RAISE EXCEPTION 'timeout'; END IF;
		PERFORM pg_sleep(0.01);
	END LOOP;
END \$\$;
SELECT extract(epoch FROM max(at)) FROM delivered;
SQL
)
	rates[r]=$(echo "$N / ($t1 - $t0)" | bc -l)
	txns[r]=$(sql -c "SELECT count(DISTINCT xid) FROM delivered")
	[ "$(sql -c "SELECT count(DISTINCT outbox_id) FROM delivered")" = "$N" ] ||
		{ echo "run $r: not every row delivered once" >&2; exit 1; }
	printf 'run %d: %.0f rows/s, %d delivering transactions\n' "$r" "${rates[r]}" "${txns[r]}" >&2
	sql -c "SELECT spool.drop_target('$t', force => true)" >/dev/null
done

mr=$(median "${rates[@]}")
mt=$(median "${txns[@]}")
bench_result retry_drain_rows_per_s "$mr" higher
bench_result retry_drain_transactions "$mt" lower
echo
echo "parked rows drained once their keys recover: $N rows on $KEYS keys, $RUNS runs, $(nproc) cores"
echo
echo "| figure | median | min | max |"
echo "|---|--:|--:|--:|"
printf '| rows/s | %.0f | %.0f | %.0f |\n' "$mr" "$(printf '%s\n' "${rates[@]}" | sort -g | head -1)" \
	"$(printf '%s\n' "${rates[@]}" | sort -g | tail -1)"
printf '| delivering transactions | %.0f | %s | %s |\n' "$mt" "$(printf '%s\n' "${txns[@]}" | sort -n | head -1)" \
	"$(printf '%s\n' "${txns[@]}" | sort -n | tail -1)"

#!/usr/bin/env bash
# Benchmark: Kafka ingest throughput, side by side on one throwaway server and
# one test Kafka cluster in one run, the same preloaded messages each time:
#   (a) kcat -C ... | psql -c "\copy ..." into an equivalent logged table with
#       one unique index on (topic, partition, offset)   -- the baseline
#   (b) a spool_ext source into the durable spool (exactly once: entries and
#       offsets committed together)
# Prints messages/s per run, medians, the ratio b/a, and the peak resident
# memory of the ingest worker.
#
# Usage: bash bench/ingest_bench.sh [MESSAGES] [PARTITIONS] [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-1000000}
PARTS=${2:-64}
RUNS=${3:-3}
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
. "$here/bench/ingest_setup.sh" ingest 54349

sql -c "CREATE TABLE bench_copy (topic text NOT NULL, kafka_partition int NOT NULL,
	        kafka_offset bigint NOT NULL, key text, value jsonb,
	        UNIQUE (topic, kafka_partition, kafka_offset))"

now() { date +%s.%N; }
declare -a copy_rate spool_rate spool_rss
for run in $(seq 1 "$RUNS"); do
	# (a) the baseline
	sql -c "TRUNCATE bench_copy" -c "CHECKPOINT"
	t0=$(now)
	kcat -C -b "$BOOT" -t bench -o beginning -e -q -f '%t\t%p\t%o\t%k\t%s\n' |
		as_user "$PG_BIN/psql" -X -q -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 \
			-c "\\copy bench_copy FROM STDIN"
	t1=$(now)
	got=$(sql -c "SELECT count(*) FROM bench_copy")
	[ "$got" -eq "$N" ] || { echo "baseline copied $got of $N rows"; exit 1; }
	copy_rate[$run]=$(echo "$N / ($t1 - $t0)" | bc -l)

	# (b) a spool source, exactly once into the durable spool
	sql -c "CHECKPOINT"
	sql -c "SELECT spool.create_source('bench$run', '$BOOT', '{bench}', '{\"batch_size\": 20000, \"batch_ms\": 50}')"
	t0=$(now)
	sql -c "SELECT spool.start_source('bench$run')"
	pid=
	rss=0
	for _ in $(seq 1 6000); do
		done_n=$(sql -c "SELECT coalesce(sum(next_offset), 0) FROM spool.offsets WHERE source = 'bench$run'")
		[ -z "$pid" ] && pid=$(sql -c "SELECT pid FROM pg_stat_activity WHERE 'spool ingest bench$run' IN (backend_type, application_name)")
		# private memory (RssAnon: not the shared buffers it touches), sampled for the peak
		if [ -n "$pid" ]; then
			r=$(awk '/RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
			[ "${r:-0}" -gt "$rss" ] && rss=$r
		fi
		[ "$done_n" -ge "$N" ] && break
		sleep 0.05
	done
	t1=$(now)
	got=$(sql -c "SELECT count(*) FROM spool.entries WHERE source = 'bench$run'")
	[ "$got" -eq "$N" ] || { echo "spool has $got of $N entries"; exit 1; }
	spool_rate[$run]=$(echo "$N / ($t1 - $t0)" | bc -l)
	spool_rss[$run]=$rss
	sql -c "SELECT spool.stop_source('bench$run')"
	printf '  run %d: copy %8.0f msg/s   spool %8.0f msg/s   ingest worker peak private RSS %s kB\n' \
		"$run" "${copy_rate[$run]}" "${spool_rate[$run]}" "${spool_rss[$run]}" >&2
done

mc=$(median "${copy_rate[@]}")
ms=$(median "${spool_rate[@]}")
mr=$(median "${spool_rss[@]}")
echo
echo "Kafka ingest, $N messages (~200-byte JSON) preloaded over $PARTS partitions, $RUNS runs, $(nproc) cores, $(date -u +%Y-%m-%d)"
printf '%-58s %12s %12s %12s\n' "case" "median msg/s" "min" "max"
printf '%-58s %12.0f %12.0f %12.0f\n' "(a) kcat | psql \\copy, logged table + unique index" "$mc" \
	"$(printf '%s\n' "${copy_rate[@]}" | sort -g | head -1)" "$(printf '%s\n' "${copy_rate[@]}" | sort -g | tail -1)"
printf '%-58s %12.0f %12.0f %12.0f\n' "(b) spool source -> durable spool, exactly once" "$ms" \
	"$(printf '%s\n' "${spool_rate[@]}" | sort -g | head -1)" "$(printf '%s\n' "${spool_rate[@]}" | sort -g | tail -1)"
printf 'ratio b/a: %.2fx   ingest worker peak private RSS (median): %d kB\n' "$(echo "$ms / $mc" | bc -l)" "$mr"
bench_result "(a) kcat | psql \\copy, msg/s" "$mc" higher
bench_result "(b) spool source -> durable spool, msg/s" "$ms" higher
bench_result "ingest worker peak private RSS, kB" "$mr" lower

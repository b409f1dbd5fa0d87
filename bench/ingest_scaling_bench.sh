#!/usr/bin/env bash
# Benchmark: ingest with one ingest worker against two, side by side on one
# throwaway server and one test Kafka cluster in one run, the same preloaded
# messages each time:
#   (a) one source over every partition of the topic       -- the baseline
#   (b) one source with "workers": 2: two ingest workers split its
#       partitions (even and odd) and stage in parallel, and the one
#       promoter makes both durable, in one commit-ordered spool
#   (c) two sources, each with half of the partitions ("partitions" lists:
#       even and odd): the same split done by hand
# Prints messages/s per run (time until every offset is durable), medians and
# the ratios b/a and c/a.
#
# Usage: bash bench/ingest_scaling_bench.sh [MESSAGES] [PARTITIONS] [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-1000000}
PARTS=${2:-64}
RUNS=${3:-3}
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
. "$here/bench/ingest_setup.sh" scaling 54351

even=$(seq -s, 0 2 $((PARTS - 1)))
odd=$(seq -s, 1 2 $((PARTS - 1)))
now() { date +%s.%N; }

# ingest NAME...: start the named sources, wait until all N offsets are
# durable, print msg/s.
ingest() {
	local t0 t1 done_n got s
	sql -c "CHECKPOINT" >/dev/null
	t0=$(now)
	for s in "$@"; do sql -c "SELECT spool.start_source('$s')" >/dev/null; done
	for _ in $(seq 1 6000); do
		done_n=$(sql -c "SELECT coalesce(sum(next_offset), 0) FROM spool.offsets
			WHERE source IN ($(printf "'%s'," "$@" | sed 's/,$//'))")
		[ "$done_n" -ge "$N" ] && break
		sleep 0.05
	done
	t1=$(now)
	got=$(sql -c "SELECT count(*) FROM spool.entries WHERE source IN ($(printf "'%s'," "$@" | sed 's/,$//'))")
	[ "$got" -eq "$N" ] || {
		echo "spool has $got of $N entries; offsets $done_n; dead letters and gaps:" >&2
		sql -c "SELECT 'dead', count(*) FROM spool.dead_letters UNION ALL SELECT 'gaps', count(*) FROM spool.gaps" >&2
		exit 1
	}
	for s in "$@"; do sql -c "SELECT spool.stop_source('$s')" >/dev/null; done
	echo "$N / ($t1 - $t0)" | bc -l
}

declare -a one two hand
opts='"batch_size": 20000, "batch_ms": 50'
for run in $(seq 1 "$RUNS"); do
	sql -c "SELECT spool.create_source('one$run', '$BOOT', '{bench}', '{$opts}')"
	one[$run]=$(ingest "one$run")
	sql -c "SELECT spool.create_source('two$run', '$BOOT', '{bench}', '{$opts, \"workers\": 2}')"
	two[$run]=$(ingest "two$run")
	sql -c "SELECT spool.create_source('even$run', '$BOOT', '{bench}', '{$opts, \"partitions\": [$even]}')" \
		-c "SELECT spool.create_source('odd$run', '$BOOT', '{bench}', '{$opts, \"partitions\": [$odd]}')"
	hand[$run]=$(ingest "even$run" "odd$run")
	printf '  run %d: one worker %8.0f msg/s   workers 2 %8.0f msg/s   two sources %8.0f msg/s\n' \
		"$run" "${one[$run]}" "${two[$run]}" "${hand[$run]}" >&2
done

m1=$(median "${one[@]}")
m2=$(median "${two[@]}")
m3=$(median "${hand[@]}")
row() {
	local label=$1 m=$2
	shift 2
	printf '%-60s %12.0f %12.0f %12.0f\n' "$label" "$m" \
		"$(printf '%s\n' "$@" | sort -g | head -1)" "$(printf '%s\n' "$@" | sort -g | tail -1)"
}
echo
echo "Ingest workers, $N messages (~200-byte JSON) preloaded over $PARTS partitions, $RUNS runs, $(nproc) cores, $(date -u +%Y-%m-%d)"
printf '%-60s %12s %12s %12s\n' "case" "median msg/s" "min" "max"
row "(a) one source, one ingest worker" "$m1" "${one[@]}"
row "(b) one source, \"workers\": 2" "$m2" "${two[@]}"
row "(c) two sources (even/odd partitions), two ingest workers" "$m3" "${hand[@]}"
printf 'ratio b/a: %.2fx   ratio c/a: %.2fx\n' "$(echo "$m2 / $m1" | bc -l)" "$(echo "$m3 / $m1" | bc -l)"
bench_result "(a) one ingest worker, msg/s" "$m1" higher
bench_result "(b) workers 2, msg/s" "$m2" higher
bench_result "(c) two sources, msg/s" "$m3" higher

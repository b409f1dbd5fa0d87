#!/usr/bin/env bash
# Benchmark: how long a Kafka consumer group leaves a departed member's
# partitions without a consumer -- the baseline for replica takeover in the
# spool_ext processors.  Two members share a fresh group on a 4-partition
# topic of the test Kafka cluster (test/kafka/spool_kafka_mock); then member B
#   leave:  calls rd_kafka_consumer_close() (a clean LeaveGroup), or
#   stall:  is SIGSTOPped (stops heartbeating; the coordinator notices after
#           session.timeout.ms)
# and the time until the survivor's rebalance callback assigns it every
# partition is measured (bench/rebalance/spool_rebalance_bench.c).  Prints a
# markdown table of min/median/max per mode.
#
# Usage: bash bench/rebalance_bench.sh [ROUNDS_LEAVE] [ROUNDS_STALL]
#   (defaults 5 and 2)
#   SESSION_TIMEOUT_MS=N overrides librdkafka's default session.timeout.ms.
#   On the mock a stall round takes ~2 x session.timeout.ms (see the caveat
#   printed at the end), so values above ~55000 hit the tool's 120 s cap.
#   Exit status 1 if any round failed (e.g. a 120 s wait timed out).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS_LEAVE=${1:-5}
ROUNDS_STALL=${2:-2}
PARTS=4
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
work=$(mktemp -d /tmp/spool_ext-rebalance-bench.XXXXXX)
cleanup() {
	stop_kafka
	rm -rf "$work"
}
trap cleanup EXIT

# Build both programs from copies of their sources in $work, so that nothing
# is written into the source tree.
mkdir -p "$work/tree/test/kafka" "$work/rebalance"
cp "$here/test/kafka/Makefile" "$here/test/kafka/spool_kafka_mock.c" "$work/tree/test/kafka/"
cp "$here/bench/rebalance/Makefile" "$here/bench/rebalance/spool_rebalance_bench.c" "$work/rebalance/"
make -s -C "$work/tree/test/kafka" >&2
make -s -C "$work/rebalance" >&2
tool=$work/rebalance/spool_rebalance_bench

start_kafka "$work" "$work/tree" --brokers 1 --topic "rb:$PARTS"
echo "test Kafka cluster at $KAFKA_BOOTSTRAP, topic rb with $PARTS partitions" >&2

# run_mode MODE ROUNDS: run the tool, its output also to $work/MODE.out;
# returns its exit status.  The outer timeout is only a backstop: every wait
# in the tool is capped at 120 s and a round watchdog at 420 s.
run_mode() {
	local mode=$1 rounds=$2 rc
	echo "== $mode, $rounds round(s)" >&2
	set +e
	timeout --kill-after=10 $((rounds * 450 + 60)) \
		"$tool" "$KAFKA_BOOTSTRAP" rb "$rounds" "$mode" | tee "$work/$mode.out" >&2
	rc=${PIPESTATUS[0]}
	set -e
	return "$rc"
}

start=$(date +%s)
failed=0
declare -A status
for m in leave stall; do
	if [ "$m" = leave ]; then n=$ROUNDS_LEAVE; else n=$ROUNDS_STALL; fi
	if [ "$n" -eq 0 ]; then
		status[$m]=skipped
	elif run_mode "$m" "$n"; then
		status[$m]=ok
	else
		status[$m]=failed
		failed=1
	fi
done
elapsed=$(($(date +%s) - start))

setting() { sed -n "s/^# $1 = //p" "$work/leave.out" "$work/stall.out" 2>/dev/null | head -1; }

echo
echo "Consumer-group takeover, test Kafka cluster (librdkafka $(sed -n 's/^# librdkafka \([0-9].*\)/\1/p' "$work"/*.out 2>/dev/null | head -1) mock, 1 broker), topic rb:$PARTS, 2 members, $(date -u +%Y-%m-%d)"
echo "session.timeout.ms: librdkafka default $(setting 'librdkafka default session.timeout.ms'), used $(setting 'session.timeout.ms used');" \
	"heartbeat.interval.ms $(setting 'librdkafka default heartbeat.interval.ms');" \
	"partition.assignment.strategy $(setting 'librdkafka default partition.assignment.strategy')"
echo
echo "| mode | rounds | min ms | median ms | max ms |"
echo "|------|-------:|-------:|----------:|-------:|"
for m in leave stall; do
	case ${status[$m]} in
		ok)
			read -r min med max < <(awk '/^summary/ {print $7, $9, $11}' "$work/$m.out")
			n=$(awk '/^summary/ {print $5}' "$work/$m.out")
			echo "| $m | $n | $min | $med | $max |"
			;;
		failed)
			done_n=$(grep -c '^round ' "$work/$m.out" || true)
			echo "| $m | FAILED after $done_n round(s) (see the error above; no number) | | | |"
			;;
		skipped)
			echo "| $m | 0 (skipped) | | | |"
			;;
	esac
done
echo
for m in leave stall; do
	[ -f "$work/$m.out" ] || continue
	mapfile -t rv < <(sed -n 's/^# round [0-9]*: survivor saw the rebalance start (revoke) after \(-\?[0-9]*\) ms/\1/p' "$work/$m.out")
	if [ ${#rv[@]} -gt 0 ]; then
		echo "$m: the survivor learnt of the rebalance (revoke callback) after a median $(median "${rv[@]}") ms"
	fi
done
cat <<'NOTE'

Caveat (mock cluster): librdkafka's mock group coordinator (rdkafka_mock_cgrp.c,
rd_kafka_mock_cgrp_rebalance) does not finish a join phase when every remaining
member has rejoined, as a real broker does; it always waits a fixed window of
session.timeout.ms - 1000 ms before electing a leader.  So on the mock both rows
include that window: leave ~ session.timeout.ms - 1 s, stall ~ the session
timeout (checked every 1 s) plus that window again.  The revoke times above
(when the survivor's heartbeat was told to rejoin) do not include it.
NOTE
echo
echo "total run time: ${elapsed} s"
exit "$failed"

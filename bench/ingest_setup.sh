# Sourced by the ingest benchmarks (after scripts/common.sh, with N and PARTS
# set): build and install the tree, start a throwaway server on
# SPOOL_BENCH_PORT (default: the second argument) and a test Kafka cluster
# with topic "bench" of PARTS partitions, produce N messages of ~200 bytes of
# JSON, and create the extension (with SEGMENT_HISTORY rows of dropped
# segments, if set).  Defines tree, work, PORT, BOOT and sql(); everything is
# stopped and removed at exit.
#
# Usage: . bench/ingest_setup.sh NAME DEFAULT_PORT
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d "/tmp/spool_ext-$1-bench.XXXXXX")
PORT=${SPOOL_BENCH_PORT:-$2}
cleanup() {
	stop_kafka
	stop_server "$work"
	rm -rf "$work" "$tree"
}
trap cleanup EXIT

start_server "$work" "$PORT" "shared_buffers = 1GB
max_wal_size = 4GB
spool.nonce_workers = 0"
sql() { as_user "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }

start_kafka "$work" "$tree" --brokers 1 --topic "bench:$PARTS"
BOOT=$KAFKA_BOOTSTRAP
echo "producing $N messages of ~200 bytes over $PARTS partitions to $BOOT ..." >&2
reply=$(kafka "produce bench $N -1 200")
case $reply in OK*) ;; *) echo "produce failed: $reply"; exit 1 ;; esac
sql -c "CREATE EXTENSION spool_ext"
# SEGMENT_HISTORY=N: N rows of long-dropped segments in spool.segment_info,
# as a server that has run for a long time keeps (below every real cursor).
if [ "${SEGMENT_HISTORY:-0}" -gt 0 ]; then
	sql -c "INSERT INTO spool.segment_info (segment, lo, hi, rows, sealed_at, dropped_at)
	        SELECT -g, -(g + 1) * 1000000::bigint, -g * 1000000::bigint, 1000000, now(), now()
	          FROM generate_series(1, $SEGMENT_HISTORY) g" -c "ANALYZE spool.segment_info"
fi

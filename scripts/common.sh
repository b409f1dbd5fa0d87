# Shared by the scripts: where PostgreSQL is, which user runs servers, and a
# private, writable copy of the source tree for that user.
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BIN=$("$PG_CONFIG" --bindir)
export PATH="$PG_BIN:$PATH"
RUN_AS=${SPOOL_RUN_AS:-postgres}

# as_user CMD...: run CMD as the unprivileged server user (PostgreSQL refuses root).
as_user() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u "$RUN_AS" -- env PATH="$PATH" "$@"
	else
		"$@"
	fi
}

# as_root CMD...: run CMD with rights to write into PostgreSQL's directories.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# prepare_build_tree SRC: copy SRC into a fresh directory the server user owns,
# build and install the extension from it, and print the directory.
prepare_build_tree() {
	local src=$1 tree
	tree=$(mktemp -d /tmp/spool_ext-build.XXXXXX)
	rsync -a --exclude .git --exclude 'tmp_*' --exclude '*.o' --exclude '*.so' \
		--exclude results --exclude output_iso --exclude log "$src"/ "$tree"/
	[ "$(id -u)" -eq 0 ] && chown -R "$RUN_AS" "$tree"
	chmod 755 "$tree"
	as_user make -s -C "$tree" PG_CONFIG="$PG_CONFIG" -j2 >&2
	as_user make -s -C "$tree/test/kafka" >&2	# the test Kafka cluster
	as_root make -s -C "$tree" PG_CONFIG="$PG_CONFIG" install >&2
	echo "$tree"
}

# prepare_release VERSION DIR: the library of a released VERSION (test/releases
# names its commit), built from git history and installed into a private
# copy of this PostgreSQL installation made under DIR; prints the copy's installation
# directory (the parent of its bin/), for PostgreSQL::Test::Cluster's
# install_path.  The copy keeps this tree's extension scripts, so it can
# create any released catalog.  Fails if the commit is not in git history.
prepare_release() {
	local version=$1 dest=$2/$1 here rev bindir sharedir pkglibdir
	here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	rev=$(awk -v v="$version" '$1 == v { print $2 }' "$here/test/releases")
	[ -n "$rev" ] || { echo "no release $version in test/releases" >&2; return 1; }
	git -C "$here" cat-file -e "$rev^{commit}" 2>/dev/null ||
		{ echo "commit $rev of release $version is not in git history" >&2; return 1; }
	bindir=$("$PG_CONFIG" --bindir)
	sharedir=$("$PG_CONFIG" --sharedir)
	pkglibdir=$("$PG_CONFIG" --pkglibdir)
	mkdir -p "$dest/src" "$dest/root$(dirname "$(dirname "$bindir")")" "$dest/root$(dirname "$sharedir")"
	cp -a "$(dirname "$bindir")" "$dest/root$(dirname "$(dirname "$bindir")")/"
	cp -a "$sharedir" "$dest/root$(dirname "$sharedir")/"
	git -C "$here" archive "$rev" | tar -x -C "$dest/src" || return 1
	[ "$(id -u)" -eq 0 ] && chown -R "$RUN_AS" "$dest"
	as_user make -s -C "$dest/src" PG_CONFIG="$PG_CONFIG" -j2 >&2 || return 1
	# Its library replaces this tree's in the copy (and no JIT bitcode of
	# another version stays beside it).
	rm -rf "$dest/root$pkglibdir/bitcode/spool_ext"*
	cp "$dest/src/spool_ext.so" "$dest/root$pkglibdir/spool_ext.so" || return 1
	echo "$dest/root$(dirname "$bindir")"
}

# start_server WORK PORT [EXTRA_CONF_LINES]: initdb a throwaway cluster in
# WORK/data (WORK must exist), preload spool_ext, listen only on a unix socket
# in WORK, and start it.  stop_server WORK stops it.
start_server() {
	local work=$1 port=$2 extra=${3:-}
	[ "$(id -u)" -eq 0 ] && chown "$RUN_AS" "$work"
	as_user initdb -D "$work/data" -A trust -U "$RUN_AS" >/dev/null
	cat >> "$work/data/postgresql.conf" <<CONF
shared_preload_libraries = 'spool_ext'
listen_addresses = ''
unix_socket_directories = '$work'
port = $port
max_worker_processes = 32
spool.database = 'postgres'
$extra
CONF
	as_user pg_ctl -D "$work/data" -l "$work/log" -w start >/dev/null
}

stop_server() {
	as_user pg_ctl -D "$1/data" -m fast stop >/dev/null 2>&1 || true
}

# keep_failed_log RC WORK NAME: after a failed run (RC not 0), copy the server
# log WORK/log to /tmp/NAME-PID.log, say where, and show any signal deaths.
keep_failed_log() {
	[ "$1" -ne 0 ] && [ -s "$2/log" ] || return 0
	cp "$2/log" "/tmp/$3-$$.log" && echo "server log: /tmp/$3-$$.log" >&2
	grep -A1 'terminated by signal' "$2/log" >&2 || true
}

# start_kafka WORK TREE [OPTIONS...]: start the test Kafka cluster (a librdkafka
# mock on 127.0.0.1, test/kafka/spool_kafka_mock) driven through a fifo in
# WORK; sets KAFKA_PID and KAFKA_BOOTSTRAP.  kafka CMD: send one command and
# print its one-line answer (bounded wait).
start_kafka() {
	local work=$1 tree=$2
	shift 2
	mkfifo "$work/kafka.in"
	"$tree/test/kafka/spool_kafka_mock" --quiet "$@" < "$work/kafka.in" > "$work/kafka.out" 2> "$work/kafka.err" &
	KAFKA_PID=$!
	exec 9> "$work/kafka.in"
	KAFKA_OUT=$work/kafka.out
	for _ in $(seq 1 100); do grep -q '^BOOTSTRAP' "$KAFKA_OUT" 2>/dev/null && break; sleep 0.1; done
	KAFKA_BOOTSTRAP=$(sed -n 's/^BOOTSTRAP //p' "$KAFKA_OUT")
	[ -n "$KAFKA_BOOTSTRAP" ] || { echo "test Kafka cluster did not start:"; cat "$work/kafka.err"; return 1; }
}

# KAFKA_WAIT_S bounds the wait (default 180 s); the answer is polled every 10 ms.
kafka() {
	local before
	before=$(wc -l < "$KAFKA_OUT")
	echo "$*" >&9
	for _ in $(seq 1 $((${KAFKA_WAIT_S:-180} * 100))); do
		[ "$(wc -l < "$KAFKA_OUT")" -gt "$before" ] && break
		sleep 0.01
	done
	tail -n 1 "$KAFKA_OUT"
}

stop_kafka() {
	[ -n "${KAFKA_PID:-}" ] && kill "$KAFKA_PID" 2>/dev/null || true
}

# bench_src HERE: the source tree a benchmark builds: $SPOOL_SRC if set
# (bench/compare.sh points it at another commit), else HERE.
bench_src() { echo "${SPOOL_SRC:-$1}"; }

# bench_result CASE VALUE BETTER: record one figure for bench/compare.sh in
# $BENCH_RESULTS (when set); BETTER is "higher" or "lower".
bench_result() {
	[ -n "${BENCH_RESULTS:-}" ] && printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$BENCH_RESULTS"
	return 0
}

# median VALUES...: the median (mean of the middle two for an even count);
# empty arguments are ignored, nothing is printed for none.  For benchmarks.
median() {
	printf '%s\n' "$@" | sort -g | awk 'NF {a[++n] = $1} END {
		if (n) printf "%.10g\n", (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2 }'
}

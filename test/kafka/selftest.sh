#!/usr/bin/env bash
# Self-check of the test Kafka cluster (spool_kafka_mock) and SpoolKafka.pm.
#
# Builds the program, drives it with a bash coproc (the recipe documented at
# the top of spool_kafka_mock.c), produces over 4 partitions and consumes
# with kcat, exercises down/up/wmarks, the retention hole below the low
# watermark, single messages with headers and tombstones, SIGTERM, and the
# Perl module.  Exits non-zero on the first failure.  Needs kcat.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prog="$here/spool_kafka_mock"
KCAT_TIMEOUT=60

fail() { echo "selftest: FAIL: $*" >&2; exit 1; }
pass() { echo "selftest: ok: $*"; }

command -v kcat >/dev/null || fail "kcat is not installed"
make -s -C "$here" spool_kafka_mock || fail "build"

# --- the coproc recipe ----------------------------------------------------
coproc KMOCK { exec "$prog" --quiet --topic st:4; }
mock_pid=$KMOCK_PID
# On any exit: TERM, then KILL if the program is still there 5 s later.
cleanup() {
	kill -TERM "$mock_pid" 2>/dev/null || return 0
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		kill -0 "$mock_pid" 2>/dev/null || return 0
		sleep 0.5
	done
	kill -KILL "$mock_pid" 2>/dev/null || true
}
trap cleanup EXIT

read -t 10 -r tag BOOTSTRAP <&"${KMOCK[0]}" || fail "no BOOTSTRAP line"
[ "$tag" = BOOTSTRAP ] || fail "first line was '$tag $BOOTSTRAP'"
[[ "$BOOTSTRAP" =~ ^127\.0\.0\.1:[0-9]+$ ]] || fail "bootstrap '$BOOTSTRAP'"
pass "started at $BOOTSTRAP"

# kcmd LINE: send a command, put the answer line in $REPLY (bounded wait).
kcmd() {
	echo "$*" >&"${KMOCK[1]}"
	read -t 120 -r REPLY <&"${KMOCK[0]}" || fail "no answer to '$*'"
}
# expect LINE PATTERN: the answer must match the bash regex PATTERN.
expect() {
	kcmd "$1"
	[[ "$REPLY" =~ $2 ]] || fail "'$1' answered '$REPLY'"
	pass "$1 -> $REPLY"
}
count() {   # count TOPIC [kcat options...]: messages kcat reads
	local t=$1; shift
	timeout "$KCAT_TIMEOUT" kcat -C -b "$BOOTSTRAP" -t "$t" -e -o beginning \
		-q "$@" | wc -l
}

expect "bootstrap" "^OK $BOOTSTRAP\$"
expect "produce st 1000" '^OK produced 1000$'
n=$(count st)
[ "$n" -eq 1000 ] || fail "kcat read $n messages, want 1000"
pass "kcat read 1000 messages"
for p in 0 1 2 3; do
	expect "wmarks st $p" '^OK 0 250$'
done
# The payload is the documented JSON; message seq i is on partition i % 4.
v=$(timeout "$KCAT_TIMEOUT" kcat -C -b "$BOOTSTRAP" -t st -p 1 -o 0 -c 1 \
	-e -q -f '%k %s\n')
[[ "$v" =~ ^k1\ \{\"seq\":1,\"key\":\"k1\",\"amount\":1,\"ts\":[0-9]+,\"pad\":\"x+\"\}$ ]] ||
	fail "unexpected first message of partition 1: $v"
[ "${#v}" -eq $((3 + 200)) ] || fail "value is not 200 bytes: ${#v}"
pass "payload format"

# --- broker down / up -----------------------------------------------------
expect "down 1" '^OK$'
expect "wmarks st 0" '^ERR '
expect "up 1" '^OK$'
ok=0
for i in $(seq 1 20); do
	kcmd "wmarks st 0"
	if [ "$REPLY" = "OK 0 250" ]; then ok=1; break; fi
	sleep 0.5
done
[ "$ok" = 1 ] || fail "wmarks after up: $REPLY"
pass "wmarks after up -> $REPLY"
expect "produce st 100 -1 200 1000" '^OK produced 100$'
expect "wmarks st 3" '^OK 0 275$'

# --- errors, latency ------------------------------------------------------
expect "error 0 6 2" '^OK$'      # 2 x NOT_LEADER_OR_FOLLOWER on Produce
expect "produce st 10" '^OK produced 10$'
expect "rtt 1 50" '^OK$'
expect "produce st 10" '^OK produced 10$'
expect "rtt 1 0" '^OK$'
expect "down 7" '^ERR no broker 7'
expect "nonsense" '^ERR unknown command'

# --- single messages ------------------------------------------------------
expect "topic one 1" '^OK$'
expect 'produce_one one 0 a {"not json' '^OK produced 1 0 0$'
expect 'produce_one one 0 \null \null' '^OK produced 1 0 1$'
expect 'produce_hdr one 0 h x=1,y {"seq":5}' '^OK produced 1 0 2$'
expect 'produce_one one 0 b \big:100000' '^OK produced 1 0 3$'
got=$(timeout "$KCAT_TIMEOUT" kcat -C -b "$BOOTSTRAP" -t one -e -o beginning \
	-q -Z -f '%k|%h|%S|%s\n' | cut -c1-40)
want=$'a||10|{"not json\nNULL||-1|NULL\nh|x=1,y=NULL|9|{"seq":5}\nb||100000|'$(printf 'x%.0s' $(seq 30))
[ "$got" = "$want" ] || fail "single messages read back as: $got"
pass "produce_one / produce_hdr / \\null / \\big read back"

# --- retention: more than 5 MiB in one partition moves the log start ------
expect "topic hole 1" '^OK$'
expect "produce hole 20000 0 200" '^OK produced 20000$'
expect "wmarks hole 0" '^OK 0 20000$'
expect "produce hole 10000 0 200 20000" '^OK produced 10000$'
expect "wmarks hole 0" '^OK [1-9][0-9]* 30000$'
low=${REPLY#OK }; low=${low% *}
# Reading from below the log start: OFFSET_OUT_OF_RANGE, as from Kafka.
err=$(timeout "$KCAT_TIMEOUT" kcat -C -b "$BOOTSTRAP" -t hole -p 0 -o 5 -e \
	-X auto.offset.reset=error -q 2>&1 >/dev/null || true)
[[ "$err" == *"Offset out of range"* ]] ||
	fail "no OFFSET_OUT_OF_RANGE below the low watermark: $err"
pass "offset 5 < low $low: Offset out of range"
n=$(count hole)
[ "$n" -eq $((30000 - low)) ] || fail "kcat read $n, want $((30000 - low))"
pass "beginning = low watermark ($n messages left)"

# --- quit -----------------------------------------------------------------
expect "quit" '^OK$'
rc=0; wait "$mock_pid" || rc=$?
[ "$rc" -eq 0 ] || fail "exit status $rc after quit"
pass "quit -> exit 0"

# --- SIGTERM --------------------------------------------------------------
"$prog" --quiet < <(sleep 30) > /dev/null &
mock_pid=$!
sleep 1
kill -TERM "$mock_pid"
rc=0; wait "$mock_pid" || rc=$?
[ "$rc" -eq 0 ] || fail "exit status $rc after SIGTERM"
pass "SIGTERM -> exit 0"

# --- the Perl module ------------------------------------------------------
if perl -MIPC::Run -e 1 2>/dev/null; then
	SPOOL_KAFKA_MOCK="$prog" timeout 120 perl -I "$here/.." -MSpoolKafka -e '
		my $k = SpoolKafka->start(brokers => 2, topics => ["p:2"]);
		$k->bootstrap =~ /^127\.0\.0\.1:\d+,127\.0\.0\.1:\d+$/
		  or die "bootstrap ", $k->bootstrap, "\n";
		$k->cmd("produce p 1000") eq "OK produced 1000" or die "produce\n";
		my ($lo, $hi) = $k->wmarks("p", 1);
		"$lo $hi" eq "0 500" or die "wmarks $lo $hi\n";
		$k->cmd("bogus", allow_error => 1) =~ /^ERR/ or die "allow_error\n";
		eval { $k->cmd("bogus"); 1 } and die "ERR did not die\n";
		$k->stop == 0 or die "stop\n";
		print "selftest: ok: SpoolKafka.pm\n";
	' || fail "SpoolKafka.pm"
else
	echo "selftest: skipped SpoolKafka.pm (no IPC::Run)"
fi

trap - EXIT
echo "selftest: all passed"

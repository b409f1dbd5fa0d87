#!/usr/bin/env bash
# Self-check of the test Kafka cluster (spool_kafka_mock) and SpoolKafka.pm.
#
# Builds the program, drives it with a bash coproc (the recipe documented at
# the top of spool_kafka_mock.c), produces over 4 partitions and consumes
# with kcat, exercises down/up/wmarks, the retention hole below the low
# watermark, single messages with headers and tombstones, reading partitions
# back with the consume command, SIGTERM, and the Perl module.  Exits non-zero
# on the first failure.  Needs kcat.
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
	rm -f "${out:-}"
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

# --- consume: read a partition back with keys and headers -------------------
out=$(mktemp "${TMPDIR:-/tmp}/selftest_consume.XXXXXX")
expect 'produce_hdr one 0 a\tb spool-outbox-id=17,spool-barrier=true,z {"v":"a\tb"}' \
	'^OK produced 1 0 4$'
expect "consume one 0 0 100 $out" '^OK consumed 5 5$'
got=$(cut -f1-7 "$out" | cut -c1-80)
want=$(printf '%s\n' \
	$'0\t0\ta\t\\N\t\\N\t{"not json\t' \
	$'0\t1\t\\N\t\\N\t\\N\t\\N\t' \
	$'0\t2\th\t\\N\t\\N\t{"seq":5}\tx=1,y' \
	$'0\t3\tb\t\\N\t\\N\t'"$(printf 'x%.0s' $(seq 68))" \
	$'0\t4\ta\\\\tb\t17\ttrue\t{"v":"a\\\\tb"}\tspool-outbox-id=17,spool-barrier=true,z')
[ "$got" = "$want" ] || fail "consume wrote:
$got
want:
$want"
now_ms=$(date +%s%3N)
cut -f8 "$out" | while read -r ts; do
	[ "$ts" -gt $((now_ms - 600000)) ] && [ "$ts" -le $((now_ms + 1000)) ] ||
		fail "message timestamp $ts (now $now_ms)"
done
pass "consume: keys, NULLs, values, spool headers, the header list, timestamps"
expect "consume one 0 1 2 $out" '^OK consumed 2 3$'
[ "$(cut -f2 "$out" | tr '\n' ' ')" = "1 2 " ] || fail "consume from 1 max 2: $(cat "$out")"
pass "consume FROM 1 MAX 2 -> offsets 1 2"
expect "consume one 0 5 100 $out" '^OK consumed 0 5$'
[ ! -s "$out" ] || fail "consume at the end wrote something"
expect "consume one 0 6 100 $out" '^ERR .*Offset out of range'
expect "consume one 1 0 100 $out" '^ERR partition 1 out of range'
expect "consume one 0 0 100" '^ERR usage: consume'
expect "consume st 2 -2 1000 $out" '^OK consumed 279 279$'
[ "$(wc -l < "$out")" -eq 279 ] || fail "consume st 2 wrote $(wc -l < "$out") lines"
head -n 1 "$out" | grep -q $'^2\t0\tk2\t\\\\N\t\\\\N\t{"seq":2,' ||
	fail "first message of st 2: $(head -n 1 "$out" | cut -c1-60)"
pass "consume -2 reads a whole partition (279 messages)"

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
expect "consume hole 0 0 10 $out" '^ERR .*Offset out of range'
expect "consume hole 0 -2 100000 $out" "^OK consumed $((30000 - low)) 30000\$"
[ "$(head -n 1 "$out" | cut -f2)" = "$low" ] || fail "consume -2 did not start at $low"
pass "consume below the log start: Offset out of range; -2 starts at $low"
rm -f "$out"

# --- the proxy: partitions that appear, ListOffsets by time ---------------
expect "topic grow 4" '^OK$'
expect "partitions grow 2" '^OK$'
expect "proxy" '^OK 127\.0\.0\.1:[0-9]+$'
PROXY=${REPLY#OK }
parts() { timeout "$KCAT_TIMEOUT" kcat -L -b "$PROXY" -t grow | grep -c ' partition '; }
[ "$(parts)" -eq 2 ] || fail "through the proxy, grow has $(parts) partitions, want 2"
expect "produce grow 100" '^OK produced 100$'
expect "partitions grow 4" '^OK$'
[ "$(parts)" -eq 4 ] || fail "through the proxy, grow has $(parts) partitions, want 4"
n=$(timeout "$KCAT_TIMEOUT" kcat -C -b "$PROXY" -t grow -p 3 -e -o beginning -q | wc -l)
[ "$n" -eq 25 ] || fail "kcat read $n messages of grow [3] through the proxy, want 25"
pass "proxy: 2 partitions of grow, then 4; partition 3 has its 25 messages"
for i in 0 1 2 3; do expect "produce_ts tso 0 k$i $((1700000000000 + i * 1000)) x" "^OK produced 1 0 $i\$"; done
q=$(timeout "$KCAT_TIMEOUT" kcat -Q -b "$PROXY" -t tso:0:1700000001500)
[[ "$q" =~ offset\ 2$ ]] || fail "ListOffsets by time through the proxy: '$q', want offset 2"
pass "proxy: ListOffsets by time -> $q"

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
		$k->cmd(q{produce_hdr p 1 k1 spool-outbox-id=7,x=a\\tb {"id":7}});
		$k->cmd(q{produce_hdr p 1 \null spool-outbox-id=8,spool-barrier=true \null});
		my @m = $k->consume_all("p", 2);
		@m == 1002 or die "consume_all read ", scalar(@m), "\n";
		my @p1 = grep { $_->{partition} == 1 } @m;
		my ($a, $b) = @p1[-2, -1];
		$a->{offset} == 500 && $a->{key} eq "k1" && $a->{outbox_id} eq "7"
		  && !defined $a->{barrier} && $a->{value} eq q({"id":7})
		  && $a->{headers}[1][0] eq "x" && $a->{headers}[1][1] eq "a\\tb"
		  && $a->{timestamp} > 1e12
		  or die "consume_all message 500: ", join(" ", %$a), "\n";
		!defined $b->{key} && !defined $b->{value} && $b->{outbox_id} eq "8"
		  && $b->{barrier} eq "true" or die "consume_all message 501\n";
		my @one = $k->consume("p", 1, from => 500, max => 1);
		@one == 1 && $one[0]{offset} == 500 or die "consume from/max\n";
		eval { $k->cmd("bogus"); 1 } and die "ERR did not die\n";
		$k->stop == 0 or die "stop\n";
		print "selftest: ok: SpoolKafka.pm\n";
	' || fail "SpoolKafka.pm"
else
	echo "selftest: skipped SpoolKafka.pm (no IPC::Run)"
fi

trap - EXIT
echo "selftest: all passed"

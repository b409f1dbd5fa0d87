# 100 takeovers of a processor's output gate, each by pg_terminate_backend
# of the active replica at a random moment of a stream (P-2, P-3, L-1).
#
# A processor with two replicas (batch_size 50, checkpoint_every 200,
# lease_ttl 2 s) folds topic tk through the reference handler, which emits
# one output per entry.  Each round produces a chunk of messages with
# consecutive seqs, waits a random 0-50 ms and terminates the active
# replica; every other round (at random) it rather terminates the active as
# soon as the spool holds entries beyond the committed cursor, i.e. while
# the active is working through the chunk.  The terminating statement also
# records what the active was doing.  Then the round waits, bounded, until a
# replica with another pid is active, and until the terminated replica is
# back as a standby, so that every round is a standby taking over.  At the
# end:
#   - the committed cursor reaches the spool's end and both replicas are
#     caught up;
#   - the outbox holds exactly the reference outputs of every produced seq
#     (none lost, none twice, per key in input order);
#   - spool.processor_status counts >= 100 takeovers over the replicas;
#   - the token of each new active is larger than the previous one, and
#     gate_token (the checkpoint row's token) grew to the last one;
#   - the writer's token is non-decreasing in outbox id order;
#   - some terminations hit an active with the stream in flight (entries
#     beyond its committed cursor, or inside a batch transaction), and some
#     chunks' outputs were committed by two writers (tokens).
# The distribution of last_takeover_ms (server side: from the old active's
# exit to the new one ready to commit) and of the time the test saw from
# the terminate to the new active are printed.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm, SpoolProcessor.pm
use SpoolTest;
use SpoolKafka;
use SpoolProcessor;
use Test::More;
use Time::HiRes qw(time usleep);

my $nparts = 4;
my $rounds = 100;
my $chunk = 500;          # messages produced per round
my $warmup = 1000;
my $wait_secs = 30;       # bound of each wait inside a round

my $t_start = time;
my $kafka = SpoolKafka->start(topics => ["tk:$nparts"]);
my $node = spool_node('processor_takeover');
my $proc = processor_setup($node, $kafka->bootstrap, 'tk',
	options => '{"batch_size": 50, "checkpoint_every": 200, "lease_ttl": "2 s"}');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $next_seq = 0;

sub produce
{
	my ($n) = @_;
	my $ans = $kafka->produce('tk', $n, -1, 200, $next_seq);
	die "produce $n from $next_seq: $ans" unless $ans eq "OK produced $n";
	$next_seq += $n;
}

# One long-lived session drives the rounds (a psql per poll would dominate
# the test time).  quiet() runs a query without noting it in the test's
# log, and the session's statements stay out of the server log
# (log_statement = all there): each round notes what it did instead.
my $s = SpoolTest::Session->new($node, 'driver');
$s->query_ok("SET log_statement = 'none'");

sub quiet
{
	my ($q) = @_;
	no warnings 'redefine';
	local *SpoolTest::Session::note = sub { };
	return $s->query_ok($q);
}

# Poll $q until it returns a non-empty result, at most $secs seconds,
# pausing $nap seconds between polls (default 5 ms); returns the result
# ('' on timeout).
sub wait_row
{
	my ($q, $secs, $nap) = @_;
	my $t0 = time;
	while (time - $t0 < $secs)
	{
		my $r = quiet($q);
		return $r if $r ne '';
		usleep(1_000_000 * ($nap // 0.005));
	}
	return '';
}

# One active and one standby, neither of them $gone (a pid).
sub gate_query
{
	my ($gone) = @_;
	return "SELECT 1 FROM spool.processor_status WHERE processor = '$proc'"
	  . " HAVING count(*) FILTER (WHERE role = 'active') = 1"
	  . " AND count(*) FILTER (WHERE role = 'standby') = 1"
	  . " AND count(*) FILTER (WHERE pid = $gone) = 0";
}

sub pct
{
	my ($p, @v) = @_;
	@v = sort { $a <=> $b } @v;
	return 'n/a' unless @v;
	return sprintf('%.1f', $v[ int($p * $#v + 0.5) ]);
}

sub dist
{
	my @v = @_;
	return sprintf('n=%d min %s p50 %s p90 %s p99 %s max %s', scalar(@v),
		pct(0, @v), pct(0.5, @v), pct(0.9, @v), pct(0.99, @v), pct(1, @v));
}

# ---------------------------------------------------------------------------
# Warm-up: the processor runs with one active and one standby and has
# committed a first stream.
# ---------------------------------------------------------------------------
wait_gate($node, $proc, 2, 'the processor to run with one active and one standby');
produce($warmup);
poll_ok($node,
	"SELECT committed_cursor = $warmup FROM spool.processor_checkpoints WHERE processor = '$proc'",
	"the warm-up's $warmup entries to be committed");
my $token0 = sql("SELECT token FROM spool.processor_checkpoints WHERE processor = '$proc'");
like($token0, qr/^[1-9]\d*$/, "the first active holds gate token $token0");

# ---------------------------------------------------------------------------
# The rounds.
# ---------------------------------------------------------------------------
my (@seen_ms, @takeover_ms, @not_increasing, @replicas);
my ($in_flight, $mid_batch, $fenced, $backlog, $aimed) = (0, 0, 0, 0, 0);
my $prev_token = $token0;
my $done = 0;
my $t_rounds = time;
for my $round (1 .. $rounds)
{
	produce($chunk);

	# Terminate the active; the same statement says what it was doing.
	my $terminate =
	    "SELECT s.pid, s.replica, s.token, coalesce(s.last_takeover_ms::text, ''),"
	  . " c.committed_cursor, st.next_cursor - 1,"
	  . " coalesce(a.state, '') = 'active' AND a.query = 'processing',"
	  . " a.backend_xid IS NOT NULL,"
	  . " pg_terminate_backend(s.pid)"
	  . " FROM spool.processor_status s LEFT JOIN pg_stat_activity a ON a.pid = s.pid,"
	  . " spool.processor_checkpoints c, spool.spool_state st"
	  . " WHERE s.processor = '$proc' AND s.role = 'active' AND c.processor = '$proc'";
	my $row = '';
	if (rand() < 0.5)
	{
		# While the active works through the chunk: entries in the spool
		# beyond its committed cursor (polled every millisecond; if the
		# chunk went by unseen, the active is terminated anyway below).
		$row = wait_row("$terminate AND st.next_cursor - 1 > c.committed_cursor", 2, 0.001);
		$aimed++;
	}
	else
	{
		usleep(int(rand(50_000)));
	}
	$row = wait_row($terminate, $wait_secs) if $row eq '';
	my $t_term = time;
	if ($row eq '')
	{
		fail("round $round: an active replica to terminate");
		last;
	}
	my ($pid, $replica, $token, $last_ms, $committed, $end, $processing, $xid, $killed) =
	  split /\|/, $row;
	if ($killed ne 't')
	{
		fail("round $round: pg_terminate_backend($pid) of the active replica");
		last;
	}
	# The last_takeover_ms of the active we terminate is the one of the
	# previous round's takeover (it is set once the new active caught up).
	push @takeover_ms, $last_ms if $round > 1 && $last_ms ne '' && $last_ms >= 0;
	$in_flight++ if $committed < $next_seq;
	$backlog++ if $committed < $end;
	$mid_batch++ if $processing eq 't';
	$fenced++ if $processing eq 't' && $xid eq 't';

	# A replica with another pid becomes active.
	my $new = wait_row(
		"SELECT pid, replica, token FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND role = 'active' AND pid <> $pid",
		$wait_secs);
	if ($new eq '')
	{
		fail("round $round: a replica other than $pid to become active"
			  . " within ${wait_secs}s");
		diag(sql("SELECT * FROM spool.processor_status"));
		last;
	}
	push @seen_ms, (time - $t_term) * 1000;
	my ($npid, $nreplica, $ntoken) = split /\|/, $new;
	note(sprintf('round %d: terminated pid %d (replica %d, token %d, committed %d,'
			  . ' spool end %d, produced %d, in a batch: %s, fenced: %s);'
			  . ' pid %d (replica %d, token %d) active %.1f ms later',
			$round, $pid, $replica, $token, $committed, $end, $next_seq,
			$processing, $xid, $npid, $nreplica, $ntoken, $seen_ms[-1]));
	push @replicas, $nreplica;
	push @not_increasing, "round $round: $prev_token -> $ntoken"
	  unless $ntoken > $prev_token;
	$prev_token = $ntoken;

	# The terminated replica comes back as a standby.
	if (wait_row(gate_query($pid), $wait_secs) eq '')
	{
		fail("round $round: one active and one standby again, without pid $pid");
		diag(sql("SELECT * FROM spool.processor_status"));
		last;
	}
	$done++;
}
my $t_loop = time - $t_rounds;
is($done, $rounds, "$rounds rounds, each a takeover after pg_terminate_backend of the active");
is(scalar(@not_increasing), 0, 'the token of each new active is larger than the previous one')
  or diag(join('; ', @not_increasing[ 0 .. ($#not_increasing < 9 ? $#not_increasing : 9) ]));
note(sprintf('%d rounds in %.1fs (%.0f ms per round); new actives by replica: %s',
		$done, $t_loop, $done ? $t_loop * 1000 / $done : 0,
		join(', ', map { my $r = $_; "$r: " . scalar(grep { $_ == $r } @replicas) }
			  sort { $a <=> $b } keys %{ { map { $_ => 1 } @replicas } })));
note("terminations: $in_flight before the chunk was committed (committed < produced),"
	  . " $backlog with entries in the spool beyond the committed cursor,"
	  . " $mid_batch inside a batch transaction ($fenced of them after the fence);"
	  . " $aimed rounds aimed at a backlog");
cmp_ok($backlog + $mid_batch, '>', 0,
	'some terminations hit the active with the stream in flight'
	  . ' (entries beyond its committed cursor, or inside a batch)');

# ---------------------------------------------------------------------------
# Everything is committed once.
# ---------------------------------------------------------------------------
poll_within($node, 60,
	"SELECT count(*) = $next_seq FROM spool.entries WHERE source = 'src'",
	"all $next_seq messages to reach the spool");
poll_within($node, 60,
	"SELECT c.committed_cursor = s.next_cursor - 1 AND c.committed_cursor = $next_seq"
	  . " FROM spool.processor_checkpoints c, spool.spool_state s WHERE c.processor = '$proc'",
	"the committed cursor to reach the spool's end ($next_seq)");
poll_within($node, 60,
	"SELECT count(*) FILTER (WHERE role = 'active') = 1"
	  . " AND count(*) FILTER (WHERE role = 'standby') = 1"
	  . " AND bool_and(cursor = $next_seq AND committed_cursor = $next_seq)"
	  . " FROM spool.processor_status WHERE processor = '$proc'",
	'both replicas to be caught up at the committed cursor');
# The final active's takeover latency.
my $last = sql("SELECT last_takeover_ms FROM spool.processor_status"
	  . " WHERE processor = '$proc' AND role = 'active'");
push @takeover_ms, $last if $last ne '' && $last >= 0;

outputs_exact($node, $proc, $nparts, $next_seq, "after $done takeovers");

my ($takeovers, $gate_token, $active_token) = split /\|/, sql(
	"SELECT sum(takeovers), max(gate_token), max(token) FILTER (WHERE role = 'active')"
	  . " FROM spool.processor_status WHERE processor = '$proc'");
cmp_ok($takeovers, '>=', $rounds, "processor_status counts $takeovers takeovers (>= $rounds)");
cmp_ok($gate_token, '>', $token0, "gate_token grew from $token0 to $gate_token");
is($gate_token, $prev_token, 'gate_token is the token of the last new active');
is($active_token, $gate_token, 'the active replica holds the gate token');
tokens_ordered($node, $proc, 'all takeovers');
is(sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc' AND token IS NULL"),
	'0', 'every output carries its writer token');
my ($writers, $partial) = split /\|/, sql(
	"SELECT count(DISTINCT token), count(*) FILTER (WHERE n % $chunk <> 0)"
	  . " FROM (SELECT token, count(*) AS n FROM spool.outbox WHERE processor = '$proc'"
	  . " GROUP BY token) t");
cmp_ok($writers, '<=', $done + 1, "$writers distinct writer tokens in the outbox (<= takeovers + 1)");
cmp_ok($partial, '>', 0,
	"$partial writers committed only part of a chunk (a chunk split between writers)");
is( sql("SELECT count(*) FROM spool.processor_status WHERE processor = '$proc'"
		  . " AND hash_mismatches > 0"),
	'0', 'no replica saw a state hash mismatch');

note('last_takeover_ms (server: old active exit -> new active ready): ' . dist(@takeover_ms));
note('terminate -> new active seen by the test (ms): ' . dist(@seen_ms));
note(sprintf('total test time %.1fs', time - $t_start));

$s->quit;
$node->stop;
$kafka->stop;
done_testing();


# Handler errors in a processor with two replicas (test_handler raises at a
# seq listed in test_faults, in one replica or in all of them):
#   (a) an error in the active replica only: the active fails on the batch
#       holding seq S, processor_status shows the error for that replica,
#       the other replica takes the gate and emits everything; the launcher
#       restarts the failed replica (new pid, LOG "exited; restarting in N
#       ms" when it ran less than 10 s, at once after a longer run).  A
#       restarted replica replays from the latest state snapshot, so it
#       would fail again on S while that snapshot precedes S; it comes back
#       as a standby once the active's next snapshot passes S.  In practice
#       that snapshot comes with the new active's first batch (it holds at
#       least checkpoint_every entries, or the active snapshots as soon as
#       it is idle, its last snapshot being older than 1 s), before the
#       1 s backoff ends: the replica fails once and recovers at its first
#       restart.  The test asserts at least one failure and the recovery.
#   (b) an error in every replica: processing stops before S's batch (no
#       output for any entry after the committed cursor, the committed
#       cursor below S's cursor, and it stays there), both replicas report
#       the error and keep being restarted with a doubling backoff; once
#       the fault is deleted everything is processed within a bounded wait.
# After each part the outbox holds exactly the reference outputs.
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
use Time::HiRes qw(time);

my $nparts = 4;
my $topic = 'he';
my $kafka = SpoolKafka->start(topics => ["$topic:$nparts"]);
my $node = spool_node('proc_handler_errors');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $proc = processor_setup($node, $kafka->bootstrap, $topic,
	nparts => $nparts,
	options => '{"replicas": 2, "checkpoint_every": 100}');

my $next_seq = 0;

sub produce
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$kafka->produce_next($topic, $_[0], 100, \$next_seq);
}

# One replica's processor_status row as a hash.
sub replica_row
{
	my ($r) = @_;
	my @cols = qw(pid role cursor committed_cursor errors last_error takeovers
	  hash_checks hash_mismatches snapshot_cursor started_at last_error_at);
	my $row = sql('SELECT ' . join(', ', map { "coalesce(${_}::text, '')" } @cols)
		  . " FROM spool.processor_status WHERE processor = '$proc' AND replica = $r");
	my %h;
	@h{@cols} = split /\|/, $row, -1;
	return \%h;
}

sub seq_cursor
{
	my ($seq) = @_;
	return sql("SELECT cursor FROM spool.entries WHERE source = 'src'"
		  . " AND (value->>'seq')::int = $seq");
}

wait_gate($node, $proc, 2);
produce(500);
wait_processed($node, $proc, $next_seq, 'warm-up');
outputs_exact($node, $proc, $nparts, $next_seq, 'warm-up');

# ---------------------------------------------------------------------------
# (a) An error in the active replica only.
# ---------------------------------------------------------------------------
{
	wait_gate($node, $proc, 2, '(a) one active and one standby');
	my $r = sql("SELECT replica FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND role = 'active'");
	my $other = $r == 1 ? 2 : 1;
	my $before = replica_row($r);
	my $pid = $before->{pid};
	my $s = $next_seq + 150;
	note "the active is replica $r (pid $pid); fault at seq $s in replica $r only";
	sql("INSERT INTO test_faults VALUES ($s, $r)");
	my $log_offset = -s $node->logfile;
	produce(400);
	wait_spooled($node, $next_seq, '(a)');
	my $s_cursor = seq_cursor($s);

	poll_ok($node,
		"SELECT errors > $before->{errors} AND last_error LIKE '%injected fault at seq $s in replica $r'"
		  . " FROM spool.processor_status WHERE processor = '$proc' AND replica = $r",
		"(a) processor_status to show replica ${r}'s error");
	my $err = replica_row($r);
	like($err->{last_error}, qr/^at cursor (\d+): injected fault at seq $s in replica $r$/,
		"(a) replica $r: last_error says where it failed ($err->{last_error})");
	my ($at) = $err->{last_error} =~ /^at cursor (\d+)/;
	cmp_ok($at, '<', $s_cursor,
		"(a) replica $r failed on a batch that starts before seq ${s}'s cursor $s_cursor");

	poll_ok($node,
		"SELECT role = 'active' AND takeovers > 0 FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND replica = $other",
		"(a) replica $other to take the gate");
	wait_processed($node, $proc, $next_seq, '(a) after the takeover');
	outputs_exact($node, $proc, $nparts, $next_seq, '(a) after the takeover');
	ok($node->log_contains(qr/ERROR:  injected fault at seq $s in replica $r/, $log_offset),
		"(a) the handler's error is in the log");

	# The launcher restarts the failed replica.
	poll_ok($node,
		"SELECT pid IS NOT NULL AND pid <> $pid FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND replica = $r",
		"(a) replica $r to be restarted (a pid other than $pid)");
	ok(!kill(0, $pid), "(a) the failed process $pid is gone");

	# It replays from the latest snapshot: while that precedes seq S it
	# meets S again and fails again.  The active snapshots every 100
	# entries and after 1 s idle; more input makes sure it gets past S.
	produce(200);
	poll_ok($node,
		"SELECT snapshot_cursor >= $s_cursor FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND replica = $other",
		"(a) the active's state snapshot to pass seq ${s}'s cursor $s_cursor");
	poll_ok($node,
		"SELECT role = 'standby' AND cursor = committed_cursor AND cursor >= $s_cursor"
		  . " FROM spool.processor_status WHERE processor = '$proc' AND replica = $r",
		"(a) replica $r to be back as a standby caught up past seq $s");
	my $back = replica_row($r);
	my $failures = $back->{errors} - $before->{errors};
	cmp_ok($failures, '>=', 1, "(a) replica $r failed $failures time(s) before it recovered");
	note "(a) replica $r failed $failures time(s) on seq $s before a snapshot past it let it recover";
	my @restarts = slurp_file($node->logfile) =~ /spool processor $proc\/$r exited; restarting in (\d+) ms/g;
	note "(a) launcher restarts of replica $r with a backoff: @restarts ms";
	# The backoff applies to a replica that failed within 10 s of its start;
	# after a longer (healthy) run it is restarted at once.
	my $ran = sql("SELECT extract(epoch FROM '$err->{last_error_at}'::timestamptz"
		  . " - '$before->{started_at}'::timestamptz)");
	if ($ran < 9)
	{
		ok($node->log_contains(qr/spool processor $proc\/$r exited; restarting in 1000 ms/, $log_offset),
			"(a) replica $r failed ${ran} s after its start: restarted after a 1000 ms backoff");
	}
	elsif ($ran >= 10 && $failures == 1)
	{
		ok(!$node->log_contains(qr/spool processor $proc\/$r exited; restarting in 1000 ms/, $log_offset),
			"(a) replica $r failed ${ran} s after its start: restarted without a backoff");
	}
	is(replica_row($other)->{role}, 'active', "(a) replica $other is still the active");
	is(replica_row($other)->{errors}, '0', "(a) replica $other had no error");

	# Nothing was lost or duplicated, and replica $r follows without errors.
	wait_processed($node, $proc, $next_seq, '(a) after the recovery');
	outputs_exact($node, $proc, $nparts, $next_seq, '(a) after the recovery');
	poll_ok($node,
		"SELECT role = 'standby' AND hash_checks > 0 AND hash_mismatches = 0"
		  . " AND errors = $back->{errors}"
		  . " FROM spool.processor_status WHERE processor = '$proc' AND replica = $r",
		"(a) replica $r to check a state hash, equal to the active's, with no new error");
	sql('DELETE FROM test_faults');
}

# ---------------------------------------------------------------------------
# (b) An error in every replica.
# ---------------------------------------------------------------------------
{
	wait_gate($node, $proc, 2, '(b) one active and one standby');
	my %before = map { $_ => replica_row($_) } 1, 2;
	my $s = $next_seq + 250;
	note "fault at seq $s in every replica";
	sql("INSERT INTO test_faults VALUES ($s, NULL)");
	my $log_offset = -s $node->logfile;
	produce(400);
	wait_spooled($node, $next_seq, '(b)');
	my $s_cursor = seq_cursor($s);

	# Each replica fails, is restarted with a backoff, fails again.
	poll_ok($node,
		"SELECT count(*) = 2 FROM spool.processor_status WHERE processor = '$proc'"
		  . " AND errors >= CASE replica WHEN 1 THEN $before{1}{errors}"
		  . " ELSE $before{2}{errors} END + 2"
		  . " AND last_error LIKE '%injected fault at seq $s in replica %'",
		'(b) both replicas to fail on the fault at least twice');
	my $c1 = committed_cursor($node, $proc);
	cmp_ok($c1, '<', $s_cursor, "(b) the committed cursor $c1 is below seq ${s}'s cursor $s_cursor");
	for my $r (1, 2)
	{
		my $row = replica_row($r);
		like($row->{last_error}, qr/^at cursor $c1: injected fault at seq $s in replica $r$/,
			"(b) replica $r reports the error at the committed cursor");
		isnt($row->{pid}, $before{$r}{pid}, "(b) replica $r was restarted");
	}

	# Let more failures happen; the committed cursor does not move.
	my $e = sql("SELECT sum(errors) FROM spool.processor_status WHERE processor = '$proc'");
	poll_ok($node,
		"SELECT sum(errors) >= $e + 2 FROM spool.processor_status WHERE processor = '$proc'",
		'(b) two more failures');
	is(committed_cursor($node, $proc), $c1, '(b) the committed cursor stays where it was');
	is( sql(qq{SELECT count(*) FROM spool.outbox o JOIN spool.entries e
		ON e.source = 'src' AND (e.value->>'seq') = (o.payload->>'seq')
		WHERE o.processor = '$proc' AND e.cursor > $c1}),
		'0', "(b) no output for an entry after the committed cursor $c1");
	is( sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"
			  . " AND (payload->>'seq')::int = $s"),
		'0', "(b) no output for seq $s");
	is( sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"),
		sql("SELECT count(*) FROM spool.entries WHERE cursor <= $c1"),
		"(b) one output for each entry up to the committed cursor $c1");
	is( sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc' AND cursor > $c1"),
		'0', "(b) no outbox row beyond the committed cursor");
	my @backoffs = slurp_file($node->logfile) =~ /spool processor $proc\/\d exited; restarting in (\d+) ms/g;
	note "(b) restart backoffs so far: @backoffs";
	ok($node->log_contains(qr/spool processor $proc\/\d exited; restarting in 2000 ms/, $log_offset),
		'(b) the restart backoff doubles (a restart after 2000 ms)');

	# Fix the handler: everything goes through, within a bound.
	sql('DELETE FROM test_faults');
	my $t0 = time;
	wait_processed($node, $proc, $next_seq, '(b) after the fault is removed', 90);
	note sprintf('(b) processed %.1f s after the fault was removed', time - $t0);
	outputs_exact($node, $proc, $nparts, $next_seq, '(b) after the fault is removed');
	wait_gate($node, $proc, 2, '(b) one active and one standby again');
	my $e2 = sql("SELECT sum(errors) FROM spool.processor_status WHERE processor = '$proc'");
	produce(300);
	wait_processed($node, $proc, $next_seq, '(b) more input');
	outputs_exact($node, $proc, $nparts, $next_seq, '(b) more input');
	is(sql("SELECT sum(errors) FROM spool.processor_status WHERE processor = '$proc'"),
		$e2, '(b) no new error after the fix');
}

# No server process died of a signal (a crash would restart them all).
my @signals = slurp_file($node->logfile) =~ /^.*was terminated by signal (?!9:).*$/mg;
is(scalar(@signals), 0, 'no server process died of a signal')
  or diag(join("\n", @signals));

$node->stop;
$kafka->stop;
done_testing();

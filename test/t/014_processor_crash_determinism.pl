
# Processor outputs across server crashes and restarts, and determinism
# checks between replicas (processor 'p': 2 replicas, batches of 100,
# a state snapshot every 50 entries):
#   (a) kill -9 mid-stream, twice:
#       1. the active replica, while its batch's transaction has inserted
#          the batch's outputs and waits at the checkpoint compare-and-set
#          (a session holds the checkpoint row);
#       2. an idle regular backend while the stream is processed at full
#          speed (the postmaster then kills the replicas wherever they are).
#       The server restarts, the launcher restarts the source and both
#       replicas by itself, the rest is produced; the outbox holds exactly
#       the reference outputs.  At every look, the outputs are exactly one
#       per entry up to the committed cursor (P-2).
#   (b) determinism: both replicas publish the same state hash at the same
#       cursor (hash_checks > 0, no mismatch); after a clean restart both
#       continue from the checkpointed state (no replay), and the hashes
#       agree again after more input.
#   (c) a non-deterministic handler (handler setting nondeterministic: the
#       state records the replica number) in a second processor 'nd': the
#       standby reports the divergence (hash_mismatches, last_error, a
#       WARNING in the log) and its outputs, which do not depend on the
#       state's replica number, are still exactly the reference.
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
my $topic = 'pc';
my $kafka = SpoolKafka->start(topics => ["$topic:$nparts"]);
# The test framework turns restart_after_crash off; this test needs it.
my $node = spool_node('proc_crash_determinism', restart_after_crash => 'on');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $proc = processor_setup($node, $kafka->bootstrap, $topic,
	nparts => $nparts,
	options => '{"replicas": 2, "batch_size": 100, "checkpoint_every": 50}');

my $next_seq = 0;

sub produce
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$kafka->produce_next($topic, $_[0], 100, \$next_seq);
}

# P-2 at this instant (one snapshot): one output per entry up to the
# committed cursor, none beyond it.
sub outputs_match_cursor
{
	my ($p, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my ($outs, $beyond, $entries) = split / /, sql(qq{SELECT
		(SELECT count(*) FROM spool.outbox WHERE processor = '$p') || ' '
		|| (SELECT count(*) FROM spool.outbox WHERE processor = '$p'
		    AND cursor > c.committed_cursor) || ' '
		|| (SELECT count(*) FROM spool.entries WHERE cursor <= c.committed_cursor)
		FROM spool.processor_checkpoints c WHERE c.processor = '$p'});
	is("$outs $beyond", "$entries 0",
		"$what: $p has one output per entry up to its committed cursor ($entries), none beyond");
}

# Both replicas of $p hold a state hash at the committed cursor; they agree.
sub hashes_agree
{
	my ($p, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	poll_ok($node,
		"SELECT count(*) = 2 AND bool_and(state_hash_cursor = committed_cursor)"
		  . " FROM spool.processor_status WHERE processor = '$p'",
		"$what: both replicas of $p to hash their state at the committed cursor");
	my %h = map { my ($r, @v) = split /\|/; ($r => \@v) } split /\n/,
	  sql("SELECT replica, role, state_hash, state_hash_cursor, hash_checks, hash_mismatches"
		  . " FROM spool.processor_status WHERE processor = '$p' ORDER BY replica");
	note "$what: replica $_: role $h{$_}[0], hash $h{$_}[1] at $h{$_}[2],"
	  . " checks $h{$_}[3], mismatches $h{$_}[4]"
	  for sort keys %h;
	is($h{1}[1], $h{2}[1], "$what: both replicas have state hash $h{1}[1] at cursor $h{1}[2]");
	my ($sb) = grep { $h{$_}[0] eq 'standby' } sort keys %h;
	ok(defined $sb && $h{$sb}[3] > 0, "$what: the standby checked its hash against the active's snapshot")
	  or diag explain \%h;
	is($h{1}[4] + $h{2}[4], 0, "$what: no hash mismatch");
}

wait_gate($node, $proc, 2);
produce(1000);
wait_processed($node, $proc, $next_seq, 'warm-up');
outputs_exact($node, $proc, $nparts, $next_seq, 'warm-up');

# ---------------------------------------------------------------------------
# (a1) kill -9 the active while its batch waits at the checkpoint CAS.
# ---------------------------------------------------------------------------
{
	# With a snapshot at the committed cursor the idle active has nothing to
	# write, so the next transaction to wait for the row is a batch's.
	poll_ok($node,
		"SELECT state_cursor = committed_cursor FROM spool.processor_checkpoints"
		  . " WHERE processor = '$proc'",
		'(a1) a state snapshot at the committed cursor');
	my $apid = active_pid($node, $proc);
	like($apid, qr/^\d+$/, "(a1) the active replica runs ($apid)");
	my $holder = SpoolTest::Session->new($node, 'checkpoint holder');
	$holder->query_ok('BEGIN');
	$holder->query_ok("SELECT committed_cursor FROM spool.processor_checkpoints"
		  . " WHERE processor = '$proc' FOR UPDATE");
	my $before = committed_cursor($node, $proc);
	produce(3000);
	poll_ok($node,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $apid AND wait_event_type = 'Lock'",
		'(a1) the active to wait for the checkpoint row in its batch');
	# Outputs are inserted straight into a ring slot of the target's outbox.
	cmp_ok( sql("SELECT count(*) FROM pg_locks WHERE pid = $apid AND granted"
			  . " AND relation::regclass::text LIKE 'spool.outbox\\_t%' AND mode = 'RowExclusiveLock'"),
		'>=', 1, "(a1) the active's open batch transaction has written to the outbox");
	is(committed_cursor($node, $proc), $before, '(a1) the batch is not committed');
	my $log_offset = -s $node->logfile;
	ok(kill('KILL', $apid), "(a1) kill -9 the active replica $apid mid-batch");
	$holder->quit;
	crash_restart_ok($node, $apid, $log_offset, '(a1)');

	wait_gate($node, $proc, 2, '(a1) both replicas back after the crash');
	ok(!grep({ $_ == $apid } values %{ replica_pids($node, $proc) }),
		'(a1) the replicas are new processes');
	outputs_match_cursor($proc, '(a1) right after the crash');
	produce(1000);
	wait_processed($node, $proc, $next_seq, '(a1) after the crash');
	outputs_exact($node, $proc, $nparts, $next_seq, '(a1) after the crash');
}

# ---------------------------------------------------------------------------
# (a2) kill -9 a regular backend while the stream is processed at full speed.
# ---------------------------------------------------------------------------
{
	my $victim = SpoolTest::Session->new($node, 'victim');
	my $vpid = $victim->pid;
	my $apid = active_pid($node, $proc);
	my $old_pids = replica_pids($node, $proc);
	my $base = committed_cursor($node, $proc);
	produce(20000);

	# Wait (bounded) for the active to be inside a batch well into the stream.
	my ($hit, $at) = (0, '');
	my $deadline = time + 60;
	while (time < $deadline)
	{
		$at = sql("SELECT c.committed_cursor || ' ' || (SELECT count(*) FROM spool.outbox"
			  . " WHERE processor = '$proc') FROM spool.processor_checkpoints c,"
			  . " pg_stat_activity a WHERE c.processor = '$proc' AND a.pid = $apid"
			  . " AND a.state = 'active' AND a.query = 'processing'"
			  . " AND c.committed_cursor > $base + 300");
		if ($at ne '')
		{
			$hit = 1;
			last;
		}
		usleep(10_000);
	}
	ok($hit, "(a2) the active is processing a batch mid-stream (committed cursor, outputs: $at)");
	my $log_offset = -s $node->logfile;
	ok(kill('KILL', $vpid), "(a2) kill -9 the regular backend $vpid");
	$victim->quit;
	my (undef, $outs) = $hit ? split(/ /, $at) : (0, $next_seq);
	cmp_ok($outs, '<', $next_seq, "(a2) the stream was mid-way ($outs of $next_seq outputs)");
	crash_restart_ok($node, $vpid, $log_offset);

	wait_gate($node, $proc, 2, '(a2) both replicas back after the crash');
	my %now = reverse %{ replica_pids($node, $proc) };
	ok(!grep({ $now{$_} } values %$old_pids), '(a2) the replicas are new processes');
	outputs_match_cursor($proc, '(a2) right after the crash');
	produce(1000);
	wait_processed($node, $proc, $next_seq, '(a2) after the crash');
	outputs_exact($node, $proc, $nparts, $next_seq, '(a2) after the crash');
	is(sql('SELECT count(*) FROM spool.dead_letters'), '0', '(a) no dead letters');
}

# ---------------------------------------------------------------------------
# (b) Equal state hashes; a clean restart continues from the checkpoint.
# ---------------------------------------------------------------------------
{
	hashes_agree($proc, '(b) before the restart');
	my $c = committed_cursor($node, $proc);
	is(sql("SELECT state_cursor FROM spool.processor_checkpoints WHERE processor = '$proc'"),
		$c, "(b) the checkpoint holds a state snapshot at the committed cursor $c");
	my $log_offset = -s $node->logfile;
	$node->restart;
	wait_gate($node, $proc, 2, '(b) both replicas back after the restart');
	poll_ok($node,
		"SELECT count(*) = 2 AND bool_and(cursor = $c) FROM spool.processor_status"
		  . " WHERE processor = '$proc'",
		"(b) both replicas at cursor $c");
	is(sql("SELECT sum(entries) FROM spool.processor_status WHERE processor = '$proc'"),
		'0', '(b) both replicas loaded the checkpointed state: nothing replayed');
	ok($node->log_contains(qr/processor "$proc" replica \d is active with token \d+ at cursor $c/,
			$log_offset), "(b) the new active took the gate at cursor $c");
	# The standby compares the state it loaded with the snapshot's hash
	# (the active publishes a hash only at its next snapshot).
	poll_ok($node,
		"SELECT s.hash_checks > 0 AND s.hash_mismatches = 0 AND s.state_hash = c.state_hash"
		  . " AND s.state_hash_cursor = $c FROM spool.processor_status s"
		  . " JOIN spool.processor_checkpoints c ON c.processor = s.processor"
		  . " WHERE s.processor = '$proc' AND s.role = 'standby'",
		"(b) the standby's loaded state to hash like the checkpoint's snapshot");
	produce(2000);
	wait_processed($node, $proc, $next_seq, '(b) after the restart');
	outputs_exact($node, $proc, $nparts, $next_seq, '(b) after the restart');
	hashes_agree($proc, '(b) after more input');
}

# ---------------------------------------------------------------------------
# (c) A non-deterministic handler: divergence is reported; outputs exact.
# ---------------------------------------------------------------------------
{
	my $log_offset = -s $node->logfile;
	sql(q{SELECT spool.create_processor('nd', 'test_handler(jsonb, spool.entries[])',
		jsonb_build_object('run_as', 'proc_owner', 'replicas', 2, 'batch_size', 100,
		'checkpoint_every', 50,
		'handler', jsonb_build_object('nondeterministic', true, 'partitions', }
		  . $nparts . ')))');
	sql(q{SELECT spool.start_processor('nd')});
	wait_gate($node, 'nd', 2);
	produce(500);
	poll_ok($node,
		"SELECT hash_mismatches > 0 AND last_error LIKE '%diverged%'"
		  . " FROM spool.processor_status WHERE processor = 'nd' AND role = 'standby'",
		"(c) nd's standby to report a state hash mismatch");
	note sql("SELECT replica || ': ' || role || ', checks ' || hash_checks || ', mismatches '"
		  . " || hash_mismatches || ', ' || coalesce(last_error, '')"
		  . " FROM spool.processor_status WHERE processor = 'nd'");
	ok($node->log_contains(
			qr/WARNING:  processor "nd" replica \d diverged from the active replica at cursor \d+/,
			$log_offset),
		'(c) the log has the divergence WARNING');
	wait_processed($node, 'nd', $next_seq, '(c)');
	outputs_exact($node, 'nd', $nparts, $next_seq, '(c) nd');
	is(sql("SELECT sum(errors) FROM spool.processor_status WHERE processor = 'nd'"),
		'0', '(c) the divergence is not a replica error');
	outputs_exact($node, $proc, $nparts, $next_seq, '(c) p');
	is(sql("SELECT sum(hash_mismatches) FROM spool.processor_status WHERE processor = '$proc'"),
		'0', '(c) p still has no mismatch');
}

# The only processes that died of a signal are the ones this test killed.
my @signals = slurp_file($node->logfile) =~ /^.*was terminated by signal (?!9:).*$/mg;
is(scalar(@signals), 0, 'no server process died of a signal other than our kill -9')
  or diag(join("\n", @signals));

$node->stop;
$kafka->stop;
done_testing();

# A stalled active replica (SIGSTOP) loses the output gate when its lease
# expires, and when it wakes up it commits nothing and becomes a standby
# (P-3, P-4, L-1, L-2).
#
# A processor with two replicas and lease_ttl 1 s folds topic st through
# the reference handler (one output per entry).  The active is stopped with
# SIGSTOP while a stream is being processed, at a moment of the round's
# kind (stop, look at pg_stat_activity, continue and try again if it is
# not the wanted moment):
#   (1) between batches: no transaction open, messages produced and not
#       yet committed;
#   (2) inside a batch transaction, before its fence (the batch is being
#       read or the handler runs): the transaction is open and has no
#       transaction id yet, so it holds no row lock.  A random stop may
#       also freeze it while it holds an LWLock (a page it reads, its
#       fast-path lock slots), which stalls whoever needs that next (the
#       promoter) and no lease can fence; if the new active's outputs do
#       not come and another process waits on an LWLock, the round is
#       skipped.
# In rounds (1) and (2):
#   - more messages are produced; the standby becomes active with a larger
#     token, no earlier than the stalled lease's expiry (by the database
#     clock: the new grant is at or after the old expires_at, and the
#     stall-to-takeover time is at least the lease time left at the stop)
#     and within lease_ttl + 10 s of the stop;
#   - more messages are produced and the new active's outputs for them
#     reach the outbox;
#   - the old active is continued: it becomes a standby again (same pid, no
#     restart), logs "is now a standby", and commits nothing: no output
#     with its token appears, and every outbox row after the new token's
#     first one has the new token or a later one;
#   - the outbox holds exactly the reference outputs of everything produced.
# The lower bound is the lease time left at the stop, not lease_ttl: the
# active renews every third of lease_ttl, so a lease has between 2/3
# lease_ttl and lease_ttl left when its holder stops, and a takeover that
# early is correct.
#
#   (3) inside a batch transaction, after its fence: the transaction holds
#       the lease row FOR KEY SHARE, and a new grant must wait for it (L-2;
#       the acquirer signals the holder, which cannot act on it while
#       stopped).  Whether the standby takes over while the active is
#       stopped is only noted.  Once continued, the stalled batch either
#       commits (before any new grant) or dies with its process; the
#       standby takes over with a larger token, and the outbox holds
#       exactly the reference outputs, tokens non-decreasing in id order.
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
my $ttl_s = 1;
my $max_extra_s = 10;     # generous bound on takeover beyond the lease
my $wait_secs = 60;

my $t_start = time;
my $kafka = SpoolKafka->start(topics => ["st:$nparts"]);
my $node = spool_node('processor_stall');
my $proc = processor_setup($node, $kafka->bootstrap, 'st',
	options => qq{{"batch_size": 50, "checkpoint_every": 200, "lease_ttl": "$ttl_s s"}});

my @stopped;    # processes to continue if the test dies half way
END { kill 'CONT', $_ for @stopped; }

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $next_seq = 0;

sub produce
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$kafka->produce_next('st', $_[0], 200, \$next_seq);
}

# A session for the stop attempts (a psql per attempt would be slow).
my $s = SpoolTest::Session->new($node, 'driver');

sub quiet
{
	my ($q) = @_;
	no warnings 'redefine';
	local *SpoolTest::Session::note = sub { };
	return $s->query_ok($q);
}

sub row
{
	my ($q) = @_;
	return split /\|/, sql($q), -1;
}

# Everything produced so far is committed and both replicas caught up.
sub all_committed
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	poll_within($node, $wait_secs,
		"SELECT c.committed_cursor = $next_seq AND s.next_cursor - 1 = $next_seq"
		  . " FROM spool.processor_checkpoints c, spool.spool_state s"
		  . " WHERE c.processor = '$proc'",
		"$what: the committed cursor to reach the spool's end ($next_seq)");
	poll_within($node, $wait_secs,
		"SELECT count(*) FILTER (WHERE role = 'active') = 1"
		  . " AND count(*) FILTER (WHERE role = 'standby') = 1"
		  . " AND bool_and(cursor = $next_seq)"
		  . " FROM spool.processor_status WHERE processor = '$proc'",
		"$what: one active and one standby, both at cursor $next_seq");
}

# Stop $pid, the active with lease token $token, at a moment $want accepts:
# up to $tries times, SIGSTOP, look at its pg_stat_activity row, and SIGCONT
# unless wanted.  Returns the time of the stop and the row (state, query,
# has xid, lease token, lease expiry, lease time left in seconds at the
# look, committed cursor, messages produced), or () if never wanted, or
# ('moved') if the lease no longer carries $token: on a loaded machine a
# stop that was not wanted can still last longer than the lease, and then
# the standby takes over before the wanted moment came.  Keeps a stream
# going meanwhile.
sub stop_when
{
	my ($pid, $want, $tries, $token) = @_;
	for my $try (1 .. $tries)
	{
		# Keep the active busy: more entries beyond its committed cursor.
		my ($backlog) = split /\|/, quiet(
			"SELECT s.next_cursor - 1 - c.committed_cursor"
			  . " FROM spool.processor_checkpoints c, spool.spool_state s"
			  . " WHERE c.processor = '$proc'");
		if ($backlog < 200)
		{
			my $ans = $kafka->produce('st', 1000, -1, 200, $next_seq);
			die "produce: $ans" unless $ans eq 'OK produced 1000';
			$next_seq += 1000;
		}
		usleep(int(rand(3_000)));
		die "could not stop $pid: $!" unless kill('STOP', $pid);
		push @stopped, $pid;
		my $t_stop = time;
		my @r = split /\|/, quiet(
			"SELECT a.state, a.query, a.backend_xid IS NOT NULL, l.token, l.expires_at,"
			  . " extract(epoch FROM l.expires_at - clock_timestamp()),"
			  . " c.committed_cursor, $next_seq"
			  . " FROM pg_stat_activity a, spool.leases l, spool.processor_checkpoints c"
			  . " WHERE a.pid = $pid AND l.resource = 'processor:$proc'"
			  . " AND c.processor = '$proc'"), -1;
		if (@r && $r[3] ne $token)
		{
			note("the lease moved to token $r[3] while $pid (token $token) was stopped"
				  . " for a look (attempt $try); continuing it");
			kill('CONT', $pid);
			@stopped = grep { $_ != $pid } @stopped;
			return ('moved');
		}
		if (@r && $want->(@r) && connects_now())
		{
			note("stopped $pid after $try attempt(s): state $r[0], query '$r[1]',"
				  . " xid: $r[2], lease token $r[3] expires $r[4] (in $r[5] s),"
				  . " committed $r[6] of $r[7] produced");
			return ($t_stop, @r);
		}
		kill('CONT', $pid);
		@stopped = grep { $_ != $pid } @stopped;
	}
	return ();
}

# Can a new session still connect?  A process stopped while it holds
# ProcArrayLock (inside GetSnapshotData, say) blocks every new connection and
# every snapshot until it continues: no takeover can be observed then, so
# such a stop is not a wanted moment.
sub connects_now
{
	my $timed_out = 0;
	$node->psql('postgres', 'SELECT 1', timeout => 5, timed_out => \$timed_out);
	return !$timed_out;
}

# The wanted moment of a stop never came: fail, or skip with $optional.
sub not_met
{
	my ($what, $pid, $optional) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	fail("$what: stop the active $pid at the wanted moment") unless $optional;
  SKIP:
	{
		skip("$what: the active $pid was never stopped at the wanted moment", 1)
		  if $optional;
	}
	return undef;
}

sub cont_pid
{
	my ($pid) = @_;
	ok(kill('CONT', $pid), "SIGCONT $pid");
	@stopped = grep { $_ != $pid } @stopped;
}

# One stall round; $want picks the moment of the stop.  With $optional, a
# round whose moment was never met is skipped rather than failed.
sub stall_round
{
	my ($what, $want, $optional) = @_;

	# Stop the active in the middle of a stream; if the lease moves to the
	# standby during the attempts, start again with the new active.
	my ($apid, $areplica, $atoken, $spid, $sreplica);
	my ($t_stop, $state, $query, $xid, $ltoken, $expires, $left);
	for my $pick (1 .. 5)
	{
		all_committed("$what: before");
		($apid, $areplica, $atoken) = row(
			"SELECT pid, replica, token FROM spool.processor_status"
			  . " WHERE processor = '$proc' AND role = 'active'");
		($spid, $sreplica) = row(
			"SELECT pid, replica FROM spool.processor_status"
			  . " WHERE processor = '$proc' AND role = 'standby'");
		note("$what: active pid $apid (replica $areplica, token $atoken),"
			  . " standby pid $spid (replica $sreplica)");
		($t_stop, $state, $query, $xid, $ltoken, $expires, $left) =
		  stop_when($apid, $want, 2000, $atoken);
		last unless defined $t_stop && $t_stop eq 'moved';
		undef $t_stop;
	}
	return not_met($what, $apid, $optional) unless defined $t_stop;
	pass("$what: the active $apid is stopped ($state, '$query', xid: $xid)");
	is($ltoken, $atoken, "$what: it holds the lease with token $atoken");
	my $old_outputs = sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"
		  . " AND token = $atoken");

	# More input while it is stopped; the standby takes over.
	produce(1000);
	my $t0 = time;
	my $new = '';
	while (time - $t0 < $ttl_s + $max_extra_s + 5)
	{
		$new = quiet("SELECT pid, token FROM spool.processor_status"
			  . " WHERE processor = '$proc' AND role = 'active' AND pid <> $apid");
		last if $new ne '';
		usleep(10_000);
	}
	my $stall = time - $t_stop;
	my ($npid, $ntoken) = split /\|/, $new;
	if ($new eq '')
	{
		fail("$what: another replica becomes active while $apid is stopped");
		diag(sql("SELECT * FROM spool.processor_status"));
		cont_pid($apid);
		return;
	}
	note(sprintf('%s: stall to takeover %.3f s (lease ttl %d s; the lease had %.3f s'
			  . ' left when the active was stopped)', $what, $stall, $ttl_s, $left));
	is($npid, $spid, "$what: the standby $spid is the new active");
	cmp_ok($ntoken, '>', $atoken, "$what: with a larger token ($ntoken > $atoken)");
	cmp_ok($stall, '>=', $left,
		sprintf('%s: not before the stalled lease expired (%.3f s >= %.3f s)',
			$what, $stall, $left));
	cmp_ok($stall, '<', $ttl_s + $max_extra_s,
		sprintf('%s: within lease_ttl + %d s of the stop (%.3f s)', $what, $max_extra_s, $stall));
	my ($granted_after, $lease_token) = row(
		"SELECT granted_at >= '$expires', token FROM spool.leases"
		  . " WHERE resource = 'processor:$proc'");
	is($granted_after, 't', "$what: the new token was granted at or after the old expiry");
	is($lease_token, $ntoken, "$what: the lease carries the new token");
	is(sql("SELECT gate_token FROM spool.processor_status WHERE processor = '$proc' LIMIT 1"),
		$ntoken, "$what: gate_token is the new token");

	# The new active's outputs reach the outbox, the old one still stopped.
	produce(1000);
	my $outputs_q = "SELECT count(*) = $next_seq FROM spool.outbox WHERE processor = '$proc'";
	my $t_out = time;
	usleep(200_000) while quiet($outputs_q) ne 't' && time - $t_out < $wait_secs;
	if (quiet($outputs_q) ne 't' && $optional)
	{
		# A stop at a random instruction can freeze the active while it holds
		# an LWLock (a page it reads, the lock manager's fast-path lock): then
		# whoever needs that next waits, e.g. the promoter.  No lease can fence
		# that, so such a round is no test of the takeover: it is skipped.
		my $lw = sql("SELECT string_agg(backend_type || ' on ' || wait_event, ', ')"
			  . " FROM pg_stat_activity WHERE wait_event_type = 'LWLock'");
		if ($lw ne '')
		{
			note("$what: $apid was stopped holding an LWLock (waiting: $lw); continuing it");
			cont_pid($apid);
			all_committed("$what: after the LWLock stall");
			return not_met($what, $apid, $optional);
		}
	}
	poll_within($node, 1, $outputs_q, "$what: outputs for all $next_seq entries while $apid is stopped")
	  or diag(sql("SELECT pid, backend_type, state, wait_event_type, wait_event, backend_xid, query"
			  . " FROM pg_stat_activity WHERE backend_type NOT IN ('client backend')"));
	is(sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"
		  . " AND token = $atoken"), $old_outputs,
		"$what: no output with the stalled token was added");
	my $first_new = sql("SELECT min(id) FROM spool.outbox WHERE processor = '$proc'"
		  . " AND token = $ntoken");
	like($first_new, qr/^\d+$/, "$what: the new active committed outputs (first id $first_new)");

	# Wake the old active: it becomes a standby, without restarting.
	my $log_offset = -s $node->logfile;
	cont_pid($apid);
	poll_within($node, $wait_secs,
		"SELECT EXISTS (SELECT 1 FROM spool.processor_status WHERE processor = '$proc'"
		  . " AND pid = $apid AND role = 'standby')"
		  . " OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $apid)",
		"$what: the old active $apid to be a standby again (or gone)");
	is( sql("SELECT role FROM spool.processor_status WHERE processor = '$proc'"
			  . " AND replica = $areplica"),
		'standby', "$what: replica $areplica is a standby");
	is( sql("SELECT pid FROM spool.processor_status WHERE processor = '$proc'"
			  . " AND replica = $areplica"),
		$apid, "$what: replica $areplica is still process $apid (it did not exit)");
	ok(kill(0, $apid), "$what: process $apid is alive");
	ok( $node->log_contains(
			qr/\[$apid\] .*processor "$proc" replica $areplica is now a standby/,
			$log_offset),
		"$what: $apid logged that it is now a standby");
	my ($why) = slurp_file($node->logfile, $log_offset)
	  =~ /\[$apid\] .*is now a standby: ([^\n]*)/;
	note("$what: $apid is now a standby: " . ($why // '(not logged)'));

	# Nothing of the old active committed after the new grant.
	produce(500);
	all_committed("$what: after");
	is(sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"
		  . " AND token = $atoken"), $old_outputs,
		"$what: still no output with the stalled token $atoken after it woke up");
	is( sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"
			  . " AND id > $first_new AND token < $ntoken"),
		'0', "$what: every output after the new token's first has token >= $ntoken");
	tokens_ordered($node, $proc, $what);
	outputs_exact($node, $proc, $nparts, $next_seq, $what);
	return $stall;
}

# Round (3): stopped after the fence.  Random stops rarely land in this short
# window (the outputs are inserted before the fence), so the active is held
# there with spool.test_worker_pause and stopped while it waits on its latch
# (holding no LWLock: a stop at a random instruction could freeze every
# backend that needs a lock the stopped process holds).  Only safety and the
# takeover after the continue are asserted; what happens while stopped is
# noted.
sub fenced_round
{
	my ($what) = @_;

	all_committed("$what: before");
	my ($apid, $areplica, $atoken) = row(
		"SELECT pid, replica, token FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND role = 'active'");
	my ($spid) = row("SELECT pid FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND role = 'standby'");
	sql("ALTER SYSTEM SET spool.test_worker_pause = '30s'; SELECT pg_reload_conf();");
	produce(200);
	my $t0 = time;
	my $held = '';
	while (time - $t0 < $wait_secs)
	{
		$held = quiet("SELECT state = 'active' AND query = 'processing'"
			  . " AND backend_xid IS NOT NULL AND wait_event_type = 'Extension'"
			  . " FROM pg_stat_activity WHERE pid = $apid");
		last if $held eq 't';
		usleep(5_000);
	}
	is($held, 't', "$what: the active $apid waits inside its fenced batch");
	die "could not stop $apid: $!" unless kill('STOP', $apid);
	push @stopped, $apid;
	my $t_stop = time;
	sql("ALTER SYSTEM RESET spool.test_worker_pause; SELECT pg_reload_conf();");
	pass("$what: the active $apid is stopped inside its fenced batch");
	produce(1000);

	# Watch for a while (lease_ttl + 2 x spool.lease_wait_timeout + 2 s).
	my $watch = $ttl_s + 4;
	my $new = '';
	while (time - $t_stop < $watch)
	{
		$new = quiet("SELECT pid, token FROM spool.processor_status"
			  . " WHERE processor = '$proc' AND role = 'active' AND pid <> $apid");
		last if $new ne '';
		usleep(50_000);
	}
	my ($gate, $lease) = row("SELECT c.token, l.token FROM spool.processor_checkpoints c,"
		  . " spool.leases l WHERE c.processor = '$proc' AND l.resource = 'processor:$proc'");
	note(sprintf('%s: while %d was stopped %.1f s: %s; gate token %d, lease token %d',
			$what, $apid, time - $t_stop,
			$new eq '' ? 'no other replica became active' : "active: $new",
			$gate, $lease));

	my $log_offset = -s $node->logfile;
	cont_pid($apid);
	poll_within($node, $wait_secs,
		"SELECT EXISTS (SELECT 1 FROM spool.processor_status WHERE processor = '$proc'"
		  . " AND role = 'active' AND pid <> $apid AND token > $atoken)",
		"$what: another replica to become active with a token > $atoken");
	my $stall = time - $t_stop;
	my ($npid, $ntoken) = row("SELECT pid, token FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND role = 'active'");
	# The standby, or the stopped replica's replacement if it catches up first:
	# both are ready once the stopped process is gone.
	isnt($npid, $apid, "$what: a replica other than the stopped $apid is the new active ($npid)");
	my $gone = !kill(0, $apid)
	  || sql("SELECT count(*) FROM pg_stat_activity WHERE pid = $apid") eq '0';
	my $log = slurp_file($node->logfile, $log_offset);
	my ($why) = $log =~ /\[$apid\] .*is now a standby: ([^\n]*)/;
	my ($fatal) = $log =~ /\[$apid\] [^\n]*FATAL:  ([^\n]*)/;
	note(sprintf('%s: stall to takeover %.3f s; old active %d %s%s', $what, $stall, $apid,
			$gone ? 'exited' : 'is alive',
			defined $why ? ", now a standby: $why"
			: defined $fatal ? ", FATAL: $fatal" : ''));

	produce(500);
	all_committed("$what: after");
	my $first_new = sql("SELECT min(id) FROM spool.outbox WHERE processor = '$proc'"
		  . " AND token = $ntoken");
	like($first_new, qr/^\d+$/, "$what: the new active committed outputs (first id $first_new)");
	is( sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"
			  . " AND id > $first_new AND token < $ntoken"),
		'0', "$what: every output after the new token's first has token >= $ntoken");
	tokens_ordered($node, $proc, $what);
	outputs_exact($node, $proc, $nparts, $next_seq, $what);
	return $stall;
}

wait_gate($node, $proc, 2, 'the processor to run with one active and one standby');
produce(1000);
all_committed('warm-up');

my @stalls;
push @stalls, stall_round('(1) stopped between batches',
	sub {
		my ($state, $query, $xid, $lt, $le, $left, $committed, $produced) = @_;
		return $state eq 'idle' && $xid eq 'f' && $committed < $produced;
	});
push @stalls, stall_round('(2) stopped inside a batch, before the fence',
	sub {
		my ($state, $query, $xid) = @_;
		return $state eq 'active' && $query eq 'processing' && $xid eq 'f';
	},
	1);

push @stalls, fenced_round('(3) stopped inside a batch, after the fence');

my $rounds = grep { defined } @stalls;
cmp_ok(sql("SELECT sum(takeovers) FROM spool.processor_status WHERE processor = '$proc'"),
	'>=', $rounds, "processor_status counts the $rounds takeovers");
is( sql("SELECT count(*) FROM spool.processor_status WHERE processor = '$proc'"
		  . " AND hash_mismatches > 0"),
	'0', 'no replica saw a state hash mismatch');
note(sprintf('stall to takeover: %s s (lease_ttl %d s); total test time %.1f s',
		join(', ', map { defined $_ ? sprintf('%.3f', $_) : 'n/a' } @stalls),
		$ttl_s, time - $t_start));

$s->quit;
$node->stop;
$kafka->stop;
done_testing();

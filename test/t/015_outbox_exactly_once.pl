# Exactly-once delivery to a sql target and to a notify target while
# dispatchers are terminated and the server crashes (docs/outbox.md,
# Guarantees), and the close-path flush.
#
# Targets st (sql, 2 shards) and nt (notify on channel spool_nt, 2 shards),
# both with small batches.  Three writer sessions enqueue to both in many
# small transactions: some commit, some roll back, some stay open while
# another writer commits (late commits of smaller ids).  A listener session
# counts every notification.
#   (a) ~14 rounds of pg_terminate_backend of a random dispatcher at random
#       moments; then every committed id is delivered once, to both targets.
#   (b) a server crash: with spool.test_worker_pause a dispatcher of each
#       target waits inside its delivering transaction, after its function
#       calls / pg_notify and before commit; the listener has received every
#       notification committed so far; the notify dispatcher is killed with
#       SIGKILL.  A writer transaction open at the crash never commits.  A
#       new listener connects before any delivery commits again.
#   (c) more rounds with terminations (>= 20 in all).
# At the end, for each target:
#   - every committed id delivered exactly once (for notify: over the union
#     of both listeners), none of a rolled-back (or crashed) transaction;
#   - per key, delivery order is outbox id order;
#   - the delivered key and payload are the enqueued ones.
# (d) close path: a target with batch_interval '1 min' and batch_size 10000
#     holds rows in a batch; pg_terminate_backend of its dispatcher makes
#     that dispatcher deliver them (recorded pid) before it exits, and
#     flushes_close counts it; likewise a clean fast shutdown: right after
#     the restart the rows are delivered, by the old dispatcher's pid.
#     With a delivery that hangs (target hg): SIGTERM to the pid and then
#     to the process group, as the postmaster sends, and a third, do not
#     interrupt the close flush; spool.outbox_close_timeout (2 s) does, and
#     nothing of that batch is marked; the next dispatcher delivers it once.
# (e) alter_target of hg's batch_interval from 1 min to 10 ms: its worker
#     delivers the batch it holds and restarts; new rows arrive by interval.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolOutbox.pm
use SpoolTest;
use SpoolOutbox;
use JSON::PP;
use Test::More;
use Time::HiRes qw(time usleep);

my $t_start = time;
my $want_terms = 20;
my $nkeys = 8;
my $pause_ms = 5000;    # spool.test_worker_pause around the crash

# The test framework turns restart_after_crash off; (b) needs it.
my $node = spool_node('outbox_exactly_once', restart_after_crash => 'on');
sub sql { return $node->safe_psql('postgres', $_[0]); }

# A millisecond per call keeps st's delivering transactions open long
# enough for some terminations to land inside them.
sql_target($node, 'st',
	'{"shards": 2, "batch_size": 20, "batch_interval": "5ms"}',
	pre => 'PERFORM pg_sleep(0.001);');
sql(q{SELECT spool.create_target('nt', 'notify',
	'{"channel": "spool_nt", "shards": 2, "batch_size": 20, "batch_interval": "5ms"}')});
wait_dispatchers($node, 'st', 2);
wait_dispatchers($node, 'nt', 2);

my %committed = (st => [], nt => []);    # ids of committed rows, per target
my @never;                               # ids whose transaction rolled back
my @lost;       # payload "u" of rows whose transaction the crash ended
my $u = 0;      # every row's payload has a unique "u"
my ($terms, $terms_in_xact, $rounds) = (0, 0, 0);
my (@writers, $driver);
my @listeners;

sub connect_sessions
{
	@writers = map { { s => SpoolTest::Session->new($node, "writer$_"), open => 0, ids => [] } }
	  (1 .. 3);
	$driver = SpoolTest::Session->new($node, 'driver');
	push @listeners, SpoolOutbox::Listener->new($node, 'spool_nt', 'listener' . (@listeners + 1));
}

sub q_ok
{
	my ($s, $sql) = @_;
	my ($out, $state, $err) = quiet_query($s, $sql);
	die "[$s->{name}] $sql failed ($state): $err" unless $state eq '00000';
	return $out;
}

# Enqueue $n rows (random target and key) in the writer's transaction.
sub enqueue_rows
{
	my ($w, $n) = @_;
	my @v = map {
		my $t = rand() < 0.5 ? 'st' : 'nt';
		my $k = 'k' . int(rand($nkeys));
		$u++;
		"('$t', '$k', '{\"r\": $rounds, \"i\": $_, \"u\": $u}')"
	} 1 .. $n;
	my $out = q_ok($w->{s},
		"SELECT t || ':' || spool.enqueue(t, k, p::jsonb) || ':' || (p::jsonb->>'u')"
		  . ' FROM (VALUES ' . join(', ', @v) . ') v(t, k, p)');
	push @{ $w->{ids} }, [ split /:/ ] for split /\n/, $out;
}

sub finish_xact
{
	my ($w, $commit) = @_;
	q_ok($w->{s}, $commit ? 'COMMIT' : 'ROLLBACK');
	for (@{ $w->{ids} })
	{
		if ($commit) { push @{ $committed{ $_->[0] } }, $_->[1]; }
		else { push @never, $_->[1]; }
	}
	$w->{ids} = [];
	$w->{open} = 0;
}

sub poll_listeners { $_->poll for grep { $_->alive } @listeners; }

# Terminate a random dispatcher of st or nt; the statement also says
# whether it was inside a transaction.
sub terminate_one
{
	usleep(int(rand(20_000)));
	my $row = q_ok($driver,
		"SELECT pid, backend_type, backend_xid IS NOT NULL, pg_terminate_backend(pid)"
		  . " FROM pg_stat_activity WHERE pid = (SELECT pid FROM pg_stat_activity"
		  . " WHERE application_name LIKE 'spool dispatch st/%'"
		  . " OR application_name LIKE 'spool dispatch nt/%' ORDER BY random() LIMIT 1)");
	return unless $row ne '';
	my ($pid, $type, $inx, $ok) = split /\|/, $row;
	return unless $ok eq 't';
	$terms++;
	$terms_in_xact++ if $inx eq 't';
	note("round $rounds: terminated $type (pid $pid)" . ($inx eq 't' ? ', inside a transaction' : ''));
}

# One round: a writer enqueues, then commits, rolls back or keeps its
# transaction open; sometimes a dispatcher is terminated.
sub round
{
	$rounds++;
	my $w = $writers[ int(rand(@writers)) ];
	if (!$w->{open})
	{
		q_ok($w->{s}, 'BEGIN');
		$w->{open} = 1;
	}
	enqueue_rows($w, 1 + int(rand(6)));
	my $x = rand();
	if ($x < 0.6) { finish_xact($w, 1); }
	elsif ($x < 0.8) { finish_xact($w, 0); }
	# else: left open, finished by a later round of this writer
	terminate_one() if rand() < 0.5;
	poll_listeners();
}

sub finish_all
{
	finish_xact($_, 1) for grep { $_->{open} } @writers;
}

sub wait_delivered
{
	my ($what) = @_;
	my $n = scalar(@{ $committed{st} });
	poll_within($node, 60,
		"SELECT count(DISTINCT outbox_id) >= $n FROM delivered",
		"$what: the $n committed rows of st to be delivered");
	# The listeners together (a dead one keeps what it got).
	my $t0 = time;
	my @missing;
	while (1)
	{
		poll_listeners();
		my %have = map { $_ => 1 } all_nt_ids();
		@missing = grep { !$have{$_} } @{ $committed{nt} };
		last if !@missing || time - $t0 > 60;
		usleep(20_000);
	}
	is(scalar(@missing), 0,
		sprintf('%s: waited for the listeners to receive the notifications of the %d committed'
			  . ' rows of nt (%.1fs)', $what, scalar(@{ $committed{nt} }), time - $t0))
	  or diag('missing: ' . join(' ', @missing[ 0 .. ($#missing < 19 ? $#missing : 19) ]));
}

sub all_nt_ids { return map { $_->ids } @listeners; }

# ---------------------------------------------------------------------------
# (a) Terminations while writers enqueue.
# ---------------------------------------------------------------------------
connect_sessions();
while (($terms < 14 || $rounds < 60) && $rounds < 400)
{
	round();
}
finish_all();
note("(a) $rounds rounds, $terms terminations ($terms_in_xact inside a transaction)");
cmp_ok($terms, '>=', 14, "(a) $terms dispatcher terminations");
wait_delivered('(a)');
exactly_once_ok([ split /\n/, sql('SELECT outbox_id FROM delivered') ],
	$committed{st}, \@never, '(a) sql target');
exactly_once_ok([ all_nt_ids() ], $committed{nt}, \@never, '(a) notify target');
wait_dispatchers($node, 'st', 2);
wait_dispatchers($node, 'nt', 2);

# ---------------------------------------------------------------------------
# (b) kill -9 of the notify dispatcher inside its delivering transaction.
# ---------------------------------------------------------------------------
sql("ALTER SYSTEM SET spool.test_worker_pause = $pause_ms; SELECT pg_reload_conf();");
my $paused_q =
    "SELECT pid, split_part(split_part(application_name, ' ', 3), '/', 1) FROM pg_stat_activity"
  . " WHERE (application_name LIKE 'spool dispatch st/%' OR application_name LIKE 'spool dispatch nt/%')"
  . " AND backend_xid IS NOT NULL AND wait_event_type = 'Extension'";
my %paused;
{
	# Enqueue committed rows to both targets until a dispatcher of each
	# waits inside its delivering transaction (a dispatcher that had not
	# reloaded its configuration yet delivers without the pause).
	my $t0 = time;
	my $last_enqueue = 0;
	while (time - $t0 < 30)
	{
		%paused = reverse map { split /\|/ } split /\n/, q_ok($driver, $paused_q);
		last if $paused{st} && $paused{nt};
		if (time - $last_enqueue > 1)
		{
			my $w = $writers[0];
			q_ok($w->{s}, 'BEGIN');
			$rounds++;
			enqueue_rows($w, 8);
			finish_xact($w, 1);
			$last_enqueue = time;
		}
		poll_listeners();
		usleep(20_000);
	}
}
ok($paused{st} && $paused{nt},
	'(b) a dispatcher of st and one of nt wait inside their delivering transactions')
  or diag(sql("SELECT pid, backend_type, state, wait_event_type, wait_event, backend_xid, query"
		  . " FROM pg_stat_activity WHERE application_name LIKE 'spool dispatch %'"));
# A writer transaction open at the crash: its rows never commit.
{
	my $w = $writers[1];
	q_ok($w->{s}, 'BEGIN') unless $w->{open};
	$w->{open} = 1;
	enqueue_rows($w, 6);
}
# The listener holds every notification committed so far.
my @nt_before = split /\n/,
  q_ok($driver, "SELECT id FROM spool.outbox WHERE target = 'nt' AND delivered ORDER BY id");
ok($listeners[-1]->wait_ids(\@nt_before, 30),
	'(b) before the crash, the listener received all ' . scalar(@nt_before)
	  . ' notifications committed so far');
my $victim = $paused{nt} // 0;
BAIL_OUT('no paused notify dispatcher to kill') unless $victim =~ /^[1-9][0-9]*$/;
my $log_offset = -s $node->logfile;
ok(kill('KILL', $victim), "(b) kill -9 the notify dispatcher $victim inside its delivering transaction");
crash_restart_ok($node, $victim, $log_offset, '(b)');

# The old sessions are gone.  The rows of the open writer transaction never
# commit; their ids may be handed out again (a sequence's advance in a
# transaction that did not commit may be lost in a crash), so they are
# recognised by their payloads' "u".  The old listener keeps what it
# received.
poll_listeners();
ok(!$listeners[-1]->alive, '(b) the first listener lost its connection');
for my $w (@writers)
{
	push @lost, map { $_->[2] } @{ $w->{ids} };
	$w->{s}->quit;
}
cmp_ok(scalar(@lost), '>', 0, '(b) ' . scalar(@lost) . ' rows were in a transaction the crash ended');
$driver->quit;
connect_sessions();
# No notify delivery has committed since the crash (the restarted
# dispatchers wait $pause_ms inside their first delivery), so the new
# listener misses none.
is(sql("SELECT count(*) FROM spool.outbox WHERE target = 'nt' AND delivered"),
	scalar(@nt_before),
	'(b) no notify delivery committed between the crash and the new LISTEN'
	  . ' (the notifications of the killed transaction were not sent)');
sql('ALTER SYSTEM RESET spool.test_worker_pause; SELECT pg_reload_conf();');
finish_all();
wait_delivered('(b)');
exactly_once_ok([ split /\n/, sql('SELECT outbox_id FROM delivered') ],
	$committed{st}, \@never, '(b) sql target after the crash');
exactly_once_ok([ all_nt_ids() ], $committed{nt}, \@never,
	'(b) notify target after the crash, both listeners');

# ---------------------------------------------------------------------------
# (c) More terminations.
# ---------------------------------------------------------------------------
wait_dispatchers($node, 'st', 2);
wait_dispatchers($node, 'nt', 2);
my $r0 = $rounds;
while (($terms < $want_terms || $rounds < $r0 + 30) && $rounds < $r0 + 400)
{
	round();
}
finish_all();
cmp_ok($terms, '>=', $want_terms,
	"$terms dispatcher terminations in all ($terms_in_xact inside a transaction)");
wait_delivered('(c)');

my @st_got = split /\n/, sql('SELECT outbox_id FROM delivered');
exactly_once_ok(\@st_got, $committed{st}, \@never, 'sql target, at the end');
exactly_once_ok([ all_nt_ids() ], $committed{nt}, \@never,
	'notify target, at the end, both listeners');
{
	my %lost = map { $_ => 1 } @lost;
	my $lost_sql = join(',', @lost);
	is(sql("SELECT count(*) FROM delivered WHERE (payload->>'u')::int IN ($lost_sql)"),
		'0', 'sql target: no row of the transaction the crash ended was delivered');
	is(scalar(grep { ref $_->{payload} eq 'HASH' && $lost{ $_->{payload}{u} // '' } }
			  map { @{ $_->got } } @listeners),
		0, 'notify target: no row of the transaction the crash ended was delivered');
}
per_key_order_ok(delivered_rows($node, 'delivered'), 'sql target');
for my $l (@listeners)
{
	per_key_order_ok([ map { [ $_->{key} // '<NULL>', $_->{id} ] } @{ $l->got } ],
		"notify target, $l->{s}{name}");
}
is( sql("SELECT count(*) FROM delivered d JOIN spool.outbox o ON o.id = d.outbox_id"
		  . " WHERE o.target <> 'st' OR d.key IS DISTINCT FROM o.key OR d.payload <> o.payload"),
	'0', 'sql target: each call got the key and payload of its outbox row');
{
	my $js = JSON::PP->new->canonical;
	my %ref = map { my ($id, $k, $p) = split /\|/, $_, 3; ($id => [ $k, $p ]) } split /\n/,
	  sql("SELECT id, coalesce(key, ''), payload FROM spool.outbox WHERE target = 'nt'");
	my @bad;
	for my $n (map { @{ $_->got } } @listeners)
	{
		my $r = $ref{ $n->{id} };
		push @bad, $n->{json}
		  unless $r && ($n->{key} // '') eq $r->[0]
		  && $js->encode($n->{payload}) eq $js->encode(decode_json($r->[1]));
	}
	is(scalar(@bad), 0, 'notify target: each notification carries its row\'s key and payload')
	  or diag(join("\n", @bad[ 0 .. ($#bad < 4 ? $#bad : 4) ]));
	is(scalar(map { $_->unparsed } @listeners), 0,
		'every notification on spool_nt is {"id": ..., "key": ..., "payload": ...} JSON')
	  or diag(join("\n", map { $_->unparsed } @listeners));
}
note(sprintf('sql: %d rows; notify: %d rows (%d + %d received by the two listeners);'
		  . ' %d rolled back, %d ended by the crash',
		scalar(@{ $committed{st} }), scalar(@{ $committed{nt} }),
		scalar($listeners[0]->ids), scalar($listeners[-1]->ids), scalar(@never), scalar(@lost)));
$_->quit for @listeners;
$_->{s}->quit for @writers;
$driver->quit;

# ---------------------------------------------------------------------------
# (d) Close path: a dispatcher that is stopped flushes the batch it holds.
# ---------------------------------------------------------------------------
sql_target($node, 'ct', '{"batch_size": 10000, "batch_interval": "1 min"}',
	table => 'delivered_ct');
wait_dispatchers($node, 'ct', 1);

# Enqueue $n rows to $target and wait until its dispatcher holds them in a
# batch (read, not delivered: the interval flush is a minute away).
# Returns the dispatcher's pid and the ids.
sub hold_rows
{
	my ($target, $table, $n, $what) = @_;
	my $pid = dispatcher_pids($node, $target)->{0};
	my @ids = split /\n/, sql("SELECT spool.enqueue('$target', 'c' || (i % 3), jsonb_build_object('i', i))"
		  . " FROM generate_series(1, $n) i");
	my $last = $ids[-1];
	# A dispatcher that read rows into its batch is 'delivering' until it
	# flushes them (and 'idle' before).
	poll_within($node, 30,
		"SELECT state = 'delivering' FROM spool.outbox_status WHERE target = '$target' AND shard = 0",
		"$what: the $target dispatcher $pid to hold the $n rows in its batch");
	is(sql("SELECT count(*) FROM $table WHERE outbox_id BETWEEN $ids[0] AND $last"),
		'0', "$what: the rows are held in the batch, not delivered");
	return ($pid, @ids);
}

# "distinct ids, rows, rows by $pid" delivered to $table among the ids.
sub delivered_by
{
	my ($table, $pid, @ids) = @_;
	return sql("SELECT count(DISTINCT outbox_id) || ' ' || count(*) || ' ' || count(*) FILTER (WHERE pid = $pid)"
		  . " FROM $table WHERE outbox_id BETWEEN $ids[0] AND $ids[-1]");
}

my ($cpid, @cids) = hold_rows('ct', 'delivered_ct', 50, '(d) terminate');
my $close0 = status_sum($node, 'ct', 'flushes_close');
ok(sql("SELECT pg_terminate_backend($cpid)") eq 't', "(d) pg_terminate_backend($cpid) of the ct dispatcher");
wait_pid_gone($node, $cpid, '(d) the ct dispatcher');
is(delivered_by('delivered_ct', $cpid, @cids), '50 50 50',
	'(d) once it exited, the terminated dispatcher had delivered its 50 held rows itself, once each');
cmp_ok(status_sum($node, 'ct', 'flushes_close'), '>', $close0, '(d) flushes_close counts the close flush');
is(status_sum($node, 'ct', 'flushes_interval'), '0', '(d) no interval flush happened');

# A delivery that hangs (target hg: its function waits while hang_switch is
# on).  The postmaster signals a child twice at once (its pid, then its
# process group); repeated SIGTERMs must not cut the close flush short, and
# spool.outbox_close_timeout bounds it.  A dispatcher takes a new value of
# the setting when it starts after the reload (checked from a new session).
sub set_close_timeout
{
	my ($value) = @_;
	sql("ALTER SYSTEM SET spool.outbox_close_timeout = '$value'; SELECT pg_reload_conf();");
	poll_ok($node, "SELECT current_setting('spool.outbox_close_timeout') = '$value'",
		"spool.outbox_close_timeout to be $value");
}
set_close_timeout('5min');
sql(q{CREATE TABLE hang_switch (hang bool NOT NULL); INSERT INTO hang_switch VALUES (true);
	DO $$ BEGIN CREATE ROLE deliverer; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
	GRANT SELECT ON hang_switch TO deliverer;});
sql_target($node, 'hg', '{"batch_size": 10000, "batch_interval": "1 min"}',
	table => 'delivered_hg',
	pre => 'WHILE (SELECT hang FROM public.hang_switch) LOOP PERFORM pg_sleep(0.05); END LOOP;');
wait_dispatchers($node, 'hg', 1);
my $in_hang = sub {
	my ($pid) = @_;
	return "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $pid AND wait_event = 'PgSleep'";
};

# The second signal is sent once the first was handled (the worker hangs
# in its close flush); a third comes from pg_terminate_backend.
my ($hpid, @hids) = hold_rows('hg', 'delivered_hg', 20, '(d) hang, repeated SIGTERMs');
ok(kill('TERM', $hpid), "(d) SIGTERM to the hg dispatcher $hpid");
poll_ok($node, $in_hang->($hpid), "(d) the hg dispatcher $hpid to hang in its close flush");
ok(kill('TERM', -$hpid), "(d) SIGTERM to its process group, as the postmaster sends");
ok(sql("SELECT pg_terminate_backend($hpid)") eq 't', "(d) and pg_terminate_backend($hpid)");
usleep(500_000);
is(sql("SELECT count(*) FROM pg_stat_activity WHERE pid = $hpid"), '1', '(d) half a second later it still runs');
is(delivered_by('delivered_hg', $hpid, @hids), '0 0 0', '(d) and has delivered nothing yet');
sql('UPDATE hang_switch SET hang = false');
wait_pid_gone($node, $hpid, '(d) the hg dispatcher');
is(delivered_by('delivered_hg', $hpid, @hids), '20 20 20',
	'(d) repeated SIGTERMs did not interrupt the close flush: all 20 held rows delivered by it');

# A 2 s close timeout: the hung close flush is cut, nothing of it marked.
set_close_timeout('2s');
wait_dispatchers($node, 'hg', 1);
$hpid = dispatcher_pids($node, 'hg')->{0};
ok(sql("SELECT pg_terminate_backend($hpid)") eq 't', "(d) restart the hg dispatcher $hpid (it holds nothing)");
wait_pid_gone($node, $hpid, '(d) the idle hg dispatcher');
sql('UPDATE hang_switch SET hang = true');
wait_dispatchers($node, 'hg', 1);
($hpid, @hids) = hold_rows('hg', 'delivered_hg', 20, '(d) hang, close timeout');
ok(sql("SELECT pg_terminate_backend($hpid)") eq 't', "(d) pg_terminate_backend($hpid) of the hg dispatcher");
wait_pid_gone($node, $hpid, '(d) the hung hg dispatcher, after its close timeout');
is(delivered_by('delivered_hg', $hpid, @hids), '0 0 0',
	'(d) the close timeout ended the hung close flush: nothing delivered, nothing marked');
like(sql("SELECT last_error FROM spool.outbox_status WHERE target = 'hg' AND shard = 0"),
	qr/stopping took longer than spool\.outbox_close_timeout \(2000 ms\); the 20 rows held/,
	'(d) outbox_status says why');
sql('UPDATE hang_switch SET hang = false');
sql("ALTER SYSTEM RESET spool.outbox_close_timeout; SELECT pg_reload_conf();");
wait_dispatchers($node, 'hg', 1);
my $hpid2 = dispatcher_pids($node, 'hg')->{0};
poll_within($node, 30,
	"SELECT state = 'delivering' FROM spool.outbox_status WHERE target = 'hg' AND shard = 0",
	"(d) the next hg dispatcher $hpid2 to hold the 20 rows again");
ok(sql("SELECT pg_terminate_backend($hpid2)") eq 't', "(d) pg_terminate_backend($hpid2)");
wait_pid_gone($node, $hpid2, '(d) the next hg dispatcher');
is(delivered_by('delivered_hg', $hpid2, @hids), '20 20 20',
	'(d) the next dispatcher delivered the 20 rows once each');
per_key_order_ok(delivered_rows($node, 'delivered_hg'), '(d) hang');

# (e) alter_target: the workers of hg restart with the new options, and the
# batch the old worker held is delivered by it as it goes (close), once.
wait_dispatchers($node, 'hg', 1);
my ($apid, @aids) = hold_rows('hg', 'delivered_hg', 10, '(e) alter_target');
sql(q{SELECT spool.alter_target('hg', '{"batch_interval": "10ms"}')});
is(sql("SELECT options->>'batch_interval' FROM spool.targets WHERE name = 'hg'"), '10 ms',
	'(e) the new batch_interval is stored');
wait_pid_gone($node, $apid, '(e) the hg dispatcher, restarted for the new options');
is(delivered_by('delivered_hg', $apid, @aids), '10 10 10',
	'(e) the rows it held were delivered by it before it exited, once each');
wait_dispatchers($node, 'hg', 1);
my $interval0 = status_sum($node, 'hg', 'flushes_interval');
my @bids = split /\n/, sql("SELECT spool.enqueue('hg', 'c1', jsonb_build_object('i', i)) FROM generate_series(1, 5) i");
poll_within($node, 30,
	"SELECT count(*) = 5 FROM delivered_hg WHERE outbox_id BETWEEN $bids[0] AND $bids[-1]",
	'(e) new rows delivered within 30 s: the 10 ms interval applies (it was a minute)');
cmp_ok(status_sum($node, 'hg', 'flushes_interval'), '>', $interval0, '(e) by an interval flush');
per_key_order_ok(delivered_rows($node, 'delivered_hg'), '(e) alter_target');

wait_dispatchers($node, 'ct', 1);
my ($spid, @sids) = hold_rows('ct', 'delivered_ct', 30, '(d) fast shutdown');
$node->stop('fast');
$node->start;
is(delivered_by('delivered_ct', $spid, @sids), '30 30 30',
	'(d) right after a clean fast shutdown and restart, the 30 held rows were delivered once each,'
	  . " by the stopped dispatcher $spid");
per_key_order_ok(delivered_rows($node, 'delivered_ct'), '(d) close path');

note(sprintf('total test time %.1fs', time - $t_start));
$node->stop;
done_testing();


# The kafka target (docs/outbox.md, Guarantees: at least once), read back
# from the test cluster with SpoolKafka's consume_all.
#
# Target out: kafka, 2 shards, batch_size 500, topic out with 4 partitions
# on a 3-broker mock cluster, message.timeout.ms 3000.  The test records
# every enqueued row (id, key, payload) in the table sent; after each phase
# the whole topic is read back and checked against it (check_topic):
#   - every message carries exactly one spool-outbox-id header, in decimal,
#     naming an enqueued id; every enqueued id is in the topic;
#   - every copy of an id has the enqueued key (bytes; NULL = no key) and
#     payload (JSON text, compared as JSON), and a spool-barrier: true
#     header exactly when the row is a barrier;
#   - per key (NULL excepted: the partitioner spreads keyless messages), all
#     messages are in one partition, and keeping the highest id seen per key
#     (the consumer deduplication the contract suggests) yields every id of
#     the key once, in increasing order: a copy is either a new highest id or
#     a repeat of an id already seen;
#   - copies added during the phase: none for phases without failures; for
#     the outage only of ids above their shard's position before the
#     outage; for the crash exactly the batches in flight (see (c)).
# (a) 4 pgbench clients x 500 transactions of 1-19 rows on 50 keys (one
#     NULL, some with spaces, tabs, backslashes, non-ASCII); meanwhile a
#     session holds a transaction that enqueued the smallest id: nothing is
#     delivered while it is open (the topic stays empty, the backlog is every
#     committed row); after its commit: no duplicates, backlog and waiting 0,
#     every shard idle without error, delivered per shard equals the rows of
#     the shard, each position covers its shard's ids, batch_max <=
#     batch_size, a key maps to one shard.
# (b) All brokers down while pgbench enqueues (enqueueing goes on): every
#     shard reports an error after the outage began, a shard shows state
#     'error' with last_error, positions stay put across a further failed
#     attempt while the backlog stays > 0; brokers up: everything arrives,
#     no shard stays in 'error'; duplicates are counted.
# (b2) Every broker response delayed beyond message.timeout.ms while 2000
#     rows are delivered: a shard reports the failure; responses on time
#     again: everything arrives, copies only of ids above the positions
#     before the delay (counted: the broker kept the timed-out messages).
# (c) spool.test_worker_pause holds every dispatcher with rows inside its
#     delivering transaction, after the broker acknowledged the batch (its
#     messages are in the topic, above the committed position) and before
#     the commit (later batches of the pipeline, at most 3 in all, may be
#     acknowledged too); kill -9 one dispatcher (server crash and restart).  After
#     recovery the acknowledged batches are delivered again, and those are
#     the only copies added; delivered since the restart equals the rows
#     above the positions at the crash.
# (d) A barrier between two groups of rows (acks slowed by 30 ms): one
#     message with spool-barrier: true and its id, no key; in its partition
#     after every earlier id and before every later one; its timestamp is not
#     before any earlier row's nor after any later row's; shard 0 counts it
#     in barriers.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm, SpoolOutbox.pm
use SpoolTest;
use SpoolKafka;
use SpoolOutbox;
use JSON::PP;
use List::Util qw(min sum0);
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $nparts = 4;
my $nshards = 2;
my $batch_size = 500;
my $wait_s = 60;

my $kafka = SpoolKafka->start(brokers => 3, topics => ["out:$nparts"]);
# The test framework turns restart_after_crash off; (c) needs it.
my $node = spool_node('outbox_kafka', restart_after_crash => 'on');
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE TABLE keys (n int PRIMARY KEY, k text);
INSERT INTO keys
SELECT n, CASE n WHEN 0 THEN NULL
				 WHEN 1 THEN 'key 1 é'
				 WHEN 2 THEN E'tab\tkey'
				 WHEN 3 THEN 'ключ'
				 WHEN 4 THEN E'back\\slash,comma=eq'
				 ELSE 'key' || n END
  FROM generate_series(0, 49) n;
CREATE TABLE sent (
	id bigint PRIMARY KEY,
	phase text NOT NULL,
	key text,
	payload jsonb NOT NULL,
	barrier boolean NOT NULL DEFAULT false,
	shard int);
});

my $bootstrap = $kafka->bootstrap;
sql(qq{SELECT spool.create_target('out', 'kafka', '{"brokers": "$bootstrap", "topic": "out",
	"shards": $nshards, "batch_size": $batch_size, "retry_backoff_max": "2s",
	"kafka": {"message.timeout.ms": 3000, "reconnect.backoff.max.ms": 1000}}')});
wait_dispatchers($node, 'out', $nshards);

# pgbench: one transaction enqueues 1-19 rows on consecutive keys.
sub pgbench_script
{
	my ($phase) = @_;
	return <<"EOS";
\\set k random(0, 49)
\\set n random(1, 19)
INSERT INTO sent (id, phase, key, payload)
SELECT spool.enqueue('out', x.k, x.p), '$phase', x.k, x.p
  FROM (SELECT k.k, jsonb_build_object('phase', '$phase', 'client', :client_id, 'g', g, 'k', k.k,
				 'note', E'tab\\t "q" \\u00e9 back\\\\slash') AS p
		  FROM generate_series(1, :n) g JOIN keys k ON k.n = (:k + g) % 50
		 ORDER BY g) x;
EOS
}

# SQL: one statement enqueueing $n rows on keys $from .. $to.
sub enqueue_sql
{
	my ($phase, $n, $from, $to) = @_;
	my $nk = $to - $from + 1;
	return qq{INSERT INTO sent (id, phase, key, payload)
SELECT spool.enqueue('out', x.k, x.p), '$phase', x.k, x.p
  FROM (SELECT k.k, jsonb_build_object('phase', '$phase', 'g', g, 'k', k.k) AS p
		  FROM generate_series(1, $n) g JOIN keys k ON k.n = $from + g % $nk
		 ORDER BY g) x;};
}

# Each row's shard, from spool.outbox, while its slot is not rotated away
# (every id of this test is in slot 0, which is never truncated while ids
# are taken from it).
sub record_shards
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	sql(q{UPDATE sent s SET shard = o.shard FROM spool.outbox o
		   WHERE o.target = 'out' AND o.id = s.id AND s.shard IS NULL});
	is(sql('SELECT count(*) FROM sent WHERE shard IS NULL'), '0',
		"$what: every enqueued row is in spool.outbox with its shard");
}

# { id => { phase, shard, barrier, key (bytes or undef), payload (text) } }
sub load_sent
{
	my %s;
	for my $l (split /\n/, sql(q{SELECT id, phase, coalesce(shard, -2), barrier, key IS NULL,
			encode(convert_to(coalesce(key, ''), pg_catalog.getdatabaseencoding()), 'hex'),
			payload::text FROM sent}))
	{
		my ($id, $phase, $shard, $barrier, $nokey, $hex, $payload) = split /\|/, $l, 7;
		$s{$id} = {
			phase => $phase,
			shard => $shard,
			barrier => $barrier eq 't',
			key => $nokey eq 't' ? undef : pack('H*', $hex),
			payload => $payload
		};
	}
	return \%s;
}

# { shard => committed position } (barriers, shard -1, belong to shard 0).
sub positions
{
	my %p = map { split /\|/ } split /\n/,
	  sql("SELECT shard, coalesce(position, 0) FROM spool.outbox_status WHERE target = 'out'");
	return \%p;
}

sub shard_pos
{
	my ($pos, $shard) = @_;
	return $pos->{ $shard < 0 ? 0 : $shard };
}

my $json = JSON::PP->new->utf8->canonical->allow_nonref;

sub same_json
{
	my ($a, $b) = @_;
	return 1 if $a eq $b;
	my ($x, $y) = eval { ($json->encode($json->decode($a)), $json->encode($json->decode($b))) };
	return defined $x && $x eq $y;
}

sub show
{
	my @v = @_;
	return join(' ', @v[ 0 .. ($#v < 9 ? $#v : 9) ]) . (@v > 10 ? ' ...' : '');
}

my %count_before;    # copies per id after the previous phase

# Read the whole topic back and check it (see the header).  %o:
#   may_repeat => { id => 1 }  ids that may get copies in this phase
# Returns { msgs, count (copies per id), added ([id, copies added]) }.
sub check_topic
{
	my ($what, %o) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $sent = load_sent();
	my @msgs = $kafka->consume_all('out', $nparts);
	my (%count, @bad_header, @unknown, @wrong);
	for my $m (@msgs)
	{
		my @ids = grep { $_->[0] eq 'spool-outbox-id' } @{ $m->{headers} };
		my $id = $m->{outbox_id};
		if (@ids != 1 || !defined $id || $id !~ /^[1-9][0-9]*$/)
		{
			push @bad_header, "[$m->{partition}] $m->{offset}";
			next;
		}
		my $s = $sent->{$id};
		if (!$s)
		{
			push @unknown, $id;
			next;
		}
		$count{$id}++;
		if ($s->{barrier})
		{
			push @wrong, "$id: barrier header " . ($m->{barrier} // 'absent')
			  unless defined $m->{barrier} && $m->{barrier} eq 'true';
			push @wrong, "$id: barrier with key $m->{key}" if defined $m->{key};
			next;
		}
		push @wrong, "$id: spool-barrier $m->{barrier} on a row" if defined $m->{barrier};
		push @wrong, "$id: key " . ($m->{key} // 'NULL') . ', want ' . ($s->{key} // 'NULL')
		  unless (defined $m->{key} ? defined $s->{key} && $m->{key} eq $s->{key}
			: !defined $s->{key});
		push @wrong, "$id: value " . ($m->{value} // 'NULL') . ", want $s->{payload}"
		  unless defined $m->{value} && same_json($m->{value}, $s->{payload});
	}
	my @missing = sort { $a <=> $b } grep { !$count{$_} } keys %$sent;
	note sprintf('%s: %d messages in the topic, %d distinct ids, %d enqueued',
		$what, scalar(@msgs), scalar(keys %count), scalar(keys %$sent));
	is(scalar(@bad_header), 0,
		"$what: every message has one spool-outbox-id header, in decimal")
	  or diag('at ' . show(@bad_header));
	is(scalar(@unknown), 0, "$what: every spool-outbox-id is an enqueued id")
	  or diag('unknown: ' . show(@unknown));
	is(scalar(@missing), 0,
		"$what: every one of the " . scalar(keys %$sent) . ' enqueued ids is in the topic')
	  or diag('missing: ' . show(@missing));
	is(scalar(@wrong), 0,
		"$what: every copy has the enqueued key and payload, spool-barrier exactly on barriers")
	  or diag(join("\n", @wrong[ 0 .. min(9, $#wrong) ]));

	# Copies added in this phase.
	my @added;
	for my $id (sort { $a <=> $b } keys %count)
	{
		my $extra = $count{$id} - ($count_before{$id} // 1);
		push @added, [ $id, $extra ] if $extra > 0;
	}
	my $may = $o{may_repeat} || {};
	my @unexplained = map { $_->[0] } grep { !$may->{ $_->[0] } } @added;
	is(scalar(@unexplained), 0,
		sprintf('%s: %d ids got %d extra copies in this phase, none outside %s', $what,
			scalar(@added), sum0(map { $_->[1] } @added),
			%$may ? 'the ' . scalar(keys %$may) . ' ids that may repeat' : 'none (no failure)'))
	  or diag('unexplained copies of ' . show(@unexplained));

	# Per key: one partition; ids only rise once repeats are dropped.
	my (%parts, %seq, %want, @order);
	for my $m (@msgs)
	{
		my $id = $m->{outbox_id} // next;
		my $s = $sent->{$id} or next;
		next if $s->{barrier} || !defined $s->{key};
		$parts{ $s->{key} }{ $m->{partition} } = 1;
		push @{ $seq{ $s->{key} }{ $m->{partition} } }, $id;
	}
	for my $id (sort { $a <=> $b } keys %$sent)
	{
		my $s = $sent->{$id};
		push @{ $want{ $s->{key} } }, $id unless $s->{barrier} || !defined $s->{key};
	}
	my @split = grep { keys %{ $parts{$_} } > 1 } sort keys %parts;
	is(scalar(@split), 0,
		"$what: each of the " . scalar(keys %want) . ' keys is in a single partition')
	  or diag('keys in several partitions: ' . show(@split));
	for my $k (sort keys %want)
	{
		next if @split && grep { $_ eq $k } @split;
		my ($p) = keys %{ $parts{$k} || {} };
		my @ids = defined $p ? @{ $seq{$k}{$p} } : ();
		my ($hi, %seen, @kept) = (0);
		for my $id (@ids)
		{
			if ($id > $hi) { push @kept, $id; $hi = $id; }
			elsif (!$seen{$id})
			{
				push @order, "key '$k' [$p]: $id after $hi";
				last;
			}
			$seen{$id} = 1;
		}
		push @order, "key '$k': keeping the highest id gives " . scalar(@kept)
		  . ' ids, want ' . scalar(@{ $want{$k} })
		  if !@order && join(',', @kept) ne join(',', @{ $want{$k} });
	}
	is(scalar(@order), 0,
		"$what: per key, in its partition, ids rise (repeats aside) and keeping the highest id yields every id once")
	  or diag(show(@order));
	my %null_parts = map { $_->{partition} => 1 }
	  grep { defined $_->{outbox_id} && $sent->{ $_->{outbox_id} } && !$sent->{ $_->{outbox_id} }{barrier}
		  && !defined $sent->{ $_->{outbox_id} }{key} } @msgs;
	note "$what: NULL-key rows landed in partitions " . join(',', sort keys %null_parts);

	%count_before = %count;
	return { msgs => \@msgs, count => \%count, added => \@added, sent => $sent };
}

# Status of the shards: "shard|col|col..." lines.
sub status
{
	my ($cols) = @_;
	return sql("SELECT shard, $cols FROM spool.outbox_status WHERE target = 'out' ORDER BY shard");
}

# ---------------------------------------------------------------------------
# (a) At least once, no failure: nothing duplicated; a held transaction
#     holds back every later id.
# ---------------------------------------------------------------------------
my $held = SpoolTest::Session->new($node, 'held');
$held->query_ok('BEGIN');
my $held_id = $held->query_ok(q{INSERT INTO sent (id, phase, key, payload)
	SELECT spool.enqueue('out', 'key5', '{"held": true}'), 'a', 'key5', '{"held": true}'
	RETURNING id});
like($held_id, qr/^\d+$/, "(a) an open transaction enqueued id $held_id");
my $run = start_pgbench($node, 'enqueue_a', pgbench_script('a'),
	'-c', '4', '-j', '4', '-t', '500');
is(finish_pgbench($run), 0, '(a) pgbench: 4 clients x 500 transactions enqueued');
my $n_a = sql("SELECT count(*) FROM sent WHERE phase = 'a'");
is(sql("SELECT count(*) FROM sent WHERE phase = 'a' AND id < $held_id"), '0',
	"(a) the $n_a committed rows all have ids above the open transaction's $held_id");
is(sql("SELECT sum(backlog) FROM spool.outbox_status WHERE target = 'out'"), $n_a,
	"(a) while it is open, the backlog is every committed row ($n_a)");
my @early = $kafka->consume_all('out', $nparts);
is(scalar(@early), 0, '(a) while it is open, nothing reached the topic');
$held->query_ok('COMMIT');
$held->quit;
$n_a++;
record_shards('(a)');
wait_drained($node, 'out', '(a)', $wait_s);
poll_within($node, $wait_s,
	"SELECT bool_and(state = 'idle') FROM spool.outbox_status WHERE target = 'out'",
	'(a) every shard idle');
check_topic('(a)');
is( status('backlog, waiting, dead_letters, retries, last_error IS NULL'),
	join("\n", map { "$_|0|0|0|0|t" } 0 .. $nshards - 1),
	'(a) status: no backlog, nothing waiting, no dead letters, no retries, no error');
is( status('delivered'),
	sql(q{SELECT string_agg(s || '|' || (SELECT count(*) FROM sent WHERE shard = s), E'\n' ORDER BY s)
		    FROM generate_series(0, 1) s}),
	"(a) status: delivered per shard equals the shard's rows ($n_a in all)");
is( sql(q{SELECT count(*) FROM spool.outbox_status st
		   WHERE target = 'out' AND position < (SELECT max(id) FROM sent WHERE shard = st.shard)}),
	'0', "(a) each shard's position covers its highest id");
is( sql("SELECT count(*) FROM spool.outbox_status WHERE target = 'out' AND batch_max > $batch_size"),
	'0', "(a) no batch above batch_size $batch_size");
cmp_ok(status_sum($node, 'out', 'flushes_size + flushes_interval + flushes_barrier + flushes_close'),
	'>=', int($n_a / $batch_size), '(a) flushes counted');
is(sql('SELECT count(*) FROM (SELECT key FROM sent GROUP BY key HAVING count(DISTINCT shard) > 1) x'),
	'0', '(a) every key (NULL included) maps to a single shard');
is(sql('SELECT count(DISTINCT shard) FROM sent'), $nshards, '(a) both shards got rows');

# ---------------------------------------------------------------------------
# (b) All brokers down while rows are enqueued and delivered.
# ---------------------------------------------------------------------------
my $max_a = sql('SELECT max(id) FROM sent');
$run = start_pgbench($node, 'enqueue_b', pgbench_script('b'),
	'-c', '2', '-j', '2', '-T', '15', '-R', '40');
poll_within($node, $wait_s,
	"SELECT max(position) > $max_a FROM spool.outbox_status WHERE target = 'out'",
	'(b) rows of the second load being delivered');
my $pos_down = positions();
my $t_down = sql('SELECT clock_timestamp()');
is($kafka->cmd('down -1'), 'OK', '(b) all brokers down');
my $t0 = time;
poll_within($node, $wait_s,
	"SELECT bool_and(last_error_at >= '$t_down') AND bool_or(state = 'error' AND last_error IS NOT NULL)"
	  . " AND sum(backlog) > 0 FROM spool.outbox_status WHERE target = 'out'",
	"(b) every shard reported an error since the outage began, one shows state 'error', backlog > 0");
note "(b) status during the outage:\n" . status("state, backlog, last_error_at, last_error");
like(sql("SELECT string_agg(last_error, ' ') FROM spool.outbox_status WHERE target = 'out'"),
	qr/kafka|broker|timed out|transport|connect/i, '(b) last_error says what failed');
my $pos_a = positions();
is(finish_pgbench($run), 0, '(b) pgbench enqueued during the outage');
record_shards('(b)');
my ($last_err, $retries) = split /\|/,
  sql("SELECT max(last_error_at), sum(retries) FROM spool.outbox_status WHERE target = 'out'");
poll_within($node, $wait_s,
	"SELECT max(last_error_at) > '$last_err' OR sum(retries) > $retries"
	  . " FROM spool.outbox_status WHERE target = 'out'",
	'(b) a further failed attempt (last_error_at or retries moved)');
is_deeply(positions(), $pos_a, '(b) no position moved while the brokers were down');
cmp_ok(sql("SELECT sum(backlog) FROM spool.outbox_status WHERE target = 'out'"), '>', 0,
	'(b) the backlog is still there');
note sprintf('(b) outage: %.1fs', time - $t0);
is($kafka->cmd('up -1'), 'OK', '(b) brokers up');
wait_drained($node, 'out', '(b)', $wait_s);
poll_within($node, $wait_s,
	"SELECT bool_and(state <> 'error') FROM spool.outbox_status WHERE target = 'out'",
	"(b) no shard left in state 'error'");
my $sent = load_sent();
my %may_b = map { $_ => 1 }
  grep { $_ > shard_pos($pos_down, $sent->{$_}{shard}) } keys %$sent;
my $res = check_topic('(b)', may_repeat => \%may_b);
note sprintf('(b) %d ids enqueued during the second load, %d copies added by the outage',
	scalar(grep { $sent->{$_}{phase} eq 'b' } keys %$sent), sum0(map { $_->[1] } @{ $res->{added} }));

# ---------------------------------------------------------------------------
# (b2) Acknowledgements slower than message.timeout.ms: the broker appends
#      the messages, the producer gives up on them, the batch is sent again.
# ---------------------------------------------------------------------------
$pos_down = positions();
my $t_slow = sql('SELECT clock_timestamp()');
is($kafka->cmd('rtt -1 4000'), 'OK', '(b2) every response delayed by 4 s (message.timeout.ms is 3 s)');
sql(enqueue_sql('b2', 2000, 5, 24));
record_shards('(b2)');
poll_within($node, $wait_s,
	"SELECT bool_or(last_error_at >= '$t_slow') FROM spool.outbox_status WHERE target = 'out'",
	'(b2) a shard reported the timed-out delivery');
note "(b2) status with slow acknowledgements:\n" . status("state, backlog, last_error_at, last_error");
is($kafka->cmd('rtt -1 0'), 'OK', '(b2) responses on time again');
wait_drained($node, 'out', '(b2)', $wait_s);
poll_within($node, $wait_s,
	"SELECT bool_and(state <> 'error') FROM spool.outbox_status WHERE target = 'out'",
	"(b2) no shard left in state 'error'");
$sent = load_sent();
my %may_b2 = map { $_ => 1 }
  grep { $_ > shard_pos($pos_down, $sent->{$_}{shard}) } keys %$sent;
$res = check_topic('(b2)', may_repeat => \%may_b2);
note sprintf('(b2) %d copies added by the timeouts, of %d ids',
	sum0(map { $_->[1] } @{ $res->{added} }), scalar(@{ $res->{added} }));

# ---------------------------------------------------------------------------
# (c) kill -9 between the broker's acknowledgement and the commit.
# ---------------------------------------------------------------------------
sql("ALTER SYSTEM SET spool.test_worker_pause = '120s'; SELECT pg_reload_conf();");
poll_within($node, $wait_s,
	"SELECT setting = '120000' FROM pg_settings WHERE name = 'spool.test_worker_pause'",
	'(c) spool.test_worker_pause set');
sql(enqueue_sql('c', 3000, 5, 24));
record_shards('(c)');
my $shards_c = sql("SELECT count(DISTINCT shard) FROM sent WHERE phase = 'c'");
my $paused_q = q{SELECT s.shard || '|' || a.pid || '|' || a.xact_start
  FROM spool.outbox_status s JOIN pg_stat_activity a ON a.pid = s.pid
 WHERE s.target = 'out' AND a.wait_event_type = 'Extension' AND a.xact_start IS NOT NULL
 ORDER BY s.shard};
poll_within($node, $wait_s,
	"SELECT count(*) = $shards_c FROM ($paused_q) x",
	"(c) the $shards_c dispatcher(s) with rows wait inside their delivering transactions");
my $paused = sql($paused_q);
my %paused_pid = map { (split /\|/)[ 0, 1 ] } split /\n/, $paused;
note "(c) paused (shard|pid|xact_start):\n$paused";
my $pos_c = positions();
$sent = load_sent();
my %inflight;    # acknowledged, above the committed position
for my $m ($kafka->consume_all('out', $nparts))
{
	my $s = $sent->{ $m->{outbox_id} // 0 } or next;
	$inflight{ $m->{outbox_id} } = 1
	  if $s->{phase} eq 'c' && $m->{outbox_id} > shard_pos($pos_c, $s->{shard});
}
for my $shard (sort keys %paused_pid)
{
	my $n = grep { $sent->{$_}{shard} == $shard } keys %inflight;
	cmp_ok($n, '>', 0,
		"(c) shard $shard: the broker acknowledged its paused batch ($n messages above position $pos_c->{$shard})");
	cmp_ok($n, "<=", 8 * $batch_size,
		"(c) shard $shard: at most 8 batches (the pipeline's depth) in flight");
}
sql('ALTER SYSTEM RESET spool.test_worker_pause; SELECT pg_reload_conf();');
is(sql($paused_q), $paused, '(c) still inside the same transactions (nothing committed)');
# Marks commit without waiting for their WAL flush (a mark lost in a crash
# only means more copies); a synchronous commit flushes the ones before it,
# so that the copies are exactly the unmarked batches.
sql('SELECT pg_current_xact_id()');
my $victim = $paused_pid{0} // (values %paused_pid)[0];
BAIL_OUT('no paused dispatcher to kill') unless defined $victim && $victim =~ /^\d+$/;
my $log_offset = -s $node->logfile;
ok(kill('KILL', $victim), "(c) kill -9 the paused dispatcher $victim");
crash_restart_ok($node, $victim, $log_offset, '(c)');
wait_dispatchers($node, 'out', $nshards);
wait_drained($node, 'out', '(c)', $wait_s);
$res = check_topic('(c)', may_repeat => \%inflight);
my @not_again = grep { $res->{count}{$_} < 2 } sort { $a <=> $b } keys %inflight;
is(scalar(@not_again), 0,
	'(c) every one of the ' . scalar(keys %inflight) . ' acknowledged, unmarked ids was delivered again')
  or diag('once only: ' . show(@not_again));
is( status('delivered'),
	join("\n", map {
		my $s = $_;
		"$s|" . scalar(grep { $sent->{$_}{shard} == $s && $_ > $pos_c->{$s} } keys %$sent)
	} 0 .. $nshards - 1),
	'(c) delivered since the restart equals the rows above the positions at the crash');

# ---------------------------------------------------------------------------
# (d) A barrier.
# ---------------------------------------------------------------------------
my $delivered_c = status_sum($node, 'out', 'delivered');
is($kafka->cmd('rtt -1 30'), 'OK', '(d) acknowledgements slowed by 30 ms');
my $barrier = sql(enqueue_sql('d-before', 1000, 5, 24) . q{
INSERT INTO sent (id, phase, key, payload, barrier)
	SELECT spool.enqueue_barrier('out'), 'd-barrier', NULL, '{"barrier": true}', true RETURNING id;
} . enqueue_sql('d-after', 1000, 5, 24));
like($barrier, qr/^\d+$/, "(d) barrier $barrier between 1000 rows and 1000 rows");
record_shards('(d)');
wait_drained($node, 'out', '(d)', $wait_s);
is($kafka->cmd('rtt -1 0'), 'OK', '(d) normal acknowledgements');
$res = check_topic('(d)');
my @bm = grep { defined $_->{barrier} } @{ $res->{msgs} };
is(scalar(@bm), 1, '(d) one message carries spool-barrier');
my $b = $bm[0] || {};
is($b->{outbox_id} // '', $barrier, '(d) ... with the barrier id in spool-outbox-id');
is($b->{barrier} // '', 'true', '(d) ... spool-barrier: true');
$sent = $res->{sent};
my (@early_b, @late_b, @ts_early, @ts_late);
for my $m (@{ $res->{msgs} })
{
	my $s = $sent->{ $m->{outbox_id} // 0 } or next;
	my $before = $s->{phase} eq 'd-before';
	my $after = $s->{phase} eq 'd-after';
	next unless $before || $after;
	push @ts_early, "$m->{outbox_id}\@$m->{timestamp}"
	  if $before && $m->{timestamp} > ($b->{timestamp} // 0);
	push @ts_late, "$m->{outbox_id}\@$m->{timestamp}"
	  if $after && $m->{timestamp} < ($b->{timestamp} // 0);
	next unless $m->{partition} == ($b->{partition} // -1);
	push @early_b, $m->{outbox_id} if $before && $m->{offset} > $b->{offset};
	push @late_b, $m->{outbox_id} if $after && $m->{offset} < $b->{offset};
}
is(scalar(@early_b) + scalar(@late_b), 0,
	"(d) in the barrier's partition ($b->{partition}): every earlier id before it, every later id after it")
  or diag('earlier ids after it: ' . show(@early_b) . '; later ids before it: ' . show(@late_b));
is(scalar(@ts_early) + scalar(@ts_late), 0,
	"(d) across partitions, by timestamp: no earlier row produced after the barrier, no later row before it")
  or diag("barrier at $b->{timestamp}; earlier rows after it: " . show(@ts_early)
	  . '; later rows before it: ' . show(@ts_late));
is(status('barriers'), "0|1\n1|0", '(d) shard 0 counts the barrier (since the restart), shard 1 none');
# A batch is flushed for the barrier only if the shard still held rows when
# it read the barrier: that depends on timing, so it is only noted.
note '(d) flushes_barrier per shard: '
  . join(', ', split /\n/, status('flushes_barrier'));
my $added = status_sum($node, 'out', 'delivered') - $delivered_c;
ok($added == 2000 || $added == 2001,
	"(d) delivered grew by the 2000 rows (and the barrier, if counted: $added)");

$kafka->stop;
$node->stop;
note sprintf('total %.0fs', time - $t_start);
done_testing();


# Processor replicas on a hot standby (spool.standby_processors; docs/
# processors.md, "Replicas on a hot standby").  A primary runs source 'src'
# (4 partitions of the test Kafka cluster) and processor 'p' (test_handler,
# 2 replicas, checkpoint_every 5000: no snapshot but the idle ones); a hot
# standby streams from it with the setting on.
#   (a) on the standby the launcher runs p's two replicas; they follow the
#       replicated committed cursor and reach it, compare their state with
#       the active's replicated snapshot, and write nothing: no role
#       'active', no token, no lock, no output, no error (no read-only
#       failure in the log);
#   (b) turning the setting off stops them (only the launcher is left),
#       turning it on again starts them, and they catch up; a rewind on the
#       primary (a new epoch in the replicated checkpoint) makes them reload
#       and follow again, without a mismatch;
#   (c) while a stream is being processed on the primary (a commit pause
#       keeps it going), the primary stops in immediate mode; once the
#       standby replicas are at the replicated committed cursor, the standby
#       is promoted: the same two processes go on (no second set starts),
#       one of them takes the gate having applied 0 entries since the
#       promotion, and at the end the outputs are exactly the reference
#       outputs, with the writer's token non-decreasing.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";
use SpoolTest;
use SpoolKafka;
use SpoolIngest;
use SpoolProcessor;
use Test::More;

my $nparts = 4;
my $topic = 'ssp';
my $n1 = 300;    # before the standby exists
my $n2 = 300;    # followed on the standby
my $n3 = 600;    # streaming when the primary stops

my $kafka = SpoolKafka->start(topics => ["$topic:$nparts"]);
my $primary = spool_node('primary', _init => { allows_streaming => 1 });
processor_setup($primary, $kafka->bootstrap, $topic,
	nparts => $nparts,
	options => '{"batch_size": 50, "replicas": 2, "checkpoint_every": 5000}');
is($kafka->produce($topic, $n1, -1, 100, 0), "OK produced $n1", "produce seq 0 .. " . ($n1 - 1));
wait_processed($primary, 'p', $n1, 'primary');

$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->append_conf('postgresql.conf', "spool.standby_processors = on\n");
$standby->start;
sub ssql { return $standby->safe_psql('postgres', $_[0]); }
is(ssql('SELECT pg_is_in_recovery()'), 't', 'standby: in recovery');

# At the replicated committed cursor: both replicas, role standby, cursor
# equal to the checkpoint row's committed cursor.
sub at_committed
{
	my ($more) = @_;
	return q{SELECT count(*) = 2 AND bool_and(role = 'standby' AND cursor = committed_cursor}
	  . ($more // '') . q{) FROM spool.processor_status WHERE processor = 'p'};
}
my $at_committed = at_committed();

# (a) the replicas follow.
$primary->wait_for_catchup($standby, 'replay');
poll_ok($standby, $at_committed, 'standby: both replicas at the replicated committed cursor');
is(ssql(q{SELECT max(cursor) FROM spool.processor_status WHERE processor = 'p'}),
	committed_cursor($primary, 'p'), 'standby: their cursor is the primary\'s committed cursor');
is($kafka->produce($topic, $n2, -1, 100, $n1), "OK produced $n2",
	"produce seq $n1 .. " . ($n1 + $n2 - 1));
wait_processed($primary, 'p', $n1 + $n2, 'primary');
# The active snapshots its idle state after a second; the standby compares.
poll_ok($primary,
	q{SELECT state_cursor = committed_cursor FROM spool.processor_checkpoints WHERE processor = 'p'},
	'primary: an idle snapshot at the committed cursor');
$primary->wait_for_catchup($standby, 'replay');
poll_ok($standby,
	at_committed(' AND hash_checks > 0 AND state_hash_cursor = committed_cursor'),
	'standby: both replicas followed and compared with the replicated snapshot');
is( ssql(q{SELECT sum(hash_mismatches) || ' ' || sum(errors) || ' ' || sum(outputs) || ' '
	|| count(token) || ' ' || count(last_error) FROM spool.processor_status WHERE processor = 'p'}),
	'0 0 0 0 0', 'standby: no mismatch, no error, no output, no token');
is(ssql(q{SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
	WHERE a.backend_type = 'spool processor' AND l.locktype = 'advisory'}),
	'0', 'standby: the replicas hold no advisory lock');
is( ssql(q{SELECT count(*) || ' ' || bool_and(batches > 0) || ' ' || (length(spool.metrics()) > 0)
	FROM spool.processor_stats WHERE processor = 'p'}),
	'2 true true', 'standby: processor_stats shows both replicas\' batches, metrics() answers');
is( ssql(q{SELECT string_agg(backend_type, ',' ORDER BY backend_type) FROM pg_stat_activity
	WHERE backend_type LIKE 'spool%'}),
	'spool launcher,spool processor,spool processor',
	'standby: the launcher and the two replicas run, no other spool worker');

# (b) off, then on again, at runtime.
ssql(q{ALTER SYSTEM SET spool.standby_processors = off; SELECT pg_reload_conf()});
poll_ok($standby,
	q{SELECT count(*) = 0 FROM pg_stat_activity WHERE backend_type = 'spool processor'},
	'standby: setting off, the replicas to stop');
# The launcher frees a stopped replica's slot once it has exited.
poll_ok($standby,
	q{SELECT count(role) = 0 FROM spool.processor_status WHERE processor = 'p'},
	'standby: processor_status to show no role without replicas');
ssql(q{ALTER SYSTEM RESET spool.standby_processors; SELECT pg_reload_conf()});
poll_ok($standby, $at_committed, 'standby: setting on again, both replicas back at the committed cursor');
my $c_mid = int(committed_cursor($primary, 'p') / 2);
$primary->safe_psql('postgres', "SELECT spool.rewind_processor('p', $c_mid)");
$primary->wait_for_catchup($standby, 'replay');
my $t_rw = time;
my $reloads = 0;
while (time - $t_rw < $PostgreSQL::Test::Utils::timeout_default)
{
	$reloads = () = slurp_file($standby->logfile) =~ /reloads its checkpoint: the processor was rewound/g;
	last if $reloads >= 2;
	$standby->poll_query_until('postgres', 'SELECT true');
}
cmp_ok($reloads, '>=', 2, 'standby: both replicas saw the new epoch and reloaded');
poll_ok($standby, at_committed(' AND rewinds = 1 AND hash_mismatches = 0'),
	'standby: after a rewind on the primary, both replicas reloaded and caught up');
my $pids_before = replica_pids($standby, 'p');

# (c) a stream on the primary, stopped in its middle; then the promotion.
my $c2 = committed_cursor($primary, 'p');
$primary->safe_psql('postgres',
	q{ALTER SYSTEM SET spool.test_worker_pause = '30ms'; SELECT pg_reload_conf()});
is($kafka->produce($topic, $n3, -1, 100, $n1 + $n2), "OK produced $n3",
	"produce seq " . ($n1 + $n2) . ' .. ' . ($n1 + $n2 + $n3 - 1));
poll_ok($primary,
	"SELECT committed_cursor > $c2 FROM spool.processor_checkpoints WHERE processor = 'p'",
	'primary: the processor to commit part of the stream');
$primary->stop('immediate');
poll_ok($standby, $at_committed, 'standby: both replicas at the last replicated committed cursor');
my $c_promo = ssql(q{SELECT committed_cursor FROM spool.processor_checkpoints WHERE processor = 'p'});
note("promoting at committed cursor $c_promo (the stream had "
	  . ssql(q{SELECT count(*) FROM spool.entries}) . ' entries in the spool)');
unlike(slurp_file($standby->logfile), qr/read-only transaction/,
	'standby: no read-only failure in its log');
my $log_offset = -s $standby->logfile;
$standby->promote;
is(ssql('SELECT pg_is_in_recovery()'), 'f', 'standby: promoted');

my $ready;
my $t0 = time;
while (time - $t0 < $PostgreSQL::Test::Utils::timeout_default)
{
	($ready) = substr(slurp_file($standby->logfile), $log_offset)
	  =~ /(replica \d is ready at cursor \d+: it applied \d+ entries in [\d.]+ ms since the promotion)/;
	last if $ready;
	$standby->poll_query_until('postgres', 'SELECT true');
}
ok($ready, 'promoted: a replica logged its takeover') or $ready = '';
note($ready);
my ($rcursor, $applied) = $ready =~ /at cursor (\d+): it applied (\d+) entries/;
is($applied, 0, 'promoted: the new active applied no entry after the promotion');
is($rcursor, $c_promo, 'promoted: it took over at the replicated committed cursor');

my $n = $n1 + $n2 + $n3;
wait_processed($standby, 'p', $n, 'promoted');
outputs_exact($standby, 'p', $nparts, $n, 'promoted');
tokens_ordered($standby, 'p', 'promoted');
wait_gate($standby, 'p', 2, 'promoted: one active replica and one standby');
is_deeply(replica_pids($standby, 'p'), $pids_before,
	'promoted: the replicas are the processes that ran during recovery');
is( ssql(q{SELECT count(*) FROM spool.processor_status WHERE processor = 'p'
	AND role = 'active' AND last_takeover_ms IS NOT NULL}),
	'1', 'promoted: the takeover latency from the promotion is recorded');

$standby->stop;
$kafka->stop;
done_testing();


# Several ingest workers for one source (source option "workers";
# docs/sources.md, "Several workers for one source").  Source iw reads topic
# iw (6 partitions) with 2 workers, then 3, then 1, while messages stream in:
#   - the launcher runs one worker per number, named "spool ingest iw/<i>"
#     (plain "spool ingest iw" for one), each consuming its own partitions;
#   - after each step the spool holds every produced message exactly once,
#     each partition's offsets contiguous and in cursor order (I-1);
#   - a change of the count while messages stream: no worker of the old
#     count runs beside one of the new count (a worker of the new count
#     waits), and nothing is lost or doubled;
#   - kill -9 of one worker mid-stream: the server restarts, every worker
#     comes back, exactly once still holds, the spool's indexes pass
#     amcheck;
#   - a forward seek of a partition of worker 1 is applied once, by that
#     worker (one LOG line, one gap), and the other worker does not wait for
#     or touch it.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm, SpoolIngest.pm
use SpoolTest;
use SpoolKafka;
use SpoolIngest;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $nparts = 6;
my $kafka = SpoolKafka->start(topics => ["iw:$nparts"]);
my $node = spool_node('ingest_workers', restart_after_crash => 'on');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $next_seq = 0;

sub produce
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$kafka->produce_next('iw', $_[0], 200, \$next_seq);
}

# The running ingest workers of iw, as "name:pid;..." sorted by name.
sub workers
{
	return sql(q{SELECT string_agg(application_name || ':' || pid, ';' ORDER BY application_name)
		FROM pg_stat_activity WHERE application_name LIKE 'spool ingest iw%'});
}

# Wait until exactly the workers @names run; returns their pids by name.
sub wait_source_workers
{
	my ($what, @names) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $want = join(',', map { "'spool ingest $_'" } @names, 'none');
	poll_ok($node,
		"SELECT count(*) = " . scalar(@names) . " AND coalesce(bool_and(application_name IN ($want)), true)"
		  . " FROM pg_stat_activity WHERE application_name LIKE 'spool ingest iw%'",
		"$what: workers " . join(', ', @names) . ' to run');
	my %pid = map { /^spool ingest (\S+):(\d+)$/ ? ($1 => $2) : () } split /;/, workers();
	return %pid;
}

sub exact
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	note("---- $what");
	spool_partitions_exact($node, $kafka, 'iw', 'iw', $nparts, $next_seq);
	spool_seqs_match($node, 'iw', $nparts, "generate_series(0, $next_seq - 1)",
		"$what: every seq is there with its key, partition and value");
	poll_ok($node,
		"SELECT count(*) = $nparts FROM spool.source_status WHERE source = 'iw'"
		  . " AND state = 'running' AND lag = 0",
		"$what: source_status shows every partition running with lag 0");
}

# ---- two workers ----
sql(qq{SELECT spool.create_source('iw', '@{[ $kafka->bootstrap ]}', '{iw}',
	'{"workers": 2, "batch_ms": 20, "batch_size": 500}');
	SELECT spool.start_source('iw');});
my %pid = wait_source_workers('start', 'iw/0', 'iw/1');
produce(3000);
exact('two workers');

# Each worker consumed its own half: partition p by worker p % 2.
my $log = slurp_file($node->logfile);
for my $i (0, 1)
{
	my @seen = $log =~ /\[$pid{"iw\/$i"}\] [^\n]*source "iw": worker $i of 2 reads (\S+)/;
	is($seen[0] // '', $i == 0 ? 'iw[0,2,4]' : 'iw[1,3,5]',
		"worker $i (pid $pid{\"iw/$i\"}) reads partitions " . ($i == 0 ? '0, 2, 4' : '1, 3, 5'));
}

# ---- three workers, changed while messages stream ----
# Worker iw/0 of 2 is stopped (SIGSTOP, while it waits for messages: it
# holds no lock then) so that it outlives the change: the workers of 3 must
# wait for it, not read beside it.
my $log_offset = -s $node->logfile;
my %old = %pid;
my $stopped = 0;
for my $try (1 .. 200)
{
	kill 'STOP', $old{'iw/0'};
	last if $stopped = sql("SELECT wait_event_type = 'Extension' FROM pg_stat_activity"
		  . " WHERE pid = $old{'iw/0'}") eq 't';
	kill 'CONT', $old{'iw/0'};
	select(undef, undef, undef, 0.01 * ($try % 7));
}
ok($stopped, "worker iw/0 of 2 (pid $old{'iw/0'}) is stopped while it waits for messages");
END { kill 'CONT', $old{'iw/0'} if $old{'iw/0'}; }
produce(2000);
sql(q{SELECT spool.alter_source('iw', options => '{"workers": 3}')});
poll_ok($node,
	q{SELECT EXISTS (SELECT FROM pg_stat_activity WHERE application_name LIKE 'spool ingest iw/_'
		AND query = 'waiting for the workers of another count to exit')},
	'a worker of 3 to wait for the stopped worker of 2');
ok(!$node->log_contains(qr/source "iw": worker \d of 3 reads/, $log_offset),
	'no worker of 3 reads while a worker of 2 is alive');
kill 'CONT', $old{'iw/0'};
produce(2000);
%pid = wait_source_workers('workers 2 -> 3', 'iw/0', 'iw/1', 'iw/2');
produce(1000);
exact('three workers');
# The workers of 3 started reading only after both workers of 2 were
# terminated (a worker of 3 waits until they have left).
my $after = slurp_file($node->logfile, $log_offset);
my $first_new = $after =~ /source "iw": worker \d of 3 reads/ ? $-[0] : -1;
for my $w ('iw/0', 'iw/1')
{
	my $gone = $after =~ /\[$old{$w}\] spool ingest FATAL:  terminating/ ? $-[0] : -1;
	ok($gone >= 0 && $first_new > $gone,
		"worker $w of 2 (pid $old{$w}) was terminated before any worker of 3 read a partition");
}
ok(!$node->log_contains(qr/another ingest worker is running|with another worker count are still running/,
		$log_offset), 'no worker of the new count was refused');

# ---- kill -9 of one worker mid-stream ----
produce(3000);
$log_offset = -s $node->logfile;
kill 'KILL', $pid{'iw/1'};
crash_restart_ok($node, $pid{'iw/1'}, $log_offset, 'kill -9 of worker iw/1');
%pid = wait_source_workers('after the crash', 'iw/0', 'iw/1', 'iw/2');
produce(1000);
exact('after kill -9');
sql('CREATE EXTENSION IF NOT EXISTS amcheck');
is( sql(q{SELECT count(*) FROM (SELECT bt_index_check(i.indexrelid, true)
		FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
		JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'spool' AND c.relname LIKE 'entries%' AND c.relkind = 'r') x}) > 0
	  ? 't' : 'f',
	't', 'amcheck: bt_index_check of every index of the spool passes');

# ---- a seek of a partition of worker 1 (of 2) ----
sql(q{SELECT spool.alter_source('iw', options => '{"workers": 2}')});
%pid = wait_source_workers('workers 3 -> 2', 'iw/0', 'iw/1');
produce(600);
exact('two workers again');
# Stopped, so that the seek starts from a known durable offset.
sql(q{SELECT spool.stop_source('iw')});
wait_source_workers('stopped');
my $high3 = sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'iw' AND kafka_partition = 3});
produce(600);    # 100 more per partition
my $to = $high3 + 50;
$log_offset = -s $node->logfile;
my $seek_id = sql(qq{SELECT id FROM spool.seek_source('iw', 'iw', 3, $to)});
sql(q{SELECT spool.start_source('iw')});
poll_ok($node,
	qq{SELECT state = 'applied' FROM spool.source_seeks WHERE id = $seek_id},
	'the seek of iw [3] to be applied');
poll_ok($node,
	qq{SELECT next_offset = $high3 + 100 FROM spool.offsets WHERE source = 'iw' AND kafka_partition = 3},
	'partition 3 to go on after the seek');
my @applied = slurp_file($node->logfile, $log_offset) =~ /(seek $seek_id of iw \[3\][^\n]*)/g;
is(scalar(@applied), 1, 'the seek was applied once (one LOG line)');
%pid = wait_source_workers('after the seek', 'iw/0', 'iw/1');
like(slurp_file($node->logfile, $log_offset),
	qr/\[$pid{'iw\/1'}\] [^\n]*seek $seek_id of iw \[3\]/, 'worker 1 applied it');
is( sql(qq{SELECT count(*) || ' ' || min(from_offset) || ' ' || max(to_offset) FROM spool.gaps
		WHERE source = 'iw' AND action = 'seek'}),
	"1 $high3 " . ($to - 1), "one gap 'seek' for offsets $high3 .. " . ($to - 1));
is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = 'iw' AND kafka_partition = 3
		AND kafka_offset BETWEEN $high3 AND $to - 1}),
	'0', 'nothing of the skipped offsets is in the spool');
is( sql(q{SELECT count(*) FROM (SELECT 1 FROM spool.entries WHERE source = 'iw'
		GROUP BY topic, kafka_partition, kafka_offset HAVING count(*) > 1) d}),
	'0', 'no (topic, partition, offset) twice');

# ---- back to one worker ----
sql(q{SELECT spool.alter_source('iw', options => '{"workers": null}')});
wait_source_workers('workers 2 -> 1', 'iw');
produce(600);
poll_ok($node,
	"SELECT coalesce(sum(next_offset), 0) = $next_seq FROM spool.offsets WHERE source = 'iw'",
	"one worker: the stored offsets to add up to all $next_seq produced");
is(sql(q{SELECT count(*) FROM spool.entries WHERE source = 'iw'}), $next_seq - 50,
	'every message is in the spool once, but the 50 the seek skipped');
is( sql(q{SELECT count(*) FROM (SELECT kafka_partition, kafka_offset, lag(kafka_offset)
		OVER (PARTITION BY topic, kafka_partition ORDER BY cursor) AS prev
		FROM spool.entries WHERE source = 'iw') x
		WHERE kafka_offset <> prev + 1 AND NOT (kafka_partition = 3 AND kafka_offset = prev + 51)}),
	'0', 'within each partition, offsets in cursor order, step 1 (but the seek)');

note(sprintf('total test time %.1f s', time - $t_start));
$node->stop;
$kafka->stop;
done_testing();

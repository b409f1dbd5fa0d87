
# I-2: the spool cursor is commit-ordered and gap-free from a reader's view.
#
# Two sources on two topics ingest concurrently (produced in several rounds,
# small batch_size/batch_ms so that there are many promotions) while
#   - a reader session follows the spool with spool.read(last, n, '1 s') and
#     remembers every cursor it saw: each read must continue exactly at
#     last + 1 with consecutive cursors, and at the end the reader must have
#     seen exactly the set of cursors in spool.entries (an entry that became
#     visible below a cursor the reader had already passed would be missed);
#   - pgbench clients check, in every snapshot they take, that the visible
#     entries are exactly the cursors 1 .. max (a prefix).
# Then spool.read with a wait returns promptly, with the new entry, when a
# message arrives while it waits.  Also I-1 for both sources: every produced
# offset is in the spool exactly once, cursors follow offsets within each
# Kafka partition, and the stored next offsets are at the high watermarks.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm
use SpoolTest;
use SpoolKafka;
use IPC::Run;
use Test::More;
use Time::HiRes qw(time usleep);

my $kafka = SpoolKafka->start(topics => [ 'co_a:3', 'co_b:2' ]);
my $bootstrap = $kafka->bootstrap;
my $node = spool_node('ingest_commit_order');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Prefix checker for pgbench: in one snapshot, count(*) = max(cursor).
sql(<<'EOSQL');
CREATE TABLE prefix_checks (n bigint, max_cursor bigint, ok bool,
							at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION check_prefix() RETURNS void LANGUAGE plpgsql AS $$
DECLARE n bigint; m bigint;
BEGIN
	SELECT count(*), coalesce(max(cursor), 0) INTO n, m FROM spool.entries;
	INSERT INTO prefix_checks (n, max_cursor, ok) VALUES (n, m, n = m);
END $$;
EOSQL

my $opts = q('{"batch_size": 23, "batch_ms": 3}');
sql("SELECT spool.create_source('co_a', '$bootstrap', ARRAY['co_a'], $opts)");
sql("SELECT spool.create_source('co_b', '$bootstrap', ARRAY['co_b'], $opts)");
sql("SELECT spool.start_source('co_a'), spool.start_source('co_b')");
poll_ok($node,
	q{SELECT count(*) = 5 FROM spool.source_status WHERE state = 'running'},
	'both ingest workers to run with their 5 partitions');

my $checker = start_pgbench($node, 'prefix_checker',
	"SELECT check_prefix();\n", '-c', 2, '-j', 2, '-R', 100, '-T', 15);

# The reader.
my $reader = SpoolTest::Session->new($node, 'reader');
my %seen;
my $last = 0;
my $reads = 0;
my $nonempty_reads = 0;
my @errors;

sub read_some
{
	my ($max, $wait) = @_;
	my $out = $reader->query_ok(
		"SELECT cursor FROM spool.read($last, $max, '$wait')");
	$reads++;
	my @c = grep { $_ ne '' } split /\n/, $out;
	$nonempty_reads++ if @c;
	push @errors, "read after $last returned " . scalar(@c) . " > $max rows"
	  if @c > $max;
	for my $c (@c)
	{
		push @errors, "read after $last: expected cursor " . ($last + 1) . ", got $c"
		  if $c != $last + 1;
		push @errors, "cursor $c seen twice" if $seen{$c}++;
		$last = $c if $c > $last;
	}
	return scalar @c;
}

my ($rounds, $per_a, $per_b) = (8, 400, 300);
for my $r (0 .. $rounds - 1)
{
	# Varying sizes: rows of different widths in the staging heap.
	my ($sa, $sb) = ((100, 1500, 300, 3000, 50, 700)[ $r % 6 ],
		(2000, 80, 900, 150, 2500, 400)[ $r % 6 ]);
	$kafka->cmd("produce co_a $per_a -1 $sa " . $r * $per_a);
	read_some(500, '1 s');
	read_some(7, '1 s');
	$kafka->cmd("produce co_b $per_b -1 $sb " . $r * $per_b);
	for (1 .. 5)
	{
		read_some(($_ % 2) ? 500 : 31, '1 s');
	}
}
my %produced = (co_a => $rounds * $per_a, co_b => $rounds * $per_b);

# Then a burst without reads in between: a backlog of rows of varying widths
# that both workers stage at once, promoted in few large promotions.
for my $r (0 .. 5)
{
	for my $t ([ 'co_a', (120, 2500, 60, 1800, 400, 3000)[$r] ],
		[ 'co_b', (2200, 90, 1500, 300, 2800, 70)[$r] ])
	{
		my ($topic, $size) = @$t;
		$kafka->cmd("produce $topic 300 -1 $size $produced{$topic}");
		$produced{$topic} += 300;
	}
}
my $total = $produced{co_a} + $produced{co_b};

# Follow until everything is read (bounded).
my $deadline = time + 120;
while ($last < $total && time < $deadline)
{
	read_some(500, '1 s');
}
is($last, $total, "the reader reached cursor $total");
is(scalar(@errors), 0, 'every read continued at last + 1 with consecutive cursors')
  or diag join("\n", @errors[ 0 .. ($#errors < 20 ? $#errors : 19) ]);
note "$reads reads, $nonempty_reads returned entries";
cmp_ok($nonempty_reads, '>=', 10, 'the reader read in many steps');

# Every cursor in the spool was seen by the reader, and no other.
my @all = split /\n/, sql('SELECT cursor FROM spool.entries ORDER BY cursor');
is(scalar(@all), $total, "the spool holds $total entries");
my @missed = grep { !$seen{$_} } @all;
is(scalar(@missed), 0, 'the reader saw every cursor that is in the spool')
  or diag "missed: @missed[0 .. ($#missed < 20 ? $#missed : 19)]";
my %in_spool = map { $_ => 1 } @all;
my @phantom = grep { !$in_spool{$_} } keys %seen;
is(scalar(@phantom), 0, 'the reader saw no cursor that is not in the spool');
is(sql('SELECT min(cursor) || \' \' || max(cursor) FROM spool.entries'),
	"1 $total", 'cursors are 1 .. N without holes');

# Promotions happened, interleaved between the two sources (how many depends
# on the machine's load; a handful proves the scenario was exercised).
my $switches = sql(q{SELECT count(*) FROM (
	SELECT source, lag(source) OVER (ORDER BY cursor) AS prev FROM spool.entries) x
	WHERE source <> prev});
cmp_ok($switches, '>=', 5, "the sources' entries interleave in the spool ($switches switches)");
is( sql(q{SELECT count(DISTINCT spooled_at) >= 5 FROM spool.entries}),
	't', 'the entries came in many promotions');

# I-1 for both sources: each offset once, all of them, in cursor order per
# partition; the stored next offsets are at the high watermarks.
is( sql(q{SELECT count(*) FROM (SELECT source, topic, kafka_partition, kafka_offset
	FROM spool.entries GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d}),
	'0', 'no Kafka offset is in the spool twice');
for my $t ([ 'co_a', 3, $produced{co_a} ], [ 'co_b', 2, $produced{co_b} ])
{
	my ($topic, $nparts, $n) = @$t;
	my $sum = 0;
	for my $p (0 .. $nparts - 1)
	{
		my ($low, $high) = $kafka->wmarks($topic, $p);
		$sum += $high;
		is( sql(qq{SELECT count(*) || ' ' || coalesce(min(kafka_offset), -1) || ' '
			|| coalesce(max(kafka_offset), -1) FROM spool.entries
			WHERE source = '$topic' AND kafka_partition = $p}),
			"$high 0 " . ($high - 1),
			"$topic [$p]: offsets 0 .. " . ($high - 1) . ' each once');
		is( sql(qq{SELECT next_offset FROM spool.offsets
			WHERE source = '$topic' AND kafka_partition = $p}),
			$high, "$topic [$p]: next_offset is the high watermark $high");
	}
	is($sum, $n, "$topic: $n messages were produced");
	is( sql(qq{SELECT count(*) FROM (SELECT kafka_offset < lag(kafka_offset)
		OVER (PARTITION BY kafka_partition ORDER BY cursor) AS back
		FROM spool.entries WHERE source = '$topic') x WHERE back}),
		'0', "$topic: within a partition, cursors follow offsets")
	  or diag sql(qq{SELECT * FROM (SELECT cursor, kafka_partition, kafka_offset,
		lag(kafka_offset) OVER w AS prev_off, lag(cursor) OVER w AS prev_cur, spooled_at
		FROM spool.entries WHERE source = '$topic'
		WINDOW w AS (PARTITION BY kafka_partition ORDER BY cursor)) x
		WHERE kafka_offset < prev_off LIMIT 10});
	is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = '$topic'
		AND (value->>'seq')::bigint IS NULL}),
		'0', "$topic: every entry has its JSON value");
}
is(sql('SELECT count(*) FROM spool.dead_letters'), '0', 'no dead letters');
is(sql('SELECT count(*) FROM spool.gaps'), '0', 'no gaps');

# The prefix checker.
is(finish_pgbench($checker), 0, 'the prefix checker ran without errors');
my ($checks, $bad, $max_seen) = split /\|/,
  sql('SELECT count(*), count(*) FILTER (WHERE NOT ok), max(max_cursor) FROM prefix_checks');
cmp_ok($checks, '>=', 100, "the prefix checker took $checks snapshots");
is($bad, 0, 'every snapshot saw exactly the cursors 1 .. max')
  or diag sql('SELECT * FROM prefix_checks WHERE NOT ok LIMIT 10');
cmp_ok($max_seen, '>', 0, 'the prefix checker saw entries');

# spool.read with a wait: it sleeps while nothing comes, and returns promptly,
# with the new entry, when a message arrives.
{
	my $t0 = time;
	my $n = read_some(500, '1 s');
	my $el = time - $t0;
	is($n, 0, 'a read with a wait and nothing new returns nothing');
	cmp_ok($el, '>=', 0.8, sprintf('... after waiting about the wait (%.2fs)', $el));

	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[
			'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d',
			$node->connstr('postgres'), '-c',
			"SELECT extract(epoch FROM clock_timestamp() - statement_timestamp())"
			  . " || '|' || count(*) || '|' || coalesce(min(cursor), -1)"
			  . " || '|' || coalesce(max(kafka_offset), -1)"
			  . " FROM spool.read($total, 500, '60 s') WHERE source = 'co_b'"
		],
		'>', \$out, '2>', \$err,
		IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
	poll_ok($node,
		q{SELECT count(*) = 1 FROM pg_stat_activity
		   WHERE query LIKE '%spool.read(%60 s%' AND wait_event_type = 'Extension'
		     AND pid <> pg_backend_pid()},
		'the waiting read to sleep');
	my $waited_before = time;
	my $ans = $kafka->cmd('produce_one co_b 1 wk {"late":true}');
	my ($off) = $ans =~ /^OK produced 1 1 (\d+)$/;
	ok(defined $off, "one more message produced to co_b [1] ($ans)");
	$h->finish;
	my $wall = time - $waited_before;
	chomp $out;
	my ($el2, $cnt, $cur, $koff) = split /\|/, $out;
	note "waiting read: '$out' $err";
	is($cnt, 1, 'the waiting read returned the new entry');
	is($cur, $total + 1, '... with the next cursor');
	is($koff, $off, '... and its Kafka offset');
	cmp_ok($wall, '<', 15,
		sprintf('the waiting read returned %.2fs after the produce', $wall));
	cmp_ok($el2, '<', 30, "... well before its 60 s wait ran out (${el2}s in all)");
}

$reader->quit;
$node->stop;
$kafka->stop;
done_testing();

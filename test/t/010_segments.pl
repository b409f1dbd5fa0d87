
# Segments and retention of the spool (spool.segment_size = 100,
# spool.min_retention = 0):
#   - ~1000 ingested messages fill segments of 100 cursors; spool.segments
#     shows their ranges, the full ones 'sealed', the last one 'active'; the
#     rows of the segments add up to the entries, and each partition
#     spool.entries_<n> holds exactly the cursors of its range;
#   - a consumer registered at 0 before the ingest holds every segment back,
#     also across retention passes;
#   - committing it to 550 drops exactly the segments with max_cursor <= 550
#     (their partitions go), the others stay;
#   - without consumers every sealed segment goes, never the active one;
#   - no row is ever DELETEd (a row trigger and the table statistics say so).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm
use SpoolTest;
use SpoolKafka;
use Test::More;
use Time::HiRes qw(time);

my $kafka = SpoolKafka->start(topics => ['seg:2']);
my $bootstrap = $kafka->bootstrap;
my $node = spool_node(
	'segments',
	'spool.segment_size' => 100,
	'spool.min_retention' => 0);

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Bounded wait for $query to return 't'; returns success.

is(sql('SHOW spool.segment_size'), '100', 'spool.segment_size is 100');
is(sql('SHOW spool.min_retention'), '0', 'spool.min_retention is 0');

# Any row DELETE on the spool is recorded (the row trigger is cloned to
# every partition attached later).
sql(<<'EOSQL');
CREATE TABLE del_log (tab text, cursor bigint, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION log_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.del_log (tab, cursor) VALUES (TG_TABLE_NAME, OLD.cursor);
	RETURN OLD;
END $$;
CREATE TRIGGER entries_deleted AFTER DELETE ON spool.entries
	FOR EACH ROW EXECUTE FUNCTION public.log_del();
EOSQL

is(sql(q{SELECT spool.register_consumer('c1', 0)}), '0',
	'consumer c1 registered at cursor 0, before the ingest');

my $total = 1050;
sql(qq{SELECT spool.create_source('sg', '$bootstrap', ARRAY['seg'],
	'{"batch_size": 64, "batch_ms": 5}')});
sql(q{SELECT spool.start_source('sg')});
$kafka->cmd("produce seg $total -1 200 0");
poll_within($node, 60, "SELECT count(*) = $total FROM spool.entries", "$total entries");
is(sql('SELECT min(cursor) || \' \' || max(cursor) FROM spool.entries'),
	"1 $total", "cursors 1 .. $total");

# The segments.
my %seg;
for my $line (split /\n/,
	sql('SELECT segment, min_cursor, max_cursor, rows, state FROM spool.segments ORDER BY segment'))
{
	my ($s, $lo, $hi, $rows, $state) = split /\|/, $line;
	$seg{$s} = { lo => $lo, hi => $hi, rows => $rows, state => $state };
}
my $nfull = int($total / 100);    # 10 full segments, then one with 50
for my $s (1 .. $nfull + 1)
{
	my $g = $seg{$s};
	ok($g, "segment $s exists") or next;
	is("$g->{lo} $g->{hi}", (($s - 1) * 100 + 1) . ' ' . ($s * 100),
		"segment $s covers cursors " . (($s - 1) * 100 + 1) . ' .. ' . ($s * 100));
	if ($s <= $nfull)
	{
		is("$g->{rows} $g->{state}", '100 sealed', "segment $s: 100 rows, sealed");
	}
	else
	{
		is("$g->{rows} $g->{state}", ($total % 100) . ' active',
			"segment $s: " . ($total % 100) . ' rows, active');
	}
}
for my $s (grep { $_ > $nfull + 1 } sort { $a <=> $b } keys %seg)
{
	is("$seg{$s}{rows} $seg{$s}{state}", '0 active', "segment $s ahead of the cursor: empty, active");
}
is(sql(q{SELECT sum(rows) FROM spool.segments WHERE state <> 'dropped'}),
	sql('SELECT count(*) FROM spool.entries'), 'the rows of the segments add up to the entries');

# Each partition holds exactly its range.
sub check_partitions
{
	my ($label) = @_;
	my @bad;
	for my $line (split /\n/,
		sql(q{SELECT segment, min_cursor, max_cursor, rows FROM spool.segments
			WHERE state <> 'dropped' ORDER BY segment}))
	{
		my ($s, $lo, $hi, $rows) = split /\|/, $line;
		my $bound = sql(qq{SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c
			WHERE c.oid = 'spool.entries_$s'::regclass});
		push @bad, "entries_$s bound $bound"
		  unless $bound eq "FOR VALUES FROM ('$lo') TO ('" . ($hi + 1) . "')";
		my $got = sql(qq{SELECT count(*) || ' ' || count(*) FILTER (WHERE cursor BETWEEN $lo AND $hi)
			FROM spool.entries_$s});
		push @bad, "entries_$s holds '$got', segment says $rows rows in [$lo, $hi]"
		  unless $got eq "$rows $rows";
		my $full = sql(qq{SELECT count(DISTINCT cursor) = $hi - $lo + 1 FROM spool.entries_$s});
		push @bad, "entries_$s is sealed with holes"
		  if $full ne 't' && sql("SELECT state FROM spool.segments WHERE segment = $s") eq 'sealed';
	}
	is(scalar(@bad), 0, "$label: every partition holds exactly the cursors of its segment")
	  or diag join("\n", @bad);
	is( sql(q{SELECT count(*) FROM spool.entries e
			WHERE e.tableoid <> ('spool.entries_' || (SELECT segment FROM spool.segments s
				WHERE e.cursor BETWEEN s.min_cursor AND s.max_cursor))::regclass}),
		'0', "$label: every entry is in its segment's partition");
}
check_partitions('after the ingest');

# c1 at 0 holds everything back, across a retention pass (they run every
# 10 s): wait until one has surely run after the last segment was sealed.
{
	my $t0 = time;
	my ($dropped, $done) = (0, 'f');
	while (time - $t0 < 40)
	{
		($dropped, $done) = split /\|/, sql(q{SELECT count(*) FILTER (WHERE state = 'dropped'),
			clock_timestamp() > max(sealed_at) + interval '12 s' FROM spool.segments});
		last if $dropped > 0 || $done eq 't';
		select(undef, undef, undef, 0.5);
	}
	is($done, 't', 'a retention pass ran after the segments were sealed');
	is($dropped, 0, 'no segment was dropped while c1 is at cursor 0');
	is(sql('SELECT count(*) FROM spool.entries'), $total, "all $total entries are still there");
}

# Committing c1 to 550 drops exactly the segments with max_cursor <= 550.
is(sql(q{SELECT spool.commit_consumer('c1', 550)}), '550', 'c1 committed to 550');
poll_within($node, 30, q{SELECT count(*) = 5 FROM spool.segments WHERE state = 'dropped'},
	'retention to drop 5 segments');
is( sql(q{SELECT string_agg(segment::text, ',' ORDER BY segment) FROM spool.segments
		WHERE state = 'dropped'}),
	'1,2,3,4,5', 'the dropped segments are 1 .. 5 (max_cursor <= 550)');
is( sql(q{SELECT count(*) FROM spool.segments
		WHERE state = 'dropped' AND (max_cursor > 550 OR to_regclass('spool.entries_' || segment) IS NOT NULL)}),
	'0', 'their partitions are gone');
is( sql(q{SELECT string_agg(segment::text, ',' ORDER BY segment) FROM spool.segments
		WHERE state = 'sealed'}),
	'6,7,8,9,10', 'segments 6 .. 10 stay sealed (segment 6 ends at 600 > 550)');
is(sql('SELECT count(*) || \' \' || min(cursor) FROM spool.entries'),
	($total - 500) . ' 501', 'the spool holds the entries from cursor 501');
is(sql(q{SELECT sum(rows) FROM spool.segments WHERE state <> 'dropped'}),
	$total - 500, 'the rows of the remaining segments add up to the entries');
is(sql(q{SELECT count(*) FROM spool.read(0, 10)}), '10', 'spool.read still works');
is(sql(q{SELECT min(cursor) FROM spool.read(0, 10)}), '501',
	'spool.read from 0 starts at the first kept cursor');
check_partitions('after commit 550');

# Without consumers every sealed segment goes, never the active one.
is(sql(q{SELECT spool.drop_consumer('c1')}), 't', 'c1 dropped');
poll_within($node, 30, q{SELECT count(*) = 0 FROM spool.segments WHERE state = 'sealed'},
	'retention to drop every sealed segment');
is( sql(q{SELECT string_agg(segment::text, ',' ORDER BY segment) FROM spool.segments
		WHERE state = 'dropped'}),
	join(',', 1 .. $nfull), "segments 1 .. $nfull are dropped");
is( sql(q{SELECT state || ' ' || rows || ' ' || (to_regclass('spool.entries_' || segment) IS NOT NULL)
		FROM spool.segments WHERE segment = } . ($nfull + 1)),
	'active ' . ($total % 100) . ' true', 'the active segment stays, with its rows and partition');
is(sql('SELECT count(*) || \' \' || min(cursor) || \' \' || max(cursor) FROM spool.entries'),
	($total % 100) . ' ' . ($nfull * 100 + 1) . " $total",
	'the spool holds the entries of the active segment');
check_partitions('without consumers');

# Ingest goes on after the drops.
$kafka->cmd("produce seg 100 -1 200 $total");
poll_within($node, 60, 'SELECT coalesce(max(cursor), 0) = ' . ($total + 100) . ' FROM spool.entries',
	'100 more entries');
is( sql(q{SELECT state || ' ' || rows FROM spool.segments WHERE segment = } . ($nfull + 1)),
	'sealed 100', 'the formerly active segment is now full and sealed')
  or diag sql('SELECT * FROM spool.segments ORDER BY segment');
check_partitions('after more ingest');

# No row was ever deleted.
is(sql('SELECT count(*) FROM del_log'), '0', 'no row was DELETEd from the spool (trigger)');
is( sql(q{SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables
		WHERE schemaname = 'spool' AND relname LIKE 'entries\_%'}),
	'0', 'n_tup_del of the spool partitions is 0');
is(sql(q{SELECT count(*) FROM spool.dead_letters}), '0', 'no dead letters');

$node->stop;
$kafka->stop;
done_testing();

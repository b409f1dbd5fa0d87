
# The stage numbers move with the work (docs/operations.md, observability):
# after N messages are ingested, promoted, processed and their outputs
# delivered,
#   - spool.ingest_stats: the batches' rows add up to N, and every batch
#     has one reason that ended it (size + bytes + time + stop = batches);
#   - spool.promoter_status: the promotions' entries add up to N, and the
#     lag histogram has a sample per promotion at most;
#   - spool.processor_stats: the active replica's batches hold N entries,
#     each batch was committed once (commits = batches) and timed, and
#     snapshots were taken (checkpoint_every is small);
#   - in every histogram of spool.stage_histograms the buckets add up to
#     its count;
#   - spool.metrics() shows the same numbers as _count and _sum samples.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm
use SpoolTest;
use SpoolKafka;
use SpoolProcessor;
use Test::More;

my $N = 3000;
my $kafka = SpoolKafka->start(topics => ['sm:4']);
my $node = spool_node('stage_metrics');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# One sample of spool.metrics(), by its name and labels as printed.
sub metric
{
	my ($sample) = @_;
	my $m = sql('SELECT spool.metrics()');
	my ($v) = $m =~ /^\Q$sample\E (\S+)$/m;
	return $v // '(none)';
}

is(sql(q{SELECT count(*) FROM spool.promoter_status WHERE promotions = 0 AND entries = 0}),
	'1', 'promoter_status: one row, nothing promoted yet');

processor_setup($node, $kafka->bootstrap, 'sm', options => '{"checkpoint_every": 500}');
wait_gate($node, 'p', 2);
is($kafka->produce('sm', $N, -1, 200), "OK produced $N", "produce $N messages");
wait_processed($node, 'p', $N, 'stage metrics');

# Ingest.
my ($batches, $ends, $rows, $rmax) = split /\|/, sql(q{SELECT batches,
	ended_size + ended_bytes + ended_time + ended_stop, rows, rows_max
	FROM spool.ingest_stats WHERE source = 'src'});
cmp_ok($batches, '>', 0, "ingest_stats: src staged $batches batches");
is($ends, $batches, 'ingest_stats: every batch has one reason that ended it');
is($rows, $N, "ingest_stats: the batches' rows add up to $N");
cmp_ok($rmax, '<=', 10000, 'ingest_stats: no batch above batch_size (10000)');
is(sql(q{SELECT batch_ms_p50_le IS NOT NULL AND batch_ms_max >= 0 AND stage_ms_p99_le IS NOT NULL
	AND last_batch_at IS NOT NULL FROM spool.ingest_stats WHERE source = 'src'}),
	't', 'ingest_stats: batch and staging times are there');

# Promoter.
my ($promotions, $entries, $lagn) = split /\|/, sql(q{SELECT promotions, entries,
	(SELECT count FROM spool.stage_histograms WHERE stage = 'promoter' AND histogram = 'lag_ms')
	FROM spool.promoter_status});
cmp_ok($promotions, '>', 0, "promoter_status: $promotions promotions");
is($entries, $N, "promoter_status: the promotions' entries add up to $N");
cmp_ok($lagn, '>', 0, "promoter lag: $lagn samples");
cmp_ok($lagn, '<=', $promotions, 'promoter lag: at most one sample per promotion');

# Processors.  Every gate commit is counted once, by the replica that made
# it: the commits add up to the checkpoint row's batches, takeovers or not.
is(sql(q{SELECT sum(s.commits) = c.batches FROM spool.processor_stats s
	JOIN spool.processor_checkpoints c USING (processor) WHERE processor = 'p' GROUP BY c.batches}),
	't', 'processor_stats: the commits of the replicas add up to the checkpoint\'s batches');
# Without a takeover (the normal case here) the first active did every batch.
my $active = sql(q{SELECT replica FROM spool.processor_status WHERE processor = 'p' AND role = 'active'});
like($active, qr/^\d+$/, "the active replica is $active");
my $clean = sql(q{SELECT sum(takeovers) = 0 AND sum(errors) = 0 FROM spool.processor_status
	WHERE processor = 'p'}) eq 't';
my ($pb, $pe, $pc, $ps, $tm) = split /\|/, sql(qq{SELECT batches, entries, commits, snapshots,
	batch_ms_max >= handler_ms_max AND commit_ms_p50_le IS NOT NULL
	FROM spool.processor_stats WHERE processor = 'p' AND replica = $active});
SKIP:
{
	skip 'a takeover or an error happened: the batches are shared between replicas', 2
	  unless $clean;
	is($pe, $N, "processor_stats: the active's batches hold $N entries");
	is($pc, $pb, "processor_stats: each of the $pb batches committed once");
}
cmp_ok($ps, '>=', 1, "processor_stats: $ps snapshots (checkpoint_every 500)");
is($tm, 't', 'processor_stats: handler time within batch time, commit times there');

# Every histogram: the buckets add up to the count.
is(sql(q{SELECT count(*) FROM spool.stage_histograms
	WHERE (SELECT coalesce(sum(c), 0) FROM unnest(counts) c) <> count
	   OR cardinality(counts) <> cardinality(bounds) + 1}),
	'0', 'stage_histograms: buckets add up to the count, one more bucket than bounds');
is(sql(q{SELECT string_agg(DISTINCT stage, ',' ORDER BY stage) FROM spool.stage_histograms}),
	'ingest,outbox,processor,promoter', 'stage_histograms: every stage is there');

# The same numbers in spool.metrics().
is(metric('spool_ingest_batch_rows_count{source="src"}'), $batches,
	'metrics: spool_ingest_batch_rows_count is the batches');
is(metric('spool_ingest_batch_rows_sum{source="src"}'), $N,
	'metrics: spool_ingest_batch_rows_sum is the rows');
is(metric('spool_promoter_batch_entries_sum'), $N,
	'metrics: spool_promoter_batch_entries_sum is the entries');
is(metric(qq{spool_processor_batch_entries_sum{processor="p",replica="$active"}}), $pe,
	'metrics: spool_processor_batch_entries_sum of the active is its entries');
is(metric(qq{spool_processor_batch_entries_bucket{processor="p",replica="$active",le="+Inf"}}), $pb,
	'metrics: the +Inf bucket is the batches');

$node->stop;
$kafka->stop;
done_testing();

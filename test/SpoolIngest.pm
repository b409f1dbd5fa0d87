# Checks shared by the Kafka ingest TAP tests.
#
#   use SpoolIngest;
#   spool_partitions_exact($node, $kafka, $source, $topic, $nparts, $n);
#   spool_seqs_match($node, $source, $nparts, $seqs_sql, $what);
#
# waits (bounded) until source $source has $n entries and stored offsets
# adding up to $n, then asserts I-1 for every partition of $topic: the spool
# holds exactly the offsets 0 .. high - 1, once each, the stored next offset
# is the high watermark, and cursor order is offset order within a partition.
package SpoolIngest;

use strict;
use warnings;

use Exporter 'import';
use SpoolTest;
use Test::More;

our @EXPORT = qw(spool_partitions_exact spool_seqs_match);

sub spool_partitions_exact
{
	my ($node, $kafka, $source, $topic, $nparts, $n) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $sql = sub { $node->safe_psql('postgres', $_[0]) };

	poll_ok($node,
		"SELECT count(*) >= $n FROM spool.entries WHERE source = '$source'",
		"$source: $n entries in the spool");
	poll_ok($node,
		"SELECT coalesce(sum(next_offset), 0) = $n FROM spool.offsets WHERE source = '$source'",
		"$source: stored next offsets to add up to $n");
	is($sql->("SELECT count(*) FROM spool.entries WHERE source = '$source'"),
		$n, "$source: exactly $n entries");
	is( $sql->(qq{SELECT count(*) FROM (SELECT 1 FROM spool.entries
		WHERE source = '$source' GROUP BY topic, kafka_partition, kafka_offset
		HAVING count(*) > 1) d}),
		'0', "$source: no (topic, partition, offset) is in the spool twice");
	my $sum = 0;
	for my $p (0 .. $nparts - 1)
	{
		my ($low, $high) = $kafka->wmarks($topic, $p);
		$sum += $high;
		is( $sql->(qq{SELECT count(*) || ' ' || count(DISTINCT kafka_offset) || ' '
			|| coalesce(min(kafka_offset), -1) || ' ' || coalesce(max(kafka_offset), -1)
			FROM spool.entries WHERE source = '$source' AND kafka_partition = $p}),
			"$high $high 0 " . ($high - 1),
			"$source [$p]: offsets 0 .. " . ($high - 1) . ', each once (contiguous)');
		is( $sql->(qq{SELECT next_offset FROM spool.offsets
			WHERE source = '$source' AND topic = '$topic' AND kafka_partition = $p}),
			$high, "$source [$p]: stored next_offset is the high watermark $high");
	}
	is($sum, $n, "$source: the high watermarks add up to $n");
	is( $sql->(qq{SELECT count(*) FROM (SELECT kafka_offset, lag(kafka_offset)
		OVER (PARTITION BY topic, kafka_partition ORDER BY cursor) AS prev
		FROM spool.entries WHERE source = '$source') x
		WHERE kafka_offset <> prev + 1}),
		'0', "$source: within a partition, cursor order is offset order, step 1");
	return $sum;
}

# Every seq in the set $seqs_sql (a set-returning SQL expression, such as
# generate_series(0, 99)) is in the spool with what the test Kafka cluster
# produced for it: key k<seq>, partition seq % $nparts, and its JSON value.
sub spool_seqs_match
{
	my ($node, $source, $nparts, $seqs_sql, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;

	is( $node->safe_psql('postgres', qq{SELECT count(*) FROM $seqs_sql s
		WHERE NOT EXISTS (SELECT 1 FROM spool.entries e WHERE e.source = '$source'
		  AND (e.value->>'seq')::bigint = s
		  AND e.key = convert_to('k' || s, 'UTF8')
		  AND e.value->>'key' = 'k' || s
		  AND (e.value->>'amount')::int = s % 1000
		  AND e.kafka_partition = s % $nparts
		  AND e.value->>'pad' ~ '^x+\$')}),
		'0', $what);
}

1;

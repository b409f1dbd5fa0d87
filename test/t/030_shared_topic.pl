
# Two servers sharing one topic (docs/sources.md, "Sharing a topic").
#
# Servers "share_a" and "share_b" each run source s on topic sh (4
# partitions) in one consumer group: a with share "1/2" (partitions 0, 2),
# b with "2/2" (1, 3).  Checked, with messages streaming in:
#   - each spool holds exactly its partitions, and across both spools every
#     (partition, offset) produced is there exactly once;
#   - an overlapping share (b changed to "1/1") is refused for the partitions
#     a claims: b logs it and does not consume them;
#   - a hand-over while both run: a's list becomes [0], so a releases
#     partition 2 once its staged rows are promoted, and b (which waits for
#     it) takes it over at the released offset; then back: b's list becomes
#     [1, 3] and a's [0, 2], a takes 2 over at b's released offset and
#     records the offsets b consumed as a gap 'handover';
#   - after each step, every (partition, offset) produced is in exactly one
#     of the two spools, none twice, none missing.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";
use SpoolTest;
use SpoolKafka;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $nparts = 4;
my $kafka = SpoolKafka->start(topics => ["sh:$nparts"]);
my $next_seq = 0;

sub produce
{
	my ($n) = @_;
	my $ans = $kafka->produce('sh', $n, -1, 100, $next_seq);
	die "produce $n from $next_seq: $ans" unless $ans eq "OK produced $n";
	$next_seq += $n;
}

my $na = spool_node('share_a');
my $nb = spool_node('share_b');
my $bootstrap = $kafka->bootstrap;

sub source_options
{
	my ($node, $share) = @_;
	$node->safe_psql('postgres',
		"SELECT spool.alter_source('s', options => '$share'::jsonb)");
}
for ([ $na, '{"share": "1/2"}' ], [ $nb, '{"share": "2/2"}' ])
{
	my ($node, $share) = @$_;
	$node->safe_psql('postgres', qq{
		SELECT spool.create_source('s', '$bootstrap', '{sh}',
			'{"group_id": "shared", "claim_timeout": "10 s", "batch_ms": 20}'::jsonb || '$share'::jsonb);
		SELECT spool.start_source('s');});
}

# Every produced (partition, offset) in exactly one of the two spools.
sub fleet_exactly_once
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $total = 0;
	my %high;
	for my $p (0 .. $nparts - 1)
	{
		(undef, $high{$p}) = $kafka->wmarks('sh', $p);
		$total += $high{$p};
	}
	my ($t0, $n) = (time, 0);
	while (time - $t0 < 120)
	{
		$n = 0;
		$n += $_->safe_psql('postgres', "SELECT count(*) FROM spool.entries WHERE source = 's'") for ($na, $nb);
		last if $n >= $total;
		select(undef, undef, undef, 0.2);
	}
	ok($n >= $total, sprintf('%s: %d entries across both spools (%.1fs)', $what, $total, time - $t0));
	my (%seen, @twice);
	for my $node ($na, $nb)
	{
		for (split /\n/, $node->safe_psql('postgres',
			"SELECT kafka_partition || ':' || kafka_offset FROM spool.entries WHERE source = 's'"))
		{
			push @twice, $_ if $seen{$_}++;
		}
	}
	is(scalar(@twice), 0, "$what: no (partition, offset) in both spools or twice")
	  or diag("twice: @twice[0 .. ($#twice < 9 ? $#twice : 9)]");
	my @missing;
	for my $p (0 .. $nparts - 1)
	{
		for my $o (0 .. $high{$p} - 1)
		{
			push @missing, "$p:$o" unless $seen{"$p:$o"};
		}
	}
	is(scalar(@missing), 0, "$what: every (partition, offset) produced is spooled")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
}

sub partitions_of
{
	my ($node) = @_;
	return $node->safe_psql('postgres',
		"SELECT string_agg(DISTINCT kafka_partition::text, ',' ORDER BY kafka_partition::text)"
		  . " FROM spool.entries WHERE source = 's'");
}

$_->wait_for_log(qr/source "s": claimed 2 partitions in group "shared"/) for ($na, $nb);
pass('both servers claimed their partitions');
produce(400);
fleet_exactly_once('shares 1/2 and 2/2');
is(partitions_of($na), '0,2', 'a spooled partitions 0 and 2');
is(partitions_of($nb), '1,3', 'b spooled partitions 1 and 3');

# An overlapping share: b would take every partition; a's are refused.
my $b_log = -s $nb->logfile;
source_options($nb, '{"share": "1/1"}');
$nb->wait_for_log(qr/source "s": partition sh \[[02]\] is consumed by another server/, $b_log);
pass('b refuses the partitions a claims');
produce(200);
fleet_exactly_once('b with the overlapping share 1/1');
is(partitions_of($nb), '1,3', 'b still spooled only partitions 1 and 3');

# Hand-over of partition 2 from a to b, while both run.
my $a_log = -s $na->logfile;
$b_log = -s $nb->logfile;
source_options($na, '{"share": null, "partitions": [0]}');
$na->wait_for_log(qr/source "s": partition sh \[2\] released at offset \d+/, $a_log);
my ($released) = slurp_file($na->logfile, $a_log) =~ /partition sh \[2\] released at offset (\d+)/;
pass("a released partition 2 at offset $released");
is($na->safe_psql('postgres', "SELECT next_offset FROM spool.offsets WHERE source = 's' AND kafka_partition = 2"),
	$released, 'the released offset is where a\'s spool ends');
$nb->wait_for_log(qr/source "s": partition sh \[2\] taken over from \S+ at offset $released/, $b_log);
pass("b took partition 2 over at offset $released");
produce(200);
fleet_exactly_once('partition 2 handed over to b');
source_options($nb, '{"share": null, "partitions": [1, 2, 3]}');
produce(100);
fleet_exactly_once('b with the list [1, 2, 3]');

# And back: b gives partition 2 up, a takes it over above its old offset.
$a_log = -s $na->logfile;
$b_log = -s $nb->logfile;
source_options($nb, '{"partitions": [1, 3]}');
$nb->wait_for_log(qr/source "s": partition sh \[2\] released at offset \d+/, $b_log);
my ($released_b) = slurp_file($nb->logfile, $b_log) =~ /partition sh \[2\] released at offset (\d+)/;
cmp_ok($released_b, '>', $released, "b released partition 2 at offset $released_b");
source_options($na, '{"partitions": [0, 2]}');
$na->wait_for_log(qr/source "s": partition sh \[2\] taken over from \S+ at offset $released_b/, $a_log);
pass("a took partition 2 back at offset $released_b");
is($na->safe_psql('postgres',
		"SELECT from_offset || '-' || to_offset FROM spool.gaps WHERE source = 's' AND action = 'handover'"),
	"$released-$released_b", 'a records the offsets b consumed as a gap handover');
produce(200);
fleet_exactly_once('partition 2 back on a');

note(sprintf('total test time %.1fs', time - $t_start));
$na->stop;
$nb->stop;
done_testing();

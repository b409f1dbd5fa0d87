
# Broker outage under a running source, with 1 broker and with 3 brokers
# (the mock does not move leadership: with 3 brokers the partitions led by
# the downed broker stall while the others go on).
#   - produce, ingest;
#   - "down 1" for several seconds while the test keeps trying to produce
#     (one message at a time, to each partition; what the cluster
#     acknowledges is expected in the spool, the rest fails);
#   - source_status shows state 'error' on the partitions the downed broker
#     leads (they cannot deliver data, so by the state rule of
#     docs/sources.md the state holds until the test brings the broker
#     back), the source's errors counter grew and last_error_at is after the
#     outage began, with a last_error naming the broker;
#   - "up 1", produce more: everything is ingested exactly once (each offset
#     once, contiguous, next_offset at the high watermark, every produced seq
#     once with its key and value) and the state is 'running' again.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm
use SpoolTest;
use SpoolKafka;
use SpoolIngest;
use Test::More;
use Time::HiRes qw(time);

my $node = spool_node('ingest_broker_outage');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# The spool holds exactly the offsets 0 .. high - 1 of each partition of
# $topic once, the stored next offsets are the highs, and every seq in
# @$seqs is there once with its key and value; plus the messages in
# $extra (key => [partition, offset]) at their offsets, and those in
# @$maybe (produce attempts that failed: a timed-out request may still have
# been written) at most once.
sub check_exact
{
	my ($kafka, $source, $topic, $nparts, $seqs, $extra, $maybe) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $n = 0;
	for my $p (0 .. $nparts - 1)
	{
		my ($low, $high) = $kafka->wmarks($topic, $p);
		$n += $high;
	}
	my $known = @$seqs + keys %$extra;
	cmp_ok($n, '>=', $known,
		"$topic holds the $known acknowledged messages ($n in all)");
	cmp_ok($n - $known, '<=', scalar(@$maybe),
		'... and at most the ' . scalar(@$maybe) . ' failed attempts besides');

	spool_partitions_exact($node, $kafka, $source, $topic, $nparts, $n);

	my $list = join(',', @$seqs);
	is( sql(qq{SELECT count(*) || ' ' || count(DISTINCT s) FROM (
		SELECT (value->>'seq')::bigint AS s FROM spool.entries
		 WHERE source = '$source' AND value ? 'seq') x}),
		scalar(@$seqs) . ' ' . scalar(@$seqs), "$source: no seq twice");
	spool_seqs_match($node, $source, $nparts, "unnest('{$list}'::bigint[])",
		"$source: every produced seq is there with its key, partition and value");
	for my $k (sort keys %$extra)
	{
		my ($p, $off) = @{ $extra->{$k} };
		is( sql(qq{SELECT encode(key, 'escape') || ' ' || value::text FROM spool.entries
			WHERE source = '$source' AND kafka_partition = $p AND kafka_offset = $off}),
			qq{$k {"during": "$k"}},
			"$source: the message acknowledged during the outage ($k) is at [$p] $off");
	}
	my $maybe_list = join(',', map { "\"$_\"" } @$maybe);
	is( sql(qq{SELECT count(*) FROM (SELECT value->>'during' AS k FROM spool.entries
		WHERE source = '$source' AND value ? 'during'
		  AND value->>'during' = ANY ('{$maybe_list}'::text[])) x}),
		$n - $known, "$source: the failed attempts that the cluster kept are there once each");
	is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = '$source'
		AND NOT value ? 'seq' AND NOT value ? 'during'}),
		'0', "$source: no other entries");
	is(sql("SELECT count(*) FROM spool.dead_letters WHERE source = '$source'"),
		'0', "$source: no dead letters");
	is(sql("SELECT count(*) FROM spool.gaps WHERE source = '$source'"),
		'0', "$source: no gaps");
}

sub outage
{
	my ($nbrokers) = @_;
	my $source = "out$nbrokers";
	my $topic = "out${nbrokers}_t";
	my $nparts = 4;
	note "==== $nbrokers broker(s)";
	# Produce attempts during the outage fail after 4 s.
	my $kafka = SpoolKafka->start(
		brokers => $nbrokers,
		topics => ["$topic:$nparts"],
		message_timeout => 4000);
	my $bootstrap = $kafka->bootstrap;

	sql(qq{SELECT spool.create_source('$source', '$bootstrap', ARRAY['$topic'],
		'{"batch_size": 200, "batch_ms": 20,
		  "kafka": {"reconnect.backoff.max.ms": 1000}}')});
	sql("SELECT spool.start_source('$source')");
	poll_ok($node,
		"SELECT count(*) = $nparts FROM spool.source_status WHERE source = '$source' AND state = 'running'",
		"$source to run");

	my @seqs;
	my $next_seq = 0;
	my $produce = sub {
		my ($n) = @_;
		is($kafka->produce($topic, $n, -1, 200, $next_seq), "OK produced $n",
			"produce seq $next_seq .. " . ($next_seq + $n - 1));
		push @seqs, $next_seq .. $next_seq + $n - 1;
		$next_seq += $n;
	};

	$produce->(3000);
	poll_ok($node,
		"SELECT count(*) = 3000 FROM spool.entries WHERE source = '$source'",
		"$source to ingest the first 3000");
	is( sql("SELECT count(*) FROM spool.source_status WHERE source = '$source'"
		  . " AND state = 'running' AND last_error IS NULL"),
		$nparts, "$source: running, no error before the outage");
	my $worker_pid = sql(qq{SELECT pid FROM pg_stat_activity WHERE application_name = 'spool ingest $source'});
	like($worker_pid, qr/^\d+$/, "$source: one ingest worker ($worker_pid)");

	my %extra;
	my @maybe;
	# Which broker leads which partitions?  The mock places leaders at
	# random: time one message per partition with an added round trip.
	my ($victim, @led);
	for my $b (1 .. $nbrokers)
	{
		$kafka->cmd("rtt $b 700");
		for my $p (0 .. $nparts - 1)
		{
			my $k = "probe${nbrokers}_${b}_$p";
			my $t = time;
			my $ans = $kafka->cmd(qq{produce_one $topic $p $k {"during": "$k"}});
			push @led, $p if time - $t >= 0.6;
			$extra{$k} = [ $p, $1 ] if $ans =~ /^OK produced 1 $p (\d+)$/;
		}
		$kafka->cmd("rtt $b 0");
		if (@led) { $victim = $b; last; }
	}
	ok(defined $victim, "found a broker that leads partitions of $topic: "
		  . ($victim // 'none') . " leads [@led]");
	$victim //= 1;
	@led = (0) unless @led;
	my @live = grep { my $p = $_; !grep { $_ == $p } @led } 0 .. $nparts - 1;
	# The probes are in the spool before the outage: no message of a led
	# partition can arrive after it and end that partition's error state.
	my $nprobes = grep { /^probe/ } keys %extra;
	poll_ok($node,
		qq{SELECT count(*) = $nprobes FROM spool.entries WHERE source = '$source'
		    AND value->>'during' LIKE 'probe%'},
		"$source: the $nprobes acknowledged probes to be ingested");
	my $errors_before = sql(qq{SELECT errors FROM spool.source_status
		WHERE source = '$source' LIMIT 1});
	my $led_list = join(',', @led);

	# The outage.
	my $t_down = sql('SELECT clock_timestamp()');
	is($kafka->cmd("down $victim"), 'OK', "broker $victim down");
	# The rule: an error puts every partition in the error state until the
	# partition delivers data (after a refresh showed the error) or 35 s pass
	# without a new error.  The led partitions cannot deliver data now.
	poll_ok($node,
		qq{SELECT count(*) = } . scalar(@led) . qq{ FROM spool.source_status
		    WHERE source = '$source' AND kafka_partition IN ($led_list)
		      AND state = 'error' AND error_since >= '$t_down'
		      AND last_error IS NOT NULL AND last_error_at >= '$t_down'},
		"$source: the partitions [@led] of broker $victim to show state 'error'");
	my $t0 = time;
	my ($attempts, $acked, $failed) = (0, 0, 0);
	# Keep trying to produce, one message per partition in turn, for at
	# least 6 s and at least once to a partition of each kind (an attempt
	# on a downed leader fails after the message timeout).
	# Each round tries the partitions of the live brokers first.
	my @order = (@live, @led);
	my ($tried_led, $tried_live) = (0, !@live);
	while ($attempts < 12 && (time - $t0 < 6 || !$tried_led || !$tried_live))
	{
		my $p = $order[ $attempts % @order ];
		$tried_led ||= grep { $_ == $p } @led;
		$tried_live ||= grep { $_ == $p } @live;
		my $k = "d${nbrokers}_$attempts";
		my $ans = $kafka->cmd(qq{produce_one $topic $p $k {"during": "$k"}},
			allow_error => 1);
		$attempts++;
		if ($ans =~ /^OK produced 1 $p (\d+)$/)
		{
			$extra{$k} = [ $p, $1 ];
			$acked++;
		}
		else
		{
			note "produce during the outage: $ans";
			push @maybe, $k;
			$failed++;
		}
	}
	note sprintf('%d produce attempts during %.1fs of outage: %d acknowledged, %d failed',
		$attempts, time - $t0, $acked, $failed);
	cmp_ok($failed, '>', 0, "producing to the partitions led by broker $victim failed");
	if (@live)
	{
		my $n_live = grep { /^d/ } keys %extra;
		cmp_ok($n_live, '>', 0, "messages to partitions [@live] were acknowledged during the outage");
		poll_ok($node,
			qq{SELECT count(*) = $n_live FROM spool.entries WHERE source = '$source'
			    AND value->>'during' LIKE 'd%'},
			"$source: the partitions [@live] of the live brokers to keep flowing during the outage");
	}
	my ($state, $errors, $err) = split /\|/, sql(qq{SELECT string_agg(DISTINCT state, ','),
		  max(errors), max(last_error)
		FROM spool.source_status WHERE source = '$source' AND kafka_partition IN ($led_list)}), 3;
	note sprintf('status after %.1fs of outage: [@led] %s, %s errors: %s', time - $t0, $state, $errors, $err);
	my $port = (split /,/, $bootstrap)[ $victim - 1 ];
	$port =~ s/^127\.0\.0\.1://;
	cmp_ok($errors, '>', $errors_before,
		"$source: the errors counter grew during the outage ($errors_before -> $errors)");
	like($err, qr/127\.0\.0\.1:$port|broker|Disconnected|Connection refused|down/i,
		"$source: last_error mentions the broker");
	is(sql(qq{SELECT pid FROM pg_stat_activity WHERE application_name = 'spool ingest $source'}),
		$worker_pid, "$source: the ingest worker ($worker_pid) is still alive during the outage");

	is($kafka->cmd("up $victim"), 'OK', "broker $victim up again");
	# Until the cluster's producer has reconnected to it (bounded).
	my $back = 0;
	for my $i (1 .. 10)
	{
		my $k = "u${nbrokers}_$i";
		my $ans = $kafka->cmd(qq{produce_one $topic $led[0] $k {"during": "$k"}},
			allow_error => 1);
		if ($ans =~ /^OK produced 1 $led[0] (\d+)$/)
		{
			$extra{$k} = [ $led[0], $1 ];
			$back = 1;
			last;
		}
		note "produce after up: $ans";
		push @maybe, $k;
	}
	ok($back, "a message to partition $led[0] was acknowledged after the broker came back");
	$produce->(3000);
	$produce->(1000);

	check_exact($kafka, $source, $topic, $nparts, \@seqs, \%extra, \@maybe);
	poll_ok($node,
		"SELECT count(*) = $nparts FROM spool.source_status WHERE source = '$source'"
		  . " AND state = 'running' AND lag = 0",
		"$source: state back to 'running' with lag 0");

	sql("SELECT spool.stop_source('$source')");
	poll_ok($node,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'spool ingest $source'",
		"$source: the ingest worker to stop");
	$kafka->stop;
}

outage(1);
outage(3);

# Cursors over both sources are 1 .. N.
my ($n, $min, $max) = split /\|/,
  sql('SELECT count(*), min(cursor), max(cursor) FROM spool.entries');
is("$min $max", "1 $n", "the $n cursors are 1 .. $n without holes");

$node->stop;
done_testing();

# The pipeline of an idempotent kafka target (docs/outbox.md, "Kafka
# targets"): a shard produces up to 8 batches (KAFKA_PIPE_DEPTH) before the oldest is
# acknowledged and marked; marks go in order, only for acknowledged rows.
# Single-broker test cluster; every topic is read back with consume_all.
# (a) The value text: payloads with escapes, control characters,
#     non-ASCII, nested and empty containers, numbers, raw scalars: each
#     message's value is byte for byte the payload's jsonb text
#     (payload::text), as jsonb's output function writes it.
# (b) A row refused for good (over message.max.bytes) in a batch while the
#     batches after it are in flight (acknowledgements slowed by 30 ms,
#     batch_size 20): it is parked, retried and dead-lettered; every other
#     row is in the topic exactly once, ids rise per key, nothing is left
#     parked and the position covers every row; the rows of its key parked
#     behind it are not produced by the pass that retries it.
# (c) A transient failure of every produce request (the broker answers
#     TOPIC_AUTHORIZATION_FAILED, an error the target treats as one of the
#     target as a whole) while batches are in flight (acknowledgements
#     slowed by 200 ms, batch_size 10, 3000 rows): the shard reports the
#     error; while it lasts, every id at or below the position is in the
#     topic (no mark passed a row that was not acknowledged) and rows are
#     left; after the error is cleared every row arrives, copies only of
#     ids above that position, and per key each copy is either a new
#     highest id or a repeat of one already seen.
# (d) kill -9 of a dispatcher with batches in flight (acknowledgements
#     slowed by 200 ms): after the crash and restart every row is in the
#     topic at least once (none lost), with the same per-key rule.
# (e) The broker down for longer than message.timeout.ms (2 s) while two
#     groups of rows on the same keys are produced a second apart, then up
#     again: the shard gives up by its own deadline ("not every message was
#     acknowledged in time"; librdkafka, whose own message timeout is off,
#     timed nothing out, so no later message of a partition can be written
#     while an earlier one of the same key was dropped), every row arrives,
#     and per key each copy is a new highest id or a repeat.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm, SpoolOutbox.pm
use SpoolTest;
use SpoolKafka;
use SpoolOutbox;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $wait_s = 90;
my $kafka = SpoolKafka->start(brokers => 1, topics => [ 'pa:1', 'pb:2', 'pc:2', 'pd:2', 'pe:2' ]);
my $bs = $kafka->bootstrap;
# The test framework turns restart_after_crash off; (d) needs it.
my $node = spool_node('outbox_kafka_pipeline', restart_after_crash => 'on');
sub sql { return $node->safe_psql('postgres', $_[0]); }

# Enqueue $n rows of target $t on $nkeys keys in one transaction; the ids
# go to table sent_$t (id, key).
sub enqueue_rows
{
	my ($t, $n, $nkeys, $big_at) = @_;
	$big_at //= 0;
	sql(qq{BEGIN;
CREATE TABLE sent_$t AS
SELECT g, 'k' || (g % $nkeys) AS key,
       spool.enqueue('$t', 'k' || (g % $nkeys),
                     jsonb_build_object('g', g, 'pad', repeat('x', CASE WHEN g = $big_at THEN 2000 ELSE 20 END))) AS id
  FROM generate_series(1, $n) g ORDER BY g;
COMMIT;});
	return { map { split /\|/ } split /\n/, sql("SELECT id, key FROM sent_$t") };
}

sub position_of
{
	my ($t) = @_;
	return sql("SELECT position FROM spool.outbox_positions p JOIN spool.targets t ON t.id = p.target_id"
		  . " WHERE t.name = '$t' AND p.shard = 0");
}

# Copies per id in $topic, and whether per key every copy is a new highest
# id or a repeat of one already seen; returns (\%count, \@violations).
sub read_topic
{
	my ($topic, $nparts) = @_;
	my (%count, %high, %seen, @bad);
	for my $m ($kafka->consume_all($topic, $nparts))
	{
		my $id = $m->{outbox_id};
		my $k = $m->{key} // '';
		$count{$id}++;
		if (!$seen{$k}{$id} && defined $high{$k} && $id < $high{$k})
		{
			push @bad, "$k: $id after $high{$k}";
		}
		$seen{$k}{$id} = 1;
		$high{$k} = $id if !defined $high{$k} || $id > $high{$k};
	}
	return (\%count, \@bad);
}

sub show
{
	my @l = @_;
	return scalar(@l) <= 10 ? "@l" : "@l[0..9] ... (" . scalar(@l) . ')';
}

# ---------------------------------------------------------------------------
# (a) The value text, byte for byte.
# ---------------------------------------------------------------------------
sql(qq{SELECT spool.create_target('pa', 'kafka', '{"brokers": "$bs", "topic": "pa"}')});
wait_dispatchers($node, 'pa', 1);
sql(q{CREATE TABLE sent_pa AS
SELECT spool.enqueue('pa', 'k', p) AS id, p
  FROM unnest(ARRAY[
    '{"s": "quote\" back\\\\ slash/ nl\n tab\t cr\r bs\b ff\f ctl\u0001\u001f del\u007f"}',
    '{"u": "é 日本 😀", "é": "key"}',
    '[1, 2.50, -0, 1e3, 1.0e-5, 123456789012345678901234567890, true, false, null, "x", [], {}, [[]], {"a": {"b": []}}]',
    '[0, -1, 7, 9999, 10000, -10000, 10001, 99990000, 100000000, 1234567890123456, 9999999999999999, -9999999999999999, 10000000000000000, 1e16, 12e3, 1.0, 100.00, -0.0, 0.0001, 123456789012345678901234567890]',
    '"raw string"', '123.4500', 'null', 'true', '{}', '[]', '""',
    '{"b": [1, {"c": null, "d": [true, "\\\\u0041"]}], "a": 1, "long key with spaces": "v", "": ""}'
  ]::jsonb[]) p});
# Strings escaped eight bytes at a time: an escape (or a multibyte
# character) at each place of a chunk, and across two chunks.
sql(q{INSERT INTO sent_pa
SELECT spool.enqueue('pa', 'k', p), p
  FROM (SELECT jsonb_build_array(repeat('x', i) || chr(c) || repeat('é', i % 3) || repeat('y', 17 - i),
                                 repeat(chr(c), i)) AS p
          FROM generate_series(0, 17) i, unnest(ARRAY[1, 9, 10, 31, 34, 92, 127, 233, 26085]) c) s});
wait_drained($node, 'pa', '(a)', $wait_s);
my %want = map { split /\|/ }
  split /\n/, sql(q{SELECT id, encode(textsend(p::text), 'hex') FROM sent_pa});
my %got_a = map { ($_->{outbox_id} => unpack('H*', $_->{value})) } $kafka->consume_all('pa', 1);
is(scalar(keys %got_a), scalar(keys %want), '(a) every payload arrived once');
my @diff = grep { ($got_a{$_} // '') ne $want{$_} } sort keys %want;
is(scalar(@diff), 0, '(a) each value is byte for byte the payload\'s jsonb text')
  or diag(join("\n", map { "id $_: want $want{$_}\n       got " . ($got_a{$_} // 'nothing') } @diff));

# ---------------------------------------------------------------------------
# (b) A row refused for good while later batches are in flight.
# ---------------------------------------------------------------------------
is($kafka->cmd('rtt -1 30'), 'OK', '(b) acknowledgements slowed by 30 ms');
sql(qq{SELECT spool.create_target('pb', 'kafka', '{"brokers": "$bs", "topic": "pb", "batch_size": 20,
	"retry_limit": 1, "retry_backoff": "1s", "kafka": {"message.max.bytes": 1000}}')});
wait_dispatchers($node, 'pb', 1);
my $sent_b = enqueue_rows('pb', 300, 10, 65);
my $big = sql('SELECT id FROM sent_pb WHERE g = 65');
poll_within($node, $wait_s,
	qq{SELECT EXISTS (SELECT FROM spool.outbox_dead WHERE id = $big AND attempts = 2)
	   AND (SELECT backlog = 0 AND waiting = 0 FROM spool.outbox_status WHERE target = 'pb')},
	'(b) the refused row dead-lettered after its retry, the rest delivered');
is($kafka->cmd('rtt -1 0'), 'OK', '(b) acknowledgements on time again');
my ($count_b, $bad_b) = read_topic('pb', 2);
my @missing_b = grep { $_ != $big && !$count_b->{$_} } sort { $a <=> $b } keys %$sent_b;
my @twice_b = grep { $count_b->{$_} > 1 } sort { $a <=> $b } keys %$count_b;
is(scalar(@missing_b), 0, '(b) every other row is in the topic') or diag(show(@missing_b));
is(scalar(@twice_b), 0, '(b) none twice') or diag(show(@twice_b));
ok(!$count_b->{$big}, '(b) the refused row is not in the topic');
is(scalar(@$bad_b), 0, '(b) ids rise per key') or diag(show(@$bad_b));
is(sql("SELECT count(*) FROM spool.outbox_retry WHERE target = 'pb'"), '0', '(b) nothing left parked');
is(position_of('pb'), sql('SELECT max(id) FROM sent_pb'), '(b) the position covers every row');
like(sql("SELECT last_error FROM spool.outbox_dead WHERE id = $big"), qr/too large/i,
	'(b) the dead letter says why');
# Rows of its key parked behind it are not produced by the pass that retries
# it (its retry is produced alone first, and refused): none of them was
# produced in the 60 ms before the transaction that dead-lettered it began
# (a pass produces, waits ~30 ms for the acknowledgements, then begins it;
# the next pass produces after it began, so at or after its millisecond).
# The rows of its key that were in flight when it was parked were produced
# before that, and the retry came at least half of retry_backoff (1 s, less
# up to half of it as jitter) after.
my $k_big = sql('SELECT key FROM sent_pb WHERE g = 65');
my $dead_ms = sql("SELECT floor(extract(epoch FROM failed_at) * 1000)::bigint FROM spool.outbox_dead WHERE id = $big");
my @early_b = map { $_->{outbox_id} }
  grep { ($_->{key} // '') eq $k_big && $_->{outbox_id} > $big
	  && $_->{timestamp} > $dead_ms - 60 && $_->{timestamp} < $dead_ms } $kafka->consume_all('pb', 2);
is(scalar(@early_b), 0, "(b) no row of key $k_big was produced with its retry, ahead of its dead letter")
  or diag(show(@early_b));

# ---------------------------------------------------------------------------
# (c) Every produce request fails while batches are in flight.
# ---------------------------------------------------------------------------
is($kafka->cmd('rtt -1 200'), 'OK', '(c) acknowledgements slowed by 200 ms');
sql(qq{SELECT spool.create_target('pc', 'kafka', '{"brokers": "$bs", "topic": "pc", "batch_size": 10,
	"kafka": {"message.timeout.ms": 5000}}')});
wait_dispatchers($node, 'pc', 1);
my $sent_c = enqueue_rows('pc', 3000, 30);
my $max_c = sql('SELECT max(id) FROM sent_pc');
poll_within($node, $wait_s, q{SELECT delivered > 0 FROM spool.outbox_status WHERE target = 'pc'},
	'(c) the first batches marked');
is($kafka->cmd('error 0 29 100000'), 'OK', '(c) every produce request fails from now on');
poll_within($node, $wait_s,
	q{SELECT last_error LIKE '%kafka delivery%' FROM spool.outbox_status WHERE target = 'pc'},
	'(c) the shard reports the failed delivery');
# Marks cannot move while every request fails.
my $pos_c = position_of('pc');
my ($count_c0) = read_topic('pc', 2);
my @passed = grep { $_ <= $pos_c && !$count_c0->{$_} } sort { $a <=> $b } keys %$sent_c;
is(scalar(@passed), 0, "(c) every id at or below the position ($pos_c) is in the topic")
  or diag('marked, not in the topic: ' . show(@passed));
cmp_ok($pos_c, '<', $max_c, '(c) rows are left to deliver');
is($kafka->cmd('clear 0'), 'OK', '(c) produce requests succeed again');
is($kafka->cmd('rtt -1 0'), 'OK', '(c) acknowledgements on time');
wait_drained($node, 'pc', '(c)', $wait_s);
my ($count_c, $bad_c) = read_topic('pc', 2);
my @missing_c = grep { !$count_c->{$_} } sort { $a <=> $b } keys %$sent_c;
my @copies_c = grep { $count_c->{$_} > 1 && $_ <= $pos_c } sort { $a <=> $b } keys %$count_c;
is(scalar(@missing_c), 0, '(c) every row arrived') or diag(show(@missing_c));
is(scalar(@copies_c), 0, "(c) copies only of ids above the position $pos_c") or diag(show(@copies_c));
is(scalar(@$bad_c), 0, '(c) per key, each copy is a new highest id or a repeat') or diag(show(@$bad_c));
note '(c) copies: ' . scalar(grep { $count_c->{$_} > 1 } keys %$count_c);

# ---------------------------------------------------------------------------
# (d) kill -9 with batches in flight.
# ---------------------------------------------------------------------------
is($kafka->cmd('rtt -1 200'), 'OK', '(d) acknowledgements slowed by 200 ms');
sql(qq{SELECT spool.create_target('pd', 'kafka', '{"brokers": "$bs", "topic": "pd", "batch_size": 10}')});
wait_dispatchers($node, 'pd', 1);
my $sent_d = enqueue_rows('pd', 2000, 30);
poll_within($node, $wait_s, q{SELECT delivered > 0 FROM spool.outbox_status WHERE target = 'pd'},
	'(d) the first batches marked');
my $pid_d = dispatcher_pids($node, 'pd')->{0};
BAIL_OUT('no dispatcher of pd') unless defined $pid_d && $pid_d =~ /^\d+$/;
my $log_offset = -s $node->logfile;
ok(kill('KILL', $pid_d), "(d) kill -9 the dispatcher $pid_d");
crash_restart_ok($node, $pid_d, $log_offset, '(d)');
is($kafka->cmd('rtt -1 0'), 'OK', '(d) acknowledgements on time');
wait_dispatchers($node, 'pd', 1);
wait_drained($node, 'pd', '(d)', $wait_s);
my ($count_d, $bad_d) = read_topic('pd', 2);
my @missing_d = grep { !$count_d->{$_} } sort { $a <=> $b } keys %$sent_d;
is(scalar(@missing_d), 0, '(d) every row is in the topic at least once') or diag(show(@missing_d));
is(scalar(@$bad_d), 0, '(d) per key, each copy is a new highest id or a repeat') or diag(show(@$bad_d));
is(position_of('pd'), sql('SELECT max(id) FROM sent_pd'), '(d) the position covers every row');
note '(d) copies: ' . scalar(grep { $count_d->{$_} > 1 } keys %$count_d);

# ---------------------------------------------------------------------------
# (e) The broker down for longer than message.timeout.ms.
# ---------------------------------------------------------------------------
sql(qq{SELECT spool.create_target('pe', 'kafka', '{"brokers": "$bs", "topic": "pe", "batch_size": 10,
	"kafka": {"message.timeout.ms": 2000, "reconnect.backoff.max.ms": 500}}')});
wait_dispatchers($node, 'pe', 1);
my $t_e = sql('SELECT clock_timestamp()');
is($kafka->cmd('down -1'), 'OK', '(e) the broker down');
sql(q{CREATE TABLE sent_pe (g int, key text, id bigint)});
my $enqueue_e = q{INSERT INTO sent_pe
SELECT g, 'k' || (g % 20), spool.enqueue('pe', 'k' || (g % 20), jsonb_build_object('g', g))
  FROM generate_series(%d, %d) g ORDER BY g};
sql(sprintf($enqueue_e, 1, 300));
sleep 1;
sql(sprintf($enqueue_e, 301, 600));
poll_within($node, $wait_s,
	"SELECT last_error_at >= '$t_e' AND last_error LIKE '%not every message was acknowledged in time%'"
	  . " FROM spool.outbox_status WHERE target = 'pe'",
	'(e) the shard gave up by its own deadline, not by a librdkafka message timeout');
is($kafka->cmd('up -1'), 'OK', '(e) the broker up again');
wait_drained($node, 'pe', '(e)', $wait_s);
my $sent_e = { map { split /\|/ } split /\n/, sql('SELECT id, key FROM sent_pe') };
my ($count_e, $bad_e) = read_topic('pe', 2);
my @missing_e = grep { !$count_e->{$_} } sort { $a <=> $b } keys %$sent_e;
is(scalar(@missing_e), 0, '(e) every row arrived') or diag(show(@missing_e));
is(scalar(@$bad_e), 0, '(e) per key, each copy is a new highest id or a repeat') or diag(show(@$bad_e));
is(position_of('pe'), sql('SELECT max(id) FROM sent_pe'), '(e) the position covers every row');

$kafka->stop;
$node->stop;
note sprintf('total %.0fs', time - $t_start);
done_testing();

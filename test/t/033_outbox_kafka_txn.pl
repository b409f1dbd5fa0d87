
# Transactional kafka targets (docs/outbox.md, "Exactly once into Kafka"),
# against the test cluster through its proxy, which keeps the offsets of
# committed transactions and fences older producers of a transactional.id
# (librdkafka 2.0.2's mock does neither; see spool_kafka_mock.c).
#
# Target tx: kafka, "transactional": true, 2 shards, batch_size 200, topic
# out (4 partitions), brokers = the proxy.  Every enqueued row is recorded
# in the table sent; read_back() reads the whole topic with kcat and
# isolation.level=read_committed and counts the copies of each
# spool-outbox-id.
# (a) Options: "transactional" must be a boolean (SP001); transactional.id
#     in "kafka" is refused for a superuser (SP001) and, as an attack, for
#     a spool_admin role that may use the brokers (42501, create and alter);
#     that role may create a transactional target.
# (b) 3000 rows on 40 keys in 30 transactions: every id exactly once,
#     backlog 0; per shard, the offset committed for group
#     spool-postgres-tx-<shard> on out [0] equals the shard's position, and
#     the proxy committed offsets at EndTxn.
# (c) spool.test_kafka_commit_pause holds a dispatcher after Kafka committed
#     a batch, before PostgreSQL marks it; kill -9 it (server restart).
#     Kafka's committed offset is then above the shard's position in
#     PostgreSQL; after recovery the log says the batch was settled without
#     sending it again, and every id is in the topic exactly once.
# (d) A zombie: a second producer takes transactional id
#     spool-postgres-tx-0 (init_transactions).  Shard 0's next transaction
#     is fenced (last_error), the dispatcher starts a new producer (fencing
#     the zombie in turn) and delivers; the zombie's commit then fails as
#     fenced and its message is not in the topic; every id exactly once.
# (e) A row refused for good (over message.max.bytes) on target tx2 (topic
#     out2, retry_limit 1): it is dead-lettered after one retry, the later
#     row of its key waits behind it and is delivered after it, the other
#     key's rows are delivered; in out2 every other row exactly once, in
#     order per key, the refused one never.
# (f) Crashes inside the settling of left-out rows (target tx3, topic out3,
#     retry_limit 0, the test pause on): a1, a2 (refused), a3 in one batch;
#     kill -9 after the batch's Kafka commit: the restarted worker settles
#     it from the offset's metadata (a2 dead-lettered, a3 parked behind it),
#     retries a3 and pauses after that Kafka commit; kill -9 again: the next
#     worker takes a3 out of spool.outbox_retry as delivered.  out3 holds
#     a1 and a3 once each.
# (g) An abortable error: the test cluster fails the next TxnOffsetCommit
#     with GROUP_AUTHORIZATION_FAILED (librdkafka: the transaction must be
#     aborted).  tx2's shard reports the failed send_offsets_to_transaction,
#     aborts, reconciles and delivers the batch in a new transaction: every
#     row in out2, Kafka's committed offset equals the shard's position, no
#     error state left.  (The mock keeps the aborted transaction's messages
#     readable: their copies are counted, not asserted away.)
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";
use SpoolTest;
use SpoolKafka;
use SpoolOutbox;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $kafka = SpoolKafka->start(topics => ['out:4', 'out2:1', 'out3:1']);
my ($proxy) = $kafka->cmd('proxy') =~ /^OK (\S+)$/ or die 'no proxy';
my $direct = $kafka->bootstrap;
my $node = spool_node(
	'outbox_kafka_txn',
	restart_after_crash => 'on',
	'spool.kafka_allowed_brokers' => "'127.0.0.1:*'");
sub sql { return $node->safe_psql('postgres', $_[0]); }

# (SQLSTATE, stderr) of $q run as $role (undef: the superuser).
sub state_of
{
	my ($q, $role) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $q,
		extra_params => [ '-v', 'VERBOSITY=verbose', $role ? ('-U', $role) : () ]);
	my ($state) = $err =~ /ERROR:\s+([0-9A-Z]{5}):/;
	return ($state // '', $err);
}

# ---- (a) options and the attack ----
my ($st, $err) = state_of(qq{SELECT spool.create_target('bad', 'kafka',
	'{"brokers": "$proxy", "topic": "out", "transactional": "yes"}')});
is($st, 'SP001', '(a) "transactional" must be a boolean') or diag($err);
($st, $err) = state_of(qq{SELECT spool.create_target('bad', 'kafka',
	'{"brokers": "$proxy", "topic": "out", "transactional": true,
	  "kafka": {"transactional.id": "spool-postgres-tx-0"}}')});
is($st, 'SP001', '(a) a superuser may not set transactional.id either') or diag($err);
like($err, qr/set transactional.id themselves/, '(a) the error says why');
sql(q{CREATE ROLE mallory LOGIN IN ROLE spool_admin});
($st, $err) = state_of(qq{SELECT spool.create_target('m1', 'kafka',
	'{"brokers": "$proxy", "topic": "out", "transactional": true,
	  "kafka": {"transactional.id": "spool-postgres-tx-0"}}')}, 'mallory');
is($st, '42501', '(a) attack: a spool_admin role may not name a transactional.id') or diag($err);
($st, $err) = state_of(qq{SELECT spool.create_target('m2', 'kafka',
	'{"brokers": "$proxy", "topic": "other", "transactional": true}')}, 'mallory');
is($st, '', '(a) that role may create a transactional target') or diag($err);
($st, $err) = state_of(q{SELECT spool.alter_target('m2',
	'{"kafka": {"transactional.id": "spool-postgres-tx-1"}}')}, 'mallory');
is($st, '42501', '(a) attack: nor set one with alter_target') or diag($err);
is(sql(q{SELECT options->>'transactional' FROM spool.targets WHERE name = 'm2'}), 'true',
	'(a) the option is stored');
sql(q{SELECT spool.drop_target('m2', force => true)});

# ---- the target ----
sql(q{CREATE TABLE sent (id bigint PRIMARY KEY, key text, payload jsonb)});
sql(qq{SELECT spool.create_target('tx', 'kafka', '{"brokers": "$proxy", "topic": "out",
	"transactional": true, "shards": 2, "batch_size": 200, "retry_backoff_max": "1s",
	"kafka": {"reconnect.backoff.max.ms": 500}}')});
wait_dispatchers($node, 'tx', 2);

sub enqueue
{
	my ($phase, $tx, $per) = @_;
	for my $t (1 .. $tx)
	{
		sql(qq{INSERT INTO sent SELECT spool.enqueue('tx', 'k' || (g % 40),
			jsonb_build_object('phase', '$phase', 't', $t, 'g', g)), 'k' || (g % 40),
			jsonb_build_object('phase', '$phase', 't', $t, 'g', g)
			FROM generate_series(1, $per) g});
	}
}

# { outbox id => copies } of the whole topic, read committed.
sub read_back
{
	my %n;
	my $out = `timeout 60 kcat -C -b $direct -t out -e -o beginning -q -X isolation.level=read_committed -f '%h\\n' 2>&1`;
	for my $l (split /\n/, $out)
	{
		next unless $l =~ /spool-outbox-id=(\d+)/;
		$n{$1}++;
	}
	return \%n;
}

sub exactly_once
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $n = read_back();
	my @ids = split /\n/, sql('SELECT id FROM sent ORDER BY id');
	my @missing = grep { !$n->{$_} } @ids;
	my @twice = grep { $n->{$_} > 1 } keys %$n;
	my %sent = map { $_ => 1 } @ids;
	my @unknown = grep { !$sent{$_} } keys %$n;
	note("$what: " . scalar(@ids) . ' ids sent, ' . scalar(keys %$n) . ' in the topic');
	is(scalar(@missing), 0, "$what: every id in the topic (read_committed)")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@twice), 0, "$what: no id twice") or diag("twice: @twice[0 .. ($#twice < 9 ? $#twice : 9)]");
	is(scalar(@unknown), 0, "$what: no unknown id") or diag("unknown: @unknown");
}

sub committed
{
	my ($shard) = @_;
	my $ans = $kafka->cmd("committed spool-postgres-tx-$shard out 0");
	my ($off) = $ans =~ /^OK (-?\d+)/ or die "committed: $ans";
	return $off;
}

# ---- (b) normal delivery ----
enqueue('b', 30, 100);
wait_drained($node, 'tx', '(b)');
exactly_once('(b)');
for my $s (0, 1)
{
	my $pos = sql(qq{SELECT position FROM spool.outbox_status WHERE target = 'tx' AND shard = $s});
	is(committed($s), $pos, "(b) shard $s: Kafka's committed offset is the shard's position ($pos)");
}
my ($fenced0, $commits0) = $kafka->cmd('txnstat') =~ /^OK (\d+) (\d+)$/;
cmp_ok($commits0, '>', 0, "(b) offsets were committed with the transactions ($commits0)");
is(sql(q{SELECT count(*) FROM spool.outbox_status WHERE target = 'tx' AND state = 'error'}), '0',
	'(b) no shard in error');

# ---- (c) kill -9 between the Kafka commit and the PostgreSQL mark ----
sql(q{ALTER SYSTEM SET spool.test_kafka_commit_pause = '10min'});
sql(q{SELECT pg_reload_conf()});
# The setting reaches the workers at their next pass; rows make them pass.
poll_within($node, 60, q{SELECT current_setting('spool.test_kafka_commit_pause') = '10min'},
	'(c) the pause setting to be loaded');
enqueue('c', 5, 50);
poll_ok($node, q{SELECT count(*) > 0 FROM pg_stat_activity
	WHERE application_name LIKE 'spool dispatch tx/%' AND query = 'test pause after a kafka commit'},
	'(c) a dispatcher to pause after a Kafka commit');
my ($pid, $shard) = split /\|/, sql(q{SELECT pid, split_part(application_name, '/', 2)
	FROM pg_stat_activity WHERE application_name LIKE 'spool dispatch tx/%'
	AND query = 'test pause after a kafka commit' LIMIT 1});
my $pg_pos = sql(qq{SELECT position FROM spool.outbox_positions p JOIN spool.targets t
	ON t.id = p.target_id WHERE t.name = 'tx' AND p.shard = $shard});
cmp_ok(committed($shard), '>', $pg_pos,
	"(c) shard $shard: Kafka committed past PostgreSQL's position ($pg_pos)");
sql(q{ALTER SYSTEM RESET spool.test_kafka_commit_pause});
sql(q{SELECT pg_reload_conf()});
my $log_offset = -s $node->logfile;
kill 'KILL', $pid;
crash_restart_ok($node, $pid, $log_offset, '(c)');
wait_dispatchers($node, 'tx', 2);
wait_drained($node, 'tx', '(c)');
ok($node->log_contains(qr/spool dispatch tx\/$shard: Kafka committed up to \d+, PostgreSQL had $pg_pos; settled [1-9]\d* rows as delivered/,
		$log_offset),
	'(c) the restarted dispatcher settled the committed batch without sending it again');
exactly_once('(c)');

# ---- (d) a zombie producer of shard 0's transactional id ----
is($kafka->cmd('txn_init spool-postgres-tx-0'), 'OK', '(d) a second producer took spool-postgres-tx-0');
my $err_before = sql(q{SELECT coalesce(last_error_at, '-infinity') FROM spool.outbox_status
	WHERE target = 'tx' AND shard = 0});
enqueue('d', 10, 40);
poll_ok($node, qq{SELECT last_error LIKE '%fatal%' AND last_error_at > '$err_before'
	FROM spool.outbox_status WHERE target = 'tx' AND shard = 0},
	'(d) shard 0 to report its fenced transaction');
wait_drained($node, 'tx', '(d)');
my ($fenced1) = $kafka->cmd('txnstat') =~ /^OK (\d+) /;
cmp_ok($fenced1, '>', $fenced0, "(d) the proxy fenced the older producer's requests");
like($kafka->cmd('txn_commit out zombie-value', allow_error => 1), qr/^ERR fatal/,
	'(d) the zombie, fenced by the new dispatcher producer, cannot commit');
$kafka->cmd('txn_close');
my $zombie = `timeout 60 kcat -C -b $direct -t out -e -o beginning -q -X isolation.level=read_committed -f '%s\\n' 2>&1`;
unlike($zombie, qr/zombie-value/, "(d) the zombie's message is not in the topic");
exactly_once('(d)');
is(sql(q{SELECT count(*) FROM spool.outbox_status WHERE target = 'tx' AND state = 'error'}), '0',
	'(d) no shard left in error');

# ---- (e) a row refused for good ----
sql(qq{SELECT spool.create_target('tx2', 'kafka', '{"brokers": "$proxy", "topic": "out2",
	"transactional": true, "retry_limit": 1, "retry_backoff": "100ms",
	"kafka": {"message.max.bytes": 1000}}')});
wait_dispatchers($node, 'tx2', 1);
my @e = split /\n/, sql(q{BEGIN;
CREATE TABLE sent2 AS
SELECT n, spool.enqueue('tx2', k, jsonb_build_object('n', n, 'pad', repeat('x', CASE WHEN n = 2 THEN 2000 ELSE 10 END))) AS id
  FROM (VALUES (1, 'a'), (2, 'a'), (3, 'a'), (4, 'b'), (5, 'b')) v(n, k) ORDER BY n;
COMMIT;
SELECT id FROM sent2 ORDER BY n});
poll_ok($node, qq{SELECT EXISTS (SELECT FROM spool.outbox_dead WHERE id = $e[1] AND attempts = 2)
	AND (SELECT backlog = 0 AND waiting = 0 FROM spool.outbox_status WHERE target = 'tx2')},
	'(e) the refused row to be dead-lettered after its retry and the rest delivered');
my @got = map { /spool-outbox-id=(\d+)/ ? $1 : () } split /\n/,
  `timeout 60 kcat -C -b $direct -t out2 -e -o beginning -q -X isolation.level=read_committed -f '%h\\n' 2>&1`;
is("@got", "$e[0] $e[3] $e[4] $e[2]",
	'(e) out2 holds the other rows once each: a1, then b1 b2 (same batch), then a3 after the refused a2 was dead-lettered');
like(sql(qq{SELECT last_error FROM spool.outbox_dead WHERE id = $e[1]}), qr/too large/i,
	'(e) the dead letter says why');

# ---- (f) crashes while left-out rows are settled ----
sql(qq{SELECT spool.create_target('tx3', 'kafka', '{"brokers": "$proxy", "topic": "out3",
	"transactional": true, "retry_limit": 0, "kafka": {"message.max.bytes": 1000}}')});
wait_dispatchers($node, 'tx3', 1);
sql(q{ALTER SYSTEM SET spool.test_kafka_commit_pause = '10min'});
sql(q{SELECT pg_reload_conf()});
poll_within($node, 60, q{SELECT current_setting('spool.test_kafka_commit_pause') = '10min'},
	'(f) the pause setting to be loaded');
my @f = split /\n/, sql(q{BEGIN;
CREATE TABLE sent3 AS
SELECT n, spool.enqueue('tx3', 'a', jsonb_build_object('n', n, 'pad', repeat('x', CASE WHEN n = 2 THEN 2000 ELSE 10 END))) AS id
  FROM generate_series(1, 3) n ORDER BY n;
COMMIT;
SELECT id FROM sent3 ORDER BY n});
my $paused = q{SELECT pid FROM pg_stat_activity WHERE application_name = 'spool dispatch tx3/0'
	AND query = 'test pause after a kafka commit'};
poll_ok($node, "SELECT EXISTS ($paused)", '(f) tx3 to pause after its batch commit');
my $pid1 = sql($paused);
$log_offset = -s $node->logfile;
kill 'KILL', $pid1;
crash_restart_ok($node, $pid1, $log_offset, '(f) first kill');
poll_ok($node, "SELECT EXISTS ($paused)", '(f) tx3 to settle the batch and pause after retrying a3');
ok($node->log_contains(qr/spool dispatch tx3\/0: Kafka committed up to $f[2], PostgreSQL had \d+; settled 1 rows/, $log_offset),
	'(f) the batch was settled from the metadata: a1 delivered');
is(sql(qq{SELECT (SELECT count(*) FROM spool.outbox_dead WHERE id = $f[1]) || ' ' ||
	(SELECT count(*) FROM spool.outbox_retry WHERE id = $f[2])}), '1 1',
	'(f) a2 dead-lettered, a3 still parked while its retry is held after the Kafka commit');
my $pid2 = sql($paused);
sql(q{ALTER SYSTEM RESET spool.test_kafka_commit_pause});
sql(q{SELECT pg_reload_conf()});
$log_offset = -s $node->logfile;
kill 'KILL', $pid2;
crash_restart_ok($node, $pid2, $log_offset, '(f) second kill');
poll_ok($node, qq{SELECT NOT EXISTS (SELECT FROM spool.outbox_retry WHERE id = $f[2])},
	'(f) a3 to leave spool.outbox_retry');
ok($node->log_contains(qr/spool dispatch tx3\/0: settled 1 parked rows Kafka committed as delivered/, $log_offset),
	'(f) the restarted worker settled the retried row from the metadata');
my @got3 = map { /spool-outbox-id=(\d+)/ ? $1 : () } split /\n/,
  `timeout 60 kcat -C -b $direct -t out3 -e -o beginning -q -X isolation.level=read_committed -f '%h\\n' 2>&1`;
is("@got3", "$f[0] $f[2]", '(f) out3 holds a1 and a3 once each');

# ---- (g) an abortable error in the middle of a transaction ----
is($kafka->cmd('error 28 30 1'), 'OK', '(g) the next TxnOffsetCommit will fail');
my $g_before = sql(q{SELECT coalesce(last_error_at, '-infinity') FROM spool.outbox_status WHERE target = 'tx2'});
my @g = split /\n/, sql(q{BEGIN;
CREATE TABLE sent4 AS SELECT g, spool.enqueue('tx2', 'c' || (g % 3), jsonb_build_object('g', g)) AS id
  FROM generate_series(1, 20) g ORDER BY g;
COMMIT;
SELECT id FROM sent4 ORDER BY g});
poll_ok($node, qq{SELECT last_error LIKE '%send_offsets_to_transaction failed%' AND last_error_at > '$g_before'
	FROM spool.outbox_status WHERE target = 'tx2'}, '(g) tx2 to report the aborted transaction');
poll_ok($node, q{SELECT backlog = 0 AND waiting = 0 AND state <> 'error' FROM spool.outbox_status WHERE target = 'tx2'},
	'(g) tx2 to deliver the batch again');
my %g_n;
$g_n{$_}++ for map { /spool-outbox-id=(\d+)/ ? $1 : () } split /\n/,
  `timeout 60 kcat -C -b $direct -t out2 -e -o beginning -q -X isolation.level=read_committed -f '%h\\n' 2>&1`;
is(scalar(grep { !$g_n{$_} } @g), 0, '(g) every row of the batch is in out2');
note('(g) copies of the aborted transaction the mock does not hide: ' . scalar(grep { $g_n{$_} > 1 } @g));
my ($g_ans) = $kafka->cmd('committed spool-postgres-tx2-0 out2 0') =~ /^OK (-?\d+)/;
is($g_ans, sql(q{SELECT position FROM spool.outbox_status WHERE target = 'tx2'}),
	"(g) Kafka's committed offset is tx2's position");

note(sprintf('033_outbox_kafka_txn took %.1f s', time - $t_start));
$node->stop;
$kafka->stop;
done_testing();

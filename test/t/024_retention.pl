
# Retention of the tables that only grow, and stale spool consumers
# (spool.retention_interval = 500ms, spool.retention_batch_size = 10,
# every history retention 1 h, spool.max_retention = 10 min, small segments
# and spool.min_retention = 0):
#   - dead letters, gaps and outbox dead letters older than 1 h disappear,
#     in DELETE statements of at most 10 rows (a statement trigger counts
#     them), while the newer rows stay;
#   - rows of the operations logs older than 1 h (nonce_set_next_log, and
#     source_seeks except a pending seek) are removed, newer ones stay;
#   - consumed nonces older than 1 h are removed, allocated and released
#     ones stay; afterwards the released ones are still handed out lowest
#     first and new ones are above every removed one; a removed nonce cannot
#     be released and its request id is forgotten;
#   - a registered consumer and a (stopped) processor that did not move
#     while the spool did get one WARNING each within a max_retention
#     period, show stale in spool.consumer_status and in spool.metrics(); a
#     consumer at the end of the spool does not;
#   - with spool.max_retention_action = 'drop' the stale consumer is
#     dropped, the processor is stopped, detached and refused by
#     start_processor, and the segments they held are then dropped; the
#     caught-up consumer stays.
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

my $kafka = SpoolKafka->start(topics => ['ret:1']);
my $bootstrap = $kafka->bootstrap;
my $node = spool_node(
	'retention',
	'spool.retention_interval' => "'500ms'",
	'spool.retention_batch_size' => 10,
	'spool.dead_letters_retention' => "'1h'",
	'spool.gaps_retention' => "'1h'",
	'spool.outbox_dead_retention' => "'1h'",
	'spool.nonce_history_retention' => "'1h'",
	'spool.operations_retention' => "'1h'",
	'spool.max_retention' => "'10min'",
	'spool.segment_size' => 100,
	'spool.min_retention' => 0);

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Every DELETE statement on the history tables: how many rows, and the
# newest time column among them.
sql(<<'EOSQL');
CREATE TABLE del_log (tab text, n bigint, newest timestamptz);
CREATE FUNCTION log_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE format('INSERT INTO public.del_log SELECT %L, count(*), max(%I) FROM old_rows',
				   TG_TABLE_NAME, TG_ARGV[0]);
	RETURN NULL;
END $$;
CREATE TRIGGER d AFTER DELETE ON spool.dead_letters REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION public.log_del('at');
CREATE TRIGGER d AFTER DELETE ON spool.gaps REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION public.log_del('at');
CREATE TRIGGER d AFTER DELETE ON spool.outbox_dead REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION public.log_del('failed_at');
CREATE TRIGGER d AFTER DELETE ON spool.nonce_store REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION public.log_del('updated_at');
CREATE TRIGGER d AFTER DELETE ON spool.nonce_set_next_log REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION public.log_del('at');
CREATE TRIGGER d AFTER DELETE ON spool.source_seeks REFERENCING OLD TABLE AS old_rows
	FOR EACH STATEMENT EXECUTE FUNCTION public.log_del('requested_at');
EOSQL

# ---- History tables ----
# Old rows (2 h) and new rows, inserted in one transaction each.
sql(<<'EOSQL');
INSERT INTO spool.dead_letters (source, topic, kafka_partition, kafka_offset, payload, error, at)
	SELECT 's', 't', 0, i, 'x', 'bad', now() - interval '2 h' - i * interval '1 s'
	  FROM generate_series(1, 95) i;
INSERT INTO spool.dead_letters (source, topic, kafka_partition, kafka_offset, payload, error)
	SELECT 's', 't', 0, 1000 + i, 'x', 'bad' FROM generate_series(1, 7) i;
INSERT INTO spool.gaps (source, topic, kafka_partition, from_offset, to_offset, action, at)
	SELECT 's', 't', 0, i, i, 'continued', now() - interval '2 h' FROM generate_series(1, 25) i;
INSERT INTO spool.gaps (source, topic, kafka_partition, from_offset, to_offset, action)
	SELECT 's', 't', 0, i, i, 'continued' FROM generate_series(100, 102) i;
INSERT INTO spool.outbox_dead (id, target, target_id, shard, payload, created_at, attempts, failed_at)
	SELECT i, 't', 1, 0, '{}', now(), 3, now() - interval '61 min' FROM generate_series(1, 33) i;
INSERT INTO spool.outbox_dead (id, target, target_id, shard, payload, created_at, attempts)
	SELECT i, 't', 1, 0, '{}', now(), 3 FROM generate_series(100, 101) i;
INSERT INTO spool.nonce_set_next_log (signer, chain_next, old_next, new_next, consumed, next_out, owner, token, at)
	SELECT 'x', i, i, i, 0, i, 'o', 1, now() - interval '2 h' FROM generate_series(1, 18) i;
INSERT INTO spool.nonce_set_next_log (signer, chain_next, old_next, new_next, consumed, next_out, owner, token)
	SELECT 'x', i, i, i, 0, i, 'o', 1 FROM generate_series(100, 101) i;
EOSQL
sql("SELECT spool.create_source('rs_ops', '$bootstrap', '{ret}')");
sql(<<'EOSQL');
INSERT INTO spool.source_seeks (source, topic, kafka_partition, to_offset, allow_rewind, state,
		requested_by, requested_at)
	SELECT 'rs_ops', 'ret', 0, i, false, CASE WHEN i = 13 THEN 'pending' ELSE 'applied' END,
		   current_user::regrole, now() - interval '2 h'
	  FROM generate_series(1, 13) i;
INSERT INTO spool.source_seeks (source, topic, kafka_partition, to_offset, allow_rewind, state, requested_by)
	SELECT 'rs_ops', 'ret', 0, i, false, 'applied', current_user::regrole FROM generate_series(100, 101) i;
EOSQL

# ---- Nonces (basic mode) ----
# 0..59 allocated with request ids; 40..44 released, the others consumed,
# then the consumed ones aged to 2 h, except 59 (consumed just now).
is(sql(q{SELECT token FROM spool.lease_acquire('signer:r1', 'n1', '1 h')}), '1', 'signer lease');
is( sql(q{SELECT max(spool.nonce_allocate('r1', 'n1', 1, 'rq-' || i)) FROM generate_series(0, 59) i}),
	'59', '60 nonces allocated');
sql(q{SELECT spool.nonce_mark_recyclable('r1', i, 'n1', 1) FROM generate_series(40, 44) i});
sql(q{SELECT spool.nonce_mark_used('r1', i, 'n1', 1) FROM generate_series(0, 39) i});
sql(q{SELECT spool.nonce_mark_used('r1', i, 'n1', 1) FROM generate_series(45, 59) i});
sql(q{UPDATE spool.nonce_store SET updated_at = now() - interval '2 h'
	WHERE signer = 'r1' AND state = 'consumed' AND nonce < 59});

poll_within($node, 60,
	q{SELECT (SELECT count(*) FROM spool.dead_letters) = 7
		 AND (SELECT count(*) FROM spool.gaps) = 3
		 AND (SELECT count(*) FROM spool.outbox_dead) = 2
		 AND (SELECT count(*) FROM spool.nonce_store WHERE signer = 'r1' AND state = 'consumed') = 1
		 AND (SELECT count(*) FROM spool.nonce_set_next_log) = 2
		 AND (SELECT count(*) FROM spool.source_seeks) = 3},
	'retention to remove the rows older than 1 h');
is(sql(q{SELECT count(*) FROM spool.dead_letters WHERE kafka_offset > 1000}), '7', 'the new dead letters stay');
is(sql(q{SELECT min(from_offset) FROM spool.gaps}), '100', 'the new gaps stay');
is(sql(q{SELECT string_agg(id::text, ',' ORDER BY id) FROM spool.outbox_dead}), '100,101',
	'the new outbox dead letters stay');
is( sql(q{SELECT string_agg(nonce || ':' || state, ',' ORDER BY nonce) FROM spool.nonce_store WHERE signer = 'r1'}),
	'40:released,41:released,42:released,43:released,44:released,59:consumed',
	'only the old consumed nonces are gone');
is(sql(q{SELECT string_agg(chain_next::text, ',' ORDER BY id) FROM spool.nonce_set_next_log}), '100,101',
	'the new nonce_set_next_log rows stay');
is(sql(q{SELECT string_agg(to_offset || ':' || state, ',' ORDER BY id) FROM spool.source_seeks}),
	'13:pending,100:applied,101:applied', 'the pending seek and the new seeks stay');
is( sql(q{SELECT string_agg(tab || '=' || rows, ',' ORDER BY tab) FROM
		(SELECT tab, sum(n) AS rows FROM del_log GROUP BY tab) x}),
	'dead_letters=95,gaps=25,nonce_set_next_log=18,nonce_store=54,outbox_dead=33,source_seeks=12',
	'every old row was deleted once');
is(sql(q{SELECT max(n) FROM del_log}), '10', 'no DELETE removed more than 10 rows (the batch size)');
cmp_ok(sql(q{SELECT count(*) FROM del_log WHERE tab = 'dead_letters' AND n > 0}), '>=', 10,
	'the 95 dead letters went in at least 10 statements');
is(sql(q{SELECT count(*) FROM del_log WHERE newest > now() - interval '1 h'}), '0',
	'no deleted row was younger than its retention');
ok($node->log_contains(qr/spool retention removed \d+ rows of spool\.dead_letters/),
	'the removal is logged');

# After removal: released ones lowest first, then above every removed one.
is( sql(q{SELECT string_agg(spool.nonce_allocate('r1', 'n1', 1)::text, ',') FROM generate_series(1, 7)}),
	'40,41,42,43,44,60,61', 'released nonces are reused lowest first, then new ones follow 59');
is(sql(q{SELECT spool.nonce_allocate('r1', 'n1', 1, 'rq-3')}), '62',
	'the request id of a removed nonce gets a new nonce (its idempotency ended)');
is(sql(q{SELECT spool.nonce_allocate('r1', 'n1', 1, 'rq-59')}), '59',
	'the request id of a kept nonce still finds it');
my ($ret, $out, $err) = $node->psql('postgres',
	q{SELECT spool.nonce_mark_recyclable('r1', 7, 'n1', 1)}, on_error_stop => 1);
like($err, qr/nonce 7 of signer "r1" is consumed and cannot be released/,
	'a removed consumed nonce cannot be released');
is(sql(q{SELECT count(*) FROM spool.nonce_store WHERE signer = 'r1' AND nonce < 40}), '0',
	'and it did not come back');

# ---- Stale consumers ----
sql(q{CREATE ROLE ret_admin LOGIN IN ROLE spool_admin});
sql(q{CREATE FUNCTION public.ret_h(state jsonb, entries spool.entries[]) RETURNS spool.step
	LANGUAGE sql IMMUTABLE AS $$ SELECT ROW(state, ARRAY[]::spool.output[])::spool.step $$});
sql(q{SET ROLE ret_admin; SELECT spool.create_processor('rp', 'ret_h(jsonb,spool.entries[])')});
is(sql(q{SELECT spool.register_consumer('rc', 0)}), '0', 'consumer rc registered at 0');

my $total = 450;
sql(qq{SELECT spool.create_source('rs', '$bootstrap', ARRAY['ret'], '{"batch_size": 64, "batch_ms": 5}')});
sql(q{SELECT spool.start_source('rs')});
$kafka->cmd("produce ret $total -1 100 0");
poll_within($node, 60, "SELECT count(*) = $total FROM spool.entries", "$total entries");
is(sql(q{SELECT spool.register_consumer('fresh')}), $total, 'consumer fresh registered at the end');

poll_within($node, 30, q{SELECT count(*) = 4 FROM spool.segments WHERE state = 'sealed'},
	'4 sealed segments');
is(sql(q{SELECT count(*) FROM spool.consumer_status WHERE stale}), '0', 'nothing is stale yet');

# Age them: nothing moved for 20 min, and the spool in front of them is as old.
my $log_offset = -s $node->logfile;
sql(q{UPDATE spool.entries SET spooled_at = spooled_at - interval '20 min'});
sql(q{UPDATE spool.consumers SET moved_at = moved_at - interval '20 min'});
poll_within($node, 30,
	q{SELECT count(*) = 2 FROM spool.consumer_status WHERE stale AND name IN ('rc', 'rp')},
	'rc and rp to show stale');
is( sql(q{SELECT string_agg(kind || ' ' || name || ' ' || cursor || ' ' || lag || ' ' || stale, ', ' ORDER BY kind, name)
		FROM spool.consumer_status}),
	"consumer fresh $total 0 false, consumer rc 0 $total true, processor rp 0 $total true",
	'spool.consumer_status: rc and rp stale, fresh (at the end) not');
my $metrics = sql(q{SELECT spool.metrics()});
like($metrics, qr/^spool_consumer_stale\{kind="consumer",consumer="rc"\} 1$/m, 'metric: rc stale');
like($metrics, qr/^spool_consumer_stale\{kind="processor",consumer="rp"\} 1$/m, 'metric: rp stale');
like($metrics, qr/^spool_consumer_stale\{kind="consumer",consumer="fresh"\} 0$/m, 'metric: fresh not stale');
# The warnings: wait (bounded) until both are in the log.
my $t0 = time;
while (time - $t0 < 30)
{
	my $log = slurp_file($node->logfile, $log_offset);
	last if $log =~ /spool consumer "rc" is stale/ && $log =~ /spool processor "rp" is stale/;
	select(undef, undef, undef, 0.2);
}
ok($node->log_contains(qr/WARNING:  spool consumer "rc" is stale: its cursor 0 has not moved for/, $log_offset),
	'a WARNING for rc');
ok($node->log_contains(qr/WARNING:  spool processor "rp" is stale/, $log_offset), 'a WARNING for rp');

# Several passes later (each removes one fresh old dead letter, after its
# stale check), still one warning each: once per spool.max_retention.
for my $round (1 .. 4)
{
	sql(qq{INSERT INTO spool.dead_letters (source, topic, kafka_partition, kafka_offset, payload, error, at)
		VALUES ('s', 't', 0, -$round, 'x', 'bad', now() - interval '2 h')});
	poll_within($node, 30, qq{SELECT count(*) = 0 FROM spool.dead_letters WHERE kafka_offset = -$round},
		"retention pass $round");
}
my $log = slurp_file($node->logfile, $log_offset);
is(scalar(() = $log =~ /spool consumer "rc" is stale/g), 1, 'rc was warned about once in 4+ passes');
is(scalar(() = $log =~ /spool processor "rp" is stale/g), 1, 'rp was warned about once in 4+ passes');
unlike($log, qr/"fresh" is stale/, 'no warning for fresh');
is(sql(q{SELECT count(*) FROM spool.segments WHERE state = 'dropped'}), '0',
	'with warn, the stale consumers still hold every segment');

# Drop.
sql(q{ALTER SYSTEM SET spool.max_retention_action = 'drop'});
sql(q{SELECT pg_reload_conf()});
poll_within($node, 30, q{SELECT count(*) = 0 FROM spool.consumers WHERE name IN ('rc', 'processor:rp')},
	'rc and rp to be dropped');
ok($node->log_contains(qr/spool consumer "rc" dropped by spool.max_retention at cursor 0/, $log_offset),
	'the drop of rc is logged');
ok($node->log_contains(qr/spool processor "rp" dropped by spool.max_retention at cursor 0/, $log_offset),
	'the drop of rp is logged');
is(sql(q{SELECT enabled || ' ' || (detached_at IS NOT NULL) FROM spool.processors WHERE name = 'rp'}),
	'false true', 'rp is stopped and detached');
is( sql(q{SELECT string_agg(kind || ' ' || name || ' ' || coalesce(cursor::text, '-') || ' ' || stale
		|| ' ' || (detached_at IS NOT NULL), ', ' ORDER BY kind, name) FROM spool.consumer_status}),
	"consumer fresh $total false false, processor rp - false true",
	'spool.consumer_status: rc gone, rp detached without a cursor, fresh stays');
($ret, $out, $err) = $node->psql('postgres', q{SET ROLE ret_admin; SELECT spool.start_processor('rp')});
like($err, qr/processor "rp" was detached from the spool by spool.max_retention/,
	'start_processor refuses the detached processor');
poll_within($node, 30, q{SELECT count(*) = 0 FROM spool.segments WHERE state = 'sealed'},
	'the segments they held to be dropped');
is(sql(q{SELECT count(*) FROM spool.segments WHERE state = 'dropped'}), '4', '4 segments dropped');
is(sql(q{SELECT spool.commit_consumer('fresh', 450)}), '450', 'fresh is still registered');

$node->stop;
$kafka->stop;
done_testing();

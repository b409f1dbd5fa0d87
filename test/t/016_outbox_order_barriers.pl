# Per-key order across 4 shards, and barriers (docs/outbox.md, Guarantees).
#
# (a) Target ot (sql, 4 shards): 8 pgbench clients enqueue 1-4 rows per
#     transaction on 300 keys, concurrently.  Then:
#       - every committed row is delivered exactly once;
#       - per key, delivery order (the order of the function calls) is
#         outbox id order;
#       - a key has one shard in spool.outbox; every shard got rows; each
#         row was delivered by the dispatcher of its shard ('spool dispatch
#         ot/<shard>'), and outbox_status counts deliveries on every shard;
#       - after a restart the same keys map to the same shards again.
# (b) Target bt (sql, 4 shards) whose function waits for an advisory lock
#     (held by the test) on keys 'slow*'; the slow key is one whose shard is
#     not 0 (found in a rolled-back transaction, whose rows must never be
#     delivered).  One transaction enqueues rows on the slow key and on 40
#     other keys, a barrier, and rows after it.  While the lock is held: the
#     rows before the barrier on the other shards are delivered, the barrier
#     is not, nor any row after it, on any shard; shard 0 is in state
#     'barrier'.
#     After the release: the barrier is delivered alone, by shard 0, after
#     every smaller id and before every larger id; barriers,
#     flushes_barrier and barrier_drain_ms_max count it, the drain time
#     covers the time the lock was held.
# (c) Barriers under concurrency: pgbench clients enqueue rows and, in some
#     transactions, a barrier; for every barrier the ordering of (b) holds.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolOutbox.pm
use SpoolTest;
use SpoolOutbox;
use Test::More;
use Time::HiRes qw(time usleep);

my $t_start = time;
my $node = spool_node('outbox_order_barriers');
sub sql { return $node->safe_psql('postgres', $_[0]); }

# Rows of $target whose outbox id has no delivery in $table, and ids
# delivered more than once.
sub exact
{
	my ($target, $table, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is( sql("SELECT (SELECT count(*) FROM spool.outbox o WHERE o.target = '$target'"
			  . " AND NOT EXISTS (SELECT 1 FROM $table d WHERE d.outbox_id = o.id))"
			  . " || ' ' || (SELECT count(*) FROM (SELECT outbox_id FROM $table"
			  . " GROUP BY outbox_id HAVING count(*) > 1) x)"
			  . " || ' ' || (SELECT count(*) FROM $table d WHERE NOT EXISTS"
			  . " (SELECT 1 FROM spool.outbox o WHERE o.id = d.outbox_id AND o.target = '$target'))"),
		'0 0 0', "$what: every row delivered once, nothing else (missing, twice, unknown)");
}

sub wait_all
{
	my ($target, $table, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return poll_within($node, 60,
		"SELECT (SELECT count(*) FROM spool.outbox WHERE target = '$target')"
		  . " = (SELECT count(DISTINCT outbox_id) FROM $table)",
		"$what: all rows of $target delivered");
}

# Barrier order: for each barrier of $target, the deliveries of smaller ids
# that came after it and those of larger ids that came before it.
sub barriers_ordered
{
	my ($target, $table, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my ($n, $late, $early, $not0, $shape) = split /\|/, sql(qq{
SELECT count(*),
	   coalesce(sum((SELECT count(*) FROM $table d WHERE d.outbox_id < b.outbox_id AND d.seq > b.seq)), 0),
	   coalesce(sum((SELECT count(*) FROM $table d WHERE d.outbox_id > b.outbox_id AND d.seq < b.seq)), 0),
	   count(*) FILTER (WHERE b.worker IS DISTINCT FROM 'spool dispatch $target/0'),
	   count(*) FILTER (WHERE b.key IS NOT NULL OR b.payload <> '{"barrier": true}')
  FROM $table b JOIN spool.outbox o ON o.id = b.outbox_id AND o.barrier});
	cmp_ok($n, '>', 0, "$what: $n barrier(s) delivered");
	is($late, '0', "$what: no row with a smaller id was delivered after its barrier");
	is($early, '0', "$what: no row with a larger id was delivered before its barrier");
	is($not0, '0', "$what: barriers are delivered by shard 0");
	is($shape, '0', "$what: a barrier is delivered as fn('{\"barrier\": true}', NULL, id)");
	return $n;
}

# ---------------------------------------------------------------------------
# (a) Per-key order under 4 shards.
# ---------------------------------------------------------------------------
sql_target($node, 'ot', '{"shards": 4, "batch_size": 50, "batch_interval": "5ms"}',
	table => 'delivered_ot');
wait_dispatchers($node, 'ot', 4);
my $pgb = start_pgbench($node, 'ot', <<'EOS', '-c', '8', '-j', '4', '-t', '150');
\set k random(1, 300)
\set n random(1, 4)
BEGIN;
SELECT spool.enqueue('ot', 'k' || ((:k + i * 7) % 300), jsonb_build_object('c', :client_id, 'i', i)) FROM generate_series(1, :n) i;
COMMIT;
EOS
is(finish_pgbench($pgb), 0, '(a) 8 pgbench clients enqueued 1200 transactions');
my $n_ot = sql("SELECT count(*) FROM spool.outbox WHERE target = 'ot'");
cmp_ok($n_ot, '>=', 1200, "(a) $n_ot rows in the outbox");
wait_all('ot', 'delivered_ot', '(a)');
exact('ot', 'delivered_ot', '(a)');
per_key_order_ok(delivered_rows($node, 'delivered_ot'), '(a)');
is( sql("SELECT count(*) FROM (SELECT key FROM spool.outbox WHERE target = 'ot'"
		  . " GROUP BY key HAVING count(DISTINCT shard) > 1) x"),
	'0', '(a) every key has one shard');
is(sql("SELECT string_agg(DISTINCT shard::text, ',' ORDER BY shard::text) FROM spool.outbox WHERE target = 'ot'"),
	'0,1,2,3', '(a) rows landed on all 4 shards');
is( sql("SELECT count(*) FROM delivered_ot d JOIN spool.outbox o ON o.id = d.outbox_id"
		  . " WHERE d.worker IS DISTINCT FROM 'spool dispatch ot/' || o.shard"),
	'0', "(a) each row was delivered by its shard's dispatcher");
is(sql("SELECT count(*) FILTER (WHERE delivered > 0) FROM spool.outbox_status WHERE target = 'ot'"),
	'4', '(a) outbox_status counts deliveries on each of the 4 shards');
note('(a) rows per shard: '
	  . sql("SELECT string_agg(shard || ': ' || n, ', ') FROM (SELECT shard, count(*) n"
		  . " FROM spool.outbox WHERE target = 'ot' GROUP BY shard ORDER BY shard) x"));

# The shard of a key is stable: after a restart the same keys map to the
# same shards.
my $shards_before = sql("SELECT string_agg(key || '=' || shard, ',' ORDER BY key) FROM"
	  . " (SELECT DISTINCT key, shard FROM spool.outbox WHERE target = 'ot') x");
$node->restart;
sql("SELECT spool.enqueue('ot', key, '{\"again\": true}') FROM"
	  . " (SELECT DISTINCT key FROM spool.outbox WHERE target = 'ot') x");
is( sql("SELECT string_agg(key || '=' || shard, ',' ORDER BY key) FROM"
		  . " (SELECT DISTINCT key, shard FROM spool.outbox WHERE target = 'ot'"
		  . " AND payload = '{\"again\": true}') x"),
	$shards_before, '(a) after a restart, every key maps to the same shard again');
wait_all('ot', 'delivered_ot', '(a) after the restart');
exact('ot', 'delivered_ot', '(a) after the restart');
per_key_order_ok(delivered_rows($node, 'delivered_ot'), '(a) after the restart');

# ---------------------------------------------------------------------------
# (b) A barrier waits for a slow shard.
# ---------------------------------------------------------------------------
sql_target($node, 'bt', '{"shards": 4, "batch_size": 100, "batch_interval": "5ms"}',
	table => 'delivered_bt',
	pre => q{IF $2 LIKE 'slow%' THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF;});
wait_dispatchers($node, 'bt', 4);

my $lock = SpoolTest::Session->new($node, 'lock');
$lock->query_ok('SELECT pg_advisory_lock(4242)');
my $w = SpoolTest::Session->new($node, 'writer');
# The slow key: one that is not on shard 0, found in a rolled-back
# transaction (its rows must never be delivered; exact() checks that).
$w->query_ok('BEGIN');
$w->query_ok("SELECT spool.enqueue('bt', 'slow' || i, '{}') FROM generate_series(1, 20) i");
my $slow = $w->query_ok("SELECT key FROM spool.outbox WHERE target = 'bt'"
	  . " AND key LIKE 'slow%' AND shard <> 0 ORDER BY id LIMIT 1");
$w->query_ok('ROLLBACK');
like($slow, qr/^slow\d+$/, "(b) key '$slow' is not on shard 0");
$w->query_ok('BEGIN');
my @pre = split /\n/, $w->query_ok(
	"SELECT spool.enqueue('bt', k, jsonb_build_object('k', k, 'part', 'pre')) FROM"
	  . " (SELECT '$slow' FROM generate_series(1, 3) UNION ALL"
	  . " SELECT 'f' || i FROM generate_series(1, 40) i, generate_series(1, 2)) v(k)");
my $bid = $w->query_ok("SELECT spool.enqueue_barrier('bt')");
my @post = split /\n/, $w->query_ok(
	"SELECT spool.enqueue('bt', k, jsonb_build_object('k', k, 'part', 'post')) FROM"
	  . " (SELECT 'f' || i FROM generate_series(1, 40) i UNION ALL SELECT '$slow') v(k)");
$w->query_ok('COMMIT');
my $t_commit = time;
cmp_ok($bid, '>', $pre[-1], "(b) the barrier $bid has a larger id than the rows before it");
cmp_ok($post[0], '>', $bid, '(b) the rows after the barrier have larger ids');

my $slow_shard = sql("SELECT DISTINCT shard FROM spool.outbox WHERE target = 'bt' AND key = '$slow'");
my $others = sql("SELECT count(*) FROM spool.outbox WHERE target = 'bt' AND id < $bid"
	  . " AND shard <> $slow_shard AND NOT barrier");
cmp_ok($others, '>', 0, "(b) $others rows before the barrier are on shards other than 'slow' ($slow_shard)");
poll_within($node, 30,
	"SELECT count(*) = $others FROM delivered_bt d JOIN spool.outbox o ON o.id = d.outbox_id"
	  . " WHERE o.id < $bid AND o.shard <> $slow_shard",
	'(b) the rows before the barrier on the other shards to be delivered');
poll_within($node, 30,
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = 'spool dispatch bt/$slow_shard'"
	  . " AND wait_event = 'advisory'",
	"(b) the dispatcher of shard $slow_shard to wait for the lock on 'slow'");
# Hold the lock a while longer (at least 300 ms after the commit); the
# barrier and the rows after it stay undelivered meanwhile.
my ($held_bad, $checks) = (0, 0);
while (time - $t_commit < 0.3 || $checks < 3)
{
	$held_bad++ if sql("SELECT count(*) FROM delivered_bt WHERE outbox_id >= $bid") ne '0';
	$checks++;
}
is($held_bad, 0, "(b) while 'slow' is held, neither the barrier nor any row after it is delivered ($checks looks)");
poll_within($node, 30,
	"SELECT state = 'barrier' FROM spool.outbox_status WHERE target = 'bt' AND shard = 0",
	"(b) while the barrier waits for shard $slow_shard, shard 0 to be in state 'barrier'");
is(sql("SELECT count(*) FROM delivered_bt WHERE outbox_id >= $bid"), '0',
	'(b) still nothing delivered from the barrier on');
note("(b) status while held:\n"
	  . sql("SELECT * FROM spool.outbox_status WHERE target = 'bt' ORDER BY shard"));
my $held_ms = (time - $t_commit) * 1000;
$lock->query_ok('SELECT pg_advisory_unlock(4242)');
wait_all('bt', 'delivered_bt', '(b)');
exact('bt', 'delivered_bt', '(b)');
barriers_ordered('bt', 'delivered_bt', '(b)');
per_key_order_ok(delivered_rows($node, 'delivered_bt'), '(b)');
cmp_ok(status_sum($node, 'bt', 'barriers'), '>=', 1, '(b) outbox_status counts the barrier');
cmp_ok(status_sum($node, 'bt', 'flushes_barrier'), '>=', 1, '(b) outbox_status counts a barrier flush');
my $drain = sql("SELECT max(barrier_drain_ms_max) FROM spool.outbox_status WHERE target = 'bt'");
cmp_ok($drain, '>=', int($held_ms) - 100,
	sprintf('(b) barrier_drain_ms_max (%s) covers the %.0f ms the slow key was held', $drain, $held_ms));
is(sql("SELECT max(barrier_drain_ms_last) > 0 FROM spool.outbox_status WHERE target = 'bt'"),
	't', '(b) barrier_drain_ms_last > 0');

# ---------------------------------------------------------------------------
# (c) Barriers enqueued concurrently with rows.
# ---------------------------------------------------------------------------
my $nb0 = sql("SELECT count(*) FROM spool.outbox WHERE target = 'bt' AND barrier");
$pgb = start_pgbench($node, 'bt', <<'EOS', '-c', '6', '-j', '3', '-t', '120');
\set k random(1, 60)
\set n random(1, 3)
\set b random(1, 15)
BEGIN;
SELECT spool.enqueue('bt', 'g' || ((:k + i) % 60), jsonb_build_object('c', :client_id)) FROM generate_series(1, :n) i;
SELECT spool.enqueue_barrier('bt') WHERE :b = 1;
SELECT spool.enqueue('bt', 'g' || :k, '{"after": true}') WHERE :b = 1;
COMMIT;
EOS
is(finish_pgbench($pgb), 0, '(c) 6 pgbench clients enqueued rows and barriers');
my $nb = sql("SELECT count(*) FROM spool.outbox WHERE target = 'bt' AND barrier") - $nb0;
cmp_ok($nb, '>', 5, "(c) $nb more barriers enqueued");
wait_all('bt', 'delivered_bt', '(c)');
exact('bt', 'delivered_bt', '(c)');
is(barriers_ordered('bt', 'delivered_bt', '(c)'), $nb + $nb0, '(c) every barrier delivered');
per_key_order_ok(delivered_rows($node, 'delivered_bt'), '(c)');
is(status_sum($node, 'bt', 'barriers'), $nb + $nb0, '(c) outbox_status counts every barrier');

note(sprintf('total test time %.1fs', time - $t_start));
$lock->quit;
$w->quit;
$node->stop;
done_testing();

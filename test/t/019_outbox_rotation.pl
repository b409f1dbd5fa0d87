# Outbox storage without bloat (docs/outbox.md, "Storage without bloat").
#
# With spool.outbox_segment_size = 1000, a target's ring of eight slots
# turns over every 8000 ids.  A session holds an old snapshot (REPEATABLE
# READ, an open transaction that read an unrelated table) for the whole
# test, while 30,000 rows are enqueued in 300 transactions and delivered:
#   - every row is delivered exactly once, while the snapshot is held;
#   - rows left the outbox by rotation: the target's slots hold fewer rows
#     than were enqueued, and no slot other than the current one and the
#     one before it holds rows (the others were truncated);
#   - no outbox row was ever updated or deleted (pg_stat_user_tables shows
#     0 updates and 0 deletes on every slot), so nothing for the held
#     snapshot to keep alive;
#   - a slot that holds an undelivered row is never truncated: with the
#     function failing for one key, that key's rows are parked, every other
#     row flows, and the parked rows are delivered once the failure is gone.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";
use SpoolTest;
use SpoolOutbox;
use Test::More;

my $node = spool_node('outbox_rotation', 'spool.outbox_segment_size' => 1000);
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{CREATE TABLE fail_keys (key text PRIMARY KEY);
      CREATE TABLE unrelated (x int); INSERT INTO unrelated VALUES (1);});
sql_target($node, 'rt', '{"shards": 2, "batch_size": 500, "batch_interval": "5 ms",'
	  . ' "retry_limit": 100, "retry_backoff": "50 ms", "retry_backoff_max": "200 ms"}',
	pre => q{IF EXISTS (SELECT 1 FROM public.fail_keys f WHERE f.key = $2) THEN
	           RAISE EXCEPTION 'key % is failing', $2; END IF;});
sql('GRANT SELECT ON fail_keys TO deliverer');
wait_dispatchers($node, 'rt', 2);

# The old snapshot, held for the whole test.
my $old = SpoolTest::Session->new($node, 'old snapshot');
$old->query_ok('BEGIN ISOLATION LEVEL REPEATABLE READ');
$old->query_ok('SELECT count(*) FROM unrelated');

sql(q{INSERT INTO fail_keys VALUES ('k7')});
for my $i (0 .. 299)
{
	my $lo = $i * 100 + 1;
	my $hi = $lo + 99;
	sql("SELECT count(spool.enqueue('rt', 'k' || (g % 10), jsonb_build_object('g', g)))"
		  . " FROM generate_series($lo, $hi) g");
}
poll_ok($node,
	"SELECT count(*) = 27000 FROM delivered",
	'every row of the healthy keys delivered while the old snapshot is held');
poll_ok($node,
	"SELECT count(*) = 3000 FROM spool.outbox_retry WHERE target = 'rt'",
	"the failing key's 3000 rows are parked");

# Truncation never takes a slot that holds a parked row's original: parked
# rows are copies, so rotation goes on; the slots hold far fewer rows.
my $t_id = sql("SELECT id FROM spool.targets WHERE name = 'rt'");
poll_ok($node,
	"SELECT count(*) < 10000 FROM spool.outbox_t$t_id",
	'rotation removed delivered rows: the ring holds fewer than 10,000 of 30,000');
poll_ok($node,
	"SELECT count(*) <= 2 FROM generate_series(0, 7) s,"
	  . " LATERAL (SELECT 1 FROM spool.outbox_store o WHERE o.target_id = $t_id AND o.slot = s LIMIT 1) x",
	'at most 2 of the 8 slots hold rows: the others were truncated');
is( sql(
		"SELECT coalesce(sum(n_tup_upd + n_tup_del + n_tup_hot_upd), 0) FROM pg_stat_user_tables"
		  . " WHERE schemaname = 'spool' AND relname LIKE 'outbox_t${t_id}_%'"),
	'0',
	'no outbox row was updated or deleted');

# The failing key recovers: its parked rows go out, in order, once.
sql(q{DELETE FROM fail_keys});
poll_ok($node, "SELECT count(*) = 30000 FROM delivered", 'the parked rows are delivered');
is(sql("SELECT count(DISTINCT outbox_id) FROM delivered"), '30000', 'each row exactly once');
per_key_order_ok(delivered_rows($node, 'delivered'), 'per key, delivery in outbox id order');
is(sql("SELECT count(*) FROM spool.outbox_dead"), '0', 'no dead letters');

$old->query_ok('COMMIT');
$old->quit;
$node->stop;
done_testing();

# Failed deliveries: parking, retries, dead letters and redrive
# (docs/outbox.md, Failures, retries and dead letters).
#
# Target rt (sql, one shard, retry_limit 3, retry_backoff 50ms) whose
# function raises for the keys listed in fail_keys.  A sequence counts the
# failing calls; a retry (a call for a row already parked) first waits for
# an advisory lock the test holds, so the parked state can be looked at.
#   (a) One transaction enqueues rows on keys a, c, d and three rows b1 < b2
#       < b3 on the failing key 'bad'.  The other keys' rows are delivered,
#       also those after b1 on the same shard; spool.outbox_retry shows b1
#       with attempts >= 1 and b2, b3 waiting behind it (attempts 0);
#       outbox_status shows waiting = 3, blocked_keys = 1.
#   (b) Released, b1 fails its 3 retries and goes to spool.outbox_dead with
#       its last error and attempts = 4 ("after retry_limit failed retries,
#       the row goes to dead letters"); then b2 and b3 (still failing) too;
#       outbox_retry is empty; retries > 0 and dead_letters = 3 in
#       outbox_status.
#   (c) With 'bad' removed from fail_keys, new rows b4 < b5 on 'bad' are
#       delivered, in order; the dead rows stay dead.
#   (d) spool.redrive(b1) and redrive(b3) deliver those rows (same outbox
#       id), once; b2 stays dead and undelivered.  redrive of a delivered
#       row, of a row redriven already, and of an unknown id are errors
#       (SP004, or SP001).
#   (e) A row that fails on its own (its id listed in fail_ids) while the
#       later rows of its key, in the same batch, would succeed: they wait
#       behind it and are delivered once each, in order, after it is dead.
#   (f) 2500 rows parked on one key (target rf, whose function fails for
#       the keys in fail_keys): once the key recovers they drain in a few
#       passes, each delivering up to 1000 of the key's rows in order (the
#       function records its transaction ids: at most 10 transactions, where
#       one row per pass took 2500), each row once.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolOutbox.pm
use SpoolTest;
use SpoolOutbox;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $node = spool_node('outbox_retry_dead');
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(q{
CREATE TABLE fail_keys (key text PRIMARY KEY);
CREATE TABLE fail_ids (id bigint PRIMARY KEY);
CREATE SEQUENCE fail_calls;
CREATE FUNCTION is_parked(bigint) RETURNS boolean LANGUAGE sql SECURITY DEFINER
	SET search_path = pg_catalog AS
	$$ SELECT EXISTS (SELECT 1 FROM spool.outbox_retry WHERE id = $1 AND attempts >= 1) $$;
});
sql_target($node, 'rt',
	'{"retry_limit": 3, "retry_backoff": "50ms", "retry_backoff_max": "1s", "batch_interval": "5ms"}',
	pre => q{
	IF EXISTS (SELECT 1 FROM public.fail_keys f WHERE f.key = $2)
	   OR EXISTS (SELECT 1 FROM public.fail_ids f WHERE f.id = $3) THEN
		PERFORM nextval('public.fail_calls');
		IF public.is_parked($3) THEN
			PERFORM pg_advisory_xact_lock_shared(4343);
		END IF;
		RAISE EXCEPTION 'injected failure for key % (outbox id %)', $2, $3;
	END IF;});
sql(q{GRANT SELECT ON fail_keys, fail_ids TO deliverer; GRANT USAGE ON SEQUENCE fail_calls TO deliverer;
	GRANT EXECUTE ON FUNCTION is_parked(bigint) TO deliverer;});
wait_dispatchers($node, 'rt', 1);

# ---------------------------------------------------------------------------
# (a) The failing key is parked; the other keys flow.
# ---------------------------------------------------------------------------
my $lock = SpoolTest::Session->new($node, 'lock');
$lock->query_ok('SELECT pg_advisory_lock(4343)');
sql(q{INSERT INTO fail_keys VALUES ('bad')});
my @rows = map { [ split /\|/ ] } split /\n/, sql(q{
SELECT k, spool.enqueue('rt', k, jsonb_build_object('n', n))
  FROM (VALUES (1, 'a'), (2, 'bad'), (3, 'a'), (4, 'c'), (5, 'bad'), (6, 'd'),
			   (7, 'bad'), (8, 'c'), (9, 'a')) v(n, k) ORDER BY n});
my @good = map { $_->[1] } grep { $_->[0] ne 'bad' } @rows;
my ($b1, $b2, $b3) = map { $_->[1] } grep { $_->[0] eq 'bad' } @rows;
my $goods = join(',', @good);
note("(a) bad: $b1 $b2 $b3; good: $goods");

poll_within($node, 30,
	"SELECT (SELECT count(DISTINCT outbox_id) FROM delivered WHERE outbox_id IN ($goods)) = "
	  . scalar(@good)
	  . " AND (SELECT count(*) FROM spool.outbox_retry WHERE target = 'rt') = 3"
	  . " AND (SELECT attempts > 0 FROM spool.outbox_retry WHERE id = $b1)",
	"(a) the other keys' rows delivered, and b1, b2, b3 parked");
is(sql("SELECT count(*) FROM delivered WHERE key = 'bad'"), '0', '(a) no row of the failing key delivered');
is( sql("SELECT string_agg(id || ':' || key || ':' || attempts, ',' ORDER BY id)"
		  . " FROM spool.outbox_retry WHERE target = 'rt' AND id <> $b1"),
	"$b2:bad:0,$b3:bad:0", '(a) outbox_retry: b2 and b3 wait behind b1 with attempts 0');
is(sql("SELECT attempts FROM spool.outbox_retry WHERE id = $b1"),
	'1', '(a) outbox_retry: b1 failed once (its retry waits for the lock)');
is(sql("SELECT sum(waiting) || ' ' || sum(blocked_keys) FROM spool.outbox_status WHERE target = 'rt'"),
	'3 1', '(a) outbox_status: waiting = 3, blocked_keys = 1');
note("(a) status:\n" . sql("SELECT * FROM spool.outbox_status WHERE target = 'rt'"));
note("(a) outbox_retry:\n" . sql("SELECT * FROM spool.outbox_retry"));

# ---------------------------------------------------------------------------
# (b) After retry_limit failed retries, dead letters.
# ---------------------------------------------------------------------------
my $t_release = time;
$lock->query_ok('SELECT pg_advisory_unlock(4343)');
poll_within($node, 30,
	"SELECT count(*) = 3 FROM spool.outbox_dead WHERE id IN ($b1, $b2, $b3)",
	'(b) b1, b2 and b3 to be dead letters');
note(sprintf('(b) dead %.1fs after the release', time - $t_release));
note("(b) outbox_dead:\n" . sql("SELECT * FROM spool.outbox_dead"));
is( sql("SELECT string_agg(id || ':' || key || ':' || attempts, ',' ORDER BY id)"
		  . " FROM spool.outbox_dead WHERE target = 'rt'"),
	"$b1:bad:4,$b2:bad:4,$b3:bad:4", '(b) each dead row failed its first attempt and retry_limit (3) retries');
is( sql("SELECT count(*) FROM spool.outbox_dead WHERE target = 'rt'"
		  . " AND last_error LIKE 'injected failure for key bad (outbox id ' || id || ')%'"),
	'3', "(b) each dead row carries its own last error");
is( sql("SELECT count(*) FROM spool.outbox_dead d JOIN spool.outbox o USING (id)"
		  . " WHERE d.payload = o.payload AND o.key = 'bad'"),
	'3', '(b) the dead rows keep their payloads');
note('(b) the function was called ' . sql('SELECT last_value FROM fail_calls')
	  . ' times for the 3 rows of the failing key');
is(sql("SELECT count(*) FROM spool.outbox_retry WHERE target = 'rt'"), '0', '(b) nothing parked any more');
is(sql("SELECT count(*) FROM delivered WHERE key = 'bad'"), '0', '(b) no row of the failing key delivered');
my ($retries, $dead, $waiting, $blocked) = split /\|/,
  sql("SELECT sum(retries), sum(dead_letters), sum(waiting), sum(blocked_keys)"
	  . " FROM spool.outbox_status WHERE target = 'rt'");
cmp_ok($retries, '>', 0, "(b) outbox_status counts $retries retries");
is($dead, '3', '(b) outbox_status counts 3 dead letters');
is("$waiting $blocked", '0 0', '(b) outbox_status: waiting = 0, blocked_keys = 0');
like(sql("SELECT max(last_error) FROM spool.outbox_status WHERE target = 'rt'"),
	qr/injected failure for key bad/, '(b) outbox_status shows the last error');

# ---------------------------------------------------------------------------
# (c) The key recovers.
# ---------------------------------------------------------------------------
sql(q{DELETE FROM fail_keys});
my ($b4, $b5) = split /\n/,
  sql(q{SELECT spool.enqueue('rt', 'bad', jsonb_build_object('n', n)) FROM generate_series(10, 11) n});
poll_within($node, 30,
	"SELECT count(*) = 2 FROM delivered WHERE outbox_id IN ($b4, $b5)",
	'(c) new rows on the recovered key to be delivered');
is( sql("SELECT string_agg(outbox_id::text, ',' ORDER BY seq) FROM delivered WHERE key = 'bad'"),
	"$b4,$b5", '(c) in order, and only them');
is(sql("SELECT count(*) FROM spool.outbox_dead WHERE target = 'rt'"), '3', '(c) the dead rows stay dead');

# ---------------------------------------------------------------------------
# (d) Redrive.
# ---------------------------------------------------------------------------
my $s = SpoolTest::Session->new($node, 'redrive');
my ($out, $state, $err) = $s->query("SELECT spool.redrive($b1)");
is($state, '00000', "(d) spool.redrive($b1) of a dead row");
poll_within($node, 30,
	"SELECT count(*) = 1 FROM delivered WHERE outbox_id = $b1",
	"(d) the redriven row $b1 to be delivered");
$s->query_ok("SELECT spool.redrive($b3)");
poll_within($node, 30,
	"SELECT count(*) = 1 FROM delivered WHERE outbox_id = $b3",
	"(d) the redriven row $b3 to be delivered");
is( sql("SELECT key || ':' || payload::text FROM delivered WHERE outbox_id = $b1"),
	'bad:{"n": 2}', '(d) the redriven row kept its key and payload');
is(sql("SELECT string_agg(id::text, ',') FROM spool.outbox_dead WHERE target = 'rt'"),
	"$b2", '(d) only b2 is still a dead letter');

for my $case ([ $b4, 'a delivered row' ], [ $b1, 'a row redriven and delivered already' ],
	[ 999999999, 'an unknown id' ])
{
	my ($id, $what) = @$case;
	($out, $state, $err) = $s->query("SELECT spool.redrive($id)");
	like($state, qr/^SP00[14]$/, "(d) spool.redrive of $what ($id) fails with SP001 or SP004 (got $state)")
	  or diag($err);
	note("(d) redrive of $what: $state $err");
}

# Nothing else was delivered, nothing twice, and apart from the redriven
# rows, per key in id order.
is( sql("SELECT string_agg(outbox_id::text, ',' ORDER BY outbox_id) FROM delivered"),
	join(',', sort { $a <=> $b } (@good, $b1, $b3, $b4, $b5)),
	'every delivered row once: the good rows, b4, b5 and the redriven b1, b3');
per_key_order_ok([ grep { $_->[1] != $b1 && $_->[1] != $b3 } @{ delivered_rows($node, 'delivered') } ],
	'rows not redriven');
is( sql("SELECT string_agg(outbox_id::text, ',' ORDER BY seq) FROM delivered WHERE key = 'bad'"),
	"$b4,$b5,$b1,$b3", 'the redriven rows were delivered after the recovered key\'s new rows, in redrive order');

# ---------------------------------------------------------------------------
# (e) A row that fails on its own (its id in fail_ids), with later rows of
# its key in the same batch that would succeed: they wait behind it, and
# are delivered once each, in order, after it went to dead letters.
# ---------------------------------------------------------------------------
my $e = SpoolTest::Session->new($node, 'e');
$e->query_ok('BEGIN');
my $r1 = $e->query_ok(q{SELECT spool.enqueue('rt', 'solo', '{"n": 1}')});
$e->query_ok("INSERT INTO fail_ids VALUES ($r1)");
my ($r2, $r3) = split /\n/,
  $e->query_ok(q{SELECT spool.enqueue('rt', 'solo', jsonb_build_object('n', n)) FROM generate_series(2, 3) n});
$e->query_ok('COMMIT');
poll_within($node, 30,
	"SELECT EXISTS (SELECT FROM spool.outbox_dead WHERE id = $r1)"
	  . " AND NOT EXISTS (SELECT FROM spool.outbox_retry WHERE key = 'solo')"
	  . " AND (SELECT count(*) FROM delivered WHERE key = 'solo') >= 2",
	"(e) $r1 dead, and nothing of key 'solo' parked any more");
is( sql("SELECT string_agg(outbox_id::text, ',' ORDER BY seq) FROM delivered WHERE key = 'solo'"),
	"$r2,$r3", "(e) the later rows $r2, $r3 of the key were delivered once each, in order");
is( sql("SELECT count(*) FROM delivered d, spool.outbox_dead x"
		  . " WHERE d.key = 'solo' AND x.id = $r1 AND d.at < x.failed_at"),
	'0', "(e) no later row of the key was delivered before $r1 went to dead letters");
$e->quit;

# ---------------------------------------------------------------------------
# (f) Many rows parked on one key drain in few passes.
# ---------------------------------------------------------------------------
sql(q{CREATE TABLE rf_tx (xid bigint NOT NULL, outbox_id bigint NOT NULL)});
sql_target($node, 'rf',
	'{"retry_limit": 100, "retry_backoff": "50ms", "retry_backoff_max": "200ms", "batch_interval": "5ms"}',
	table => 'rf_delivered',
	pre => q{
	IF EXISTS (SELECT 1 FROM public.fail_keys f WHERE f.key = $2) THEN
		RAISE EXCEPTION 'injected failure for key % (outbox id %)', $2, $3;
	END IF;
	INSERT INTO public.rf_tx VALUES (txid_current(), $3);});
sql(q{GRANT INSERT ON rf_tx TO deliverer});
wait_dispatchers($node, 'rf', 1);
sql(q{INSERT INTO fail_keys VALUES ('hot')});
sql(q{CREATE TABLE rf_sent AS
SELECT spool.enqueue('rf', 'hot', jsonb_build_object('n', n)) AS id FROM generate_series(1, 2500) n});
poll_within($node, 60,
	q{SELECT count(*) = 2500 FROM spool.outbox_retry r JOIN spool.targets t ON t.id = r.target_id
	   WHERE t.name = 'rf'},
	'(f) all 2500 rows of key hot parked');
sql(q{DELETE FROM fail_keys WHERE key = 'hot'});
poll_within($node, 120, q{SELECT count(*) = 2500 FROM rf_delivered},
	'(f) all 2500 delivered once the key recovered');
is(sql(q{SELECT count(*) FROM (SELECT outbox_id FROM rf_delivered GROUP BY 1 HAVING count(*) > 1) d}),
	'0', '(f) each row delivered once');
is(sql(q{SELECT count(*) FROM (SELECT seq, outbox_id, lag(outbox_id) OVER (ORDER BY seq) AS before
	       FROM rf_delivered) d WHERE outbox_id < before}),
	'0', '(f) in id order');
cmp_ok(sql(q{SELECT count(DISTINCT xid) FROM rf_tx}), '<=', 10,
	'(f) in at most 10 delivering transactions');
note('(f) delivering transactions: ' . sql(q{SELECT count(DISTINCT xid) FROM rf_tx}));

note(sprintf('total test time %.1fs', time - $t_start));
$s->quit;
$lock->quit;
$node->stop;
done_testing();


# Streaming replication and failover (docs/operations.md, Replication and
# failover).  A primary runs a pipeline: source 'src' on the test Kafka
# cluster (4 partitions), processor 'p' (test_handler) whose outputs go to
# the sql target 'test' (one row per delivery in table delivered).  A hot
# standby streams from it.
#   (a) on the standby (spool.standby_processors off, the default): only
#       the launcher runs, no other spool worker (test/t/029 runs processor
#       replicas there), and
#       every view of the extension and every set-returning function
#       without required arguments (found in the catalog, so new ones are
#       covered), plus spool.metrics(), answers; source_status shows the
#       replicated offsets with NULL runtime columns; writing functions
#       (a lease, a queued nonce, an enqueue) fail with 25006 at once.
#   (b) asynchronous replication that loses the primary's last
#       transactions: a client lease sb:res is granted on the primary
#       (token 1, short ttl) and replicated; more messages are produced and,
#       while they stream, the standby is cut off (primary_conninfo = '');
#       the primary goes on: it grants sb:res again (token 2, never
#       replicated), ingests, processes and delivers more; then it is
#       stopped in immediate mode and the standby promoted.
#   (c) the launcher of the promoted server starts every worker; at the
#       end: every Kafka offset once in the spool, the processor's outputs
#       exactly the reference outputs, each delivered once into the sql
#       target's table; the lease acquired again carries a token above
#       every token of the old primary and at least 2 << 40 (the epoch of
#       timeline 2), and so does every grant made after the promotion.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";
use SpoolTest;
use SpoolKafka;
use SpoolIngest;
use SpoolOutbox;
use SpoolProcessor;
use Test::More;

my $nparts = 4;
my $topic = 'sb';
my $n1 = 200;    # processed and delivered before the standby exists
my $na = 200;    # streaming when the standby is cut off
my $nb = 400;    # produced after that, for the old primary alone
my $epoch = 2 << 40;    # the token epoch of timeline 2

my $kafka = SpoolKafka->start(topics => ["$topic:$nparts"]);
my $primary = spool_node('primary', _init => { allows_streaming => 1 });

# A millisecond per delivery keeps the deliveries streaming for a while.
sql_target($primary, 'test', '{"batch_size": 20, "batch_interval": "5ms"}',
	pre => 'PERFORM pg_sleep(0.001);');
processor_setup($primary, $kafka->bootstrap, $topic,
	nparts => $nparts,
	options => '{"batch_size": 50}');
is($kafka->produce($topic, $n1, -1, 100, 0), "OK produced $n1", "produce seq 0 .. " . ($n1 - 1));
wait_processed($primary, 'p', $n1, 'primary');
poll_ok($primary, "SELECT count(*) = $n1 FROM delivered", "primary: $n1 deliveries");

# A client lease, granted on the primary.
my $old_token = $primary->safe_psql('postgres',
	"SELECT token FROM spool.lease_acquire('sb:res', 'a', '1 s')");
like($old_token, qr/^\d+$/, "primary: lease sb:res granted with token $old_token");
cmp_ok($old_token, '<', 1 << 40, 'primary: tokens on timeline 1 count from 1');

# The standby.
$primary->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'b', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby, 'replay');
sub ssql { return $standby->safe_psql('postgres', $_[0]); }

is(ssql('SELECT pg_is_in_recovery()'), 't', 'standby: in recovery');
poll_ok($standby,
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'spool launcher'",
	'standby: the launcher to run');
is( ssql("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'spool%'"),
	'1', 'standby: no spool worker runs but the launcher');

# (a) every view and every argument-less set-returning function answers.
my @views = split /\n/, ssql(q{SELECT format('%I.%I', schemaname, viewname)
	FROM pg_views WHERE schemaname = 'spool' ORDER BY 1});
my @srfs = split /\n/, ssql(q{SELECT p.oid::regproc FROM pg_proc p
	JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
	JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'spool_ext'
	WHERE p.proretset AND p.pronargs = p.pronargdefaults ORDER BY 1});
cmp_ok(scalar(@views), '>=', 16, scalar(@views) . ' views of the extension');
cmp_ok(scalar(@srfs), '>=', 5, scalar(@srfs) . ' set-returning functions without required arguments');
my $s = SpoolTest::Session->new($standby, 'standby');
for my $q ((map { "SELECT count(*) FROM $_" } @views),
	(map { "SELECT count(*) FROM $_()" } @srfs),
	'SELECT length(spool.metrics()) > 0')
{
	my ($out, $state, $err) = $s->query($q);
	is($state, '00000', "standby: $q answers") or diag($err);
}
# Writing functions fail at once with 25006 (read-only), the nonce queue too
# (no worker would answer it there).
for my $q ("SELECT spool.lease_acquire('sb:res', 'x', '1 min')",
	"SELECT spool.nonce_request('0xsb', 'r1')",
	"SELECT spool.enqueue('test', 'k', '{}')")
{
	my ($out, $state, $err) = $s->query($q);
	is($state, '25006', "standby: $q fails as read-only");
}
$s->quit;
is( ssql(q{SELECT sum(next_offset) || ' ' || count(*) || ' ' || count(pid) || ' '
	|| count(state) || ' ' || count(high_watermark) FROM spool.source_status WHERE source = 'src'}),
	"$n1 $nparts 0 0 0",
	'standby: source_status shows the replicated offsets, NULL runtime columns');
is(ssql(q{SELECT count(*) || ' ' || count(role) || ' ' || max(committed_cursor)
	FROM spool.processor_status WHERE processor = 'p'}),
	'1 0 ' . $primary->safe_psql('postgres',
		"SELECT committed_cursor FROM spool.processor_checkpoints WHERE processor = 'p'"),
	'standby: processor_status shows the replicated checkpoint, no role');
is(ssql("SELECT token FROM spool.leases WHERE resource = 'sb:res'"), $old_token,
	'standby: the lease is replicated');

# (b) cut the standby off while the stream runs, go on on the primary alone.
is($kafka->produce($topic, $na, -1, 100, $n1), "OK produced $na",
	"produce seq $n1 .. " . ($n1 + $na - 1));
poll_ok($primary, "SELECT count(*) > $n1 FROM spool.entries WHERE source = 'src'",
	'primary: the stream to go on');
$primary->wait_for_catchup($standby, 'replay');
ssql(q{ALTER SYSTEM SET primary_conninfo = ''; SELECT pg_reload_conf()});
poll_ok($standby, 'SELECT count(*) = 0 FROM pg_stat_wal_receiver', 'standby: cut off');
poll_ok($primary,
	"SELECT token IS NOT NULL FROM spool.lease_acquire('sb:res', 'c', '1 min')",
	'primary: sb:res granted again, not replicated');
my $lost_token = $primary->safe_psql('postgres',
	"SELECT token FROM spool.lease_store WHERE resource = 'sb:res'");
cmp_ok($lost_token, '>', $old_token, "primary: token $lost_token, lost with the primary");
is($kafka->produce($topic, $nb, -1, 100, $n1 + $na), "OK produced $nb",
	"produce seq " . ($n1 + $na) . ' .. ' . ($n1 + $na + $nb - 1));
poll_ok($primary,
	"SELECT count(*) > " . ($n1 + $na) . " FROM delivered",
	'primary: deliveries the standby does not have');
my $max_old = $primary->safe_psql('postgres', 'SELECT max(token) FROM spool.lease_store');
is( ssql("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'spool%'"
		  . " AND backend_type <> 'spool launcher'"),
	'0', 'standby: still no spool worker but the launcher, seconds later');
$primary->stop('immediate');
note('at the promotion the standby has: '
	  . ssql(q{SELECT (SELECT count(*) FROM spool.entries) || ' entries, '
		|| (SELECT count(*) FROM spool.outbox) || ' outputs, '
		|| (SELECT count(*) FROM delivered) || ' deliveries'}));
$standby->promote;
is(ssql('SELECT pg_is_in_recovery()'), 'f', 'standby: promoted');
my $promoted_at = ssql('SELECT clock_timestamp()');

# (c) everything resumes from the replicated state.
poll_ok($standby,
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'spool processor'",
	'promoted: the processor replicas to run');
my $n = $n1 + $na + $nb;
wait_processed($standby, 'p', $n, 'promoted');
spool_partitions_exact($standby, $kafka, 'src', $topic, $nparts, $n);
outputs_exact($standby, 'p', $nparts, $n, 'promoted');
tokens_ordered($standby, 'p', 'promoted');
poll_ok($standby, "SELECT count(*) >= $n FROM delivered", "promoted: $n deliveries");
is( ssql(q{SELECT count(*) || ' ' || count(DISTINCT outbox_id) FROM delivered}),
	"$n $n", 'promoted: every output delivered, none twice');
is( ssql(q{SELECT count(*) FROM spool.outbox o WHERE o.processor = 'p'
	AND NOT EXISTS (SELECT FROM delivered d WHERE d.outbox_id = o.id)}),
	'0', 'promoted: the deliveries are the outbox rows');

# Tokens after the promotion: above the old primary's and the epoch.
poll_ok($standby,
	"SELECT token IS NOT NULL FROM spool.lease_acquire('sb:res', 'b', '1 min')",
	'promoted: sb:res granted again');
my $new_token = ssql("SELECT token FROM spool.leases WHERE resource = 'sb:res'");
cmp_ok($new_token, '>', $old_token, "promoted: new token $new_token above the old one $old_token");
cmp_ok($new_token, '>', $lost_token, "promoted: new token above the lost one $lost_token");
cmp_ok($new_token, '>', $max_old, "promoted: new token above every token of the old primary ($max_old)");
cmp_ok($new_token, '>=', $epoch, 'promoted: new token in the epoch of timeline 2');
is( ssql(qq{SELECT count(*) > 0 AND bool_and(token >= $epoch AND token > $max_old)
	FROM spool.lease_store WHERE granted_at >= '$promoted_at'}),
	't', 'promoted: every grant since the promotion is in the new epoch');
is( ssql(q{SELECT count(*) FROM spool.nonce_signer s JOIN spool.lease_store l
	ON l.resource = 'signer:' || s.signer WHERE s.lease_token <> l.token}),
	'0', 'promoted: signer rows mirror their lease tokens');

$standby->stop;
$kafka->stop;
done_testing();

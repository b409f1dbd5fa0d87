
# Crash restart (kill -9 of one backend restarts the whole server and runs
# crash recovery) in the middle of nonce load, basic mode and worker-queue
# mode.  After recovery:
#   - every allocation acknowledged to a client before the crash is present,
#     none is duplicated, and the next allocation continues after the max
#     (nonces stay gap-free);
#   - lease tokens keep increasing: a new grant is above every token seen
#     before the crash;
#   - the launcher and the nonce workers come back by themselves and serve.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm
use SpoolTest;
use Test::More;

# The test framework turns restart_after_crash off; this test needs it.
my $node = spool_node('crash_restart', 'spool.nonce_workers' => 2,
	restart_after_crash => 'on');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(<<'EOSQL');
CREATE SEQUENCE rid_seq;
CREATE TABLE alloc_audit (signer text, nonce bigint, rid text, mode text);
-- Basic mode: all clients share owner 'app' (re-acquiring keeps the token).
CREATE FUNCTION basic_step() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
	l   spool.lease := spool.lease_acquire('signer:b1', 'app', '30 s');
	rid text := 'b-' || nextval('rid_seq');
	n   bigint := spool.nonce_allocate('b1', 'app', l.token, rid);
BEGIN
	INSERT INTO alloc_audit VALUES ('b1', n, rid, 'basic');
	RETURN n;
END
$$;
-- Worker-queue mode: recorded after the worker committed it.
CREATE FUNCTION queue_step() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
	sg  text := 'q' || (1 + floor(random() * 4))::int;
	rid text := 'q-' || nextval('rid_seq');
	n   bigint := spool.nonce_request(sg, rid);
BEGIN
	INSERT INTO alloc_audit VALUES (sg, n, rid, 'queue');
	RETURN n;
END
$$;
EOSQL

my $old_workers = wait_workers($node, 2, 'the nonce workers to start');

# Allocations acknowledged to this client before the crash.
my $s = SpoolTest::Session->new($node, 'client');
my $tc = $s->query_ok(q{SELECT token FROM spool.lease_acquire('signer:c1', 'perl', '3 s')});
my %acked;
for my $i (1 .. 20)
{
	$acked{"c1|c-$i"} = $s->query_ok("SELECT spool.nonce_allocate('c1', 'perl', $tc, 'c-$i')");
}
for my $i (1 .. 10)
{
	my $sg = 'q' . (1 + $i % 4);
	$acked{"$sg|pq-$i"} = $s->query_ok("SELECT spool.nonce_request('$sg', 'pq-$i')");
}
$s->query_ok("SELECT spool.nonce_mark_used('c1', 0, 'perl', $tc)");
$s->quit;
is(join(',', map { $acked{"c1|c-$_"} } 1 .. 20), join(',', 0 .. 19),
	'client allocated c1 nonces 0 .. 19');

my $load = start_pgbench($node, 'crash_load',
	"SELECT basic_step();\nSELECT queue_step();\n",
	'-c', 6, '-j', 2, '-R', 200, '-t', 2000);
poll_ok($node, q{SELECT count(*) >= 300 FROM alloc_audit},
	'the load to record 300 allocations');

my %tok_before = map { split /\|/ } split /\n/,
  sql('SELECT resource, token FROM spool.lease_store');
my $victim = sql(q{SELECT pid FROM pg_stat_activity
                    WHERE backend_type = 'client backend' AND query LIKE '%_step()%'
                      AND pid <> pg_backend_pid() LIMIT 1});
# Never kill(..., 0 or ''): that would signal our own process group.
BAIL_OUT('no load backend found to kill') unless $victim =~ /^[1-9][0-9]*$/;
pass("picked load backend $victim");
my $log_offset = -s $node->logfile;
ok(kill('KILL', $victim), "kill -9 backend $victim");
finish_pgbench($load);    # its clients lose their connections

crash_restart_ok($node, $victim, $log_offset);
ok($node->log_contains(qr/automatic recovery in progress|redo done/, $log_offset),
	'crash recovery ran');

my $workers = wait_workers($node, 2, 'the launcher to bring the nonce workers back');
for my $w (0, 1)
{
	isnt($workers->{$w}, $old_workers->{$w}, "nonce worker $w is a new process");
}
is(sql(q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'spool launcher'}),
	'1', 'the launcher is back');

# Nothing acknowledged was lost, nothing is duplicated, no gaps.
my @missing = grep {
	my ($sg, $rid) = split /\|/;
	sql("SELECT nonce FROM spool.nonces WHERE signer = '$sg' AND request_id = '$rid'")
	  ne $acked{$_}
} sort keys %acked;
is(scalar(@missing), 0, 'every allocation acknowledged to the client survived')
  or diag "@missing";
is(sql(q{SELECT state FROM spool.nonces WHERE signer = 'c1' AND nonce = 0}),
	'consumed', 'the consumed mark survived');
my $audited = sql('SELECT count(*) FROM alloc_audit');
cmp_ok($audited, '>=', 300, "$audited allocations were recorded by the load");
is(sql(q{SELECT count(*) FROM alloc_audit a LEFT JOIN spool.nonce_store n
           ON n.signer = a.signer AND n.request_id = a.rid
        WHERE n.nonce IS DISTINCT FROM a.nonce}),
	'0', 'every recorded allocation is stored with the nonce the client got');
is(sql(q{SELECT count(*) FROM (SELECT signer, nonce FROM alloc_audit GROUP BY 1, 2
           HAVING count(*) > 1) d}),
	'0', 'no nonce was handed out twice');
is(sql(q{SELECT count(*) FROM spool.nonce_signer s
          WHERE s.next_nonce <> (SELECT count(*) FROM spool.nonce_store n WHERE n.signer = s.signer)
             OR s.next_nonce - 1 <> (SELECT coalesce(max(nonce), -1) FROM spool.nonce_store n
                                      WHERE n.signer = s.signer)}),
	'0', 'nonces are gap-free for every signer');

# Allocation continues after the max.
my %max = map { split /\|/ } split /\n/,
  sql('SELECT signer, max(nonce) FROM spool.nonce_store GROUP BY 1');
my $tb = sql(q{SELECT token FROM spool.lease_acquire('signer:b1', 'app', '30 s')});
is($tb, $tok_before{'signer:b1'}, 'the live lease of b1 survived with its token (renewal)');
is(sql("SELECT spool.nonce_allocate('b1', 'app', $tb, 'after-b1')"),
	$max{b1} + 1, 'b1: the next allocation continues after the max');
for my $sg (qw(q1 q2 q3 q4))
{
	is(sql("SELECT spool.nonce_request('$sg', 'after-$sg')"),
		$max{$sg} + 1, "$sg: the restarted workers continue after the max");
	cmp_ok(sql("SELECT token FROM spool.lease_store WHERE resource = 'signer:$sg'"),
		'>', $tok_before{"signer:$sg"}, "$sg: the new worker's lease has a new token");
}

# A new grant after the crash is above every token seen before.
poll_ok($node, q{SELECT NOT live FROM spool.leases WHERE resource = 'signer:c1'},
	'the client lease of c1 to expire');
my $tnew = sql(q{SELECT token FROM spool.lease_acquire('signer:c1', 'perl-2', '30 s')});
cmp_ok($tnew, '>', $tok_before{'signer:c1'}, 'a new grant of c1 gets a higher token');
my $stale = SpoolTest::Session->new($node, 'stale');
my (undef, $state) = $stale->query("SELECT spool.nonce_allocate('c1', 'perl', $tc, 'stale')");
is($state, 'SP003', 'the pre-crash token of c1 is rejected');
$stale->quit;
is(sql("SELECT spool.nonce_allocate('c1', 'perl-2', $tnew, 'after-c1')"),
	$max{c1} + 1, 'c1: the next allocation continues after the max');

$node->stop;
done_testing();


# A lease holder that stalls (SIGSTOP) past its TTL loses the lease, and when
# it wakes up nothing it does with the old token is accepted (L-1, L-2, P-4).
#
# (a) stalled while idle: a rival acquires with a new token at once; the
#     holder's renew / release / fence / nonce operations are all rejected.
# (b) stalled inside an open fenced transaction: the rival's acquire returns
#     NULL after a bounded wait and signals the holder; the holder dies when
#     continued, its writes never commit, and the rival then gets token + 1.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, also when run without make
use SpoolTest;
use Test::More;
use Time::HiRes qw(time);

my $node = spool_node('lease_stall', 'spool.lease_wait_timeout' => "'1s'");
$node->safe_psql('postgres',
	'CREATE TABLE fenced_writes (who text, token bigint, note text)');

my @stopped;    # processes to continue if we die half way

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub stop_pid
{
	my ($pid) = @_;
	ok(kill('STOP', $pid), "SIGSTOP $pid");
	push @stopped, $pid;
}

sub cont_pid
{
	my ($pid) = @_;
	ok(kill('CONT', $pid), "SIGCONT $pid");
	@stopped = grep { $_ != $pid } @stopped;
}

END { kill 'CONT', $_ for @stopped; }

# Expect $sql in $session to fail with $state.
sub fails_with
{
	my ($session, $sql, $state, $what) = @_;
	my (undef, $got, $err) = $session->query($sql);
	is($got, $state, "$what fails with $state") or diag $err;
}

##########################################################################
# (a) the holder stalls while idle
##########################################################################

my $h = SpoolTest::Session->new($node, 'holder');
my $hpid = $h->pid;

my ($res_token) = split /\|/,
  $h->query_ok(q{SELECT token FROM spool.lease_acquire('res-a', 'holder', '2 s')});
my ($sig_token) = split /\|/,
  $h->query_ok(q{SELECT token FROM spool.lease_acquire('signer:sig-a', 'holder', '2 s')});
ok($res_token > 0 && $sig_token > 0,
	"holder got tokens $res_token (res-a) and $sig_token (signer:sig-a)");

my @mine = map {
	$h->query_ok("SELECT spool.nonce_allocate('sig-a', 'holder', $sig_token, 'h-$_')")
} 1 .. 3;
is_deeply(\@mine, [ 0, 1, 2 ], 'holder allocated nonces 0, 1, 2');
$h->query_ok("SELECT spool.nonce_mark_used('sig-a', 0, 'holder', $sig_token)");
$h->query_ok("SELECT spool.fence('res-a', $res_token)");

stop_pid($hpid);

poll_ok($node,
	q{SELECT bool_and(NOT live) FROM spool.leases
	   WHERE resource IN ('res-a', 'signer:sig-a')},
	'the stalled holder\'s leases to expire');

my $t0 = time;
my $rival = sql(q{SELECT token FROM spool.lease_acquire('res-a', 'rival', '60 s')});
my $rival_sig = sql(q{SELECT token FROM spool.lease_acquire('signer:sig-a', 'rival', '60 s')});
my $took = time - $t0;
is($rival, $res_token + 1, 'rival acquires res-a with the next token');
is($rival_sig, $sig_token + 1, 'rival acquires signer:sig-a with the next token');
cmp_ok($took, '<', 1.0,
	'an idle stalled holder holds no fence, so the rival did not wait');
is(sql(q{SELECT spool.nonce_allocate('sig-a', 'rival', } . ($sig_token + 1) . q{, 'r-1')}),
	'3', 'rival allocates the next nonce, 3');

my $holder_rows_before = sql(
	q{SELECT string_agg(nonce || ':' || state || ':' || token, ',' ORDER BY nonce)
	    FROM spool.nonces WHERE signer = 'sig-a'});

cont_pid($hpid);

fails_with($h, "SELECT spool.lease_renew('res-a', 'holder', $res_token, '2 s')",
	'SP002', 'renew by the old holder');
fails_with($h, "SELECT spool.lease_renew('signer:sig-a', 'holder', $sig_token, '2 s')",
	'SP002', 'renew of the signer lease by the old holder');
fails_with($h, "SELECT spool.fence('res-a', $res_token)",
	'SP003', 'fence with the old token');
fails_with($h, "SELECT spool.nonce_allocate('sig-a', 'holder', $sig_token, 'h-4')",
	'SP003', 'nonce_allocate with the old token');
fails_with($h, "SELECT spool.nonce_allocate('sig-a', 'holder', $sig_token, 'h-1')",
	'SP003', 'a repeated nonce_allocate request with the old token');
fails_with($h, "SELECT spool.nonce_mark_used('sig-a', 1, 'holder', $sig_token)",
	'SP003', 'nonce_mark_used with the old token');
fails_with($h, "SELECT spool.nonce_mark_recyclable('sig-a', 2, 'holder', $sig_token)",
	'SP003', 'nonce_mark_recyclable with the old token');
fails_with($h, "SELECT spool.lease_release('res-a', 'holder', $res_token)",
	'SP002', 'release by the old holder');
# A fenced write in one transaction: nothing of it commits.
$h->query('BEGIN');
fails_with($h, "SELECT spool.fence('res-a', $res_token)",
	'SP003', 'fence inside a transaction');
$h->query(q{INSERT INTO fenced_writes VALUES ('holder', } . $res_token . q{, 'after steal')});
$h->query('COMMIT');

is($h->query_ok(q{SELECT spool.lease_acquire('res-a', 'holder', '2 s') IS NULL}),
	't', 'the old holder cannot re-acquire while the rival holds the lease');

is(sql(q{SELECT count(*) FROM fenced_writes WHERE who = 'holder'}),
	'0', 'no write of the old holder was committed');
is( sql(
		q{SELECT string_agg(nonce || ':' || state || ':' || token, ',' ORDER BY nonce)
	        FROM spool.nonces WHERE signer = 'sig-a'}),
	$holder_rows_before,
	'the nonce table is unchanged by the old holder after the steal');
is( $holder_rows_before,
	"0:consumed:$sig_token,1:allocated:$sig_token,2:allocated:$sig_token,3:allocated:"
	  . ($sig_token + 1),
	'nonce rows: 0 consumed, 1-2 allocated by the holder, 3 by the rival');
is(sql(q{SELECT next_nonce || '/' || released || '/' || lease_token
           FROM spool.nonce_signer WHERE signer = 'sig-a'}),
	'4/0/' . ($sig_token + 1), 'signer row: next nonce 4, nothing released, new token');
is(sql(q{SELECT owner || '/' || token FROM spool.lease_store WHERE resource = 'res-a'}),
	'rival/' . ($res_token + 1), 'res-a belongs to the rival');
is($h->query_ok('SELECT 1'), '1',
	'the idle holder was not terminated (it fenced nothing open)');
$h->quit;

##########################################################################
# (b) the holder stalls inside an open fenced transaction
##########################################################################

my $h2 = SpoolTest::Session->new($node, 'holder2');
my $h2pid = $h2->pid;
my $tb = $h2->query_ok(q{SELECT token FROM spool.lease_acquire('res-b', 'holder2', '2 s')});
my $tsb = $h2->query_ok(q{SELECT token FROM spool.lease_acquire('signer:sig-b', 'holder2', '2 s')});
is($h2->query_ok("SELECT spool.nonce_allocate('sig-b', 'holder2', $tsb, 'b-1')"),
	'0', 'holder2 allocated nonce 0 (committed)');

$h2->query_ok('BEGIN');
$h2->query_ok("SELECT spool.fence('res-b', $tb)");
$h2->query_ok(q{INSERT INTO fenced_writes VALUES ('holder2', } . $tb . q{, 'in open xact')});
is($h2->query_ok("SELECT spool.nonce_allocate('sig-b', 'holder2', $tsb, 'b-2')"),
	'1', 'holder2 allocated nonce 1 inside the open transaction');
stop_pid($h2pid);

poll_ok($node,
	q{SELECT bool_and(NOT live) FROM spool.leases
	   WHERE resource IN ('res-b', 'signer:sig-b')},
	'holder2\'s leases to expire while its transaction is open');

my $log_offset = -s $node->logfile;
$t0 = time;
is(sql(q{SELECT spool.lease_acquire('res-b', 'rival2', '60 s') IS NULL}),
	't', 'rival cannot acquire res-b while the stalled fenced transaction is open');
$took = time - $t0;
cmp_ok($took, '>=', 1.0, sprintf('rival waited for the fenced transaction (%.1fs)', $took));
cmp_ok($took, '<', 10, 'rival\'s acquire returned within a bounded time');
is(sql(q{SELECT spool.lease_acquire('signer:sig-b', 'rival2', '60 s') IS NULL}),
	't', 'rival cannot acquire signer:sig-b either');
ok( $node->log_contains(
		qr/terminating backend $h2pid: its transaction fenced with token $tb outlived lease "res-b"/,
		$log_offset),
	'the rival signalled the stalled holder');
is(sql(q{SELECT owner || '/' || token FROM spool.lease_store WHERE resource = 'res-b'}),
	"holder2/$tb", 'res-b was not granted while the holder\'s transaction is open');

cont_pid($h2pid);
wait_pid_gone($node, $h2pid, 'the continued holder2 backend');
my (undef, $state) = $h2->query('COMMIT');
isnt($state, '00000', 'holder2 cannot commit: its session is gone');
$h2->quit;

is(sql(q{SELECT token FROM spool.lease_acquire('res-b', 'rival2', '60 s')}),
	$tb + 1, 'rival acquires res-b with token + 1 once the holder is gone');
is(sql(q{SELECT token FROM spool.lease_acquire('signer:sig-b', 'rival2', '60 s')}),
	$tsb + 1, 'rival acquires signer:sig-b with token + 1');
is(sql(q{SELECT count(*) FROM fenced_writes WHERE who = 'holder2'}),
	'0', 'the stalled holder\'s fenced insert never committed');
is( sql(
		q{SELECT string_agg(nonce || ':' || coalesce(request_id, ''), ',' ORDER BY nonce)
	        FROM spool.nonces WHERE signer = 'sig-b'}),
	'0:b-1', 'the nonce allocated in the open transaction never committed');
is(sql(q{SELECT spool.nonce_allocate('sig-b', 'rival2', } . ($tsb + 1) . q{, 'b-2')}),
	'1', 'the rival gets nonce 1 (no gap, no double hand-out)');
is(sql('SELECT count(*) FROM pg_stat_activity WHERE backend_type = \'spool launcher\''),
	'1', 'the server did not restart (the launcher is still up)');

$node->stop;
done_testing();

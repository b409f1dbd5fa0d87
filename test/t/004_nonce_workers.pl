
# Worker-queue mode (spool.nonce_request) while nonce workers fail:
#   (1) a worker is terminated under load: the launcher replaces it, the new
#       worker takes its signer leases over with a new token, every request
#       completes (clients repeat a failed request with its request id);
#   (2) a worker is SIGSTOPped while idle and requests queue up for it: it is
#       replaced within the stall timeout, the queued requests complete (the
#       replacement takes the still-live leases over at once), and once
#       continued the old process exits;
#   (3) with spool.test_worker_pause a worker is SIGSTOPped inside a fenced,
#       uncommitted batch: the replacement cannot commit anything for that
#       signer until the old one is continued, the old one then dies and its
#       batch never commits.
# Throughout: every request id gets exactly one nonce, repeating a request id
# returns the same nonce, and nonces stay gap-free.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm
use SpoolTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $stall_s = 2;
my $node = spool_node(
	'nonce_workers',
	'spool.nonce_workers' => 2,
	'spool.nonce_stall_timeout' => "'${stall_s}s'",
	'spool.nonce_lease_ttl' => "'30s'",
	'spool.lease_wait_timeout' => "'1s'");

my @stopped;
END { kill 'CONT', $_ for @stopped; }

sub sql { return $node->safe_psql('postgres', $_[0]); }

my @signers = map { "w$_" } 1 .. 8;
sql(<<'EOSQL');
CREATE SEQUENCE rid_seq;
CREATE TABLE load_cfg (signers text[]);
CREATE TABLE req_log (rid text PRIMARY KEY, signer text, nonce bigint,
					  tries int, errs text, phase text);
-- One logical request: repeated with the same request id until it succeeds.
CREATE FUNCTION req_step(p_phase text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
	sg    text;
	rid   text := p_phase || '-' || nextval('rid_seq');
	n     bigint;
	tries int := 0;
	errs  text := '';
BEGIN
	SELECT signers[1 + floor(random() * cardinality(signers))::int] INTO sg
	  FROM load_cfg;
	PERFORM set_config('spool.nonce_request_timeout', '15s', true);
	LOOP
		tries := tries + 1;
		BEGIN
			n := spool.nonce_request(sg, rid);
			EXIT;
		EXCEPTION WHEN SQLSTATE 'SP000' THEN
			errs := errs || SQLSTATE || ' ';
			EXIT WHEN tries >= 20;
			PERFORM pg_sleep(0.05);
		END;
	END LOOP;
	INSERT INTO req_log VALUES (rid, sg, n, tries, errs, p_phase);
	RETURN n;
END
$$;
-- Seconds one (repeated) request takes.
CREATE FUNCTION timed_request(sg text, rid text) RETURNS float8
LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
	PERFORM spool.nonce_request(sg, rid);
	RETURN extract(epoch FROM clock_timestamp() - t0);
END
$$;
EOSQL
sql('INSERT INTO load_cfg VALUES (ARRAY[' . sql_list(@signers) . '])');

my $pids = wait_workers($node, 2, 'the launcher to start 2 nonce workers');

# Warm up: one request per signer, then learn which worker serves which.
sql("SELECT spool.nonce_request(s, 'x-warm-' || s) FROM unnest(ARRAY["
	  . sql_list(@signers) . ']) s');

# The workers flush their table statistics, so pg_stat_user_tables (and
# autovacuum) see the rows they insert; every poll queues one more request,
# a new transaction for the worker.
poll_ok($node,
	"SELECT spool.nonce_request('stats-probe', 'x-probe-' || clock_timestamp()) IS NOT NULL AND n_tup_ins > 0"
	  . " FROM pg_stat_user_tables WHERE relid = 'spool.nonce_store'::regclass",
	'the nonce workers\' inserts to show in pg_stat_user_tables');

sub signers_of
{
	my ($w) = @_;
	return split /\n/, sql(
		"SELECT substr(resource, 8) FROM spool.leases
		  WHERE owner LIKE 'nonce-worker:$w:%' AND resource LIKE 'signer:w%'
		  ORDER BY 1");
}

sub tokens_of
{
	my @s = @_;
	return { map { split /\|/ } split /\n/, sql(
		'SELECT substr(resource, 8), token FROM spool.leases WHERE resource IN ('
		  . sql_list(map { "signer:$_" } @s) . ')') };
}
my @of0 = signers_of(0);
my @of1 = signers_of(1);
is(scalar(@of0) + scalar(@of1), scalar(@signers),
	'every signer is leased by a nonce worker');
if (!@of0 || !@of1)
{
	BAIL_OUT('test signers all hash to one worker: choose other names');
}
note "worker 0 serves @of0; worker 1 serves @of1";

##########################################################################
# (1) terminate a worker under load
##########################################################################

my $served0 = worker_row($node, 0)->{served};
my $load = start_pgbench($node, 'p1', "SELECT req_step('p1');\n",
	'-c', 8, '-j', 2, '-R', 300, '-t', 250);
poll_ok($node,
	"SELECT served >= $served0 + 100 FROM spool.nonce_workers WHERE worker = 0",
	'worker 0 to serve 100 requests of the load');
my $old = worker_row($node, 0);
my $before = tokens_of(@of0);
is(sql("SELECT pg_terminate_backend($old->{pid})"), 't',
	"terminated nonce worker 0 (pid $old->{pid})");
wait_pid_gone($node, $old->{pid}, 'the terminated worker');
poll_ok($node,
	"SELECT pid IS NOT NULL AND pid <> $old->{pid} FROM spool.nonce_workers WHERE worker = 0",
	'the launcher to start a new worker 0');
is(finish_pgbench($load), 0, 'load (1) finished');
is(sql(q{SELECT count(*) || '/' || count(nonce) FROM req_log WHERE phase = 'p1'}),
	'2000/2000', 'every request of load (1) got a nonce');

my $new = worker_row($node, 0);
cmp_ok($new->{generation}, '>', $old->{generation}, 'worker 0 slot has a new generation');
sql("SELECT spool.nonce_request(s, 'x-after-1-' || s) FROM unnest(ARRAY["
	  . sql_list(@of0) . ']) s');
my $after = tokens_of(@of0);
for my $s (@of0)
{
	cmp_ok($after->{$s}, '>', $before->{$s},
		"signer $s: the new worker took the lease over with a new token");
}
is(sql("SELECT count(*) FROM spool.leases WHERE resource IN ("
		  . sql_list(map { "signer:$_" } @of0)
		  . ") AND owner <> 'nonce-worker:0:$new->{pid}'"),
	'0', "worker 0's signers are leased by nonce-worker:0:$new->{pid}");

##########################################################################
# (2) a worker stalls (SIGSTOP) while idle, then requests arrive
##########################################################################

poll_ok($node,
	'SELECT bool_and(queued = 0 AND in_progress = 0) FROM spool.nonce_workers',
	'the workers to be idle');
$old = worker_row($node, 1);
$before = tokens_of(@of1);
my $old_expiry = sql("SELECT min(expires_at) FROM spool.leases WHERE resource IN ("
	  . sql_list(map { "signer:$_" } @of1) . ')');
ok(kill('STOP', $old->{pid}), "SIGSTOP idle nonce worker 1 (pid $old->{pid})");
push @stopped, $old->{pid};
my $t0 = time;
sql('UPDATE load_cfg SET signers = ARRAY[' . sql_list(@of1) . ']');
$load = start_pgbench($node, 'p2', "SELECT req_step('p2');\n",
	'-c', 4, '-j', 1, '-t', 3);
poll_ok($node, 'SELECT queued > 0 FROM spool.nonce_workers WHERE worker = 1',
	'requests to queue up for the stopped worker');
poll_ok($node,
	"SELECT pid IS NOT NULL AND pid <> $old->{pid} FROM spool.nonce_workers WHERE worker = 1",
	'the launcher to replace the stalled worker 1');
my $took = time - $t0;
cmp_ok($took, '<', $stall_s + 8,
	sprintf('replaced %.1fs after the stall (stall timeout %ds)', $took, $stall_s));
is(finish_pgbench($load), 0, 'load (2) finished');
is(sql(q{SELECT count(*) || '/' || count(nonce) || '/' || max(tries) FROM req_log WHERE phase = 'p2'}),
	'12/12/1', 'the queued requests completed, none failed');
$new = worker_row($node, 1);
my $served = sql(q{SELECT string_agg(DISTINCT signer, ' ') FROM req_log WHERE phase = 'p2'});
$after = tokens_of(split / /, $served);
for my $s (split / /, $served)
{
	cmp_ok($after->{$s}, '>', $before->{$s}, "signer $s: new token after the stall");
}
is(sql(qq{SELECT count(*) FROM req_log r JOIN spool.nonce_store n
            ON n.signer = r.signer AND n.request_id = r.rid
         WHERE r.phase = 'p2' AND n.owner <> 'nonce-worker:1:$new->{pid}'}),
	'0', 'the replacement served every queued request');
is(sql("SELECT bool_and(granted_at < '$old_expiry') FROM spool.leases WHERE resource IN ("
		  . sql_list(map { "signer:$_" } split / /, $served) . ')'),
	't', 'the leases were taken over before the stalled worker\'s leases expired');
ok(kill('CONT', $old->{pid}), "SIGCONT the old worker 1 (pid $old->{pid})");
@stopped = ();
wait_pid_gone($node, $old->{pid}, 'the replaced worker 1 once continued');

##########################################################################
# (3) a worker stalls (SIGSTOP) inside a fenced, uncommitted batch
##########################################################################

sql(q{ALTER SYSTEM SET spool.test_worker_pause = '1s'});
sql(q{ALTER SYSTEM SET spool.nonce_stall_timeout = '5s'});
sql('SELECT pg_reload_conf()');
my $x = $of0[0];
sql("UPDATE load_cfg SET signers = ARRAY['$x']");
$old = worker_row($node, 0);
my $P = $old->{pid};
$load = start_pgbench($node, 'p3', "SELECT req_step('p3');\n",
	'-c', 4, '-j', 1, '-t', 6);

# Stop worker 0 while it waits in the test pause inside its transaction.
my $in_batch = "SELECT backend_xid FROM pg_stat_activity WHERE pid = $P"
  . " AND state = 'active' AND wait_event_type = 'Extension' AND backend_xid IS NOT NULL";
my $xid = '';
for (my $i = 0; $i < 600 && $xid eq ''; $i++)
{
	my $seen = sql($in_batch);
	if ($seen eq '')
	{
		usleep(20_000);
		next;
	}
	kill 'STOP', $P;
	push @stopped, $P;
	# It may have committed between the look and the signal: look again.
	if (sql($in_batch) eq $seen) { $xid = $seen; last; }
	kill 'CONT', $P;
	@stopped = ();
}
isnt($xid, '', "stopped worker 0 (pid $P) inside its fenced batch (xid $xid)");
my $tx = tokens_of($x)->{$x};
my $rows_x = sql("SELECT count(*) FROM spool.nonce_store WHERE signer = '$x'");
my $rows_old = sql("SELECT count(*) FROM spool.nonce_store WHERE owner = '$old->{owner}'");
my $log_offset = -s $node->logfile;

poll_ok($node,
	"SELECT pid IS NOT NULL AND pid <> $P FROM spool.nonce_workers WHERE worker = 0",
	'the launcher to replace the worker stopped in its batch');
$node->wait_for_log(
	qr/terminating backend $P: its transaction fenced with token $tx outlived lease "signer:$x"/,
	$log_offset);
pass('the replacement found the stopped batch blocking it and signalled it');
is(tokens_of($x)->{$x}, $tx, "signer $x: no new grant while the old batch is open");
is(sql("SELECT count(*) FROM spool.nonce_store WHERE signer = '$x'"), $rows_x,
	"signer $x: nothing committed while the old batch is open");

ok(kill('CONT', $P), "SIGCONT the old worker 0 (pid $P)");
@stopped = ();
wait_pid_gone($node, $P, 'the old worker 0 once continued');
ok($node->log_contains(qr/\[$P\] spool nonce worker FATAL:  terminating/, $log_offset),
	'the old worker was terminated');
is(finish_pgbench($load), 0, 'load (3) finished');
is(sql(q{SELECT count(*) || '/' || count(nonce) FROM req_log WHERE phase = 'p3'}),
	'24/24', 'every request of load (3) got a nonce');
is(sql("SELECT count(*) FROM spool.nonce_store WHERE owner = '$old->{owner}'"), $rows_old,
	'the stopped batch never committed');
cmp_ok(tokens_of($x)->{$x}, '>', $tx, "signer $x: the replacement got a new token");
note sql(q{SELECT string_agg(errs, ', ') FROM req_log WHERE errs <> ''});

##########################################################################
# Exactly once, overall
##########################################################################

sql('ALTER SYSTEM RESET spool.test_worker_pause');
sql('ALTER SYSTEM RESET spool.nonce_stall_timeout');
sql('SELECT pg_reload_conf()');
poll_ok($node,
	"SELECT timed_request('$of0[0]', 'x-warm-$of0[0]') < 0.5"
	  . " AND timed_request('$of1[0]', 'x-warm-$of1[0]') < 0.5",
	'the workers to drop the test pause');

is(sql('SELECT count(*) FROM req_log WHERE nonce IS NULL'), '0',
	'every request got a nonce');
is(sql(q{SELECT count(*) FROM req_log r LEFT JOIN spool.nonce_store n
           ON n.signer = r.signer AND n.request_id = r.rid
        WHERE n.nonce IS DISTINCT FROM r.nonce}),
	'0', 'the nonce each client got is the one stored for its request id');
is(sql(q{SELECT count(*) FROM (SELECT signer, nonce FROM req_log
           GROUP BY 1, 2 HAVING count(*) > 1) d}),
	'0', 'no nonce was given to two requests');
is(sql(q{SELECT count(*) FROM spool.nonce_store n
          WHERE n.request_id NOT LIKE 'x-%'
            AND NOT EXISTS (SELECT FROM req_log r WHERE r.rid = n.request_id)}),
	'0', 'no nonce was allocated for a request beyond the one it returned');
is(sql(q{SELECT count(*) FROM spool.nonce_store WHERE request_id IS NULL}),
	'0', 'every stored nonce has its request id');
my $total = sql('SELECT count(*) FROM spool.nonce_store');
is(sql('SELECT count(*) FROM req_log WHERE spool.nonce_request(signer, rid) IS DISTINCT FROM nonce'),
	'0', 'repeating every request id returns the same nonce');
is(sql('SELECT count(*) FROM spool.nonce_store'), $total,
	'repeated requests allocated nothing');
is(sql(q{SELECT count(*) FROM spool.nonce_signer s
          WHERE s.next_nonce <> (SELECT count(*) FROM spool.nonce_store n WHERE n.signer = s.signer)
             OR s.next_nonce - 1 <> (SELECT coalesce(max(nonce), -1) FROM spool.nonce_store n
                                      WHERE n.signer = s.signer)}),
	'0', 'nonces are gap-free for every signer');

$node->stop;
done_testing();

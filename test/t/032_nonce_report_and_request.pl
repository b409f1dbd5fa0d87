
# spool.nonce_report_and_request: a report and the next nonce in one worker
# commit.
#   (1) one worker batch (the signer row is held by a test session, so the
#       calls sent meanwhile queue up) holds such calls and a plain request:
#       a call whose report fails gets no nonce and fails alone; a nonce
#       given back goes to the first allocation of the batch;
#   (2) clients each keep a chain (request a nonce, then report it and take
#       the next, used or 1 in 8 recyclable, retried with the same request
#       id until it succeeds) while the nonce workers are terminated again
#       and again with calls queued and in progress: every report ends
#       applied exactly once and to its own allocation, no nonce is used
#       twice, the counters agree with the rows.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm
use SpoolTest;
use Test::More;

my $node = spool_node(
	'nonce_report_and_request',
	'spool.nonce_workers' => 2,
	'spool.nonce_stall_timeout' => "'60s'",
	'spool.nonce_lease_ttl' => "'30s'",
	'spool.lease_wait_timeout' => "'1s'");

sub sql { return $node->safe_psql('postgres', $_[0]); }

create_call_functions($node);

wait_workers($node, 2, 'the launcher to start 2 nonce workers');

##########################################################################
# (1) report_and_request calls in one batch
##########################################################################

my $s = 'ca';
sql("SELECT spool.nonce_request('$s', 'a' || g) FROM generate_series(0, 3) g");
sql("SELECT spool.nonce_report('$s', 'used', 0)");
my $w = sql("SELECT split_part(owner, ':', 2) FROM spool.leases WHERE resource = 'signer:$s'");
note "signer $s is served by worker $w";

my $lock = SpoolTest::Session->new($node, 'lock');
$lock->query_ok("BEGIN; SELECT FROM spool.nonce_signer WHERE signer = '$s' FOR UPDATE");
my $batches = worker_row($node, $w)->{batches};

my @runs;
sub call_async { push @runs, start_logged_call($node, @_); }
call_async('first', "SELECT spool.nonce_request('$s', 'a-first')");
poll_ok($node, "SELECT in_progress = 1 FROM spool.nonce_workers WHERE worker = $w",
	'the worker to take the first request and wait for the signer row');
my $queued = 0;
for my $c (
	[ 'bad', "SELECT spool.nonce_report_and_request('$s', 'recyclable', 0, request_id => 'a-bad')" ],
	[ 'rel1', "SELECT spool.nonce_report_and_request('$s', 'recyclable', 1, request_id => 'a-rel1')" ],
	[ 'used2', "SELECT spool.nonce_report_and_request('$s', 'used', reported_request_id => 'a2', request_id => 'a-used2')" ],
	[ 'req', "SELECT spool.nonce_request('$s', 'a-req')" ])
{
	call_async(@$c);
	$queued++;
	poll_ok($node, "SELECT queued = $queued FROM spool.nonce_workers WHERE worker = $w",
		"call $c->[0] to queue up behind the waiting batch");
}
$lock->query_ok('COMMIT');
is(finish_pgbench($_), 0, "call $_->{name} finished") for @runs;
@runs = ();
$lock->quit;

is(sql("SELECT batches - $batches FROM spool.nonce_workers WHERE worker = $w"), '2',
	'the four queued calls were served in one batch after the first');
is(sql("SELECT string_agg(tag || '=' || coalesce(result::text, '') || '/' || sqlstate, ' ' ORDER BY tag COLLATE \"C\") FROM calls"),
	'bad=/SP006 first=4/00000 rel1=1/00000 req=6/00000 used2=5/00000',
	'the bad call failed alone; 1 given back went to the first allocation of the batch');
is(sql("SELECT string_agg(nonce || ':' || state || ':' || request_id, ' ' ORDER BY nonce) FROM spool.nonces WHERE signer = '$s'"),
	'0:consumed:a0 1:allocated:a-rel1 2:consumed:a2 3:allocated:a3 4:allocated:a-first 5:allocated:a-used2 6:allocated:a-req',
	'the signer\'s nonces; the failed call took none');

##########################################################################
# (2) chains of report_and_request while the workers are terminated
##########################################################################

# Four signers, two per worker (routed by the stable hash of the signer).
sql(<<'EOSQL');
CREATE TABLE signers AS
	SELECT row_number() OVER (ORDER BY w, s) - 1 AS i, s
	  FROM (SELECT s, w, row_number() OVER (PARTITION BY w ORDER BY s) AS k
			  FROM (SELECT 'qc' || g AS s, (hashtext('qc' || g)::bigint & 4294967295) % 2 AS w
					  FROM generate_series(0, 19) g) x) y
	 WHERE k <= 2;
EOSQL

sql(<<'EOSQL');
-- Each client's chain: its signer, and the request id and nonce it holds.
CREATE TABLE chain (client int PRIMARY KEY, signer text, seq int, rid text, nonce bigint);
-- Every nonce a client got; outcome: how the next step reported it.
CREATE TABLE chain_log (client int, seq int, signer text, rid text, nonce bigint,
						outcome text, tries int, errs text, PRIMARY KEY (client, seq));
-- One client step: the first requests a nonce; every later one reports the
-- nonce held (by nonce) and takes the next with a new request id, repeated
-- with that same request id until it succeeds.
CREATE FUNCTION step(p_client int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	c     chain;
	oc    text := CASE WHEN random() < 0.125 THEN 'recyclable' ELSE 'used' END;
	v_rid text;
	n     bigint;
	rt    int;
	e     text;
BEGIN
	PERFORM set_config('spool.nonce_request_timeout', '3s', true);
	SELECT * INTO c FROM chain WHERE client = p_client;
	IF NOT FOUND THEN
		c.signer := (SELECT s FROM signers WHERE i = p_client % 4);
		v_rid := 'c' || p_client || '-0';
		SELECT r, tries, errs INTO n, rt, e FROM retry(format(
			'SELECT spool.nonce_request(%L, %L)', c.signer, v_rid));
		INSERT INTO chain VALUES (p_client, c.signer, 0, v_rid, n);
		INSERT INTO chain_log VALUES (p_client, 0, c.signer, v_rid, n, NULL, rt, e);
		RETURN;
	END IF;
	v_rid := 'c' || p_client || '-' || (c.seq + 1);
	SELECT r, tries, errs INTO n, rt, e FROM retry(format(
		'SELECT spool.nonce_report_and_request(%L, %L, %s, request_id => %L)',
		c.signer, oc, c.nonce, v_rid));
	UPDATE chain_log SET outcome = oc WHERE client = p_client AND seq = c.seq;
	INSERT INTO chain_log VALUES (p_client, c.seq + 1, c.signer, v_rid, n, NULL, rt, e);
	UPDATE chain SET seq = c.seq + 1, rid = v_rid, nonce = n WHERE client = p_client;
END
$$;
EOSQL

# Each batch waits 100 ms before its commit, so calls pile up and the
# terminations below find batches in progress and calls queued.
sql(q{ALTER SYSTEM SET spool.test_worker_pause = '100ms'});
sql('SELECT pg_reload_conf()');
my $load = start_pgbench($node, 'load', "SELECT step(:client_id);\n",
	'-c', 8, '-j', 2, '-t', 60);
my $kills = terminate_busy_nonce_workers($node, 'SELECT count(*) FROM chain_log', 480, 'calls');
cmp_ok($kills, '>=', 3, "terminated nonce workers $kills times with calls pending");
is(finish_pgbench($load), 0, 'the load finished');
is(sql('SELECT count(*) FROM chain_log'), '480', 'every client step completed');
is(sql(q{SELECT count(DISTINCT split_part(owner, ':', 2)) FROM spool.leases
         WHERE resource IN (SELECT 'signer:' || s FROM signers)}),
	'2', 'the signers were served by both workers');
sql('ALTER SYSTEM RESET spool.test_worker_pause');
sql('SELECT pg_reload_conf()');
ok($node->log_contains(qr/re-queued \d+ in-progress requests/),
	'in-progress calls were re-queued at least once');

is(sql(q{SELECT count(*) FROM chain_log l JOIN spool.nonce_store n USING (signer, nonce)
         WHERE l.outcome = 'used' AND (n.state <> 'consumed' OR n.request_id <> l.rid)}),
	'0', 'every used report is applied to its own allocation');
is(sql(q{SELECT count(*) FROM chain_log WHERE outcome = 'used'}),
	sql(q{SELECT count(*) FROM spool.nonce_store WHERE signer LIKE 'qc%' AND state = 'consumed'}),
	'one consumed nonce per used report');
is(sql(q{SELECT count(*) FROM chain_log l JOIN spool.nonce_store n
           ON n.signer = l.signer AND n.request_id = l.rid
         WHERE l.outcome = 'recyclable' AND n.state <> 'released'}),
	'0', 'no request id reported recyclable holds a nonce it did not give back');
is(sql(q{SELECT count(*) FROM chain_log l JOIN spool.nonce_store n USING (signer, nonce)
         WHERE l.outcome IS NULL AND n.state = 'allocated' AND n.request_id = l.rid}),
	'8', 'each client holds its last nonce, allocated to its last request id');
is(sql(q{SELECT count(*) FROM spool.nonce_store WHERE signer LIKE 'qc%' AND state = 'allocated'}),
	'8', 'no other nonce is left allocated');
is(sql(q{SELECT count(*) FROM (SELECT signer, nonce FROM chain_log WHERE outcome = 'used' OR outcome IS NULL
           GROUP BY 1, 2 HAVING count(*) > 1) d}),
	'0', 'no nonce was kept by two requests');
is(sql(q{SELECT count(*) FROM spool.nonce_signer s WHERE signer LIKE 'qc%' AND (
           s.next_nonce <> (SELECT count(*) FROM spool.nonce_store n WHERE n.signer = s.signer)
           OR s.released <> (SELECT count(*) FROM spool.nonce_store n
                              WHERE n.signer = s.signer AND state = 'released'))}),
	'0', 'nonces are gap-free and the released counters agree');
note sql(q{SELECT string_agg(errs, ' ') FROM chain_log WHERE errs <> ''});

$node->stop;
done_testing();

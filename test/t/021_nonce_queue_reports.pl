
# Worker-queue reports (spool.nonce_report) and set_next through the nonce
# workers:
#   (1) one worker batch holds requests and reports together (the signer row
#       is held by a test session, so everything sent meanwhile queues up):
#       a report giving a nonce back is applied before the request beside
#       it, which gets that nonce; a bad report in the batch fails alone;
#       set_next in the batch is applied first;
#   (2) clients request a nonce and report it (used, 1 in 8 recyclable)
#       while the nonce workers are terminated again and again with reports
#       queued and in progress: every report ends applied exactly once, no
#       nonce is used by two requests, the state machine holds and the
#       counters agree with the rows.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm
use SpoolTest;
use Test::More;

my $node = spool_node(
	'nonce_queue_reports',
	'spool.nonce_workers' => 2,
	'spool.nonce_stall_timeout' => "'60s'",
	'spool.nonce_lease_ttl' => "'30s'",
	'spool.lease_wait_timeout' => "'1s'");

sub sql { return $node->safe_psql('postgres', $_[0]); }

create_call_functions($node);

wait_workers($node, 2, 'the launcher to start 2 nonce workers');

##########################################################################
# (1) requests and reports in one batch
##########################################################################

my $s = 'qa';
sql("SELECT spool.nonce_request('$s', 'a' || g) FROM generate_series(0, 3) g");
sql("SELECT spool.nonce_report('$s', 'used', 0)");
my $w = sql("SELECT split_part(owner, ':', 2) FROM spool.leases WHERE resource = 'signer:$s'");
note "signer $s is served by worker $w";

my $lock = SpoolTest::Session->new($node, 'lock');
$lock->query_ok("BEGIN; SELECT FROM spool.nonce_signer WHERE signer = '$s' FOR UPDATE");
my $batches = worker_row($node, $w)->{batches};

# The first call is taken by the worker, which then waits for the row lock.
my @runs;
sub call_async { push @runs, start_logged_call($node, @_); }
call_async('first', "SELECT spool.nonce_request('$s', 'a-first')");
poll_ok($node, "SELECT in_progress = 1 FROM spool.nonce_workers WHERE worker = $w",
	'the worker to take the first request and wait for the signer row');
call_async('rel1', "SELECT spool.nonce_report('$s', 'recyclable', 1)");
call_async('bad', "SELECT spool.nonce_report('$s', 'recyclable', 0)");
call_async('used2', "SELECT spool.nonce_report('$s', 'used', request_id => 'a2')");
call_async('req', "SELECT spool.nonce_request('$s', 'a-req')");
poll_ok($node, "SELECT queued = 4 FROM spool.nonce_workers WHERE worker = $w",
	'the four later calls to queue up behind the waiting batch');
call_async('req2', "SELECT spool.nonce_request('$s', 'a-req2')");
poll_ok($node, "SELECT queued = 5 FROM spool.nonce_workers WHERE worker = $w",
	'a second request to queue up too');
$lock->query_ok('COMMIT');
is(finish_pgbench($_), 0, "call $_->{name} finished") for @runs;
@runs = ();

is(sql("SELECT batches - $batches FROM spool.nonce_workers WHERE worker = $w"), '2',
	'the five queued calls were served in one batch after the first');
is(sql("SELECT string_agg(tag || '=' || coalesce(result::text, '') || '/' || sqlstate, ' ' ORDER BY tag COLLATE \"C\") FROM calls"),
	'bad=/SP006 first=4/00000 rel1=1/00000 req=1/00000 req2=5/00000 used2=2/00000',
	'the report gave 1 back before the requests of its batch; the bad report failed alone');
is(sql("SELECT string_agg(nonce || ':' || state || ':' || request_id, ' ' ORDER BY nonce) FROM spool.nonces WHERE signer = '$s'"),
	'0:consumed:a0 1:allocated:a-req 2:consumed:a2 3:allocated:a3 4:allocated:a-first 5:allocated:a-req2',
	'the signer\'s nonces');

# set_next queued with requests and reports: applied first.
sql('TRUNCATE calls');
$lock->query_ok("BEGIN; SELECT FROM spool.nonce_signer WHERE signer = '$s' FOR UPDATE");
call_async('first', "SELECT spool.nonce_report('$s', 'recyclable', 3)");
poll_ok($node, "SELECT in_progress = 1 FROM spool.nonce_workers WHERE worker = $w",
	'the worker to take the first report and wait for the signer row');
call_async('req', "SELECT spool.nonce_request('$s', 'a-after')");
poll_ok($node, "SELECT queued = 1 FROM spool.nonce_workers WHERE worker = $w",
	'the request to queue up');
call_async('set', "SELECT spool.nonce_set_next('$s', 10)");
poll_ok($node, "SELECT queued = 2 FROM spool.nonce_workers WHERE worker = $w",
	'set_next to queue up');
$lock->query_ok('COMMIT');
is(finish_pgbench($_), 0, "call $_->{name} finished") for @runs;
@runs = ();
is(sql("SELECT string_agg(tag || '=' || coalesce(result::text, '') || '/' || sqlstate, ' ' ORDER BY tag COLLATE \"C\") FROM calls"),
	'first=3/00000 req=10/00000 set=10/00000',
	'set_next consumed everything below 10 (3 too) before the request of its batch');
is(sql("SELECT string_agg(DISTINCT state::text, ',') FROM spool.nonces WHERE signer = '$s' AND nonce < 10"),
	'consumed', 'every nonce below the chain\'s is consumed');
is(sql("SELECT released FROM spool.nonce_signer WHERE signer = '$s'"), '0',
	'no released nonce is counted');
$lock->quit;

##########################################################################
# (2) request, then report, while the workers are terminated
##########################################################################

sql(<<'EOSQL');
CREATE SEQUENCE rid_seq;
CREATE TABLE req_log (rid text PRIMARY KEY, signer text, nonce bigint,
					  outcome text, req_tries int, rep_tries int, rep_errs text);
-- One client step: request a nonce, then report it (used by nonce, or 1 in
-- 8 recyclable by request id), each repeated until it succeeds.  A repeated
-- recyclable report may find its request id gone (SP005) when the first
-- attempt was applied and the nonce already went to another request.
CREATE FUNCTION step() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	sg   text := 'qb' || (1 + floor(random() * 4))::int;
	rid  text := 'b-' || nextval('rid_seq');
	oc   text := CASE WHEN random() < 0.125 THEN 'recyclable' ELSE 'used' END;
	n    bigint;
	rt   int;
	e    text;
	rep  record;
BEGIN
	PERFORM set_config('spool.nonce_request_timeout', '3s', true);
	SELECT r, tries, errs INTO n, rt, e FROM retry(format(
		'SELECT spool.nonce_request(%L, %L)', sg, rid));
	IF oc = 'used' THEN
		SELECT * INTO rep FROM retry(format(
			'SELECT spool.nonce_report(%L, ''used'', %s)', sg, n));
	ELSE
		SELECT * INTO rep FROM retry(format(
			'SELECT CASE WHEN spool.nonce_report(%L, ''recyclable'', request_id => %L) IS NULL THEN 0 END',
			sg, rid));
	END IF;
	INSERT INTO req_log VALUES (rid, sg, n, oc, rt, rep.tries, e || rep.errs);
EXCEPTION WHEN SQLSTATE 'SP005' THEN
	-- Only a repeated recyclable report may get here (checked below).
	INSERT INTO req_log VALUES (rid, sg, n, oc, rt, -1, 'SP005');
END
$$;
EOSQL

# Each batch waits 100 ms before its commit, so requests pile up and the
# terminations below find batches in progress and requests queued.
sql(q{ALTER SYSTEM SET spool.test_worker_pause = '100ms'});
sql('SELECT pg_reload_conf()');
my $load = start_pgbench($node, 'load', "SELECT step();\n",
	'-c', 8, '-j', 2, '-t', 40);
my $kills = terminate_busy_nonce_workers($node, 'SELECT count(*) FROM req_log', 320, 'requests');
cmp_ok($kills, '>=', 3, "terminated nonce workers $kills times with requests pending");
is(finish_pgbench($load), 0, 'the load finished');
is(sql('SELECT count(*) FROM req_log'), '320', 'every client step completed');
sql('ALTER SYSTEM RESET spool.test_worker_pause');
sql('SELECT pg_reload_conf()');
ok($node->log_contains(qr/re-queued \d+ in-progress requests/),
	'in-progress requests were re-queued at least once');

# Exactly once.
is(sql(q{SELECT count(*) FROM req_log WHERE rep_tries = -1 AND outcome = 'used'}), '0',
	'no used report ended unknown');
is(sql(q{SELECT count(*) FROM (SELECT signer, nonce FROM req_log WHERE outcome = 'used'
           GROUP BY 1, 2 HAVING count(*) > 1) d}),
	'0', 'no nonce was used by two requests');
is(sql(q{SELECT count(*) FROM req_log r JOIN spool.nonce_store n ON n.signer = r.signer
           AND n.nonce = r.nonce
         WHERE r.outcome = 'used' AND (n.state <> 'consumed' OR n.request_id <> r.rid)}),
	'0', 'every used report is applied to its own allocation');
is(sql(q{SELECT count(*) FROM req_log r JOIN spool.nonce_store n ON n.signer = r.signer
           AND n.request_id = r.rid WHERE r.outcome = 'recyclable' AND n.state <> 'released'}),
	'0', 'no recyclable request id still holds a nonce it did not give back');
is(sql(q{SELECT count(*) FROM spool.nonce_store WHERE signer LIKE 'qb%' AND state = 'allocated'}),
	'0', 'every nonce handed out was reported');
is(sql(q{SELECT count(*) FROM spool.nonce_store n WHERE signer LIKE 'qb%' AND state = 'consumed'}),
	sql(q{SELECT count(*) FROM req_log WHERE outcome = 'used'}),
	'one consumed nonce per used report');
is(sql(q{SELECT count(*) FROM spool.nonce_signer s WHERE signer LIKE 'qb%' AND (
           s.next_nonce <> (SELECT count(*) FROM spool.nonce_store n WHERE n.signer = s.signer)
           OR s.released <> (SELECT count(*) FROM spool.nonce_store n
                              WHERE n.signer = s.signer AND state = 'released'))}),
	'0', 'nonces are gap-free and the released counters agree');
# Released nonces go out lowest first: with k released, the next k requests
# of the signer get them in order.
my ($sg, $rel) = split /\|/, sql(q{SELECT signer, string_agg(nonce::text, ',' ORDER BY nonce)
	FROM spool.nonce_store WHERE signer LIKE 'qb%' AND state = 'released'
	GROUP BY signer ORDER BY count(*) DESC LIMIT 1});
if (defined $rel)
{
	my @rel = split /,/, $rel;
	my @got = map { sql("SELECT spool.nonce_request('$sg', 'c-$_')") } 0 .. $#rel;
	is("@got", "@rel", "signer $sg: the released nonces are handed out lowest first");
}
note sql(q{SELECT string_agg(rep_errs, ' ') FROM req_log WHERE rep_errs <> ''});

$node->stop;
done_testing();

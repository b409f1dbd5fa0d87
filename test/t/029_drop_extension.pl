
# DROP EXTENSION spool_ext while a pipeline runs (docs/operations.md,
# "Dropping the extension"): a Kafka source, a processor with two replicas
# writing to a sql target, and the nonce workers.
#   (a) The seatbelt: while a signer has handed out nonces the drop is
#       refused (2BP01); with spool.allow_drop_with_nonces it goes ahead.
#   (b) A client waiting in spool.nonce_request (both nonce workers
#       SIGSTOPped, so nobody answers) gets a clear SP007 error when the
#       extension is dropped, long before spool.nonce_request_timeout.
#   (c) Within a poll bound no spool worker but the launcher is left, and
#       the launcher logs that every old worker has stopped.
#   (d) After CREATE EXTENSION no shared slot of the old catalog is in use
#       (processors, dispatcher shards, source stats, nonce queues), the
#       token floor covers every token granted before the drop, and the
#       first grants of the new catalog are above it; the recreated
#       pipeline runs and delivers everything again.
#   (e) Four more cycles, the first while both replicas sleep in the handler
#       (the drop terminates them instead of waiting for the handler), the
#       last three with DROP and CREATE back to back
#       (no pause between them: the launcher sees a new extension oid): no
#       old worker survives into the new catalog, slots are reused, tokens
#       keep rising.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm, SpoolOutbox.pm
use IPC::Run;
use SpoolTest;
use SpoolKafka;
use SpoolOutbox;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $topic = 'dx';
my $kafka = SpoolKafka->start(topics => ["$topic:2"]);
# A stopped nonce worker must not be replaced during the test: only the
# drop may answer the waiting client.
my $node = spool_node('drop_extension', 'spool.nonce_stall_timeout' => "'120s'");
my $bootstrap = $kafka->bootstrap;

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $workers_q = "SELECT coalesce(string_agg(backend_type || ' ' || pid, ', '), '')"
  . " FROM pg_stat_activity WHERE backend_type LIKE 'spool %'"
  . " AND backend_type <> 'spool launcher'";

# Objects outside the extension survive a drop: the roles, the delivery
# table and the sql target's function.
sql(q{CREATE ROLE proc_owner; GRANT spool_admin TO proc_owner;
	CREATE TABLE public.slow (b boolean); GRANT SELECT ON public.slow TO proc_owner;});
sql_target($node, 't', '{"batch_interval": "5ms"}');

# The handler takes spool types, so DROP EXTENSION ... CASCADE drops it:
# made again for each catalog.  One output per entry, key = seq.
sub pipeline
{
	my ($first) = @_;
	sql(q{
CREATE FUNCTION public.h(state jsonb, entries spool.entries[])
RETURNS spool.step LANGUAGE sql AS $$
	SELECT ROW(state, coalesce((SELECT array_agg(ROW('t', e.value->>'seq', e.value)::spool.output
	                                              ORDER BY e.cursor)
	                              FROM unnest(entries) e), '{}'))::spool.step
	  FROM pg_sleep(CASE WHEN EXISTS (SELECT FROM public.slow) THEN 60 ELSE 0 END)
$$;
GRANT EXECUTE ON FUNCTION public.h(jsonb, spool.entries[]) TO proc_owner;
});
	sql(q{SELECT spool.create_target('t', 'sql', '{"function": "public.deliver_t",
	      "run_as": "deliverer", "batch_interval": "5ms"}')})
	  unless $first;
	sql("SELECT spool.create_source('src', '$bootstrap', '{$topic}', '{\"batch_ms\": 20}');"
		  . " SELECT spool.start_source('src');");
	sql(q{SELECT spool.create_processor('p', 'public.h(jsonb, spool.entries[])',
	      '{"run_as": "proc_owner", "replicas": 2}');
	      SELECT spool.start_processor('p');});
}

my $produced = 0;

sub produce
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$kafka->produce_next($topic, $_[0], 100, \$produced);
}

# The pipeline of the current catalog delivered every produced entry
# (the delivery table is emptied at each drop; a new source reads from the
# log start).
sub delivered_all
{
	my ($what) = @_;
	poll_within($node, 60,
		"SELECT count(DISTINCT key) = $produced FROM public.delivered",
		"$what: all $produced entries delivered by the pipeline");
}

sub pipeline_up
{
	my ($what) = @_;
	poll_ok($node,
		"SELECT count(*) FILTER (WHERE role = 'active') = 1"
		  . " AND count(*) FILTER (WHERE role = 'standby') = 1"
		  . " FROM spool.processor_status WHERE processor = 'p'",
		"$what: one active and one standby replica");
	poll_ok($node,
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'spool ingest'",
		"$what: the ingest worker runs");
	wait_dispatchers($node, 't', 1);
	wait_workers($node, 2, "$what: both nonce workers run");
}

sub max_token { return sql('SELECT coalesce(max(token), 0) FROM spool.lease_store'); }

sub no_workers_left
{
	my ($what) = @_;
	my $t0 = time;
	my $ok = poll_within($node, 30,
		"SELECT ($workers_q) = ''", "$what: no spool worker but the launcher left");
	diag('still running: ' . sql($workers_q)) unless $ok;
	return time - $t0;
}

# Just after CREATE EXTENSION, before any object exists: nothing of the
# old catalog holds a shared slot, and the floor covers the old tokens.
sub fresh_catalog_ok
{
	my ($what, $old_max) = @_;
	# The launcher frees a slot once it sees the worker exit (a pass later).
	poll_within($node, 30,
		'SELECT (SELECT count(*) FROM spool.processor_runtime()) = 0'
		  . ' AND (SELECT count(*) FROM spool.outbox_runtime()) = 0'
		  . ' AND (SELECT count(*) FROM spool._ingest_counters() WHERE source IS NOT NULL) = 0'
		  . ' AND (SELECT coalesce(sum(queued + in_progress), 0) FROM spool.nonce_workers) = 0',
		"$what: no processor, dispatcher, source stats or nonce queue slot of the old catalog in use");
	is(sql('SELECT count(*) FROM spool.entries'), '0',
		"$what: no old worker wrote into the new spool");
	cmp_ok(sql('SELECT floor FROM spool.token_floor'), '>=', $old_max,
		"$what: the token floor covers the highest token before the drop ($old_max)");
}

# ---------------------------------------------------------------------------
# The first catalog: a fresh cluster issues token 1 first.
# ---------------------------------------------------------------------------
is(sql('SELECT floor FROM spool.token_floor'), '0', 'a fresh database has floor 0');
is(sql("SELECT token FROM spool.lease_acquire('client-r', 'c1')"), '1',
	'a fresh cluster issues token 1 first');
pipeline(1);
pipeline_up('first catalog');
produce(200);
delivered_all('first catalog');
is(sql("SELECT spool.nonce_request('s1')"), '0', 'signer s1 gets nonce 0 through the queue');
# A basic-mode signer b1 (a client holds its lease): nonces 0 and 1 handed out.
is(sql("SELECT string_agg(spool.nonce_allocate('b1', 'app', l.token)::text, ',')"
	  . " FROM spool.lease_acquire('signer:b1', 'app') l, generate_series(1, 2)"),
	'0,1', 'basic-mode signer b1 hands out nonces 0 and 1');

# (a) The seatbelt.
my ($rc, $out, $err) = $node->psql('postgres', 'DROP EXTENSION spool_ext CASCADE');
isnt($rc, 0, '(a) DROP EXTENSION is refused while a signer holds nonce state');
like($err, qr/cannot drop extension spool_ext: 2 signers have handed out nonces/,
	'(a) the error says why');
is(sql("SELECT count(*) FROM pg_extension WHERE extname = 'spool_ext'"), '1',
	'(a) the extension is still there');
($rc, $out, $err) = $node->psql('postgres',
	"CREATE ROLE plain_r LOGIN; SET ROLE plain_r; SET spool.allow_drop_with_nonces = on");
like($err, qr/permission denied to set parameter "spool.allow_drop_with_nonces"/,
	'(a) a plain role cannot set spool.allow_drop_with_nonces');
# A role that may not drop the extension stops no worker (the hook acts only
# for the owner): the same workers run after its attempt.
my $pids_q = "SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity"
  . " WHERE backend_type LIKE 'spool %' AND backend_type <> 'spool launcher'";
my $pids = sql($pids_q);
($rc, $out, $err) = $node->psql('postgres',
	"SET ROLE plain_r; DROP EXTENSION spool_ext CASCADE");
like($err, qr/must be owner of extension spool_ext/, '(a) a plain role may not drop the extension');
is(sql($pids_q), $pids, '(a) and its attempt terminated no worker');

# (b) A client waits in nonce_request for stopped nonce workers.
poll_ok($node,
	'SELECT bool_and(queued = 0 AND in_progress = 0) FROM spool.nonce_workers',
	'(b) the nonce workers to be idle');
my @nonce_pids = split /\n/, sql('SELECT pid FROM spool.nonce_workers ORDER BY worker');
my $holds_ext = "SELECT count(*) FROM pg_locks WHERE locktype = 'object'"
  . " AND classid = 'pg_extension'::regclass AND pid IN (" . join(', ', @nonce_pids) . ')';
for my $try (1 .. 50)
{
	kill 'STOP', @nonce_pids;
	last if sql($holds_ext) eq '0';
	kill 'CONT', @nonce_pids;    # stopped inside a transaction: again
}
is(sql($holds_ext), '0', '(b) both nonce workers stopped outside a transaction');
my ($bg_out, $bg_err) = ('', '');
my $bg = IPC::Run::start(
	[
		'psql', '-XAtq', '-d', $node->connstr('postgres'), '-c',
		"SET spool.nonce_request_timeout = '120s'; SELECT spool.nonce_request('s2')"
	],
	'>', \$bg_out, '2>', \$bg_err,
	IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
poll_ok($node, 'SELECT sum(queued) = 1 FROM spool.nonce_workers',
	'(b) the request to wait in a nonce queue');

# Saved as docs/operations.md says, to be restored after CREATE EXTENSION.
sql(q{CREATE TABLE public.saved_nonces AS
  SELECT s.signer, s.next_nonce, s.role::text AS role, coalesce(l.role = 0, true) AS queue_mode
    FROM spool.nonce_signer s LEFT JOIN spool.lease_store l ON l.resource = 'signer:' || s.signer
   WHERE s.next_nonce > 0});
is(sql("SELECT string_agg(signer || ':' || next_nonce || ':' || queue_mode, ' ' ORDER BY signer)"
	  . " FROM public.saved_nonces"), 'b1:2:false s1:1:true',
	'the saved next nonces and modes');
my $max_before = max_token();
my $t_drop = time;
sql("SET spool.allow_drop_with_nonces = on; DROP EXTENSION spool_ext CASCADE");
note sprintf('DROP EXTENSION took %.1fs', time - $t_drop);
$bg->finish;
my $answered = time - $t_drop;
like($bg_err, qr/ERROR:  the extension spool_ext was dropped while the request waited/,
	'(b) the waiting client gets a clear error');
cmp_ok($answered, '<', 60,
	sprintf('(b) answered %.1fs after the drop (request timeout 120 s)', $answered));
kill 'CONT', @nonce_pids;

# (c) Every worker stops.
my $took = no_workers_left('(c)');
note sprintf('workers gone %.1fs after the drop', $took);
ok($node->log_contains(qr/every worker of the dropped extension has stopped/),
	'(c) the launcher saw every old worker exit');
ok(!$node->log_contains(qr/more than \d+ .*is not started/),
	'(c) no unit was refused a slot');

# (d) CREATE again: fresh slots, tokens above the old ones, the pipeline again.
sql('TRUNCATE public.delivered');
sql('CREATE EXTENSION spool_ext');
fresh_catalog_ok('(d)', $max_before);
cmp_ok(sql("SELECT token FROM spool.lease_acquire('client-r', 'c1')"), '>', $max_before,
	"(d) the client's next token is above every token before the drop");
pipeline(0);
pipeline_up('(d)');
delivered_all('(d)');
cmp_ok(sql("SELECT min(token) FROM spool.lease_store WHERE resource LIKE 'processor:%'"),
	'>', $max_before, '(d) the processor lease token is above the old tokens');
# Nonces are forgotten (the seatbelt's reason); the repair is nonce_set_next.
is(sql("SELECT count(*) FROM spool.nonce_signer"), '0', '(d) the new catalog knows no signer');
sql(q{
DO $$
DECLARE r record; l spool.lease;
BEGIN
  FOR r IN SELECT * FROM public.saved_nonces LOOP
    EXECUTE format('SET LOCAL ROLE %I', r.role);
    IF r.queue_mode THEN
      PERFORM spool.nonce_set_next(r.signer, r.next_nonce);
    ELSE
      l := spool.lease_acquire('signer:' || r.signer, 'restore');
      PERFORM spool.nonce_set_next(r.signer, r.next_nonce, 'restore', l.token);
      PERFORM spool.lease_release('signer:' || r.signer, 'restore', l.token);
    END IF;
    RESET ROLE;
  END LOOP;
END $$});
is(sql("SELECT spool.nonce_request('s1')"), '1',
	'(d) queue-mode s1, restored as docs/operations.md says, goes on at nonce 1');
is(sql("SELECT spool.nonce_allocate('b1', 'app', l.token) FROM spool.lease_acquire('signer:b1', 'app') l"),
	'2', '(d) basic-mode b1, restored with its lease, goes on at nonce 2');

# (e) More cycles; the last three drop and create at once.
for my $cycle (2 .. 5)
{
	my $what = "cycle $cycle";
	# Cycle 2 drops while both replicas sleep in the handler (60 s).
	my $stuck = $cycle == 2;
	sql('INSERT INTO public.slow VALUES (true)') if $stuck;
	produce(50);
	if ($stuck)
	{
		poll_ok($node,
			"SELECT count(*) > 0 FROM pg_stat_activity"
			  . " WHERE backend_type = 'spool processor' AND wait_event = 'PgSleep'",
			"$what: a processor replica sleeps in its handler");
	}
	else
	{
		delivered_all($what);
	}
	my @old = split /\n/, sql(
		"SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'spool %'"
		  . " AND backend_type <> 'spool launcher'");
	cmp_ok(scalar(@old), '>=', 6, "$what: the pipeline's workers run (" . scalar(@old) . ')');
	$max_before = max_token();
	my $back_to_back = $cycle >= 3;
	my $t0 = time;
	sql("SET spool.allow_drop_with_nonces = on; DROP EXTENSION spool_ext CASCADE;"
		  . ($back_to_back ? ' CREATE EXTENSION spool_ext;' : ''));
	my $took = time - $t0;
	if ($stuck)
	{
		cmp_ok($took, '<', 30,
			sprintf('%s: DROP EXTENSION returned after %.1fs, not after the handler\'s sleep',
				$what, $took));
		sql('DELETE FROM public.slow');
	}
	no_workers_left($what) unless $back_to_back;
	poll_within($node, 30,
		'SELECT count(*) = 0 FROM pg_stat_activity WHERE pid IN (' . join(', ', @old) . ')',
		"$what: every old worker exited");
	sql('TRUNCATE public.delivered');
	sql('CREATE EXTENSION spool_ext') unless $back_to_back;
	fresh_catalog_ok($what, $max_before);
	pipeline(0);
	pipeline_up($what);
	delivered_all($what);
	cmp_ok(sql('SELECT min(token) FROM spool.lease_store WHERE grants > 0'), '>', $max_before,
		"$what: every token of the new catalog is above the old ones");
}
ok(!$node->log_contains(qr/more than \d+ .*is not started|could not start spool/),
	'no slot or worker limit was hit over five cycles');
ok(!$node->log_contains(qr/spool launcher (?:ERROR|FATAL):/),
	'the launcher never failed (it reads the catalog only while it holds the extension)');
ok(!$node->log_contains(qr/still have workers running after/),
	'no worker of a dropped extension outlived SIGTERM');

$kafka->stop;
$node->stop;
note sprintf('test took %.1fs', time - $t_start);
done_testing();

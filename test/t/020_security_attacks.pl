
# The attacker's view (docs/security.md): every attack below is made with
# only spool_admin (mallory), spool_client (eve) or a plain role (plain),
# logged in as that role, and must fail with a clear error and leave no
# trace: no call recorded as a superuser, no file written, no lease moved,
# no worker stalled, nothing lost from the victims' pipelines (alice's).
#
# (1) User code changes the settings of the worker that runs it: mallory's
#     processor handler and sql target function set search_path to
#     'evil, pg_catalog' (session-wide) and call pg_advisory_unlock_all();
#     evil.now() and evil.clock_timestamp() record current_user.  Nothing
#     is recorded as a superuser, the outputs are delivered, and the worker
#     took its internal lock back.
# (2) librdkafka properties: sasl.kerberos.kinit.cmd with GSSAPI (librdkafka
#     runs it in the caller's backend) for a source and a kafka target: 42501
#     and no file.  A superuser's source with a superuser-only property whose
#     owner is demoted no longer starts (state failed, the policy's error).
# (3) The database owner (a plain role) sets search_path = 'dbevil,
#     pg_catalog' with ALTER DATABASE: the workers, restarted, never call its
#     functions.
# (4) Leases: eve cannot see processor tokens, cannot renew, release or take
#     a processor's lease with the owner and token she read, nor use alice's
#     signer with alice's owner and token; nonce_request on alice's signer is
#     refused; a lease of a group role taken by node2 does not terminate the
#     fenced transaction of node1 (another login role), it returns NULL.
# (5) Internal locks: plain holds the advisory locks the old code used for
#     an ingest worker and a dispatcher shard; both work regardless.
# (6) Owners: mallory cannot stop or drop alice's source, move or drop her
#     consumer or her processor's, redrive her dead letters; eve cannot
#     enqueue into alice's target without a grant.
# (7) Poison pills: a Kafka timestamp beyond timestamptz is a dead letter
#     (the spool stays readable); a processor batch is cut at 64 MB of
#     entries; an ingest batch is staged at 32 MB, long before its batch_ms
#     of 60 s; window_alert keeps at most max_keys keys, replicas agreeing;
#     a payload larger than the Kafka target accepts is dead-lettered.
# (8) A busy dispatcher stops within spool.outbox_close_timeout (2 s) of
#     pg_terminate_backend: inside a user function that never returns, and
#     inside a Kafka flush to brokers that are down; the rows are delivered
#     later, once.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm
use SpoolTest;
use SpoolKafka;
use Test::More;
use Time::HiRes qw(time);

my $kafka = SpoolKafka->start(
	topics => [ 'vic:2', 'mal:1', 'tsp:1', 'big:8', 'lock:1', 'kout:1', 'wa:2' ]);
my $bootstrap = $kafka->bootstrap;
my $node = spool_node(
	'security',
	'spool.kafka_allowed_brokers' => "'127.0.0.1:*'",
	'spool.outbox_close_timeout' => "'2s'",
	'spool.lease_wait_timeout' => "'300ms'");
sub sql { return $node->safe_psql('postgres', $_[0]); }

# as($role, $sql): run $sql logged in as $role; (exit code, output, SQLSTATE
# of the first error or '', stderr).
sub as
{
	my ($role, $q) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $q,
		extra_params => [ '-U', $role, '-v', 'VERBOSITY=verbose' ]);
	my ($state) = $err =~ /ERROR:\s+([0-9A-Z]{5}):/;
	return ($ret, $out, $state // '', $err);
}

sub as_ok
{
	my ($role, $q) = @_;
	my ($ret, $out, $state, $err) = as($role, $q);
	die "as $role failed ($state): $q\n$err" if $ret != 0;
	return $out;
}

# The attack fails with 42501.
sub refused
{
	my ($role, $q, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my ($ret, $out, $state, $err) = as($role, $q);
	return is($state, '42501', "$what: refused with 42501") || diag("output: $out\n$err");
}

sql(q{
CREATE ROLE mallory LOGIN IN ROLE spool_admin;
CREATE ROLE alice LOGIN IN ROLE spool_admin;
CREATE ROLE eve LOGIN IN ROLE spool_client;
CREATE ROLE plain LOGIN;
CREATE ROLE grp IN ROLE spool_client;
CREATE ROLE node1 LOGIN IN ROLE grp;
CREATE ROLE node2 LOGIN IN ROLE grp;
CREATE SCHEMA evil AUTHORIZATION mallory;
CREATE SCHEMA app AUTHORIZATION alice;
});

# spies($schema): SQL that makes $schema.calls and functions $schema.now()
# and $schema.clock_timestamp(), each recording who called it (and whether a
# superuser) before returning what pg_catalog's function returns.
sub spies
{
	my ($schema) = @_;
	return qq{
CREATE TABLE $schema.calls (fn text, role text, su boolean, pid int,
	at timestamptz DEFAULT pg_catalog.clock_timestamp());
GRANT USAGE ON SCHEMA $schema TO PUBLIC;
GRANT INSERT ON $schema.calls TO PUBLIC;
DO \$d\$
DECLARE fn text;
BEGIN
	FOREACH fn IN ARRAY ARRAY['now', 'clock_timestamp'] LOOP
		EXECUTE format(\$f\$
			CREATE FUNCTION $schema.%1\$I() RETURNS timestamptz LANGUAGE plpgsql AS \$\$
			BEGIN
				INSERT INTO $schema.calls (fn, role, su, pid)
				SELECT %1\$L, current_user, rolsuper, pg_catalog.pg_backend_pid()
				  FROM pg_catalog.pg_roles WHERE rolname = current_user;
				RETURN pg_catalog.%1\$I();
			END \$\$\$f\$, fn);
	END LOOP;
END \$d\$;
};
}

#
# (1) User code changes the settings of the worker that runs it.
#
as_ok('mallory', spies('evil'));
as_ok('mallory', q{
-- The handler hijacks the search_path of the replica for good, and drops
-- every session lock of the process.
CREATE FUNCTION evil.handler(state jsonb, entries spool.entries[]) RETURNS spool.step
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_catalog.set_config('search_path', 'evil, pg_catalog', false);
	PERFORM pg_catalog.pg_advisory_unlock_all();
	RETURN ROW(state, ARRAY(SELECT ROW('mal_out', e.value->>'key',
				jsonb_build_object('cursor', e.cursor))::spool.output
				FROM unnest(entries) e))::spool.step;
END $$;
CREATE TABLE evil.delivered (outbox_id bigint, n int);
CREATE FUNCTION evil.deliver(payload jsonb, key text, outbox_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_catalog.set_config('search_path', 'evil, pg_catalog', false);
	PERFORM pg_catalog.pg_advisory_unlock_all();
	INSERT INTO evil.delivered VALUES (outbox_id, 1);
END $$;
});
sql(q{SELECT spool.create_source('mal', '} . $bootstrap . q{', '{mal}', '{"batch_ms": 20}');
	SELECT spool.start_source('mal')});
as_ok('mallory', q{
SELECT spool.create_target('mal_out', 'sql', '{"function": "evil.deliver", "batch_interval": "5ms"}');
SELECT spool.create_processor('evilp', 'evil.handler(jsonb, spool.entries[])',
	'{"sources": ["mal"], "replicas": 2, "lease_ttl": "1 s", "batch_size": 10}');
SELECT spool.start_processor('evilp');
});
my $log_offset = -s $node->logfile;
$kafka->cmd('produce mal 100');
poll_ok($node, q{SELECT count(*) = 100 FROM evil.delivered},
	'(1) the evil processor and target delivered all 100 outputs');
# Let the replicas and the dispatcher do their own work after the hijack:
# lease renewals (clock_timestamp()) and position updates (now()).
my $renewed = sql(q{SELECT clock_timestamp() FROM spool.lease_store WHERE resource = 'processor:evilp'});
poll_ok($node,
	qq{SELECT renewed_at > '$renewed' FROM spool.lease_store WHERE resource = 'processor:evilp'},
	'(1) the active replica renewed its lease after the hijack');
$kafka->cmd('produce mal 20 -1 200 100');
poll_ok($node, q{SELECT count(*) = 120 FROM evil.delivered}, '(1) 20 more delivered');
is(sql(q{SELECT count(*) FROM evil.calls WHERE su}), '0',
	'(1) no evil function ran as a superuser');
is(sql(q{SELECT count(*) FROM evil.calls c JOIN pg_stat_activity a ON a.pid = c.pid
		  WHERE a.backend_type LIKE 'spool %' AND c.role <> 'mallory'}), '0',
	'(1) in the workers, evil functions ran only as mallory (inside the box)');
ok($node->log_contains(qr/user code released an internal lock of this worker; it was taken back/,
		$log_offset),
	'(1) a worker took back the internal lock that pg_advisory_unlock_all() released');

#
# (2) librdkafka properties.
#
my $pwned = "$PostgreSQL::Test::Utils::tmp_check/pwned";
unlink $pwned;
my $kinit = qq{"security.protocol": "sasl_plaintext", "sasl.mechanisms": "GSSAPI",
	"sasl.kerberos.kinit.cmd": "touch $pwned"};
refused('mallory',
	qq{SELECT spool.create_source('k1', '$bootstrap', '{mal}', '{"kafka": {$kinit}}')},
	'(2) a source whose librdkafka configuration runs a command');
refused('mallory',
	qq{SELECT spool.create_target('k2', 'kafka', '{"brokers": "$bootstrap", "topic": "kout",
		"kafka": {$kinit}}')},
	'(2) a kafka target whose librdkafka configuration runs a command');
refused('mallory',
	qq{SELECT spool.create_source('k3', '$bootstrap', '{mal}',
		'{"kafka": {"plugin.library.paths": "$pwned"}}')},
	'(2) a source that loads a library');
ok(!-e $pwned, '(2) no command ran: the file does not exist');
is(sql(q{SELECT count(*) FROM spool.sources WHERE name IN ('k1', 'k3')})
	  . sql(q{SELECT count(*) FROM spool.targets WHERE name = 'k2'}),
	'00', '(2) nothing was created');
# A role demoted since it created a source loses what only superusers may set.
sql(q{CREATE ROLE tmpsu LOGIN SUPERUSER});
as_ok('tmpsu', qq{SELECT spool.create_source('demoted', '$bootstrap', '{mal}',
	'{"kafka": {"statistics.interval.ms": 0}}')});
sql(q{ALTER ROLE tmpsu NOSUPERUSER; SELECT spool.start_source('demoted')});
poll_ok($node,
	q{SELECT state = 'failed' AND last_error LIKE '%only superusers may set Kafka property "statistics.interval.ms"%'
	    FROM spool.source_status WHERE source = 'demoted' LIMIT 1},
	'(2) the demoted owner\'s source fails on the property it may no longer set');
is(sql(q{SELECT count(*) FROM spool.entries WHERE source = 'demoted'}), '0',
	'(2) the demoted owner\'s source ingested nothing');
sql(q{SELECT spool.stop_source('demoted')});

#
# (4) Leases.
#
my ($ptoken, $powner) = split /\|/,
  sql(q{SELECT token, owner FROM spool.lease_store WHERE resource = 'processor:evilp'});
my $lease_before = sql(q{SELECT token || owner || grants FROM spool.lease_store
						 WHERE resource = 'processor:evilp'});
is(as_ok('eve', q{SELECT coalesce(token::text, 'hidden') FROM spool.leases
				  WHERE resource = 'processor:evilp'}),
	'hidden', '(4) eve does not see the processor\'s token');
refused('eve', qq{SELECT spool.lease_renew('processor:evilp', '$powner', $ptoken, '1 h')},
	'(4) renewing a processor lease with its owner and token');
refused('eve', qq{SELECT spool.lease_release('processor:evilp', '$powner', $ptoken)},
	'(4) releasing a processor lease');
refused('eve', q{SELECT spool.lease_acquire('processor:evilp', 'eve', '1 h')},
	'(4) taking a processor lease');
refused('eve', qq{SELECT spool.fence('processor:evilp', $ptoken)},
	'(4) fencing with a processor token');
is(sql(q{SELECT token || owner || grants FROM spool.lease_store WHERE resource = 'processor:evilp'}),
	$lease_before, '(4) the processor lease did not move');
# Basic mode: alice's signer, used with alice's owner name and token.
sql(q{CREATE ROLE alice_client LOGIN IN ROLE spool_client});
as_ok('alice_client', q{SELECT spool.lease_acquire('signer:alice', 'alice-node', '1 h')});
as_ok('alice_client', q{SELECT spool.nonce_allocate('alice', 'alice-node', 1)});
refused('eve', q{SELECT spool.nonce_allocate('alice', 'alice-node', 1)},
	'(4) allocating from alice\'s signer with her owner and token');
refused('eve', q{SELECT spool.nonce_mark_recyclable('alice', 0, 'alice-node', 1)},
	'(4) giving back alice\'s nonce');
refused('eve', q{SELECT spool.lease_release('signer:alice', 'alice-node', 1)},
	'(4) releasing alice\'s signer lease');
is(sql(q{SELECT string_agg(nonce || state::text, ',' ORDER BY nonce) FROM spool.nonce_store
		  WHERE signer = 'alice'}),
	'0allocated', '(4) alice\'s nonces are as she left them');
# Worker-queue mode: a signer belongs to its first requester.
is(as_ok('alice_client', q{SELECT spool.nonce_request('alice-q')}), '0',
	'(4) alice\'s first queued nonce');
refused('eve', q{SELECT spool.nonce_request('alice-q')},
	'(4) requesting a nonce of alice\'s queued signer');
is(as_ok('alice_client', q{SELECT spool.nonce_request('alice-q')}), '1',
	'(4) alice\'s next queued nonce follows: eve used none up');
# Group leases: node2 may take grp's expired lease, but not terminate node1.
my $n1 = SpoolTest::Session->new($node, 'node1', 'node1');
$n1->query_ok(q{SET ROLE grp});
$n1->query_ok(q{SELECT spool.lease_acquire('grp:res', 'n1', '1 s')});
$n1->query_ok(q{BEGIN});
$n1->query_ok(q{SELECT spool.fence('grp:res', 1)});
my $n1pid = $n1->pid;
poll_ok($node, q{SELECT NOT live FROM spool.leases WHERE resource = 'grp:res'},
	'(4) node1\'s lease to expire while its fenced transaction stays open');
is(as_ok('node2', q{SET ROLE grp; SELECT coalesce(spool.lease_acquire('grp:res', 'n2', '10 s')::text, 'null')}),
	'null', '(4) node2 cannot take the lease while node1\'s fenced transaction is open');
is(sql(qq{SELECT count(*) FROM pg_stat_activity WHERE pid = $n1pid}), '1',
	'(4) node1 (another login role) was not terminated');
is(($n1->query(q{COMMIT}))[1], '00000', '(4) node1\'s fenced transaction commits');
$n1->quit;

#
# (5) Internal locks out of reach.
#
my $locker = SpoolTest::Session->new($node, 'plain-locker', 'plain');
$locker->query_ok(q{SELECT pg_advisory_lock(hashtext('spool_ext ingest'), hashtext('lock'))});
my $next_target = sql(q{SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
						FROM spool.target_id_seq});
$locker->query_ok(qq{SELECT pg_advisory_lock(x'53504f44'::int, $next_target * 16)});
sql(qq{SELECT spool.create_source('lock', '$bootstrap', '{lock}', '{"batch_ms": 20}');
	SELECT spool.start_source('lock')});
sql(q{CREATE TABLE lock_delivered (id bigint)});
sql(q{CREATE FUNCTION public.lock_deliver(p jsonb, k text, id bigint) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO public.lock_delivered VALUES (id) $$;
	CREATE ROLE lock_runner; GRANT INSERT ON lock_delivered TO lock_runner});
sql(q{SELECT spool.create_target('lock_t', 'sql',
	'{"function": "public.lock_deliver", "run_as": "lock_runner"}')});
is(sql(q{SELECT id FROM spool.targets WHERE name = 'lock_t'}), $next_target,
	'(5) the target got the id whose old lock key plain holds');
$kafka->cmd('produce lock 10');
sql(q{SELECT spool.enqueue('lock_t', 'k', '{}') FROM generate_series(1, 10)});
poll_ok($node, q{SELECT count(*) = 10 FROM spool.entries WHERE source = 'lock'},
	'(5) the ingest worker runs although plain holds its old advisory lock');
poll_ok($node, q{SELECT count(*) = 10 FROM lock_delivered},
	'(5) the dispatcher delivers although plain holds its old advisory lock');
$locker->quit;

#
# (6) Owners.
#
as_ok('alice', qq{
SELECT spool.create_source('vic', '$bootstrap', '{vic}', '{"batch_ms": 20}');
SELECT spool.start_source('vic');
SELECT spool.register_consumer('alice-reader', 0);
CREATE TABLE app.got (id bigint);
CREATE FUNCTION app.take(p jsonb, k text, id bigint) RETURNS void LANGUAGE plpgsql AS \$\$
BEGIN
	IF p ? 'fail' THEN RAISE EXCEPTION 'refused'; END IF;
	INSERT INTO app.got VALUES (id);
END \$\$;
SELECT spool.create_target('vic_t', 'sql', '{"function": "app.take", "retry_limit": 0,
	"batch_interval": "5ms"}');
SELECT spool.enqueue('vic_t', 'bad', '{"fail": true}');
});
$kafka->cmd('produce vic 10');
poll_ok($node, q{SELECT count(*) = 10 FROM spool.entries WHERE source = 'vic'},
	'(6) alice\'s source runs');
poll_ok($node, q{SELECT count(*) = 1 FROM spool.outbox_dead WHERE target = 'vic_t'},
	'(6) alice\'s failing row is dead-lettered');
my $dead = sql(q{SELECT id FROM spool.outbox_dead WHERE target = 'vic_t'});
refused('mallory', q{SELECT spool.stop_source('vic')}, '(6) stopping alice\'s source');
refused('mallory', q{SELECT spool.drop_source('vic')}, '(6) dropping alice\'s source');
refused('mallory', q{SELECT spool.commit_consumer('alice-reader', 1000000)},
	'(6) moving alice\'s consumer');
refused('mallory', q{SELECT spool.drop_consumer('alice-reader')}, '(6) dropping alice\'s consumer');
refused('mallory', q{SELECT spool.commit_consumer('processor:evilp', 1000000)},
	'(6) moving a processor\'s consumer');
refused('mallory', qq{SELECT spool.redrive($dead)}, '(6) redriving alice\'s dead letter');
refused('mallory', q{SELECT spool.drop_target('vic_t', true)}, '(6) dropping alice\'s target');
refused('eve', q{SELECT spool.enqueue('vic_t', 'eve', '{}')},
	'(6) enqueueing into alice\'s target without a grant');
refused('mallory', q{SELECT spool.enqueue('vic_t', 'mallory', '{}')},
	'(6) mallory enqueueing into alice\'s target');
is(sql(q{SELECT enabled FROM spool.sources WHERE name = 'vic'}), 't', '(6) alice\'s source still runs');
is(sql(q{SELECT committed_cursor FROM spool.consumers WHERE name = 'alice-reader'}), '0',
	'(6) alice\'s consumer did not move');
is(sql(q{SELECT count(*) FROM spool.outbox_dead WHERE target = 'vic_t'}), '1',
	'(6) alice\'s dead letter is still there');
is(sql(q{SELECT count(*) FROM spool.outbox WHERE target = 'vic_t' AND key IN ('eve', 'mallory')}),
	'0', '(6) nothing was written into alice\'s target');
as_ok('alice', q{SELECT spool.grant_target('vic_t', 'eve')});
as_ok('eve', q{SELECT spool.enqueue('vic_t', 'eve', '{}')});
poll_ok($node, q{SELECT count(*) = 1 FROM app.got}, '(6) with alice\'s grant, eve\'s row is delivered');

#
# (7) Poison pills.
#
# A Kafka timestamp far beyond timestamptz (year 292 million).
sql(qq{SELECT spool.create_source('tsp', '$bootstrap', '{tsp}', '{"batch_ms": 20}');
	SELECT spool.start_source('tsp')});
$kafka->cmd('produce_ts tsp 0 k 9000000000000000000 {"n": 1}');
$kafka->cmd('produce_one tsp 0 k {"n": 2}');
poll_ok($node, q{SELECT count(*) = 1 FROM spool.entries WHERE source = 'tsp'},
	'(7) the message after the bad timestamp is spooled');
is(sql(q{SELECT kafka_offset || ':' || (error LIKE '%outside the range of timestamptz%')::int
		  FROM spool.dead_letters WHERE source = 'tsp'}),
	'0:1', '(7) the message with the bad timestamp is a dead letter, with the reason');
is(sql(q{SELECT count(*) FROM (SELECT kafka_ts::text FROM spool.entries) x}) > 0 ? 'readable' : '',
	'readable', '(7) every spooled timestamp reads back');
# Processor batches are cut at 64 MB: three entries of 30 MB (raw) each.
sql(q{
SELECT spool.create_source('bigs', '127.0.0.1:1', '{none}');
CREATE FUNCTION public.count_batch(state jsonb, entries spool.entries[]) RETURNS spool.step
LANGUAGE sql AS $$
	SELECT ROW(state, ARRAY[ROW('batches', NULL, jsonb_build_object('n', cardinality(entries),
		'last', entries[cardinality(entries)].cursor))::spool.output])::spool.step
$$;
CREATE ROLE counter IN ROLE spool_client; GRANT EXECUTE ON FUNCTION public.count_batch(jsonb, spool.entries[]) TO counter;
SELECT spool.create_target('batches', 'notify', '{"channel": "batches"}');
SELECT spool.create_processor('bigp', 'public.count_batch(jsonb, spool.entries[])',
	'{"sources": ["bigs"], "replicas": 1, "batch_size": 1000, "run_as": "counter"}');
SELECT spool.start_processor('bigp');
});
poll_ok($node, q{SELECT role = 'active' FROM spool.processor_status WHERE processor = 'bigp'},
	'(7) the batch-counting processor is active');
sql(q{
WITH s AS (SELECT next_cursor AS c FROM spool.spool_state FOR UPDATE),
	 ins AS (INSERT INTO spool.entries (cursor, source, topic, kafka_partition, kafka_offset, value, spooled_at)
			 SELECT s.c + i, 'bigs', 'none', 0, i, jsonb_build_object('pad', repeat('x', 30000000)), now()
			   FROM s, generate_series(0, 2) i)
UPDATE spool.spool_state SET next_cursor = next_cursor + 3 FROM s;
});
poll_ok($node,
	q{SELECT coalesce(sum((payload->>'n')::int), 0) = 3 FROM spool.outbox WHERE processor = 'bigp'},
	'(7) the processor applied the three 30 MB entries');
is(sql(q{SELECT string_agg(payload->>'n', ',' ORDER BY id) FROM spool.outbox WHERE processor = 'bigp'}),
	'2,1', '(7) in two batches: the 64 MB bound cut the first after 60 MB');
sql(q{SELECT spool.stop_processor('bigp')});
# Ingest batches are staged at 32 MB: 40 messages of 900 kB with batch_ms 60 s.
sql(qq{SELECT spool.create_source('big', '$bootstrap', '{big}',
	'{"batch_ms": 60000, "batch_size": 1000000, "max_message_bytes": 2000000}');
	SELECT spool.start_source('big')});
poll_ok($node, q{SELECT count(*) = 8 AND bool_and(state = 'running') FROM spool.source_status WHERE source = 'big'},
	'(7) the big source runs');
$kafka->cmd('produce big 40 -1 900000');
poll_within($node, 40,
	q{SELECT count(*) >= 37 FROM spool.entries WHERE source = 'big'},
	'(7) a 32 MB batch is staged long before batch_ms (60 s) ends it');
# window_alert forgets the least recently seen keys past max_keys; both
# replicas agree.
sql(qq{SELECT spool.create_source('wa', '$bootstrap', '{wa}', '{"batch_ms": 20}');
	SELECT spool.start_source('wa');
	SELECT spool.create_target('wa_alerts', 'notify', '{"channel": "wa"}');
	CREATE ROLE wa_runner IN ROLE spool_client;
	SELECT spool.create_processor('wap', 'spool.window_alert(jsonb, spool.entries[])',
		'{"sources": ["wa"], "replicas": 2, "batch_size": 50, "checkpoint_every": 100, "run_as": "wa_runner",
		  "handler": {"key": "key", "aggregate": "count", "window": {"type": "count", "size": 3},
		              "threshold": 1000000, "target": "wa_alerts", "max_keys": 40}}');
	SELECT spool.start_processor('wap')});
$kafka->cmd('produce wa 300');
poll_ok($node, q{SELECT count(*) = 300 FROM spool.entries WHERE source = 'wa'}, '(7) 300 entries for window_alert');
# An entry without a value (as a text or bytes source writes) is skipped, not a crash.
sql(q{
WITH s AS (SELECT next_cursor AS c FROM spool.spool_state FOR UPDATE),
	 ins AS (INSERT INTO spool.entries (cursor, source, topic, kafka_partition, kafka_offset, payload, spooled_at)
			 SELECT s.c, 'wa', 'wa', 0, 1000000, 'not json', now() FROM s)
UPDATE spool.spool_state SET next_cursor = next_cursor + 1 FROM s;
});
poll_ok($node,
	q{SELECT c.state_cursor = (SELECT max(cursor) FROM spool.entries WHERE source = 'wa')
	    FROM spool.processor_checkpoints c WHERE processor = 'wap'},
	'(7) window_alert snapshot covers all 300 entries');
is(sql(q{SELECT (SELECT count(*) FROM jsonb_object_keys(state->'keys')) <= 40
		   AND (state->>'evicted')::int >= 260 AND (state->>'skipped')::int = 1
		  FROM spool.processor_checkpoints WHERE processor = 'wap'}),
	't', '(7) window_alert kept at most max_keys (40) of 300 keys, and skipped the entry without a value');
poll_ok($node,
	q{SELECT count(DISTINCT state_hash) = 1 AND count(*) = 2 AND min(hash_mismatches) = 0
	    FROM spool.processor_status WHERE processor = 'wap' AND state_hash_cursor =
	      (SELECT state_cursor FROM spool.processor_checkpoints WHERE processor = 'wap')},
	'(7) both window_alert replicas reach the same state hash');
# A payload the Kafka target can never take is dead-lettered, not retried forever.
sql(qq{SELECT spool.create_target('kout', 'kafka', '{"brokers": "$bootstrap", "topic": "kout",
	"retry_limit": 1, "retry_backoff": "50ms", "batch_interval": "5ms"}');
	SELECT spool.enqueue('kout', 'huge', jsonb_build_object('pad', repeat('x', 2000000)));
	SELECT spool.enqueue('kout', 'small', '{"n": 1}')});
poll_ok($node, q{SELECT count(*) = 1 FROM spool.outbox_dead WHERE target = 'kout' AND key = 'huge'},
	'(7) the 2 MB payload for Kafka is dead-lettered');
poll_ok($node, q{SELECT delivered >= 1 FROM spool.outbox_status WHERE target = 'kout'},
	'(7) the small row after it is delivered');

#
# (8) A busy dispatcher stops within the close timeout.
#
sql(q{
CREATE TABLE hang_switch (hang boolean);
INSERT INTO hang_switch VALUES (true);
CREATE TABLE hang_got (id bigint, pid int);
CREATE ROLE hanger;
GRANT SELECT ON hang_switch TO hanger;
GRANT INSERT ON hang_got TO hanger;
CREATE FUNCTION public.hang(p jsonb, k text, id bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	WHILE (SELECT hang FROM public.hang_switch) LOOP PERFORM pg_sleep(0.05); END LOOP;
	INSERT INTO public.hang_got VALUES (id, pg_backend_pid());
END $$;
SELECT spool.create_target('hang_t', 'sql', '{"function": "public.hang", "run_as": "hanger",
	"batch_interval": "5ms"}');
SELECT spool.enqueue('hang_t', 'k', '{}');
});
poll_ok($node,
	q{SELECT count(*) = 1 FROM pg_stat_activity
	   WHERE application_name = 'spool dispatch hang_t/0' AND wait_event = 'PgSleep'},
	'(8) the dispatcher is inside the function that does not return');
my $hpid = sql(q{SELECT pid FROM pg_stat_activity WHERE application_name = 'spool dispatch hang_t/0'});
my $t0 = time;
sql(qq{SELECT pg_terminate_backend($hpid)});
poll_within($node, 20, qq{SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $hpid},
	'(8) the dispatcher inside a user function exits after SIGTERM');
note sprintf('(8) it took %.1f s (close timeout 2 s)', time - $t0);
sql(q{UPDATE hang_switch SET hang = false});
poll_ok($node, q{SELECT count(*) = 1 FROM hang_got}, '(8) the row is delivered by the next worker');
is(sql(q{SELECT count(*) FROM hang_got}), '1', '(8) ... once');
# Inside a Kafka flush to brokers that are down (it would wait 60 s).
$kafka->cmd('down -1');
sql(q{SELECT spool.enqueue('kout', 'during-outage', '{"n": 2}')});
poll_ok($node,
	q{SELECT count(*) = 1 FROM pg_stat_activity
	   WHERE application_name = 'spool dispatch kout/0' AND query = 'delivering to kafka'},
	'(8) the kafka dispatcher is inside a flush to brokers that are down');
my $kpid = sql(q{SELECT pid FROM pg_stat_activity WHERE application_name = 'spool dispatch kout/0'});
sql(qq{SELECT pg_terminate_backend($kpid)});
poll_within($node, 20, qq{SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $kpid},
	'(8) the dispatcher inside a Kafka flush exits after SIGTERM');
$kafka->cmd('up -1');
poll_ok($node,
	q{SELECT position >= (SELECT max(id) FROM spool.outbox WHERE target = 'kout')
	    FROM spool.outbox_status WHERE target = 'kout'},
	'(8) after the brokers are back, the row is delivered');

#
# (3) The database owner's search_path for the workers (last: it restarts
#     the server).
#
sql(q{CREATE ROLE dbo LOGIN; ALTER DATABASE postgres OWNER TO dbo});
as_ok('dbo', q{CREATE SCHEMA dbevil});
as_ok('dbo', spies('dbevil'));
as_ok('dbo', q{
ALTER DATABASE postgres SET search_path = dbevil, pg_catalog, public;
});
$node->restart;
poll_ok($node, q{SELECT count(*) = 2 FROM spool.processor_status WHERE processor = 'evilp' AND role IN ('active', 'standby')},
	'(3) the processor replicas run again after the restart');
$kafka->cmd('produce mal 20 -1 200 120');
sql(q{SELECT spool.nonce_request('after-restart')});
poll_ok($node, q{SELECT count(*) = 140 FROM evil.delivered}, '(3) the pipeline runs on');
is(sql(q{SELECT count(*) FROM dbevil.calls WHERE su}), '0',
	'(3) no worker called the database owner\'s functions as a superuser');
sql(q{ALTER DATABASE postgres RESET search_path});

$node->stop;
$kafka->stop;
done_testing();

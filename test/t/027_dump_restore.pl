# pg_dump and pg_restore of a running pipeline (docs/operations.md,
# "Backup and restore").
#
# Node "dump_src" runs a source on topic td (4 partitions), the reference
# processor p and a sql target 'test' its outputs are delivered to (table
# delivered); a client lease app:r1 was granted twice, signer S1 allocated
# nonces in basic mode and signer S2 through the nonce workers.  More
# messages are produced and pg_dump -Fc runs while they stream in; the node
# is stopped and more messages are produced.  A fresh server "dump_dst"
# (spool_ext preloaded, the extension not created) gets the roles
# (pg_dumpall --roles-only) and the documented pg_restore command, while a
# session named pg_restore stays connected:
#   - no spool worker starts while that session is there (the launcher
#     waits, and says so in the log); once it is gone the pipeline runs;
#   - the spool holds every (partition, offset) of td exactly once, the
#     stored offsets are the high watermarks, the processor's outputs are
#     the reference outputs once each, and the sql target's table got each
#     output once;
#   - tokens and nonces only grow: a new grant of app:r1 gets a larger
#     token than any dumped one, S1 (new lease) and S2 (nonce workers)
#     continue above the dumped nonces, the old S1 token is fenced off;
#     every sequence is at or above the largest id of its table, and the
#     spool's next cursor above every restored entry;
#   - bt_index_check passes on every index of the restored spool schema;
#   - retention on the restored spool (segments of 100 cursors, kept until
#     then by consumer 'keep'): with segment 1 locked as pg_dump locks it,
#     the drop times out without ending the promoter, and the same promoter
#     drops it once the lock is gone.
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
use IPC::Run;
use Test::More;
use Time::HiRes qw(time);

my $t_start = time;
my $nparts = 4;
my $kafka = SpoolKafka->start(topics => ["td:$nparts"]);
my $src = spool_node('dump_src', 'spool.segment_size' => 100);
my $next_seq = 0;

sub produce
{
	my ($n) = @_;
	my $ans = $kafka->produce('td', $n, -1, 100, $next_seq);
	die "produce $n from $next_seq: $ans" unless $ans eq "OK produced $n";
	$next_seq += $n;
}

sub s_sql { return $src->safe_psql('postgres', $_[0]); }

# The processor's outputs go to a sql target (created before
# processor_setup, which then keeps it).
sql_target($src, 'test', '{"batch_interval": "5ms"}');
# A consumer that keeps every segment (dropped on the destination, at the end).
s_sql("SELECT spool.register_consumer('keep', 0)");
my $proc = processor_setup($src, $kafka->bootstrap, 'td',
	options => '{"batch_size": 50, "checkpoint_every": 100}');
wait_dispatchers($src, 'test', 1);

# A client lease granted twice; basic-mode nonces of S1; queued nonces of S2.
my $t1 = s_sql("SELECT (spool.lease_acquire('app:r1', 'a')).token");
s_sql("SELECT spool.lease_release('app:r1', 'a', $t1)");
my $t2 = s_sql("SELECT (spool.lease_acquire('app:r1', 'b')).token");
cmp_ok($t2, '>', $t1, "source: app:r1 tokens $t1 then $t2");
my $ts1 = s_sql("SELECT (spool.lease_acquire('signer:S1', 'w1', '1 h')).token");
my @s1 = map { s_sql("SELECT spool.nonce_allocate('S1', 'w1', $ts1)") } 1 .. 4;
s_sql("SELECT spool.nonce_mark_used('S1', $s1[0], 'w1', $ts1)");
is("@s1", '0 1 2 3', 'source: S1 allocated nonces 0 .. 3');
my @s2 = map { s_sql("SELECT spool.nonce_request('S2', 'r$_')") } 1 .. 3;
is("@s2", '0 1 2', 'source: S2 served nonces 0 .. 2 through the nonce workers');
my $ts2 = s_sql("SELECT token FROM spool.lease_store WHERE resource = 'signer:S2'");
# A lease and a target grant of a role whose oid differs on the destination
# (roles are created there in name order).
s_sql(q{CREATE ROLE zz_leaser; GRANT spool_client TO zz_leaser;
	SET ROLE zz_leaser; SELECT spool.lease_acquire('app:z1', 'z', '1 h'); RESET ROLE;
	SELECT spool.grant_target('test', 'zz_leaser')});

produce(400);
wait_processed($src, $proc, 400, 'source, first 400');
poll_ok($src, 'SELECT count(*) = 400 FROM delivered', 'source: 400 outputs delivered');

# pg_dump while messages stream in.
my $dump = $PostgreSQL::Test::Utils::tmp_check . '/027.dump';
produce(300);
poll_ok($src, "SELECT count(*) > 400 FROM spool.entries", 'source: the next messages arriving');
$src->command_ok([ 'pg_dump', '-Fc', '-f', $dump, '-d', $src->connstr('postgres') ],
	'pg_dump -Fc while the pipeline runs');
my $roles = $PostgreSQL::Test::Utils::tmp_check . '/027_roles.sql';
$src->command_ok([ 'pg_dumpall', '--roles-only', '-f', $roles, '-d', $src->connstr('postgres') ],
	'pg_dumpall --roles-only');
my %dumped;
{
	# What the dump holds, read from the dump itself.
	my ($out, $err);
	IPC::Run::run([ 'pg_restore', '-f', '-', '-a', '-t', 'lease_store', '-t', 'nonce_signer', $dump ],
		'>', \$out, '2>', \$err);
	$dumped{token} = 0;
	for (split /\n/, $out)
	{
		my @f = split /\t/;
		$dumped{token} = $f[3] if @f > 3 && $f[0] =~ /^(app:r1|signer:S[12])$/ && $f[3] > $dumped{token};
	}
	note("largest dumped token: $dumped{token}");
	cmp_ok($dumped{token}, '>=', $t2, 'the dump holds the lease tokens');
}
my $zz_oid = s_sql("SELECT oid FROM pg_roles WHERE rolname = 'zz_leaser'");
sub s_oid_zz { return $zz_oid; }
$src->stop('fast');
produce(200);
my $total = $next_seq;

# A fresh server: spool_ext preloaded, nothing created yet.
my $dst = PostgreSQL::Test::Cluster->new('dump_dst');
$dst->init;
$dst->append_conf('postgresql.conf', join('', map { "$_\n" }
	  "shared_preload_libraries = 'spool_ext'", "spool.database = 'postgres'",
	  'max_worker_processes = 32', 'max_connections = 40', "log_line_prefix = '%m [%p] %b '",
	  'spool.segment_size = 100', 'spool.min_retention = 0', "spool.retention_interval = '200ms'"));
$dst->start;
sub d_sql { return $dst->safe_psql('postgres', $_[0]); }

# Roles first (the bootstrap superuser's CREATE ROLE fails: it exists).
$dst->psql('postgres', undef, on_error_stop => 0, extra_params => [ '-f', $roles ]);
is(d_sql("SELECT count(*) FROM pg_roles WHERE rolname IN ('proc_owner', 'deliverer', 'spool_admin')"),
	'3', 'destination: the roles exist');

# A session named like pg_restore holds the launcher off, also after the
# restore itself has disconnected.
my ($hin, $hout, $herr) = ('', '', '');
my $holder = IPC::Run::start(
	[ 'psql', '-XAtq', '-d', $dst->connstr('postgres') . ' application_name=pg_restore' ],
	'<', \$hin, '>', \$hout, '2>', \$herr);
poll_ok($dst, "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'pg_restore'",
	'the pg_restore-named session to connect');
# Attack: a plain role names its session pg_restore too; it must not hold
# the workers back (only a superuser can restore the extension).
d_sql("CREATE ROLE zz_plain LOGIN");
my ($pin, $pout, $perr) = ('', '', '');
my $plain = IPC::Run::start(
	[ 'psql', '-XAtq', '-d', $dst->connstr('postgres') . ' user=zz_plain application_name=pg_restore' ],
	'<', \$pin, '>', \$pout, '2>', \$perr);
poll_ok($dst, "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'pg_restore'"
	  . " AND usename = 'zz_plain'", "zz_plain's pg_restore-named session to connect");
my $log_offset = -s $dst->logfile;

# The documented restore: one transaction, without the worker-made
# partitions' own indexes (attaching a partition creates them).
my $list = $PostgreSQL::Test::Utils::tmp_check . '/027.list';
{
	my ($toc, $err);
	IPC::Run::run([ 'pg_restore', '-l', $dump ], '>', \$toc, '2>', \$err) or die "pg_restore -l: $err";
	my @keep = grep { !/^\d+; \d+ \d+ (CONSTRAINT|INDEX|INDEX ATTACH) spool / } split /\n/, $toc;
	open my $fh, '>', $list or die;
	print $fh "$_\n" for @keep;
	close $fh;
}
my $t_restore = time;
$dst->command_ok(
	[ 'pg_restore', '--single-transaction', '--exit-on-error', '-L', $list,
	  '-d', $dst->connstr('postgres'), $dump ],
	'pg_restore --single-transaction --exit-on-error -L list');
note(sprintf('restore took %.1fs', time - $t_restore));
$dst->wait_for_log(qr/spool_ext waits for pg_restore to finish before starting workers/, $log_offset);
pass('the launcher waits while a pg_restore session is connected');
is(d_sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'spool %'"
		  . " AND backend_type <> 'spool launcher'"),
	'0', 'no spool worker runs while the pg_restore session is connected');

# What was restored, before any worker runs.
is(d_sql("SELECT count(*) FROM spool.entries"), d_sql(
		"SELECT coalesce(sum(next_offset), 0) FROM spool.offsets WHERE source = 'src'"),
	'restored: the entries match the stored offsets');
is(d_sql("SELECT next_cursor > (SELECT coalesce(max(cursor), 0) FROM spool.entries)"
		  . " AND next_cursor > 1 FROM spool.spool_state"),
	't', 'restored: the next cursor is above every entry (the dumped spool_state row won)');
is(d_sql(q{SELECT string_agg(format('%s %s %s', t.seq, s.last_value, t.mx), ', ')
	FROM (VALUES ('spool.outbox_id_seq', (SELECT max(id) FROM spool.outbox_store)),
				 ('spool.target_id_seq', (SELECT max(id) FROM spool.targets)),
				 ('spool.nonce_set_next_log_id_seq', (SELECT max(id) FROM spool.nonce_set_next_log)),
				 ('spool.dead_letters_id_seq', (SELECT max(id) FROM spool.dead_letters)),
				 ('spool.gaps_id_seq', (SELECT max(id) FROM spool.gaps)),
				 ('spool.source_seeks_id_seq', (SELECT max(id) FROM spool.source_seeks)),
				 ('spool.processor_rewinds_id_seq', (SELECT max(id) FROM spool.processor_rewinds)))
		 t(seq, mx)
	JOIN pg_sequences s ON format('%I.%I', s.schemaname, s.sequencename) = t.seq
	WHERE t.mx IS NOT NULL AND (s.last_value IS NULL OR s.last_value < t.mx)}),
	'', 'restored: every sequence is at or above the largest id of its table');
cmp_ok(d_sql("SELECT last_value FROM spool.outbox_id_seq"), '>=', 400,
	'restored: the outbox ids continue');

# Roles are restored by name.
isnt(d_sql("SELECT oid FROM pg_roles WHERE rolname = 'zz_leaser'"),
	s_oid_zz(), 'zz_leaser has another oid on the destination');
is(d_sql(q{SELECT (SELECT role::text FROM spool.lease_store WHERE resource = 'app:z1') || ' '
	|| (SELECT string_agg(role::text, ',') FROM spool.target_grants)}),
	'zz_leaser zz_leaser', 'restored: the lease and the target grant belong to zz_leaser');
my ($zrc, $zout, $zerr) = $dst->psql('postgres',
	"SET ROLE proc_owner; SELECT spool.lease_acquire('app:z1', 'p', '1 s')");
like($zerr, qr/belongs to another role.*It belongs to role "zz_leaser"/s, 'restored: another role cannot take the lease of zz_leaser');
my $tz = d_sql("SELECT token FROM spool.lease_store WHERE resource = 'app:z1'");
is(d_sql("SET ROLE zz_leaser; SELECT spool.lease_renew('app:z1', 'z', $tz) IS NOT NULL"),
	't', 'restored: zz_leaser renews its lease');

# The holder leaves: the launcher starts the pipeline.
d_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_restore'"
	  . " AND usename <> 'zz_plain'");
$holder->finish;
wait_processed($dst, $proc, $total, "destination, all $total", 120);
pass("the workers run although zz_plain's pg_restore-named session is still connected");
d_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'zz_plain'");
$plain->finish;
spool_partitions_exact($dst, $kafka, 'src', 'td', $nparts, $total);
outputs_exact($dst, $proc, $nparts, $total, 'destination');
tokens_ordered($dst, $proc, 'destination');
poll_ok($dst, "SELECT count(*) >= $total FROM delivered", "destination: $total outputs delivered");
is(d_sql("SELECT count(*) || ' ' || count(DISTINCT outbox_id) FROM delivered"), "$total $total",
	'destination: the sql target got each output once');
is(d_sql("SELECT count(*) FROM spool.outbox o WHERE o.processor = '$proc'"
		  . " AND NOT EXISTS (SELECT 1 FROM delivered d WHERE d.outbox_id = o.id AND d.payload = o.payload)"),
	'0', 'destination: every output in the table, with its payload');

# Tokens and nonces only grow.
d_sql("SELECT spool.lease_release('app:r1', 'b', $t2)");
my $t4 = d_sql("SELECT (spool.lease_acquire('app:r1', 'c')).token");
cmp_ok($t4, '>', $t2, "app:r1 granted after the restore gets token $t4 > $t2");
d_sql("SELECT spool.lease_release('signer:S1', 'w1', $ts1)");
my $ts1b = d_sql("SELECT (spool.lease_acquire('signer:S1', 'w2')).token");
cmp_ok($ts1b, '>', $ts1, "signer:S1 granted after the restore gets token $ts1b > $ts1");
is(d_sql("SELECT spool.nonce_allocate('S1', 'w2', $ts1b)"), '4',
	'S1 continues at nonce 4 after the restore');
my ($rc, $out, $err) = $dst->psql('postgres', "SELECT spool.nonce_allocate('S1', 'w1', $ts1)");
isnt($rc, 0, "the dumped S1 token $ts1 is fenced off after the restore");
is(d_sql("SELECT spool.nonce_request('S2', 'r4')"), '3',
	'S2 continues at nonce 3 through the restored nonce workers');
cmp_ok(d_sql("SELECT token FROM spool.lease_store WHERE resource = 'signer:S2'"), '>', $ts2,
	'the nonce worker serving S2 holds a larger token than the dumped one');

# More messages after the restore: still exactly once.
produce(100);
$total = $next_seq;
wait_processed($dst, $proc, $total, "destination, all $total", 120);
spool_partitions_exact($dst, $kafka, 'src', 'td', $nparts, $total);
outputs_exact($dst, $proc, $nparts, $total, 'destination, later');
poll_ok($dst, "SELECT count(*) >= $total FROM delivered", "destination: $total outputs delivered");
is(d_sql("SELECT count(*) || ' ' || count(DISTINCT outbox_id) FROM delivered"), "$total $total",
	'destination, later: the sql target got each output once');

# The restored indexes are sound.
d_sql('CREATE EXTENSION amcheck');
is(d_sql(q{SELECT count(*) FILTER (WHERE NOT ok) || ' of ' || (count(*) > 20)
	FROM (SELECT bt_index_check(c.oid, true) IS NOT NULL AS ok
		  FROM pg_class c JOIN pg_am a ON a.oid = c.relam
		  WHERE c.relkind = 'i' AND a.amname = 'btree'
			AND c.relnamespace = 'spool'::regnamespace) x}),
	'0 of true', 'bt_index_check passes on every btree index of schema spool');

# Retention on the restored spool, with a segment locked as pg_dump locks it:
# the drop times out, the promoter goes on, and drops it once the lock is gone.
cmp_ok(d_sql("SELECT count(*) FROM spool.segment_info WHERE hi <= $total"), '>=', 5,
	'the restored spool has several sealed segments');
my $promoter = d_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'spool promoter'");
my $locker = SpoolTest::Session->new($dst, 'locker');
$locker->query_ok('BEGIN');
$locker->query_ok('LOCK TABLE spool.entries_1 IN ACCESS SHARE MODE');
$log_offset = -s $dst->logfile;
d_sql("SELECT spool.drop_consumer('keep')");
$dst->wait_for_log(qr/spool segment 1 not dropped: another session holds a lock on it/, $log_offset);
pass('retention could not drop the locked segment 1');
is(d_sql("SELECT count(*) FROM spool.segment_info WHERE dropped_at IS NOT NULL"), '0',
	'nothing dropped while segment 1 is locked');
is(d_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'spool promoter'"), $promoter,
	'the promoter did not exit on the lock timeout');
$locker->query_ok('COMMIT');
$locker->quit;
poll_ok($dst, "SELECT dropped_at IS NOT NULL FROM spool.segment_info WHERE segment = 1",
	'segment 1 to be dropped once the lock is gone');
is(d_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'spool promoter'"), $promoter,
	'the same promoter dropped it');

note(sprintf('total test time %.1fs', time - $t_start));
$dst->stop;
done_testing();

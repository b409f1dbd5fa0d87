
# ALTER EXTENSION spool_ext UPDATE with a live pipeline (docs/operations.md,
# "Upgrading").
#
# Node "upgrade" starts on the library of release 0.1 (built from git history
# by scripts/test.sh, SPOOL_RELEASE_0_1) with the 0.1 catalog: a source on
# topic tu (4 partitions), the reference processor p, a sql target 'test'
# its outputs go to, a client lease and nonces of a basic-mode signer S1 and
# a worker-queue signer S2.  Messages stream in; the server restarts on the
# current library (the package upgrade):
#   - the workers wait, and say what to run, while the catalog is 0.1; the
#     0.1 SQL functions still answer through the new library;
#   - ALTER EXTENSION spool_ext UPDATE while messages keep coming; the
#     pipeline resumes: every (partition, offset) is in the spool once, the
#     outputs are the reference outputs once each, the sql target got each
#     once, and tokens and nonces only grow;
#   - the updated catalog (with its data) equals a fresh install's in
#     another database: functions, signatures, security settings, comments,
#     columns, indexes, constraints, triggers, grants, extension members and
#     the tables pg_dump saves;
#   - a catalog of another version than the library's stops the running
#     workers (as an update under a running older library would), and they
#     resume when it matches again;
#   - bt_index_check passes on every index of schema spool.
# Without SPOOL_RELEASE_0_1 (no git history) the 0.1 catalog starts on the
# current library, and the checks that need the old library are skipped.
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
use Time::HiRes qw(time);

my $t_start = time;
my $old = $ENV{SPOOL_RELEASE_0_1};
my $nparts = 4;
my $kafka = SpoolKafka->start(topics => ["tu:$nparts"]);
my $next_seq = 0;

sub produce
{
	my ($n) = @_;
	my $ans = $kafka->produce('tu', $n, -1, 100, $next_seq);
	die "produce $n from $next_seq: $ans" unless $ans eq "OK produced $n";
	$next_seq += $n;
}

my $node = PostgreSQL::Test::Cluster->new('upgrade', $old ? (install_path => $old) : ());
$node->init;
$node->append_conf('postgresql.conf', join('', map { "$_\n" }
	  "shared_preload_libraries = 'spool_ext'", "spool.database = 'postgres'",
	  'max_worker_processes = 32', 'max_connections = 40', "log_line_prefix = '%m [%p] %b '"));
$node->start;
sub sql { return $node->safe_psql($_[1] // 'postgres', $_[0]); }
my $workers = "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'spool %'"
  . " AND backend_type <> 'spool launcher'";

note($old ? "release 0.1 library: $old" : 'no release 0.1 library: the 0.1 catalog starts on the current library');
sql("CREATE EXTENSION spool_ext VERSION '0.1'");
is(sql("SELECT extversion FROM pg_extension WHERE extname = 'spool_ext'"), '0.1', 'the 0.1 catalog');

# The pipeline and the clients' state, made through the 0.1 SQL functions.
sql_target($node, 'test', '{"batch_interval": "5ms"}');
my $proc = processor_setup($node, $kafka->bootstrap, 'tu',
	options => '{"batch_size": 50, "checkpoint_every": 100}');
my $t1 = sql("SELECT (spool.lease_acquire('app:r1', 'a')).token");
my $ts1 = sql("SELECT (spool.lease_acquire('signer:S1', 'w1', '1 h')).token");
my @s1 = map { sql("SELECT spool.nonce_allocate('S1', 'w1', $ts1)") } 1 .. 3;
is("@s1", '0 1 2', 'S1 allocated nonces 0 .. 2 on the 0.1 catalog');
my $s2_next = 0;
produce(300);

SKIP:
{
	skip 'the release 0.1 library was not built', 5 unless $old;
	wait_processed($node, $proc, 300, 'release 0.1: the first 300');
	poll_ok($node, 'SELECT count(*) = 300 FROM delivered', 'release 0.1: 300 outputs delivered');
	my @s2 = map { sql("SELECT spool.nonce_request('S2', 'r$_')") } 1 .. 3;
	is("@s2", '0 1 2', 'release 0.1: S2 served nonces 0 .. 2 through the nonce workers');
	$s2_next = 3;

	# The package upgrade: new files, then the restart that loads the library.
	produce(200);
	poll_ok($node, 'SELECT count(*) > 300 FROM spool.entries', 'release 0.1: the next messages arriving');
	$node->stop('fast');
	$node->{_install_path} = undef;
	$node->start;
}
my $log_offset = $old ? 0 : -s $node->logfile;

# The current library and the 0.1 catalog: the workers wait.
$node->wait_for_log(
	qr/WARNING:  spool_ext workers wait: the library is version 0\.2, the extension in database "postgres" is version 0\.1\n.*HINT:  Run ALTER EXTENSION spool_ext UPDATE TO '0\.2' there/,
	$log_offset);
pass('the launcher says the workers wait for ALTER EXTENSION spool_ext UPDATE');
is(sql($workers), '0', 'no spool worker runs against the 0.1 catalog');
produce(200);
sql("SELECT spool.lease_release('app:r1', 'a', $t1)");
my $t2 = sql("SELECT (spool.lease_acquire('app:r1', 'b')).token");
cmp_ok($t2, '>', $t1, "0.1 catalog, current library: app:r1 granted again, token $t2 > $t1");
is(sql("SELECT spool.nonce_allocate('S1', 'w1', $ts1)"), '3',
	'0.1 catalog, current library: S1 continues at nonce 3');
is(sql($workers), '0', 'still no spool worker');

# The update, while messages keep coming.
sql('ALTER EXTENSION spool_ext UPDATE');
is(sql("SELECT extversion FROM pg_extension WHERE extname = 'spool_ext'"), '0.2', 'updated to 0.2');
produce(200);
my $total = $next_seq;
wait_processed($node, $proc, $total, "updated: all $total", 180);
spool_partitions_exact($node, $kafka, 'src', 'tu', $nparts, $total);
outputs_exact($node, $proc, $nparts, $total, 'updated');
tokens_ordered($node, $proc, 'updated');
poll_ok($node, "SELECT count(*) >= $total FROM delivered", "updated: $total outputs delivered");
is(sql("SELECT count(*) || ' ' || count(DISTINCT outbox_id) FROM delivered"), "$total $total",
	'updated: the sql target got each output once');
is(sql("SELECT spool.nonce_request('S2', 'r9')"), $s2_next,
	"updated: S2 continues at nonce $s2_next through the nonce workers");
sql("SELECT spool.lease_release('app:r1', 'b', $t2)");
my $t3 = sql("SELECT (spool.lease_acquire('app:r1', 'c')).token");
cmp_ok($t3, '>', $t2, "updated: app:r1 granted again, token $t3 > $t2");
is(sql("SELECT spool.nonce_allocate('S1', 'w1', $ts1)"), '4', 'updated: S1 continues at nonce 4');

# The updated catalog equals a fresh install's.
my $catalog = q{
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'spool_ext'),
rels AS (
	SELECT c.oid, c.relname, c.relkind FROM pg_class c
	WHERE c.relnamespace = 'spool'::regnamespace AND NOT c.relispartition
	  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'c', 'f')),
lines AS (
	SELECT format('function %s(%s) -> %s kind=%s secdef=%s config=%s volatile=%s strict=%s parallel=%s acl=%s lib=%s body=%s comment=%s',
			p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
			p.prokind, p.prosecdef, p.proconfig, p.provolatile, p.proisstrict, p.proparallel,
			p.proacl, p.probin, md5(p.prosrc), obj_description(p.oid, 'pg_proc')) AS l
	FROM pg_proc p WHERE p.pronamespace = 'spool'::regnamespace
	UNION ALL
	SELECT format('relation %s kind=%s persistence=%s options=%s acl=%s comment=%s view=%s',
			c.relname, c.relkind, c.relpersistence, c.reloptions, c.relacl,
			obj_description(c.oid, 'pg_class'),
			CASE WHEN c.relkind IN ('v', 'm') THEN md5(pg_get_viewdef(c.oid)) END)
	FROM rels r JOIN pg_class c ON c.oid = r.oid
	UNION ALL
	SELECT format('column %s.%s #%s %s notnull=%s default=%s identity=%s generated=%s acl=%s comment=%s',
			r.relname, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull,
			pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attacl,
			col_description(r.oid, a.attnum))
	FROM rels r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
	LEFT JOIN pg_attrdef d ON d.adrelid = r.oid AND d.adnum = a.attnum
	UNION ALL
	SELECT 'index ' || pg_get_indexdef(i.indexrelid)
	FROM rels r JOIN pg_index i ON i.indrelid = r.oid
	UNION ALL
	SELECT format('constraint %s on %s: %s', co.conname, r.relname, pg_get_constraintdef(co.oid))
	FROM rels r JOIN pg_constraint co ON co.conrelid = r.oid
	UNION ALL
	SELECT 'trigger ' || pg_get_triggerdef(t.oid)
	FROM rels r JOIN pg_trigger t ON t.tgrelid = r.oid AND NOT t.tgisinternal
	UNION ALL
	SELECT format('sequence %s %s start=%s min=%s max=%s inc=%s cycle=%s cache=%s',
			s.sequencename, s.data_type, s.start_value, s.min_value, s.max_value,
			s.increment_by, s.cycle, s.cache_size)
	FROM pg_sequences s WHERE s.schemaname = 'spool'
	UNION ALL
	SELECT format('type %s kind=%s labels=%s', t.typname, t.typtype,
			(SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid))
	FROM pg_type t WHERE t.typnamespace = 'spool'::regnamespace AND t.typtype IN ('e', 'd', 'r', 'm')
	UNION ALL
	SELECT 'member ' || pg_describe_object(dp.classid, dp.objid, dp.objsubid)
	FROM pg_depend dp, ext WHERE dp.refclassid = 'pg_extension'::regclass AND dp.refobjid = ext.oid
	  AND dp.deptype = 'e'
	UNION ALL
	SELECT format('dumped %s where %s', c::regclass, cond)
	FROM pg_extension x, unnest(x.extconfig, x.extcondition) AS u(c, cond)
	WHERE x.extname = 'spool_ext'
	UNION ALL
	SELECT format('schema acl=%s', n.nspacl) FROM pg_namespace n WHERE n.nspname = 'spool'
	UNION ALL
	SELECT format('extension %s %s', x.extversion, x.extrelocatable) FROM pg_extension x
	WHERE x.extname = 'spool_ext')
SELECT l FROM lines ORDER BY l COLLATE "C"};
sql('CREATE DATABASE fresh');
sql('CREATE EXTENSION spool_ext', 'fresh');
my $updated = sql($catalog);
my $fresh = sql($catalog, 'fresh');
cmp_ok(scalar(split /\n/, $fresh), '>', 300, 'the catalog listing covers the extension');
is($updated, $fresh, 'the updated catalog (with its data) equals a fresh install');

# A catalog of another version under running workers (what an update under a
# running older library looks like to it): they stop, and start again when
# it matches.
$log_offset = -s $node->logfile;
sql("UPDATE pg_extension SET extversion = '0.3' WHERE extname = 'spool_ext'");
$node->wait_for_log(
	qr/spool_ext workers wait: the library is version 0\.2, the extension in database "postgres" is version 0\.3/,
	$log_offset);
poll_ok($node, "SELECT ($workers) = 0", 'every spool worker to stop under the 0.3 catalog');
produce(100);
sql("UPDATE pg_extension SET extversion = '0.2' WHERE extname = 'spool_ext'");
$total = $next_seq;
wait_processed($node, $proc, $total, "0.2 again: all $total", 120);
spool_partitions_exact($node, $kafka, 'src', 'tu', $nparts, $total);
outputs_exact($node, $proc, $nparts, $total, '0.2 again');
poll_ok($node, "SELECT count(*) >= $total FROM delivered", "0.2 again: $total outputs delivered");
is(sql("SELECT count(*) || ' ' || count(DISTINCT outbox_id) FROM delivered"), "$total $total",
	'0.2 again: the sql target got each output once');

sql('CREATE EXTENSION amcheck');
is(sql(q{SELECT count(*) FILTER (WHERE NOT ok) || ' of ' || (count(*) > 20)
	FROM (SELECT bt_index_check(c.oid, true) IS NOT NULL AS ok
		  FROM pg_class c JOIN pg_am a ON a.oid = c.relam
		  WHERE c.relkind = 'i' AND a.amname = 'btree'
			AND c.relnamespace = 'spool'::regnamespace) x}),
	'0 of true', 'bt_index_check passes on every btree index of schema spool');

note(sprintf('total test time %.1fs', time - $t_start));
$node->stop;
done_testing();


# Processor operations on a running processor 'p' (test_handler, 2 replicas,
# batches of 50, lease 1 s):
#   (a) alter_processor while it runs: batch_size 7 and checkpoint_every 30
#       are picked up by both replicas in place (their log says so; the
#       batches committed afterwards hold at most 7 entries; snapshots are
#       written again), the committed cursor and the gate token never go
#       back, and the outputs stay exactly the reference across the change.
#       replicas 3, then 1, then 2: the running replicas follow the count.
#   (b) rewind_processor(p, C, 'suppress'): the state is rebuilt from the
#       processor's start; the snapshot written afterwards equals the one of
#       a fresh processor 'q' at the same cursor (state and hash), and no
#       output is written again.
#   (c) rewind_processor(p, C, 'emit') while the replicas run and entries
#       keep arriving: the outputs of the entries after C appear exactly once
#       more, those up to C are not written again, every row written after the
#       rewind carries a larger token than the rewind took, and every row
#       written before it belongs to the entries up to the old committed
#       cursor (no replica committed from a state of before the rewind).
#   (d) the handler's code is fixed (CREATE OR REPLACE) and p is rewound to
#       its start with 'suppress': the outputs after the rewind come from the
#       state the new code rebuilt from the spool; the earlier ones stay.
#   (e) attack: another spool_admin role can neither alter nor rewind p
#       (42501), and nothing changes.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm, SpoolProcessor.pm
use SpoolTest;
use SpoolKafka;
use SpoolProcessor;
use Test::More;

my $nparts = 4;
my $topic = 'ops';
my $kafka = SpoolKafka->start(topics => ["$topic:$nparts"]);
my $node = spool_node('proc_operations');

sub sql { return $node->safe_psql('postgres', $_[0]); }

my $proc = processor_setup($node, $kafka->bootstrap, $topic,
	nparts => $nparts,
	options => '{"replicas": 2, "batch_size": 50, "lease_ttl": "1 s"}');

my $next_seq = 0;

sub produce
{
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$kafka->produce_next($topic, $_[0], 100, \$next_seq);
}

# ---------------------------------------------------------------------------
# (a) alter while running
# ---------------------------------------------------------------------------
produce(200);
wait_processed($node, $proc, 200, 'before alter');
wait_gate($node, $proc, 2);
my ($c0, $tok0) = split /\|/,
  sql("SELECT committed_cursor, token FROM spool.processor_checkpoints WHERE processor = '$proc'");

my $p0 = replica_pids($node, $proc);
my $pids0 = join(',', map { "$_=$p0->{$_}" } sort keys %$p0);
my $log_offset = -s $node->logfile;
sql("SELECT spool.alter_processor('$proc', '{\"batch_size\": 7, \"checkpoint_every\": 30}')");
for my $r (1, 2)
{
	ok( $node->wait_for_log(
			qr/processor "$proc" replica $r now runs with batch_size 7, lease_ttl 1000 ms, checkpoint_every 30/,
			$log_offset),
		"replica $r reloaded its options in place");
}
is( sql("SELECT committed_cursor >= $c0 AND token = $tok0 FROM spool.processor_checkpoints"
		  . " WHERE processor = '$proc'"),
	't', 'alter: the checkpoint and the gate token stay');
my $p1 = replica_pids($node, $proc);
is(join(',', map { "$_=$p1->{$_}" } sort keys %$p1), $pids0, 'alter: the replicas were not restarted (same pids)');

produce(200);
wait_processed($node, $proc, 400, 'after alter');
is( sql("SELECT count(*) > 0 AND max(n) <= 7 FROM (SELECT count(*) AS n FROM spool.outbox"
		  . " WHERE processor = '$proc' AND cursor > $c0 GROUP BY token, cursor) b"),
	't', 'batches after the change hold at most 7 entries (one output per entry)');
poll_ok($node,
	"SELECT state_cursor > $c0 FROM spool.processor_checkpoints WHERE processor = '$proc'",
	'a snapshot after the change');
outputs_exact($node, $proc, $nparts, 400, 'across alter');

sql("SELECT spool.alter_processor('$proc', '{\"replicas\": 3}')");
poll_ok($node, "SELECT count(*) = 3 FROM spool.processor_status"
	  . " WHERE processor = '$proc' AND pid IS NOT NULL", 'replicas 3: a third replica runs');
wait_gate($node, $proc, 3);
sql("SELECT spool.alter_processor('$proc', '{\"replicas\": 1}')");
poll_ok($node, "SELECT count(*) = 1 FROM spool.processor_status"
	  . " WHERE processor = '$proc' AND pid IS NOT NULL", 'replicas 1: two replicas stopped');
wait_gate($node, $proc, 1);
produce(100);
wait_processed($node, $proc, 500, 'with one replica');
sql("SELECT spool.alter_processor('$proc', '{\"replicas\": 2, \"batch_size\": 50, \"checkpoint_every\": 100000}')");
wait_gate($node, $proc, 2, 'replicas 2: one active, one standby');
outputs_exact($node, $proc, $nparts, 500, 'across replica changes');
tokens_ordered($node, $proc, 'across replica changes');

# ---------------------------------------------------------------------------
# (b) rewind with 'suppress'
# ---------------------------------------------------------------------------
# A fresh processor over the same spool, for its state at the same cursor.
sql("SELECT spool.create_processor('q', 'test_handler(jsonb, spool.entries[])',"
	  . " jsonb_build_object('run_as', 'proc_owner', 'replicas', 1,"
	  . " 'handler', jsonb_build_object('partitions', $nparts)));"
	  . " SELECT spool.start_processor('q')");
my $head = sql("SELECT max(cursor) FROM spool.entries");
poll_ok($node, "SELECT state_cursor = $head AND state_hash IS NOT NULL"
	  . " FROM spool.processor_checkpoints WHERE processor = 'q'", "q: a snapshot at cursor $head");

my $c_mid = sql("SELECT cursor FROM spool.entries ORDER BY cursor OFFSET 150 LIMIT 1");
is(sql("SELECT spool.rewind_processor('$proc', $c_mid)"), '1', "rewind to $c_mid (suppress): epoch 1");
is( sql("SELECT replay_from, from_cursor, outputs FROM spool.processor_rewinds"
		  . " WHERE processor = '$proc' AND epoch = 1"),
	"0|$head|suppress", 'the rewind is recorded: replay from the start, old committed cursor');
poll_ok($node, "SELECT epoch = 1 AND state_cursor = $head AND state_hash IS NOT NULL"
	  . " FROM spool.processor_checkpoints WHERE processor = '$proc'",
	"p: a snapshot at $head rebuilt after the rewind");
is( sql("SELECT p.state = q.state AND p.state_hash = q.state_hash"
		  . " FROM spool.processor_checkpoints p, spool.processor_checkpoints q"
		  . " WHERE p.processor = '$proc' AND q.processor = 'q'"),
	't', 'suppress: the rebuilt state equals a fresh processor\'s at the same cursor');
is(sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc'"),
	'500', 'suppress: no output written again');
ok($node->log_contains(qr/processor "$proc" rewound to cursor $c_mid \(outputs suppress\)/, 0),
	'the rewind is in the log');
wait_gate($node, $proc, 2);
produce(40);
wait_processed($node, $proc, 540, 'after the suppress rewind');
outputs_exact($node, $proc, $nparts, 540, 'after the suppress rewind');

# ---------------------------------------------------------------------------
# (c) rewind with 'emit' while the replicas run and entries arrive
# ---------------------------------------------------------------------------
my $c_emit = sql("SELECT cursor FROM spool.entries ORDER BY cursor OFFSET 400 LIMIT 1");
produce(60);
is(sql("SELECT spool.rewind_processor('$proc', $c_emit, 'emit')"), '2',
	"rewind to $c_emit (emit) while running: epoch 2");
produce(60);
my ($from, $rtoken) = split /\|/, sql("SELECT from_cursor, token FROM spool.processor_rewinds"
	  . " WHERE processor = '$proc' AND epoch = 2");
wait_spooled($node, 660, 'emit');
my $entries_between = sql("SELECT count(*) FROM spool.entries WHERE cursor > $c_emit AND cursor <= $from");
my $want = 660 + $entries_between;
poll_ok($node, "SELECT count(*) = $want FROM spool.outbox WHERE processor = '$proc'",
	"emit: the $entries_between outputs after $c_emit up to $from written again (total $want)");
poll_ok($node, "SELECT committed_cursor = (SELECT max(cursor) FROM spool.entries)"
	  . " FROM spool.processor_checkpoints WHERE processor = '$proc'", 'emit: caught up');

# seq -> entry cursor; every output row as (key|seq|n, token, batch cursor).
my %cursor_of = map { split /\|/ } split /\n/,
  sql("SELECT value->>'seq', cursor FROM spool.entries WHERE source = 'src'");
my @rows = map { [ split /\|/ ] } split /\n/,
  sql("SELECT key || ':' || (payload->>'seq') || ':' || (payload->>'n'), payload->>'seq', token, cursor"
	  . " FROM spool.outbox WHERE processor = '$proc' ORDER BY id");
my (%count, $stale_after, $late_before, $low_after);
for my $r (@rows)
{
	my ($k, $seq, $token, $batch) = @$r;
	$count{$k}++;
	if ($token > $rtoken)
	{
		$low_after++ if $cursor_of{$seq} <= $c_emit;
	}
	else
	{
		$stale_after++ if $cursor_of{$seq} > $from || $batch > $from;
	}
}
my %n;
my ($wrong, $checked) = (0, 0);
for my $seq (0 .. $next_seq - 1)
{
	my $g = 'g' . ($seq % $nparts);
	my $k = "$g:$seq:" . ++$n{$g};
	my $expect = ($cursor_of{$seq} > $c_emit && $cursor_of{$seq} <= $from) ? 2 : 1;
	$checked++;
	$wrong++ if ($count{$k} // 0) != $expect;
}
is($wrong, 0, "emit: each of $checked outputs present once, twice if its entry is in ($c_emit, $from]");
is(scalar(keys %count), $next_seq, 'emit: no output outside the reference');
ok(!$low_after, "emit: no output of an entry up to $c_emit written after the rewind");
ok(!$stale_after, "emit: rows with the rewind's token or older all belong to entries up to $from");
tokens_ordered($node, $proc, 'across the rewinds');
is(sql("SELECT count(*) FROM spool.processor_status WHERE processor = '$proc' AND last_error LIKE '%diverged%'"),
	'0', 'no replica reported a diverged state');

# ---------------------------------------------------------------------------
# (d) a fixed handler and a 'suppress' rewind to the start: the new handler
#     counts by 2, so every output after the rewind must carry n = 2 x the
#     entry's rank in its group (a state rebuilt by the new code from the
#     spool); one computed from a replica's state of before the rewind would
#     carry rank + 1 or so.  The outputs already written stay as they were.
# ---------------------------------------------------------------------------
my $def = sql("SELECT pg_get_functiondef('test_handler(jsonb, spool.entries[])'::regprocedure)");
$def =~ s/::bigint, 0\) \+ 1;/::bigint, 0) + 2;/ or die "cannot patch test_handler";
sql($def);
my $k_before = sql("SELECT committed_cursor FROM spool.processor_checkpoints WHERE processor = '$proc'");
is(sql("SELECT spool.rewind_processor('$proc', 0)"), '3', 'fixed handler: rewind to the start (suppress)');
my $rtoken3 = sql("SELECT token FROM spool.processor_rewinds WHERE processor = '$proc' AND epoch = 3");
produce(40);
wait_spooled($node, 700, 'fixed handler');
poll_ok($node, "SELECT committed_cursor = (SELECT max(cursor) FROM spool.entries)"
	  . " FROM spool.processor_checkpoints WHERE processor = '$proc'", 'fixed handler: caught up');
is(sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc' AND token > $rtoken3"),
	'40', 'fixed handler: one output per new entry, none for the replayed range');
my %rank;
my %want_n;
for my $seq (0 .. $next_seq - 1)
{
	my $g = 'g' . ($seq % $nparts);
	$want_n{$seq} = 2 * ++$rank{$g};
}
my @after = map { [ split /\|/ ] } split /\n/,
  sql("SELECT payload->>'seq', payload->>'n' FROM spool.outbox"
	  . " WHERE processor = '$proc' AND token > $rtoken3");
is(scalar(grep { $_->[1] != $want_n{ $_->[0] } } @after), 0,
	'fixed handler: every output after the rewind comes from the rebuilt state (n = 2 x rank)');
is(sql("SELECT count(*) FROM spool.outbox WHERE processor = '$proc' AND token <= $rtoken3"),
	$want, 'fixed handler: the outputs written before the rewind are untouched (no correction)');

# ---------------------------------------------------------------------------
# (e) another role's processor
# ---------------------------------------------------------------------------
sql("CREATE ROLE intruder IN ROLE spool_admin");
my $before = sql("SELECT options::text || epoch || committed_cursor FROM spool.processors p"
	  . " JOIN spool.processor_checkpoints c ON c.processor = p.name WHERE p.name = '$proc'");
for my $call ("spool.alter_processor('$proc', '{\"replicas\": 1}')",
	"spool.rewind_processor('$proc', 0, 'emit')")
{
	my ($ret, $out, $err) = $node->psql('postgres', "SET ROLE intruder; SELECT $call");
	like($err, qr/must be a member of the owner of processor "$proc"/, "intruder: $call refused");
}
is( sql("SELECT options::text || epoch || committed_cursor FROM spool.processors p"
		  . " JOIN spool.processor_checkpoints c ON c.processor = p.name WHERE p.name = '$proc'"),
	$before, 'intruder: nothing changed');

$node->stop;
$kafka->stop;
done_testing();

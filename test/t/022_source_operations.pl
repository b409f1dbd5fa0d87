
# Operating a running source (docs/sources.md, "Operating a source"):
#   (1) alter_source while producing: the ingest worker is restarted with the
#       new options and nothing is lost or doubled: every offset of every
#       partition is in the spool exactly once.
#   (2) seek back with allow_rewind while staged rows wait for the promoter
#       (the promoter is held on the spool_state row lock): the seek is
#       applied only after those rows are durable, from the offset they
#       reached, and the range is spooled again exactly once more; the seek
#       is recorded with its from/to offsets and a LOG line.  Without
#       allow_rewind the same seek is refused and nothing changes.
#   (3) seek forward on a stopped source: the skipped offsets are a 'seek'
#       gap, the rest arrives once.
#   (4) seek by timestamp (resolved by the brokers) before the first start.
#   (5) dead-letter replay: refused by the old max_message_bytes (the dead
#       letter keeps the new error), then, after alter_source raised it, the
#       message is spooled once with a new cursor at the end and the dead
#       letter is marked replayed; a message that fails another check keeps
#       its new error.
#   (5b) dead-letter replay of a message Kafka no longer has (pushed below
#       the partition's log start by the test cluster's retention): the
#       entry is built once from the dead letter's key and payload
#       (replayed_from 'stored', NULL headers and kafka_ts); a dead letter
#       without a payload cannot be rebuilt and keeps a new error.
#   (6) partitions added to a topic while the source runs (the test
#       cluster's proxy shows 2 of 4 partitions, then all 4): the worker
#       picks them up without a restart and reads them from their log
#       start, so what was produced into them before they were seen
#       arrives too; every offset of every partition exactly once.
#   (7) another spool_admin cannot alter, seek or replay the source.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm, SpoolKafka.pm
use SpoolTest;
use SpoolKafka;
use SpoolIngest;
use Test::More;

my $kafka = SpoolKafka->start(topics => [ 'ops_a:2', 'ops_ts:1', 'ops_dl:1', 'ops_grow:4', 'ops_gone:1' ]);
my $bootstrap = $kafka->bootstrap;
# Through the proxy, ops_grow has 2 partitions until the test adds the
# others; the proxy also answers ListOffsets by timestamp, which the mock
# itself does not.
$kafka->cmd('partitions ops_grow 2');
my $proxy = $kafka->cmd('proxy') =~ s/^OK //r;
my $node = spool_node('source_operations',
	'spool.kafka_allowed_brokers' => "'127.0.0.1:*'");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub ingest_pid
{
	my ($source) = @_;
	return sql(
		"SELECT pid FROM pg_stat_activity WHERE application_name = 'spool ingest $source'");
}

sub produce_one
{
	my ($topic, $key, $value) = @_;
	my $ans = $kafka->cmd("produce_one $topic 0 $key $value");
	my ($off) = $ans =~ /^OK produced 1 0 (\d+)$/
	  or die "unexpected answer '$ans'";
	return $off;
}

############################################################################
# (1) alter_source while producing: exactly once across the restart.
############################################################################

sql(qq{SELECT spool.create_source('sa', '$bootstrap', ARRAY['ops_a'],
	'{"format": "json", "batch_ms": 20, "batch_size": 200}')});
sql(q{SELECT spool.start_source('sa')});
$kafka->produce('ops_a', 3000);
poll_ok($node, q{SELECT count(*) > 0 FROM spool.entries WHERE source = 'sa'},
	'sa: the first entries');
my $pid1 = ingest_pid('sa');
sql(q{SELECT spool.alter_source('sa', NULL, '{"batch_size": 50, "kafka": {"fetch.wait.max.ms": 20}}')});
$kafka->cmd('produce ops_a 3000 -1 200 3000');
poll_ok($node,
	qq{SELECT pid IS NOT NULL AND pid <> $pid1 FROM pg_stat_activity
	   WHERE application_name = 'spool ingest sa'},
	'sa: the ingest worker restarted with the new options');
spool_partitions_exact($node, $kafka, 'sa', 'ops_a', 2, 6000);
spool_seqs_match($node, 'sa', 2, 'generate_series(0, 5999)',
	'sa: every seq produced before and after alter_source is in the spool');
is(sql(q{SELECT options->>'batch_size' || ' ' || (options->'kafka'->>'fetch.wait.max.ms')
	FROM spool.sources WHERE name = 'sa'}), '50 20', 'sa: the new options are stored');

############################################################################
# (2) Seek back while rows are staged and not yet durable.
############################################################################

my ($low0, $high0) = $kafka->wmarks('ops_a', 0);
is($high0, 3000, 'ops_a [0] holds 3000 messages');

# Refused without allow_rewind; nothing changes.
my ($rc, $out, $err) = $node->psql('postgres',
	q{SELECT spool.seek_source('sa', 'ops_a', 0, 100)});
like($err, qr/would go back over spooled data/, 'a rewind without allow_rewind is refused');
is(sql(q{SELECT count(*) FROM spool.source_seeks}), '0', '... and nothing is recorded');
is(sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'sa' AND kafka_partition = 0}),
	'3000', '... and the offset is unchanged');

# Hold the promoter: it waits for the spool_state row while the worker keeps
# staging into the other table.
my $blocker = SpoolTest::Session->new($node, 'blocker');
$blocker->query_ok('BEGIN');
$blocker->query_ok('SELECT next_cursor FROM spool.spool_state FOR SHARE');
my $held_sql = q{SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
	JOIN pg_stat_activity a USING (pid)
	WHERE c.relname IN ('staging_0', 'staging_1') AND a.backend_type = 'spool promoter'
	  AND a.wait_event_type = 'Lock' AND l.granted};
poll_ok($node, "SELECT count(*) = 1 FROM ($held_sql) h",
	'the promoter holds one staging table and waits for the spool_state row');
my $active = sql($held_sql) eq 'staging_0' ? 'staging_1' : 'staging_0';
$kafka->cmd('produce ops_a 200 0 200 6000');
poll_ok($node,
	qq{SELECT count(*) = 200 FROM spool.$active WHERE source = 'sa' AND kafka_partition = 0},
	"sa: 200 more messages of [0] staged (in $active)");
is(sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'sa' AND kafka_partition = 0}),
	'3000', 'sa: ... and not durable (the promoter is held)');

my $log_offset = -s $node->logfile;
my $seek = sql(q{SELECT id || ' ' || to_offset || ' ' || state
	FROM spool.seek_source('sa', 'ops_a', 0, 2900, allow_rewind => true)});
like($seek, qr/^\d+ 2900 pending$/, 'the seek is recorded, pending');
my ($seek_id) = split / /, $seek;
poll_ok($node,
	q{SELECT count(*) = 1 FROM pg_stat_activity
	   WHERE application_name = 'spool ingest sa'
	     AND query = 'waiting for staged rows to be promoted'},
	'the restarted worker waits for the staged rows to be promoted');
is(sql(qq{SELECT state FROM spool.source_seeks WHERE id = $seek_id}), 'pending',
	'the seek waits while rows of the source are staged');
$blocker->query_ok('COMMIT');
$blocker->quit;

poll_ok($node, qq{SELECT state = 'applied' FROM spool.source_seeks WHERE id = $seek_id},
	'the seek to be applied');
is( sql(qq{SELECT from_offset || ' ' || to_offset || ' ' || direction || ' ' || requested_by::text
		FROM spool.source_seeks WHERE id = $seek_id}),
	'3200 2900 rewind ' . sql('SELECT current_user'),
	'the seek started from the offset the staged rows reached (3200), not the stale 3000');
poll_ok($node,
	q{SELECT next_offset = 3200 AND (SELECT count(*) FROM spool.entries
	   WHERE source = 'sa' AND kafka_partition = 0) = 3500
	   FROM spool.offsets WHERE source = 'sa' AND kafka_partition = 0},
	'sa [0]: 2900 .. 3199 spooled again');
is( sql(q{SELECT string_agg(n || 'x' || c, ' ' ORDER BY n) FROM (
		SELECT n, count(*) AS c FROM (SELECT kafka_offset, count(*) AS n FROM spool.entries
		  WHERE source = 'sa' AND kafka_partition = 0 GROUP BY kafka_offset) x GROUP BY n) y}),
	'1x2900 2x300',
	'sa [0]: offsets 0 .. 2899 once, 2900 .. 3199 exactly twice, nothing else');
is( sql(q{SELECT string_agg(prev || '->' || kafka_offset, ',') FROM (SELECT kafka_offset,
		lag(kafka_offset) OVER (ORDER BY cursor) AS prev
		FROM spool.entries WHERE source = 'sa' AND kafka_partition = 0) z
		WHERE kafka_offset <> prev + 1}),
	'3199->2900', 'sa [0]: in cursor order, offsets 0 .. 3199, then 2900 .. 3199 again');
ok($node->log_contains(qr/seek $seek_id of ops_a \[0\] from offset 3200 to 2900 \(rewind/, $log_offset),
	'the rewind is in the server log');
my ($l1, $high1) = $kafka->wmarks('ops_a', 1);
is(sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'sa' AND kafka_partition = 1}),
	$high1, 'sa [1] is untouched by the seek of [0]');

############################################################################
# (3) Seek forward on a stopped source: the skipped offsets are a gap.
############################################################################

sql(q{SELECT spool.stop_source('sa')});
poll_ok($node, q{SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'spool ingest sa'},
	'sa: the worker stopped');
$kafka->cmd('produce ops_a 100 1 200 7000');
my $skip_to = $high1 + 40;
like(sql(qq{SELECT state FROM spool.seek_source('sa', 'ops_a', 1, $skip_to)}),
	qr/^pending$/, 'forward seek of a stopped source is pending');
sql(q{SELECT spool.start_source('sa')});
poll_ok($node,
	qq{SELECT next_offset = $high1 + 100 FROM spool.offsets WHERE source = 'sa' AND kafka_partition = 1},
	'sa [1]: the messages after the seek');
is( sql(qq{SELECT from_offset || ' ' || to_offset || ' ' || action FROM spool.gaps
		WHERE source = 'sa' AND kafka_partition = 1}),
	"$high1 " . ($skip_to - 1) . ' seek', 'the skipped offsets are a gap with action seek');
is( sql(qq{SELECT count(*) || ' ' || min(kafka_offset) || ' ' || max(kafka_offset) FROM spool.entries
		WHERE source = 'sa' AND kafka_partition = 1 AND kafka_offset >= $high1}),
	"60 $skip_to " . ($high1 + 99), 'sa [1]: only the offsets after the seek, once each');
is( sql(qq{SELECT direction || ' ' || from_offset FROM spool.source_seeks
		WHERE source = 'sa' AND kafka_partition = 1}),
	"forward $high1", 'the forward seek is recorded');

############################################################################
# (4) Seek by timestamp, before the source's first start.
############################################################################

my $t0 = 1700000000000;
$kafka->cmd("produce_ts ops_ts 0 k$_ " . ($t0 + $_ * 1000) . " {\"i\":$_}") for 0 .. 9;
sql(qq{SELECT spool.create_source('st', '$proxy', ARRAY['ops_ts'])});
# Rolled back: only the resolution is looked at.
is( sql(qq{BEGIN; SELECT to_offset FROM spool.seek_source('st', 'ops_ts', 0,
		to_time => to_timestamp(($t0 + 99000) / 1000.0)); ROLLBACK}),
	'10', 'a time after the last message resolves to the end');
is( sql(q{BEGIN; SELECT to_offset FROM spool.seek_source('st', 'ops_ts', 0,
		to_time => to_timestamp(1700000004.000)); ROLLBACK}),
	'4', 'a time equal to a message timestamp resolves to that message');
is( sql(qq{SELECT to_offset FROM spool.seek_source('st', 'ops_ts', 0,
		to_time => to_timestamp(($t0 + 4500) / 1000.0))}),
	'5', 'a time resolves to the first offset at or after it');
($rc, $out, $err) = $node->psql('postgres',
	q{SELECT spool.seek_source('st', 'ops_ts', 0, 11)});
like($err, qr/is not in the log/, 'an offset past the end is refused');
($rc, $out, $err) = $node->psql('postgres',
	q{SELECT spool.seek_source('st', 'ops_ts', 3, 0)});
like($err, qr/has no partition 3/, 'a partition the topic lacks is refused');
sql(q{SELECT spool.start_source('st')});
poll_ok($node, q{SELECT next_offset = 10 FROM spool.offsets WHERE source = 'st'},
	'st: read to the end');
is( sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY cursor) FROM spool.entries
		WHERE source = 'st'}),
	'5,6,7,8,9', 'st: the partition starts at the time seeked to');
is( sql(q{SELECT state || ' ' || direction || ' ' || coalesce(from_offset::text, '-')
		FROM spool.source_seeks WHERE source = 'st'}),
	'applied forward -', 'st: one seek, applied before anything was stored');
is(sql(q{SELECT count(*) FROM spool.gaps WHERE source = 'st'}), '0',
	'st: no gap for a partition that had no position yet');

############################################################################
# (5) Dead-letter replay.
############################################################################

my $big = '{"pad":"' . ('z' x 1990) . '"}';
produce_one('ops_dl', 'k0', '{"i":0}');
produce_one('ops_dl', 'k1', $big);
produce_one('ops_dl', 'k2', '\big:3000');
produce_one('ops_dl', 'k3', '{"i":3}');
sql(qq{SELECT spool.create_source('sd', '$bootstrap', ARRAY['ops_dl'],
	'{"format": "json", "max_message_bytes": 1000}')});
sql(q{SELECT spool.start_source('sd')});
poll_ok($node, q{SELECT next_offset = 4 FROM spool.offsets WHERE source = 'sd'},
	'sd: all four offsets consumed');
is(sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY kafka_offset) FROM spool.dead_letters
	WHERE source = 'sd'}), '1,2', 'sd: the two oversized messages are dead letters');
my $dl1 = sql(q{SELECT id FROM spool.dead_letters WHERE source = 'sd' AND kafka_offset = 1});
my $dl2 = sql(q{SELECT id FROM spool.dead_letters WHERE source = 'sd' AND kafka_offset = 2});

# Replayed before the cause is fixed: it fails again and keeps the error.
sql(qq{SELECT spool.replay_dead_letter($dl1)});
poll_ok($node,
	qq{SELECT replay_requested_at IS NULL AND replay_attempts = 1 FROM spool.dead_letters WHERE id = $dl1},
	'sd: the first replay was tried');
like(sql(qq{SELECT error FROM spool.dead_letters WHERE id = $dl1}),
	qr/2000 bytes exceeds max_message_bytes \(1000\)/, 'it failed on the same check');
is(sql(q{SELECT count(*) FROM spool.entries WHERE source = 'sd'}), '2', 'nothing was spooled');

# Fix the cause, replay both.
sql(q{SELECT spool.alter_source('sd', NULL, '{"max_message_bytes": 100000}')});
sql(qq{SELECT spool.replay_dead_letter($dl1), spool.replay_dead_letter($dl2)});
poll_ok($node,
	qq{SELECT count(*) = 2 FROM spool.dead_letters WHERE id IN ($dl1, $dl2)
	   AND replay_requested_at IS NULL AND replay_attempts >= 1
	   AND (replay_cursor IS NOT NULL OR id = $dl2)},
	'sd: both replays done');
is( sql(qq{SELECT count(*) || ' ' || bool_and(e.cursor = d.replay_cursor)
			  || ' ' || bool_and(e.cursor > (SELECT max(cursor) FROM spool.entries x
				 WHERE x.source = 'sd' AND x.kafka_offset = 3))
			  || ' ' || bool_and(e.value->>'pad' = repeat('z', 1990))
		FROM spool.entries e JOIN spool.dead_letters d ON d.id = $dl1
		WHERE e.source = 'sd' AND e.kafka_offset = 1}),
	'1 true true true',
	'the replayed message is one entry, with a new cursor after the later offsets, and the dead letter points at it');
ok(sql(qq{SELECT replayed_at IS NOT NULL FROM spool.dead_letters WHERE id = $dl1}) eq 't',
	'the dead letter is marked replayed, not deleted');
is(sql(qq{SELECT replayed_from FROM spool.dead_letters WHERE id = $dl1}), 'kafka',
	'... from the message read again from Kafka');
like(sql(qq{SELECT error || ' ' || (replay_cursor IS NULL) FROM spool.dead_letters WHERE id = $dl2}),
	qr/invalid JSON.* true$/, 'the other message fails a later check: it keeps the new error');
is(sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'sd'}), '4',
	'replays do not move the offset');
($rc, $out, $err) = $node->psql('postgres', qq{SELECT spool.replay_dead_letter($dl1)});
like($err, qr/was replayed already/, 'a replayed dead letter is not replayed twice');
is(sql(q{SELECT count(*) FROM spool.entries WHERE source = 'sd'}), '3', 'sd: 3 entries in all');

############################################################################
# (5b) Replay of a dead letter whose message Kafka no longer has.
############################################################################

my $gone_value = 'not json {';
produce_one('ops_gone', 'kg', $gone_value);
produce_one('ops_gone', 'kb', '\big:5000');
sql(qq{SELECT spool.create_source('sgone', '$bootstrap', ARRAY['ops_gone'],
	'{"format": "json", "max_message_bytes": 3000, "on_gap": "continue"}')});
sql(q{SELECT spool.start_source('sgone')});
poll_ok($node, q{SELECT count(*) = 2 FROM spool.dead_letters WHERE source = 'sgone'},
	'sgone: offsets 0 (not JSON) and 1 (too large) are dead letters');
my $dlg = sql(q{SELECT id FROM spool.dead_letters WHERE source = 'sgone' AND kafka_offset = 0});
my $dlb = sql(q{SELECT id FROM spool.dead_letters WHERE source = 'sgone' AND kafka_offset = 1});
is(sql(qq{SELECT payload IS NOT NULL FROM spool.dead_letters WHERE id = $dlb}), 'f',
	'sgone: the too large one holds no payload');
# The test cluster keeps about 5 MiB per partition: 7.5 MB more pushes the
# oldest batches, offsets 0 and 1 among them, below the log start.
$kafka->cmd('produce ops_gone 5000 0 1500 100');
my ($glow) = $kafka->wmarks('ops_gone', 0);
cmp_ok($glow, '>', 1, "ops_gone [0]: offsets 0 and 1 are gone from Kafka (log start $glow)");
poll_ok($node, q{SELECT next_offset = 5002 FROM spool.offsets WHERE source = 'sgone'},
	'sgone: read to the end');
# Fix the cause of the first (bytes take anything), replay both.
sql(q{SELECT spool.alter_source('sgone', NULL, '{"format": "bytes"}')});
$log_offset = -s $node->logfile;
sql(qq{SELECT spool.replay_dead_letter($dlg), spool.replay_dead_letter($dlb)});
poll_ok($node,
	qq{SELECT count(*) = 2 FROM spool.dead_letters WHERE id IN ($dlg, $dlb)
	   AND replay_requested_at IS NULL AND replay_attempts = 1},
	'sgone: both replays tried');
is( sql(qq{SELECT count(*) || ' ' || bool_and(e.cursor = d.replay_cursor)
			  || ' ' || bool_and(e.payload = d.payload AND e.payload = '$gone_value'::bytea)
			  || ' ' || bool_and(e.key = 'kg'::bytea)
			  || ' ' || bool_and(e.headers IS NULL AND e.kafka_ts IS NULL AND e.value IS NULL)
			  || ' ' || d.replayed_from
		FROM spool.entries e JOIN spool.dead_letters d ON d.id = $dlg
		WHERE e.source = 'sgone' AND e.kafka_offset = 0 GROUP BY d.replayed_from}),
	'1 true true true true stored',
	'sgone: the gone message is one entry, built from the stored key and payload, without headers or Kafka timestamp');
is( sql(qq{SELECT (replay_cursor IS NULL) || ' ' || (replayed_from IS NULL) || ' ' || error
		FROM spool.dead_letters WHERE id = $dlb}),
	'true true message no longer in Kafka, and the dead letter holds no payload',
	'sgone: a gone message without a stored payload keeps a new error');
is(sql(q{SELECT count(*) FROM spool.entries WHERE source = 'sgone' AND kafka_offset < 2}), '1',
	'sgone: nothing else of offsets 0 and 1 in the spool');
ok($node->log_contains(qr/source "sgone": 2 dead letters replayed, 2 of them from their stored payload/,
		$log_offset),
	'the replay is in the server log');
is(sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'sgone'}), '5002',
	'sgone: replays do not move the offset');

############################################################################
# (6) Partitions added while the source runs.
############################################################################

sql(qq{SELECT spool.create_source('sg', '$proxy', ARRAY['ops_grow'],
	'{"batch_ms": 20, "kafka": {"topic.metadata.refresh.interval.ms": 1000}}')});
# Into all four partitions, before the source starts: 2 and 3 are not
# visible to it yet.
$kafka->produce('ops_grow', 2000);
sql(q{SELECT spool.start_source('sg')});
poll_ok($node, q{SELECT count(*) = 1000 FROM spool.entries WHERE source = 'sg'},
	'sg: the two visible partitions read');
is(sql(q{SELECT string_agg(kafka_partition::text, ',' ORDER BY kafka_partition)
	FROM spool.source_status WHERE source = 'sg'}), '0,1', 'sg: source_status shows 2 partitions');
my $gpid = ingest_pid('sg');
$log_offset = -s $node->logfile;
$kafka->cmd('partitions ops_grow 4');
$kafka->cmd('produce ops_grow 2000 -1 200 2000');
spool_partitions_exact($node, $kafka, 'sg', 'ops_grow', 4, 4000);
spool_seqs_match($node, 'sg', 4, 'generate_series(0, 3999)',
	'sg: every seq, from old and new partitions, is in the spool');
is(ingest_pid('sg'), $gpid, 'sg: the same worker picked the new partitions up (no restart)');
is(sql(q{SELECT string_agg(kafka_partition::text, ',' ORDER BY kafka_partition)
	FROM spool.source_status WHERE source = 'sg'}), '0,1,2,3', 'sg: source_status shows 4 partitions');
ok($node->log_contains(qr/source "sg": new partition ops_grow \[3\], read from offset 0/, $log_offset),
	'the new partitions are in the server log');

############################################################################
# (7) Another spool_admin cannot touch the source.
############################################################################

sql(q{CREATE ROLE ops_owner LOGIN IN ROLE spool_admin;
	CREATE ROLE ops_other LOGIN IN ROLE spool_admin});
$node->safe_psql('postgres',
	qq{SELECT spool.create_source('so', '$bootstrap', ARRAY['ops_dl'])}, extra_params => [ '-U', 'ops_owner' ]);
for my $call (q{SELECT spool.alter_source('so', NULL, '{"batch_size": 1}')},
	q{SELECT spool.seek_source('so', 'ops_dl', 0, 0)},
	q{SELECT spool.seek_source('sd', 'ops_dl', 0, 0, allow_rewind => true)},
	qq{SELECT spool.replay_dead_letter($dl2)})
{
	($rc, $out, $err) = $node->psql('postgres', $call, extra_params => [ '-U', 'ops_other' ]);
	like($err, qr/must be a member of the owner/, "another spool_admin: $call refused");
}
($rc, $out, $err) = $node->psql('postgres',
	q{SELECT spool.alter_source('so', NULL, '{"kafka": {"ssl.key.location": "/etc/ssl/private/x"}}')},
	extra_params => [ '-U', 'ops_owner' ]);
like($err, qr/only superusers may set Kafka property/, 'the owner cannot add a file property');
is(sql(q{SELECT config_version FROM spool.sources WHERE name = 'so'}), '0', 'so is unchanged');
is(sql(q{SELECT count(*) FROM spool.source_seeks WHERE source IN ('so', 'sd')}), '0',
	'no seek was recorded');

$node->stop;
$kafka->stop;
done_testing();

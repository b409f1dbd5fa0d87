
# I-4: nothing is silently dropped.
#   (1) Bad messages on a json source (invalid JSON, empty value, NULL value,
#       a value over max_message_bytes, ...) interleaved with good ones on one
#       partition: each bad one is one dead letter with a sensible error and
#       its offset, each good one is one entry, entries and dead letters
#       together cover every offset once, next_offset is past the last, and
#       the stream goes on.  Valid JSON that shares a batch with invalid JSON
#       stays valid; JSON that is not valid UTF-8 is refused.  A text source
#       refuses invalid UTF-8 and keeps other text byte for byte.
#   (2) A retention hole with on_gap 'stop': the source is stopped, the
#       partition's log start moves past the stored offset, start_source: a
#       'stopped' gap row [stored next_offset, low - 1], a WARNING, the source
#       disabled with stopped_reason 'gap ...', next_offset unchanged; a
#       second start_source accepts the gap and continues from the log start,
#       every offset from low to high is in the spool exactly once.
#   (3) The same with on_gap 'continue': a 'continued' gap row, the source
#       never stops (same worker process), entries exact after the hole.
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
	topics => [ 'bad_j:1', 'bad_n:1', 'bad_u:1', 'bad_t:1', 'gap_s:1', 'gap_c:1' ]);
my $bootstrap = $kafka->bootstrap;
my $node = spool_node('ingest_bad_gaps');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# produce_one, checking the offset it got.
sub produce_one
{
	my ($topic, $key, $value, $want_offset) = @_;
	my $ans = $kafka->cmd("produce_one $topic 0 $key $value");
	my ($off) = $ans =~ /^OK produced 1 0 (\d+)$/
	  or die "unexpected answer '$ans'";
	die "$topic: expected offset $want_offset, got $off"
	  if defined $want_offset && $off != $want_offset;
	return $off;
}

# poll_ok with a shorter bound (seconds) than the framework's default, for
# waits that should take a few seconds; shows the source's state on failure.
sub poll_source
{
	my ($secs, $query, $what, $source) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $ok = poll_within($node, $secs, $query, $what);
	$ok
	  or diag "source $source: "
	  . sql(qq{SELECT row_to_json(s)::text || ' ' || coalesce((SELECT row_to_json(o)::text
		FROM spool.offsets o WHERE o.source = s.source), '')
		FROM spool.source_status s WHERE source = '$source'});
	return $ok;
}

sub ingest_pid
{
	my ($source) = @_;
	return sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'spool ingest $source'");
}

############################################################################
# (1) Bad messages on a json source.
############################################################################

my $exact = '{"i":8,"pad":"' . ('y' x (1000 - 16)) . '"}';    # 1000 bytes
die 'length' unless length($exact) == 1000;
# [key, value, bad?, error pattern]
my @msgs = (
	[ 'k0', '{"i":0}', 0 ],
	[ 'k1', '{"i":', 1, qr/invalid JSON/ ],
	[ 'k2', '{"i":2}', 0 ],
	[ 'k3', '\empty', 1, qr/JSON|empty/i ],
	[ 'k4', "{\"i\":4, \"s\":\"h\xc3\xa9\"}", 0 ],
	[ 'k5', '\null', 1, qr/null value|tombstone/ ],
	[ '\null', '{"i":6}', 0 ],
	[ 'k7', '\big:5000', 1, qr/5000.*max_message_bytes.*1000/ ],
	[ 'k8', $exact, 0 ],
	[ 'k9', '{"s":"\u0000"}', 1, qr/invalid JSON/ ],
	[ 'k10', 'not json', 1, qr/invalid JSON/ ],
	[ 'k11', '{"i":11,"nested":{"a":[1,2,{"b":null}]}}', 0 ],
	[ 'k12', '{"a":1} trailing', 1, qr/invalid JSON/ ],
	[ 'k13', '"just a string"', 0 ],
);
# Produced before the source starts: they arrive in one batch.
produce_one('bad_j', $msgs[$_][0], $msgs[$_][1], $_) for 0 .. $#msgs;
my $n = scalar @msgs;

sql(qq{SELECT spool.create_source('bj', '$bootstrap', ARRAY['bad_j'],
	'{"format": "json", "max_message_bytes": 1000}')});
sql(q{SELECT spool.start_source('bj')});
poll_ok($node,
	qq{SELECT next_offset = $n FROM spool.offsets WHERE source = 'bj'},
	"bj: next_offset to reach $n");

for my $i (0 .. $#msgs)
{
	my ($key, $value, $bad, $pat) = @{ $msgs[$i] };
	my $in_entries = sql(qq{SELECT count(*) FROM spool.entries
		WHERE source = 'bj' AND kafka_offset = $i});
	my @dl = split /\n/, sql(qq{SELECT error FROM spool.dead_letters
		WHERE source = 'bj' AND kafka_offset = $i});
	(my $show = substr($value, 0, 30)) =~ s/[^\x20-\x7e]/?/g;
	if ($bad)
	{
		is($in_entries, 0, "bj offset $i ($show): not in entries");
		is(scalar(@dl), 1, "bj offset $i ($show): one dead letter");
		like($dl[0] // '', $pat, "bj offset $i: error '" . ($dl[0] // '') . "'");
	}
	else
	{
		is($in_entries, 1, "bj offset $i ($show): one entry");
		is(scalar(@dl), 0, "bj offset $i: no dead letter");
	}
}
unlike(sql(q{SELECT error FROM spool.dead_letters WHERE source = 'bj' AND kafka_offset = 3}),
	qr/tombstone/, 'an empty value is not reported as a NULL value');
is( sql(q{SELECT convert_from(payload, 'UTF8') FROM spool.dead_letters
		WHERE source = 'bj' AND kafka_offset = 1}),
	'{"i":', 'the invalid JSON is kept as the dead letter payload');
is( sql(q{SELECT convert_from(key, 'UTF8') || '|' || topic || '|' || kafka_partition
		FROM spool.dead_letters WHERE source = 'bj' AND kafka_offset = 10}),
	'k10|bad_j|0', 'a dead letter keeps key, topic and partition');
is( sql(q{SELECT payload IS NULL FROM spool.dead_letters
		WHERE source = 'bj' AND kafka_offset = 7}),
	't', 'the oversized value is not kept');
is( sql(q{SELECT value->>'i' || '|' || convert_from(key, 'UTF8') FROM spool.entries
		WHERE source = 'bj' AND kafka_offset = 2}),
	'2|k2', 'a good message is an entry with its value and key');
is( sql(q{SELECT (key IS NULL) || '|' || (value->>'i') FROM spool.entries
		WHERE source = 'bj' AND kafka_offset = 6}),
	'true|6', 'a message without a key is an entry with a NULL key');
is( sql(q{SELECT value->>'s' FROM spool.entries WHERE source = 'bj' AND kafka_offset = 4}),
	"h\xc3\xa9", 'UTF-8 text in a JSON value is kept');
is( sql(q{SELECT length(value::text) >= 1000 AND value->>'i' = '8'
		FROM spool.entries WHERE source = 'bj' AND kafka_offset = 8}),
	't', 'a value of exactly max_message_bytes is accepted');
is( sql(q{SELECT value #>> '{}' FROM spool.entries WHERE source = 'bj' AND kafka_offset = 13}),
	'just a string', 'a JSON scalar is a valid value');
is( sql(qq{SELECT count(*) || '|' || count(DISTINCT o) || '|' || min(o) || '|' || max(o) FROM (
		SELECT kafka_offset o FROM spool.entries WHERE source = 'bj'
		UNION ALL SELECT kafka_offset FROM spool.dead_letters WHERE source = 'bj') x}),
	"$n|$n|0|" . ($n - 1), 'entries and dead letters together hold every offset once');

# The stream goes on after bad messages.
produce_one('bad_j', 'k14', '{"i":14}', 14);
produce_one('bad_j', 'k15', '{"i":', 15);
produce_one('bad_j', 'k16', '{"i":16}', 16);
poll_ok($node, q{SELECT next_offset = 17 FROM spool.offsets WHERE source = 'bj'},
	'bj: next_offset to pass the later messages');
is( sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY cursor) FROM spool.entries
		WHERE source = 'bj' AND kafka_offset >= 14}),
	'14,16', 'bj: later good messages are entries');
is( sql(q{SELECT count(*) FROM spool.dead_letters WHERE source = 'bj' AND kafka_offset = 15}),
	'1', 'bj: a later bad message is a dead letter');
is(sql(q{SELECT enabled FROM spool.sources WHERE name = 'bj'}), 't',
	'bj: the source is still enabled');
is(sql(q{SELECT state FROM spool.source_status WHERE source = 'bj'}), 'running',
	'bj: the source still runs');

# Valid JSON in a batch with invalid JSON stays valid; JSON with bytes that
# are not UTF-8 is refused (the database must not store invalid text).
produce_one('bad_n', 'n0', '{"x":', 0);
produce_one('bad_n', 'n1', '{"n":1e400}', 1);
produce_one('bad_n', 'n2', "{\"s\":\"\xff\xfe\"}", 2);
produce_one('bad_n', 'n3', '{"n":123456789012345678901234567890}', 3);
produce_one('bad_n', 'n4', '{"ok":true}', 4);
sql(qq{SELECT spool.create_source('bn', '$bootstrap', ARRAY['bad_n'], '{"format": "json"}')});
sql(q{SELECT spool.start_source('bn')});
poll_ok($node, q{SELECT next_offset = 5 FROM spool.offsets WHERE source = 'bn'},
	'bn: next_offset to reach 5');
is( sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY kafka_offset)
		FROM spool.dead_letters WHERE source = 'bn'}),
	'0,2', 'bn: dead letters are the invalid JSON and the non-UTF-8 JSON')
  or diag sql(q{SELECT kafka_offset, error FROM spool.dead_letters WHERE source = 'bn'});
is( sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY kafka_offset)
		FROM spool.entries WHERE source = 'bn'}),
	'1,3,4', 'bn: 1e400 and a big integer are valid JSON values (jsonb keeps numeric)');
is( sql(q{SELECT (value->>'n')::numeric = 123456789012345678901234567890
		FROM spool.entries WHERE source = 'bn' AND kafka_offset = 3}),
	't', 'bn: the big integer is kept exactly');

# The same non-UTF-8 JSON in a batch where everything else is valid JSON.
produce_one('bad_u', 'u0', '{"a":0}', 0);
produce_one('bad_u', 'u1', "{\"s\":\"\xff\xfe\"}", 1);
produce_one('bad_u', 'u2', "{\"s\":\"caf\xe9\"}", 2);
produce_one('bad_u', 'u3', '{"a":3}', 3);
sql(qq{SELECT spool.create_source('bu', '$bootstrap', ARRAY['bad_u'], '{"format": "json"}')});
sql(q{SELECT spool.start_source('bu')});
poll_ok($node, q{SELECT next_offset = 4 FROM spool.offsets WHERE source = 'bu'},
	'bu: next_offset to reach 4');
is( sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY kafka_offset)
		FROM spool.dead_letters WHERE source = 'bu'}),
	'1,2', 'bu: JSON that is not valid UTF-8 is a dead letter, also in an otherwise valid batch')
  or diag sql(q{SELECT kafka_offset, encode(textsend(value::text), 'hex')
		FROM spool.entries WHERE source = 'bu'});
is( sql(q{SELECT string_agg(kafka_offset::text, ',' ORDER BY kafka_offset)
		FROM spool.entries WHERE source = 'bu'}),
	'0,3', 'bu: the valid JSON messages are entries');

# A text source: invalid UTF-8 is refused, other text kept byte for byte.
produce_one('bad_t', 't0', 'hello', 0);
produce_one('bad_t', 't1', "bad \xff\xfe bytes", 1);
produce_one('bad_t', 't2', "h\xc3\xa9llo", 2);
produce_one('bad_t', 't3', '\empty', 3);
produce_one('bad_t', 't4', "\xc3", 4);
produce_one('bad_t', 't5', '\null', 5);
produce_one('bad_t', 't6', '{"not":"parsed"', 6);
sql(qq{SELECT spool.create_source('bt', '$bootstrap', ARRAY['bad_t'], '{"format": "text"}')});
sql(q{SELECT spool.start_source('bt')});
poll_ok($node, q{SELECT next_offset = 7 FROM spool.offsets WHERE source = 'bt'},
	'bt: next_offset to reach 7');
is( sql(q{SELECT string_agg(kafka_offset || ':' || error, ',' ORDER BY kafka_offset)
		FROM spool.dead_letters WHERE source = 'bt' AND kafka_offset IN (1, 4)}),
	'1:invalid UTF-8 text,4:invalid UTF-8 text', 'bt: invalid UTF-8 goes to dead letters');
is( sql(q{SELECT encode(payload, 'hex') FROM spool.dead_letters
		WHERE source = 'bt' AND kafka_offset = 1}),
	unpack('H*', "bad \xff\xfe bytes"), 'bt: the refused bytes are kept in the dead letter');
is( sql(q{SELECT count(*) FROM spool.dead_letters WHERE source = 'bt' AND kafka_offset = 5}),
	'1', 'bt: the NULL value is a dead letter');
is( sql(q{SELECT string_agg(kafka_offset || ':' || encode(payload, 'hex'), ',' ORDER BY kafka_offset)
		FROM spool.entries WHERE source = 'bt'}),
	join(',', '0:' . unpack('H*', 'hello'), '2:' . unpack('H*', "h\xc3\xa9llo"), '3:',
		'6:' . unpack('H*', '{"not":"parsed"')),
	'bt: valid text (also empty, also not JSON) is kept byte for byte in payload');
is( sql(q{SELECT count(*) FROM spool.entries WHERE source = 'bt' AND value IS NOT NULL}),
	'0', 'bt: a text source fills payload, not value');

############################################################################
# Retention holes.
############################################################################

# Make a hole behind the stored offset of $topic [0] while $source is
# stopped; returns (low, high).
sub make_hole
{
	my ($source, $topic) = @_;
	sql("SELECT spool.stop_source('$source')");
	poll_ok($node,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'spool ingest $source'",
		"$source: the ingest worker to exit after stop_source");
	is(sql("SELECT next_offset FROM spool.offsets WHERE source = '$source'"),
		100, "$source: next_offset is 100 while stopped");
	$kafka->cmd("produce $topic 30000 0 200 100");
	my ($low, $high) = $kafka->wmarks($topic, 0);
	cmp_ok($low, '>', 100, "$topic [0]: the log start moved past 100 (OK $low $high)");
	is($high, 30100, "$topic [0]: high watermark 30100");
	return ($low, $high);
}

# Every offset 0 .. 99 and low .. high - 1 of $source is in the spool once.
sub check_after_hole
{
	my ($source, $low, $high) = @_;
	my $want = 100 + $high - $low;
	is( sql(qq{SELECT count(*) || '|' || count(DISTINCT kafka_offset) FROM spool.entries
			WHERE source = '$source'}),
		"$want|$want", "$source: $want entries, each offset once");
	is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = '$source'
			AND (kafka_offset BETWEEN 0 AND 99 OR kafka_offset BETWEEN $low AND $high - 1)}),
		$want, "$source: they are exactly offsets 0 .. 99 and $low .. " . ($high - 1));
	is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = '$source'
			AND (value->>'seq')::bigint <> kafka_offset}),
		'0', "$source: each entry is the message produced at its offset");
	is(sql(qq{SELECT count(*) FROM spool.dead_letters WHERE source = '$source'}),
		'0', "$source: no dead letters");
}

############################################################################
# (2) on_gap 'stop'
############################################################################

$kafka->cmd('produce gap_s 100 0 200 0');
sql(qq{SELECT spool.create_source('gs', '$bootstrap', ARRAY['gap_s'], '{}')});
is(sql(q{SELECT options->>'on_gap' FROM spool.sources WHERE name = 'gs'}),
	'stop', "gs: on_gap defaults to 'stop'");
sql(q{SELECT spool.start_source('gs')});
poll_ok($node, q{SELECT next_offset = 100 FROM spool.offsets WHERE source = 'gs'},
	'gs: the first 100 messages to be ingested');
my ($low_s, $high_s) = make_hole('gs', 'gap_s');

my $log_offset = -s $node->logfile;
sql(q{SELECT spool.start_source('gs')});
poll_ok($node, q{SELECT count(*) > 0 FROM spool.gaps WHERE source = 'gs'},
	'gs: a gap row');
is( sql(q{SELECT topic || '|' || kafka_partition || '|' || from_offset || '|' || to_offset
		|| '|' || action FROM spool.gaps WHERE source = 'gs'}),
	'gap_s|0|100|' . ($low_s - 1) . '|stopped',
	'gs: one gap row [100, low - 1], action stopped');
poll_ok($node, q{SELECT NOT enabled FROM spool.sources WHERE name = 'gs'},
	'gs: the source to be disabled');
like(sql(q{SELECT stopped_reason FROM spool.sources WHERE name = 'gs'}),
	qr/^gap/, 'gs: stopped_reason starts with "gap"');
poll_ok($node,
	q{SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = 'spool ingest gs'},
	'gs: the ingest worker to exit');
is(sql(q{SELECT next_offset FROM spool.offsets WHERE source = 'gs'}),
	'100', 'gs: next_offset did not move');
is(sql(q{SELECT count(*) || '|' || max(kafka_offset) FROM spool.entries WHERE source = 'gs'}),
	'100|99', 'gs: nothing was ingested past the gap');
is(sql(q{SELECT state FROM spool.source_status WHERE source = 'gs'}), 'stopped',
	'gs: source_status says stopped');
ok( $node->log_contains(
		qr/WARNING:.*source "gs": retention gap in gap_s \[0\], offsets 100 to ${\($low_s - 1)} are gone/,
		$log_offset),
	'gs: the server log has the WARNING');

# Starting again accepts the gap.
sql(q{SELECT spool.start_source('gs')});
poll_source(60, qq{SELECT next_offset = $high_s FROM spool.offsets WHERE source = 'gs'},
	"gs: ingestion to resume and reach $high_s", 'gs');
check_after_hole('gs', $low_s, $high_s);
is( sql(q{SELECT count(*) FROM spool.gaps WHERE source = 'gs'
		AND (action <> 'continued' OR from_offset <> 100 OR to_offset <> }
		  . ($low_s - 1) . q{) AND action <> 'stopped'}),
	'0', 'gs: any further gap row is the same hole, continued');
is(sql(q{SELECT count(*) FROM spool.gaps WHERE source = 'gs' AND action = 'stopped'}),
	'1', 'gs: the hole stopped the source once');
is( sql(q{SELECT enabled || '|' || coalesce(stopped_reason, '') || '|' || skip_gap
		FROM spool.sources WHERE name = 'gs'}),
	'true||false', 'gs: enabled, no stopped_reason, the gap acceptance is used up');

############################################################################
# (3) on_gap 'continue'
############################################################################

$kafka->cmd('produce gap_c 100 0 200 0');
sql(qq{SELECT spool.create_source('gc', '$bootstrap', ARRAY['gap_c'],
	'{"on_gap": "continue"}')});
sql(q{SELECT spool.start_source('gc')});
poll_ok($node, q{SELECT next_offset = 100 FROM spool.offsets WHERE source = 'gc'},
	'gc: the first 100 messages to be ingested');
my ($low_c, $high_c) = make_hole('gc', 'gap_c');

$log_offset = -s $node->logfile;
sql(q{SELECT spool.start_source('gc')});
poll_ok($node,
	q{SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'spool ingest gc'},
	'gc: the ingest worker to start');
my $pid_c = ingest_pid('gc');
my $continued = poll_source(60, qq{SELECT next_offset = $high_c FROM spool.offsets WHERE source = 'gc'},
	"gc: ingestion to continue past the hole to $high_c", 'gc');
is( sql(q{SELECT topic || '|' || kafka_partition || '|' || from_offset || '|' || to_offset
		|| '|' || action FROM spool.gaps WHERE source = 'gc'}),
	'gap_c|0|100|' . ($low_c - 1) . '|continued',
	'gc: one gap row [100, low - 1], action continued');
check_after_hole('gc', $low_c, $high_c);
is( sql(q{SELECT enabled || '|' || coalesce(stopped_reason, '') FROM spool.sources
		WHERE name = 'gc'}),
	'true|', 'gc: the source is enabled, without a stopped_reason');
is(ingest_pid('gc'), $pid_c, 'gc: the same ingest worker ran throughout (never stopped)');
is(sql(q{SELECT state FROM spool.source_status WHERE source = 'gc'}), 'running',
	'gc: source_status says running');
ok( $node->log_contains(
		qr/WARNING:.*source "gc": retention gap in gap_c \[0\], offsets 100 to ${\($low_c - 1)} are gone/,
		$log_offset),
	'gc: the server log has the WARNING');

# The stream goes on after the hole.
SKIP:
{
skip 'gc did not get past the hole', 2 unless $continued;
$kafka->cmd("produce gap_c 10 0 200 $high_c");
poll_source(60,
	q{SELECT next_offset = } . ($high_c + 10) . q{ FROM spool.offsets WHERE source = 'gc'},
	'gc: later messages are ingested', 'gc');
is(sql(q{SELECT count(*) FROM spool.gaps WHERE source = 'gc'}), '1', 'gc: still one gap row');
}

$node->stop;
$kafka->stop;
done_testing();

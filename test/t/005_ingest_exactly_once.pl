
# I-1 (exactly once into the spool) for a json source on a 4-partition topic
# fed in several produce commands while the source runs:
#   - every (topic, partition, offset) is in the spool exactly once, and per
#     partition the offsets are 0 .. high - 1 without holes;
#   - every produced seq is there exactly once, on partition seq % 4, with
#     its key "k<seq>" and the JSON value the mock produced;
#   - cursors are 1 .. N without holes and, within a partition, follow the
#     Kafka offsets (and the producer's order);
#   - spool.offsets.next_offset is the high watermark of every partition and
#     spool.source_status shows lag 0 and state 'running'.
# Then the other formats: a 'text' source (payload filled, value NULL, bad
# UTF-8 to the dead letters), a 'bytes' source (payload byte for byte, also
# bad UTF-8) and messages with headers (entries.headers is a JSON object,
# key is bytea, kafka_ts is set).  Last, values large enough for TOAST in
# several rounds: staging keeps its pages when it is emptied (and truncates
# its TOAST table), and every round's values arrive whole.
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

my $kafka = SpoolKafka->start(
	topics => [ 'eo_json:4', 'eo_text:2', 'eo_bytes:2', 'eo_hdr:1', 'eo_big:1' ]);
my $bootstrap = $kafka->bootstrap;
my $node = spool_node('ingest_exactly_once');

sub sql { return $node->safe_psql('postgres', $_[0]); }

# Wait until $source has ingested $n entries (bounded), then check that the
# spool holds exactly the offsets 0 .. high - 1 of every partition of
# $topic, once each, and that the stored next offsets are the high marks.
sub check_offsets_exact
{
	my ($source, $topic, $nparts, $n) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;

	spool_partitions_exact($node, $kafka, $source, $topic, $nparts, $n);
	is(sql("SELECT count(*) FROM spool.dead_letters WHERE source = '$source'"),
		'0', "$source: no dead letters");
	is(sql("SELECT count(*) FROM spool.gaps WHERE source = '$source'"),
		'0', "$source: no gaps");
}

# Cursors of the whole spool are 1 .. N.
sub check_cursors
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my ($n, $min, $max, $segs) = split /\|/, sql(
		'SELECT count(*), coalesce(min(cursor), 0), coalesce(max(cursor), 0),'
		  . ' count(DISTINCT tableoid) FROM spool.entries');
	is("$min $max", ($n > 0 ? 1 : 0) . " $n",
		"$what: the $n cursors are 1 .. $n without holes");
	note "$what: entries in $segs segment(s)";
}

# ---------------------------------------------------------------------------
# The json source, 4 partitions, fed while it runs.
# ---------------------------------------------------------------------------
sql(qq{SELECT spool.create_source('eo', '$bootstrap', ARRAY['eo_json'],
	'{"batch_size": 500, "batch_ms": 20}')});
is(sql(q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'spool ingest eo'}),
	'0', 'a created source has no ingest worker (created disabled)');
sql("SELECT spool.start_source('eo')");
poll_ok($node,
	q{SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'spool ingest eo'},
	'the ingest worker of eo to start');
poll_ok($node,
	q{SELECT count(*) = 4 FROM spool.source_status WHERE source = 'eo' AND state = 'running'},
	'eo to run with its 4 partitions');

my ($M, $chunks) = (20000, 5);
my $per = $M / $chunks;
for my $c (0 .. $chunks - 1)
{
	is($kafka->produce('eo_json', $per, -1, 200, $c * $per),
		"OK produced $per", "produce chunk $c (seq " . ($c * $per) . ' ..)');
	# Let some of it in before the next chunk, so batches interleave with
	# produce commands.
	poll_ok($node,
		'SELECT count(*) > ' . ($c * $per) . q{ FROM spool.entries WHERE source = 'eo'},
		"eo to ingest part of chunk $c") if $c < $chunks - 1;
}

check_offsets_exact('eo', 'eo_json', 4, $M);
check_cursors('after the json source');

# Every seq exactly once, with its key and the value the mock produced.
is( sql(qq{SELECT count(*) || ' ' || count(DISTINCT (value->>'seq')::bigint)
	FROM spool.entries WHERE source = 'eo'}),
	"$M $M", "each of the $M seqs is in the spool once");
is( sql(qq{SELECT count(*) FROM generate_series(0, $M - 1) s
	WHERE NOT EXISTS (SELECT 1 FROM spool.entries e WHERE e.source = 'eo'
	                  AND (e.value->>'seq')::bigint = s)}),
	'0', "every seq 0 .. " . ($M - 1) . ' is present');
my $bad = sql(qq{SELECT count(*) FROM spool.entries e WHERE source = 'eo' AND NOT (
	e.key = convert_to('k' || (e.value->>'seq'), 'UTF8')
	AND e.value->>'key' = 'k' || (e.value->>'seq')
	AND (e.value->>'amount')::int = (e.value->>'seq')::bigint % 1000
	AND e.kafka_partition = (e.value->>'seq')::bigint % 4
	AND jsonb_typeof(e.value->'ts') = 'number'
	AND e.value->>'pad' ~ '^x+\$'
	AND (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(e.value) k)
	    = ARRAY['amount', 'key', 'pad', 'seq', 'ts']
	AND octet_length(e.value::text) BETWEEN 150 AND 260
	AND e.payload IS NULL AND e.kafka_ts IS NOT NULL)});
is($bad, '0', 'every entry has key k<seq>, partition seq % 4 and the produced value')
  or diag sql(qq{SELECT cursor, kafka_partition, kafka_offset, encode(key, 'escape'), value
	FROM spool.entries WHERE source = 'eo' ORDER BY cursor LIMIT 3});
is( sql(qq{SELECT count(*) FROM (SELECT (value->>'seq')::bigint AS seq,
	lag((value->>'seq')::bigint) OVER (PARTITION BY kafka_partition ORDER BY kafka_offset) AS prev
	FROM spool.entries WHERE source = 'eo') x WHERE seq <> prev + 4}),
	'0', 'within a partition, offsets follow the produced seq order (seq += 4)');
is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = 'eo'
	AND kafka_offset <> (value->>'seq')::bigint / 4}),
	'0', 'seq i is at offset i / 4 of partition i % 4');

# Status: caught up and running.
poll_ok($node,
	q{SELECT count(*) = 4 FROM spool.source_status WHERE source = 'eo'
	    AND lag = 0 AND state = 'running' AND high_watermark = next_offset},
	'source_status of eo to show lag 0, state running, next_offset = high_watermark');
is( sql(q{SELECT string_agg(kafka_partition || ':' || next_offset || '/' || high_watermark
	|| '/' || lag, ' ' ORDER BY kafka_partition) FROM spool.source_status WHERE source = 'eo'}),
	join(' ', map { "$_:" . ($M / 4) . '/' . ($M / 4) . '/0' } 0 .. 3),
	'source_status per partition: next_offset/high_watermark/lag');
is( sql(q{SELECT count(*) FROM spool.source_status WHERE source = 'eo'
	AND pid = (SELECT pid FROM pg_stat_activity WHERE application_name = 'spool ingest eo')}),
	'4', 'source_status shows the pid of the running ingest worker');

# ---------------------------------------------------------------------------
# A reader holds both staging tables: the promoter cannot empty them, so
# promoted rows stay there and are promoted again with the new ones, which
# must insert each offset once.  Once the reader is gone, staging empties.
# ---------------------------------------------------------------------------
my $reader = SpoolTest::Session->new($node, 'staging reader');
$reader->query_ok('BEGIN');
$reader->query_ok('LOCK TABLE spool.staging_0, spool.staging_1 IN ACCESS SHARE MODE');
my $M2 = $M + 8000;
is($kafka->produce('eo_json', 8000, -1, 200, $M), 'OK produced 8000',
	'produce 8000 more while a reader holds the staging tables');
poll_ok($node, "SELECT count(*) = $M2 FROM spool.entries WHERE source = 'eo'",
	"eo: $M2 entries with the staging tables held");
ok(sql(q{SELECT count(*) FROM spool.staging WHERE source = 'eo'}) > 0,
	'promoted rows are still in staging while the reader holds it');
check_offsets_exact('eo', 'eo_json', 4, $M2);
check_cursors('after promotions with staging held');
$reader->query_ok('COMMIT');
$reader->quit;
poll_ok($node, q{SELECT count(*) = 0 FROM spool.staging},
	'staging to be emptied once the reader is gone');
check_offsets_exact('eo', 'eo_json', 4, $M2);

# ---------------------------------------------------------------------------
# text, bytes and headers.
# ---------------------------------------------------------------------------
sql(qq{SELECT spool.create_source('eo_t', '$bootstrap', ARRAY['eo_text'],
	'{"format": "text", "batch_ms": 10}')});
sql(qq{SELECT spool.create_source('eo_b', '$bootstrap', ARRAY['eo_bytes'],
	'{"format": "bytes", "batch_ms": 10}')});
sql(qq{SELECT spool.create_source('eo_h', '$bootstrap', ARRAY['eo_hdr'],
	'{"batch_ms": 10}')});
sql(q{SELECT spool.start_source(s) FROM unnest(ARRAY['eo_t', 'eo_b', 'eo_h']) s});
poll_ok($node,
	q{SELECT count(*) = 5 FROM spool.source_status
	   WHERE source IN ('eo_t', 'eo_b', 'eo_h') AND state = 'running'},
	'the text, bytes and headers sources to run');

my $NT = 1000;
$kafka->produce('eo_text', $NT);
$kafka->produce('eo_bytes', $NT);
# Odd ones, one by one: partition 0 after the produced ones.
my %one;
for my $m (
	[ 'eo_text', 'plain text, not JSON!', 'tk1' ],
	[ 'eo_text', "caf\xc3\xa9 \xe2\x82\xac", 'tk2' ],     # UTF-8
	[ 'eo_text', '\empty', 'tk3' ],
	[ 'eo_bytes', "\xff\xfe\x80 raw \x01\x7f", 'bk1' ],    # not UTF-8
	[ 'eo_bytes', '\empty', 'bk2' ],
	[ 'eo_bytes', '{"a": 1}', '\null' ])
{
	my ($topic, $val, $key) = @$m;
	my $ans = $kafka->cmd("produce_one $topic 0 $key $val");
	like($ans, qr/^OK produced 1 0 \d+$/, "produce_one $topic $key");
	my ($off) = $ans =~ /(\d+)$/;
	$one{"$topic|$key"} = [ $off, $val ];
}
# Bad UTF-8 into the text source: a dead letter, not an entry.
my $ans = $kafka->cmd("produce_one eo_text 1 tbad \xff\xfe not utf8");
my ($bad_off) = $ans =~ /^OK produced 1 1 (\d+)$/;
ok(defined $bad_off, "produced invalid UTF-8 to eo_text [1] at offset $bad_off");

my @hdr_ans;
push @hdr_ans, $kafka->cmd('produce_hdr eo_hdr 0 hk1 trace=abc-123,tenant=t7 {"h":1}');
push @hdr_ans, $kafka->cmd('produce_hdr eo_hdr 0 hk2 flag,n=2 {"h":2}');
push @hdr_ans, $kafka->cmd('produce_hdr eo_hdr 0 \null dup=1 {"h":3}');
push @hdr_ans, $kafka->cmd('produce_one eo_hdr 0 hk4 {"h":4}');
is_deeply(\@hdr_ans, [ map { "OK produced 1 0 $_" } 0 .. 3 ],
	'produced 4 messages to eo_hdr [0] at offsets 0 .. 3');

my $NTT = $NT + 3;    # text entries (the bad one is a dead letter)
my $NBB = $NT + 3;
poll_ok($node, "SELECT count(*) = $NTT FROM spool.entries WHERE source = 'eo_t'",
	"eo_t: $NTT entries");
poll_ok($node, "SELECT count(*) = $NBB FROM spool.entries WHERE source = 'eo_b'",
	"eo_b: $NBB entries");
poll_ok($node, q{SELECT count(*) = 4 FROM spool.entries WHERE source = 'eo_h'},
	'eo_h: 4 entries');
poll_ok($node,
	q{SELECT count(*) = 1 FROM spool.dead_letters WHERE source = 'eo_t'},
	'eo_t: the invalid UTF-8 message to be a dead letter');

for my $t ([ 'eo_t', 'eo_text' ], [ 'eo_b', 'eo_bytes' ])
{
	my ($s, $topic) = @$t;
	is( sql(qq{SELECT count(*) FROM spool.entries WHERE source = '$s'
		AND (value IS NOT NULL OR payload IS NULL)}),
		'0', "$s: value is NULL and payload is filled in every entry");
	is( sql(qq{SELECT count(*) FROM (SELECT 1 FROM spool.entries WHERE source = '$s'
		GROUP BY topic, kafka_partition, kafka_offset HAVING count(*) > 1) d}),
		'0', "$s: no offset twice");
	is( sql(qq{SELECT count(*) FROM spool.entries
		WHERE source = '$s' AND key IS NOT NULL AND key <> ''::bytea
		  AND encode(key, 'escape') ~ '^k[0-9]+\$'
		  AND convert_from(payload, 'UTF8')::jsonb->>'key' = encode(key, 'escape')
		  AND (convert_from(payload, 'UTF8')::jsonb->>'seq')::int % 2 = kafka_partition}),
		$NT, "$s: the $NT produced JSON texts are payloads, byte for byte valid, with their keys");
	is( sql(qq{SELECT count(DISTINCT convert_from(payload, 'UTF8')::jsonb->>'seq')
		FROM spool.entries WHERE source = '$s' AND encode(key, 'escape') ~ '^k[0-9]+\$'}),
		$NT, "$s: seqs 0 .. " . ($NT - 1) . ' once each');
}
# Partition 1 of eo_text ends with the bad message: the offsets of the
# entries and the dead letter together are 0 .. high - 1.
for my $t ([ 'eo_t', 'eo_text' ], [ 'eo_b', 'eo_bytes' ])
{
	my ($s, $topic) = @$t;
	for my $p (0, 1)
	{
		my ($low, $high) = $kafka->wmarks($topic, $p);
		is( sql(qq{SELECT count(*) || ' ' || count(DISTINCT o) || ' ' || min(o) || ' ' || max(o)
			FROM (SELECT kafka_offset o FROM spool.entries WHERE source = '$s' AND kafka_partition = $p
			      UNION ALL SELECT kafka_offset FROM spool.dead_letters
			      WHERE source = '$s' AND kafka_partition = $p) x}),
			"$high $high 0 " . ($high - 1),
			"$s [$p]: entries and dead letters hold offsets 0 .. " . ($high - 1) . ' once each');
		poll_ok($node,
			"SELECT next_offset = $high FROM spool.offsets WHERE source = '$s' AND kafka_partition = $p",
			"$s [$p]: stored next_offset to reach $high");
	}
}

# The one-by-one messages, byte for byte.
sub one_row
{
	my ($s, $topic, $key) = @_;
	my $off = $one{"$topic|$key"}[0];
	return sql(qq{SELECT coalesce(encode(key, 'hex'), 'NULL') || ' '
		|| coalesce(encode(payload, 'hex'), 'NULL') || ' ' || coalesce(value::text, 'NULL')
		FROM spool.entries WHERE source = '$s' AND kafka_partition = 0 AND kafka_offset = $off});
}
sub hex_of { my $v = shift; return $v eq '\empty' ? '' : unpack('H*', $v); }
for my $k ('tk1', 'tk2', 'tk3')
{
	is(one_row('eo_t', 'eo_text', $k),
		unpack('H*', $k) . ' ' . hex_of($one{"eo_text|$k"}[1]) . ' NULL',
		"eo_t: text message $k stored byte for byte in payload");
}
is(sql(qq{SELECT convert_from(payload, 'UTF8') FROM spool.entries
	WHERE source = 'eo_t' AND key = 'tk2'::bytea}),
	"caf\xc3\xa9 \xe2\x82\xac", 'eo_t: UTF-8 text reads back');
for my $k ('bk1', 'bk2')
{
	is(one_row('eo_b', 'eo_bytes', $k),
		unpack('H*', $k) . ' ' . hex_of($one{"eo_bytes|$k"}[1]) . ' NULL',
		"eo_b: bytes message $k stored byte for byte in payload");
}
is(one_row('eo_b', 'eo_bytes', '\null'),
	'NULL ' . unpack('H*', '{"a": 1}') . ' NULL', 'eo_b: a message without key has key NULL');
is( sql(qq{SELECT kafka_offset || ' ' || encode(key, 'escape') || ' ' || error
	FROM spool.dead_letters WHERE source = 'eo_t'}),
	"$bad_off tbad invalid UTF-8 text", 'eo_t: the dead letter has offset, key and reason');
is(sql(q{SELECT encode(payload, 'hex') FROM spool.dead_letters WHERE source = 'eo_t'}),
	unpack('H*', "\xff\xfe not utf8"), 'eo_t: the dead letter keeps the payload');

# Headers.
is( sql(q{SELECT string_agg(kafka_offset || ' ' || coalesce(encode(key, 'escape'), 'NULL') || ' '
	|| coalesce(headers::text, 'NULL') || ' ' || coalesce(jsonb_typeof(headers), 'NULL') || ' '
	|| value::text, E'\n' ORDER BY kafka_offset) FROM spool.entries WHERE source = 'eo_h'}),
	join("\n",
		'0 hk1 {"trace": "abc-123", "tenant": "t7"} object {"h": 1}',
		'1 hk2 {"n": "2", "flag": null} object {"h": 2}',
		'2 NULL {"dup": "1"} object {"h": 3}',
		'3 hk4 NULL NULL {"h": 4}'),
	'eo_h: headers as a JSON object (a header without value is null), keys as bytea');
is(sql(q{SELECT pg_typeof(key)::text FROM spool.entries WHERE source = 'eo_h' LIMIT 1}),
	'bytea', 'entries.key is bytea');
is( sql(q{SELECT count(*) FROM spool.entries WHERE source IN ('eo_h', 'eo_t', 'eo_b')
	AND (kafka_ts IS NULL OR kafka_ts < now() - interval '1 hour'
	     OR kafka_ts > now() + interval '1 minute' OR kafka_ts > spooled_at + interval '1 minute')}),
	'0', 'kafka_ts is set, recent and not after spooled_at');
is( sql(q{SELECT count(*) FROM spool.entries WHERE source = 'eo'
	AND abs(extract(epoch FROM kafka_ts) * 1000 - (value->>'ts')::numeric) > 60000}),
	'0', 'eo: kafka_ts is the produce time (within a minute of the value ts)');

# JSON values are the jsonb jsonb_in makes, for documents with
# repeated keys (the last one wins), key order, numbers, escapes, nesting,
# UTF-8, whitespace, scalars at the top.
my @docs = (
	'{"b":1,"a":2,"b":3,"a":{"y":[1,2.50,-0,1e3,1E-2],"x":null}}',
	'{"s":"plain","e":"esc\\"aped \\u00e9 \\n","n":123456789012345678901234567890.5}',
	'[1,{"k":true,"k":false},"x",[],{}]',
	'{"":"","aa":1,"b":2,"a":3,"":4}',
	'"just a string"',
	'42',
	'{"deep":[[[[[[{"a":1,"a":[]}]]]]]]}',
	"{\"u\":\"caf\xc3\xa9 \xe2\x98\x83\"}",
	"{ \"a\" :\t1 ,\"b\":[ true , false ,null ] }  ");
my $first_doc;
for my $d (@docs)
{
	my $ans = $kafka->cmd("produce_one eo_hdr 0 jdoc $d");
	my ($off) = $ans =~ /^OK produced 1 0 (\d+)$/;
	$first_doc //= $off;
}
my $ndocs = scalar @docs;
poll_ok($node,
	"SELECT count(*) = $ndocs FROM spool.entries WHERE source = 'eo_h' AND key = 'jdoc'::bytea",
	"eo_h: the $ndocs JSON documents");
for my $i (0 .. $#docs)
{
	my $off = $first_doc + $i;
	is( sql(qq{SELECT value = d AND value::text = d::text
		FROM spool.entries, (SELECT \$jdoc\$$docs[$i]\$jdoc\$::jsonb AS d) x
		WHERE source = 'eo_h' AND kafka_offset = $off}),
		't', "eo_h: document $i is stored as jsonb_in makes it");
}

# ---------------------------------------------------------------------------
# Values stored out of line in staging (random hex does not compress), in
# rounds with a promotion between them: the emptied staging table keeps its
# pages and empties its TOAST table, and no round sees another's values.
# ---------------------------------------------------------------------------
sql(qq{SELECT spool.create_source('eo_g', '$bootstrap', ARRAY['eo_big'], '{"batch_ms": 10}')});
sql("SELECT spool.start_source('eo_g')");
my %big;
for my $round (0 .. 3)
{
	my $produced = 0;
	for my $i (0 .. 9)
	{
		my $n = $round * 10 + $i;
		my $hex = join('', map { sprintf('%04x', int(rand(65536))) } 1 .. 1500);
		$big{$n} = $hex;
		$produced++
		  if $kafka->cmd(qq{produce_one eo_big 0 g$n {"n": $n, "r": "$hex"}}) =~
		  /^OK produced 1 0 $n$/;
	}
	is($produced, 10, "eo_big: round $round, 10 values of 6000 hex digits at their offsets");
	my $upto = ($round + 1) * 10;
	poll_ok($node, "SELECT count(*) = $upto FROM spool.entries WHERE source = 'eo_g'",
		"eo_g: round $round promoted");
}
my $wrong = 0;
for my $n (sort { $a <=> $b } keys %big)
{
	$wrong++ unless sql(qq{SELECT value->>'r' FROM spool.entries
		WHERE source = 'eo_g' AND (value->>'n')::int = $n}) eq $big{$n};
}
is($wrong, 0, 'eo_g: each of the 40 large values is in the spool whole, at its own offset');
is(sql(q{SELECT count(*) || '/' || count(DISTINCT kafka_offset) FROM spool.entries WHERE source = 'eo_g'}),
	'40/40', 'eo_g: 40 entries, one per offset');
poll_ok($node,
	q{SELECT (SELECT count(*) FROM spool.staging) = 0
	    AND pg_relation_size('spool.staging_0') + pg_relation_size('spool.staging_1') > 0
	    AND (SELECT sum(pg_relation_size(reltoastrelid)) FROM pg_class
	         WHERE oid IN ('spool.staging_0'::regclass, 'spool.staging_1'::regclass)) = 0},
	'staging empty, with its pages kept and its TOAST tables emptied');

check_cursors('at the end');
is( sql(q{SELECT count(*) FROM (SELECT kafka_offset, lag(kafka_offset)
	OVER (PARTITION BY source, topic, kafka_partition ORDER BY cursor) AS prev
	FROM spool.entries) x WHERE kafka_offset <= prev}),
	'0', 'all sources: within a partition, cursor order is offset order');
poll_ok($node,
	q{SELECT count(*) = 10 FROM spool.source_status WHERE lag = 0 AND state = 'running'},
	'all 5 sources (10 partitions) caught up and running');

$node->stop;
$kafka->stop;
done_testing();

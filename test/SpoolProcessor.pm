
# Shared helpers for the processor TAP tests.
#
#   processor_setup($node, $bootstrap, $topic, %opts)
#       a role 'proc_owner' (member of spool_admin) the handler runs as, a
#       table test_faults, the reference handler test_handler, the outbox
#       target 'test' its outputs go to (kind notify, channel spool_test;
#       kept if it exists), a json source 'src' on $topic (started) and a
#       processor (created and started).
#   reference_outputs($nparts, $nseq)
#       the outputs test_handler must produce for seqs 0 .. $nseq - 1 of the
#       mock's topic with $nparts partitions, computed from the input alone.
#   outputs_exact($node, $processor, $nparts, $nseq, $what)
#       the outbox holds exactly the reference outputs: none lost, none
#       duplicated, and per key in outbox order.
#   wait_processed($node, $processor, $nseq, $what [, $secs])
#       all $nseq produced entries are in the spool, committed, one output each
#   tokens_ordered($node, $processor, $what)
#       the writer's token never decreases in outbox id order
#   active_pid / wait_gate / replica_pids / committed_cursor
#
# test_handler folds entries of the mock's JSON ({"seq": i, ...}, i on
# partition i % nparts) into per-group counts, group 'g' || (seq % nparts),
# and emits one output per entry: key = group, payload {seq, n} where n is
# the entry's rank in its group.  Within a group the spool order is the
# partition's offset order, which is seq order, so the expected outputs
# follow from the produced seqs without looking at the spool.
#
# Faults: a row (seq, replica) in test_faults makes the handler raise when
# it meets that seq, in that replica (NULL: in every replica).  With handler
# setting {"nondeterministic": true} the state also records the replica
# number, so replicas' states differ.
package SpoolProcessor;

use strict;
use warnings;

use Exporter 'import';
use Test::More;
use SpoolTest;

our @EXPORT = qw(processor_setup reference_outputs outputs_exact active_pid
  wait_gate replica_pids committed_cursor wait_spooled wait_processed tokens_ordered);

our $HANDLER = q{
CREATE TABLE test_faults (seq int NOT NULL, replica int);
CREATE FUNCTION test_handler(state jsonb, entries spool.entries[])
RETURNS spool.step LANGUAGE plpgsql AS $$
DECLARE
	e spool.entries;
	g text;
	n bigint;
	seq int;
	outs spool.output[] := '{}';
	fault record;
	parts int := coalesce((spool.handler_settings()->>'partitions')::int, 4);
BEGIN
	FOR fault IN SELECT * FROM public.test_faults LOOP
		IF EXISTS (SELECT 1 FROM unnest(entries) x WHERE (x.value->>'seq')::int = fault.seq)
		   AND (fault.replica IS NULL OR fault.replica = spool.current_replica()) THEN
			RAISE EXCEPTION 'injected fault at seq % in replica %', fault.seq, spool.current_replica();
		END IF;
	END LOOP;
	FOREACH e IN ARRAY entries LOOP
		seq := (e.value->>'seq')::int;
		g := 'g' || (seq % parts);
		n := coalesce((state->>g)::bigint, 0) + 1;
		state := jsonb_set(state, ARRAY[g], to_jsonb(n));
		outs := outs || ROW('test', g, jsonb_build_object('seq', seq, 'n', n))::spool.output;
	END LOOP;
	IF coalesce((spool.handler_settings()->>'nondeterministic')::boolean, false) THEN
		state := jsonb_set(state, '{replica}', to_jsonb(spool.current_replica()));
	END IF;
	RETURN ROW(state, outs)::spool.step;
END $$;
CREATE ROLE proc_owner;
GRANT spool_admin TO proc_owner;
GRANT SELECT ON test_faults TO proc_owner;
GRANT EXECUTE ON FUNCTION test_handler(jsonb, spool.entries[]) TO proc_owner;
};

# %opts: processor (name, default 'p'), nparts (4), options (a JSON object
# text merged into the processor options), settings (handler settings JSON),
# start (start the processor, default 1).
sub processor_setup
{
	my ($node, $bootstrap, $topic, %opts) = @_;
	my $proc = $opts{processor} // 'p';
	my $nparts = $opts{nparts} // 4;
	my $extra = $opts{options} // '{}';
	my $settings = $opts{settings} // '{}';

	$node->safe_psql('postgres', $HANDLER);
	# Outputs to a target that does not exist fail the batch.
	$node->safe_psql('postgres',
		"SELECT spool.create_target('test', 'notify', '{\"channel\": \"spool_test\"}')"
		  . " WHERE NOT EXISTS (SELECT FROM spool.outbox_status WHERE target = 'test')");
	$node->safe_psql('postgres',
		"SELECT spool.create_source('src', '$bootstrap', '{$topic}', '{\"batch_ms\": 20}');"
		  . " SELECT spool.start_source('src');");
	$node->safe_psql('postgres',
		"SELECT spool.create_processor('$proc', 'test_handler(jsonb, spool.entries[])',"
		  . " jsonb_build_object('run_as', 'proc_owner', 'handler',"
		  . " '$settings'::jsonb || jsonb_build_object('partitions', $nparts))"
		  . " || '$extra'::jsonb)");
	$node->safe_psql('postgres', "SELECT spool.start_processor('$proc')")
	  if $opts{start} // 1;
	return $proc;
}

# "key|seq|n" for every output, per group in seq order.
sub reference_outputs
{
	my ($nparts, $nseq) = @_;
	my @out;
	my %n;
	for my $seq (0 .. $nseq - 1)
	{
		my $g = 'g' . ($seq % $nparts);
		push @out, "$g|$seq|" . ++$n{$g};
	}
	return @out;
}

sub outputs_exact
{
	my ($node, $proc, $nparts, $nseq, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my @got = split /\n/, $node->safe_psql('postgres',
		"SELECT key || '|' || (payload->>'seq') || '|' || (payload->>'n')"
		  . " FROM spool.outbox WHERE processor = '$proc' ORDER BY id");
	my @ref = reference_outputs($nparts, $nseq);
	my (%seen, @dups);
	for (@got) { push @dups, $_ if $seen{$_}++; }
	is(scalar(@got), scalar(@ref), "$what: $nseq outputs");
	is(scalar(@dups), 0, "$what: no output twice")
	  or diag("duplicates: @dups[0 .. ($#dups < 9 ? $#dups : 9)]");
	my %ref = map { $_ => 1 } @ref;
	my @missing = grep { !$seen{$_} } @ref;
	my @extra = grep { !$ref{$_} } @got;
	is(scalar(@missing) + scalar(@extra), 0,
		"$what: the outputs are the reference outputs")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)];"
		  . " unexpected: @extra[0 .. ($#extra < 9 ? $#extra : 9)]");
	# Per key, outbox order is seq order.
	my (%last, $disorder);
	for (@got)
	{
		my ($g, $seq) = split /\|/;
		$disorder++ if defined $last{$g} && $seq <= $last{$g};
		$last{$g} = $seq;
	}
	ok(!$disorder, "$what: per key, outputs are in input order");
}

sub active_pid
{
	my ($node, $proc) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM spool.processor_status WHERE processor = '$proc' AND role = 'active'");
}

# Wait until $proc has one active replica and $n - 1 standbys (bounded).
sub wait_gate
{
	my ($node, $proc, $n, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$n //= 2;
	return poll_ok($node,
		"SELECT count(*) FILTER (WHERE role = 'active') = 1"
		  . " AND count(*) FILTER (WHERE role = 'standby') = $n - 1"
		  . " FROM spool.processor_status WHERE processor = '$proc'",
		$what // "$proc: one active and " . ($n - 1) . " standby replica(s)");
}

sub committed_cursor
{
	my ($node, $proc) = @_;
	return $node->safe_psql('postgres',
		"SELECT committed_cursor FROM spool.processor_checkpoints WHERE processor = '$proc'");
}

# Wait until the $nseq produced entries are in the spool (source 'src').
sub wait_spooled
{
	my ($node, $nseq, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return poll_ok($node,
		"SELECT count(*) = $nseq FROM spool.entries WHERE source = 'src'",
		"$what: all $nseq entries in the spool");
}

# Wait until the $nseq produced entries are in the spool and $proc committed
# every entry with one output each: bounded by $secs, or the framework's
# default timeout.
sub wait_processed
{
	my ($node, $proc, $nseq, $what, $secs) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	wait_spooled($node, $nseq, $what);
	my $q = "SELECT c.committed_cursor >= (SELECT max(cursor) FROM spool.entries)"
	  . " AND (SELECT count(*) FROM spool.outbox WHERE processor = '$proc') = $nseq"
	  . " FROM spool.processor_checkpoints c WHERE c.processor = '$proc'";
	return defined $secs
	  ? poll_within($node, $secs, $q, "$what: $proc processed all $nseq entries")
	  : poll_ok($node, $q, "$what: $proc processed all $nseq entries");
}

sub tokens_ordered
{
	my ($node, $proc, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return is(
		$node->safe_psql('postgres',
			"SELECT count(*) FROM (SELECT token, lag(token) OVER (ORDER BY id) AS prev"
			  . " FROM spool.outbox WHERE processor = '$proc') x WHERE token < prev"),
		'0', "$what: the writer token is non-decreasing in outbox id order");
}

# { replica => pid } of the running replicas.
sub replica_pids
{
	my ($node, $proc) = @_;
	my %p = map { split /\|/ } split /\n/, $node->safe_psql('postgres',
		"SELECT replica, pid FROM spool.processor_status"
		  . " WHERE processor = '$proc' AND pid IS NOT NULL");
	return \%p;
}

1;

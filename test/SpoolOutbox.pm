
# Shared helpers for the outbox TAP tests (docs/outbox.md).
#
#   sql_target($node, $target, $options_json, %o)
#       a sql target whose function public.deliver_<target> inserts one row
#       per call into a table (default 'delivered'):
#         seq (bigserial: the order of the calls), outbox_id, key, payload,
#         pid (the delivering backend) and worker (its application_name).
#       %o: table, pre (PL/pgSQL statements run first; $1 payload, $2 key,
#       $3 outbox id).  The function runs as the role 'deliverer'.
#   dispatcher_pids($node, $target)    { shard => pid } of running dispatchers
#   wait_dispatchers($node, $target, $n)  until $n dispatchers of $target run
#   wait_drained($node, $target, $what [, $secs])
#       until spool.outbox_status shows no backlog for $target
#   status_sum($node, $target, $column)  sum of a status column over shards
#   delivered_rows($node, $table)   [key, outbox_id] of the non-barrier
#                                   deliveries, in call order
#   exactly_once_ok(\@got, \@expected, \@never, $what)
#       every expected id once, none twice, no id from @never or unknown
#   per_key_order_ok(\@rows, $what)  [key, id] pairs: ids rise per key
#   quiet_query($session, $sql)     a Session query left out of the log,
#                                   'EXIT' when the connection was lost
#   SpoolOutbox::Listener           a LISTENing psql that collects notify
#                                   deliveries
package SpoolOutbox;

use strict;
use warnings;

use Exporter 'import';
use JSON::PP;
use Test::More;
use Time::HiRes qw(time usleep);
use SpoolTest;

our @EXPORT = qw(sql_target dispatcher_pids wait_dispatchers wait_drained
  status_sum delivered_rows exactly_once_ok per_key_order_ok quiet_query);

sub sql_target
{
	my ($node, $target, $options, %o) = @_;
	my $table = $o{table} // 'delivered';
	my $pre = $o{pre} // '';
	my $fn = "deliver_$target";
	$node->safe_psql('postgres', qq{
DO \$\$ BEGIN CREATE ROLE deliverer; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$;
GRANT pg_read_all_stats TO deliverer;
CREATE TABLE IF NOT EXISTS $table (
	seq bigserial PRIMARY KEY,
	outbox_id bigint NOT NULL,
	key text,
	payload jsonb,
	pid int NOT NULL,
	worker text,
	at timestamptz NOT NULL DEFAULT clock_timestamp());
GRANT SELECT, INSERT ON $table TO deliverer;
GRANT USAGE ON SEQUENCE ${table}_seq_seq TO deliverer;
CREATE FUNCTION public.$fn(payload jsonb, key text, outbox_id bigint)
RETURNS void LANGUAGE plpgsql AS \$f\$
BEGIN
	$pre
	INSERT INTO public.$table (outbox_id, key, payload, pid, worker)
	VALUES (\$3, \$2, \$1, pg_backend_pid(),
			(SELECT a.application_name FROM pg_stat_get_activity(pg_backend_pid()) a));
END \$f\$;
GRANT EXECUTE ON FUNCTION public.$fn(jsonb, text, bigint) TO deliverer;
SELECT spool.create_target('$target', 'sql',
	jsonb_build_object('function', 'public.$fn', 'run_as', 'deliverer') || '$options'::jsonb);
});
	return $fn;
}

sub dispatcher_pids
{
	my ($node, $target) = @_;
	my %p = map { split /\|/ } split /\n/, $node->safe_psql('postgres',
		"SELECT split_part(application_name, '/', 2), pid FROM pg_stat_activity"
		  . " WHERE application_name LIKE 'spool dispatch $target/%'");
	return \%p;
}

sub wait_dispatchers
{
	my ($node, $target, $n) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return poll_ok($node,
		"SELECT count(*) = $n FROM pg_stat_activity"
		  . " WHERE application_name LIKE 'spool dispatch $target/%'",
		"$n dispatcher(s) of $target to run");
}

sub wait_drained
{
	my ($node, $target, $what, $secs) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return poll_within($node, $secs // 60,
		"SELECT count(*) > 0 AND sum(backlog) = 0 FROM spool.outbox_status"
		  . " WHERE target = '$target'",
		"$what: no backlog left for $target");
}

sub status_sum
{
	my ($node, $target, $col) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(sum($col), 0) FROM spool.outbox_status WHERE target = '$target'");
}

sub delivered_rows
{
	my ($node, $table) = @_;
	return [
		map { [ split /\|/, $_, -1 ] } split /\n/,
		$node->safe_psql('postgres',
			"SELECT coalesce(key, '<NULL>'), outbox_id FROM $table"
			  . " WHERE payload IS DISTINCT FROM '{\"barrier\": true}' ORDER BY seq")
	];
}

sub _first
{
	my @v = @_;
	return join(' ', @v[ 0 .. ($#v < 9 ? $#v : 9) ]) . (@v > 10 ? ' ...' : '');
}

sub exactly_once_ok
{
	my ($got, $expected, $never, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my (%n, %exp, %nev);
	$n{$_}++ for @$got;
	$exp{$_} = 1 for @$expected;
	$nev{$_} = 1 for @$never;
	my @missing = sort { $a <=> $b } grep { !$n{$_} } @$expected;
	my @twice = sort { $a <=> $b } grep { $n{$_} > 1 } keys %n;
	my @uncommitted = sort { $a <=> $b } grep { $nev{$_} } keys %n;
	my @unknown = sort { $a <=> $b } grep { !$exp{$_} && !$nev{$_} } keys %n;
	note(sprintf('%s: %d deliveries, %d expected ids, %d ids that must never be delivered',
			$what, scalar(@$got), scalar(@$expected), scalar(@$never)));
	is(scalar(@missing), 0, "$what: every committed id delivered")
	  or diag('missing: ' . _first(@missing));
	is(scalar(@twice), 0, "$what: no id delivered twice")
	  or diag('twice: ' . _first(@twice));
	is(scalar(@uncommitted) + scalar(@unknown), 0,
		"$what: no id of a rolled-back transaction (or an unknown id) delivered")
	  or diag('rolled back: ' . _first(@uncommitted) . '; unknown: ' . _first(@unknown));
	return !@missing && !@twice && !@uncommitted && !@unknown;
}

sub per_key_order_ok
{
	my ($rows, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my (%last, @bad);
	for my $r (@$rows)
	{
		my ($k, $id) = @$r;
		push @bad, "key $k: $id after $last{$k}"
		  if defined $last{$k} && $id <= $last{$k};
		$last{$k} = $id;
	}
	return is(scalar(@bad), 0,
		sprintf('%s: per key, delivery order is outbox id order (%d rows, %d keys)',
			$what, scalar(@$rows), scalar(keys %last)))
	  || diag(_first(@bad));
}

# SpoolTest::Session::query without the note, and bounded when the server
# went away: psql 15 then echoes the mark with an empty SQLSTATE (and exits
# only at its next command), which query() would wait for until its timer
# fires.  Returns (output, sqlstate, stderr); sqlstate 'EXIT' when the
# connection is lost.
sub quiet_query
{
	my ($s, $sql) = @_;
	$sql =~ s/;\s*\z//;
	my $mark = '__spool_outbox_' . (++$s->{n}) . '__';
	$s->{out} = '';
	$s->{err} = '';
	return ('', 'EXIT', 'session already ended') unless $s->{h}->pumpable;
	$s->{in} .= "$sql;\n\\echo $mark :SQLSTATE\n";
	$s->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	while ($s->{out} !~ /\Q$mark\E ?(\S*)\n/)
	{
		last unless $s->{h}->pumpable;
		$s->{h}->pump;
	}
	my ($out, $state) = ($s->{out}, 'EXIT');
	if ($out =~ s/\Q$mark\E ?(\S*)\n//)
	{
		my $got = $1;
		$state = $got =~ /^[0-9A-Z]{5}$/ ? $got : 'EXIT';
	}
	chomp $out;
	return ($out, $state, $s->{err});
}

package SpoolOutbox::Listener;

use strict;
use warnings;
use JSON::PP;
use Test::More;
use Time::HiRes qw(time usleep);

# A SpoolTest::Session that ran LISTEN $channel.  Each poll() runs SELECT 1;
# psql then prints the notifications received so far, which are parsed
# into got(): { id, key, barrier, payload, json } in arrival order.
sub new
{
	my ($class, $node, $channel, $name) = @_;
	my $s = SpoolTest::Session->new($node, $name // "listen $channel");
	$s->query_ok("LISTEN $channel");
	return bless { s => $s, channel => $channel, got => [], alive => 1, bad => [] },
	  $class;
}

# Collect what arrived; returns how many notifications were new.  A lost
# connection ends the listener (alive() is false), keeping what it got.
sub poll
{
	my ($self) = @_;
	return 0 unless $self->{alive};
	my ($out, $state) = SpoolOutbox::quiet_query($self->{s}, 'SELECT 1');
	my $n = 0;
	for my $line (split /\n/, $out)
	{
		next unless $line =~
		  /^Asynchronous notification "\Q$self->{channel}\E" with payload "(.*)" received from server process with PID \d+\.$/;
		my $text = $1;
		my $j = eval { decode_json($text) };
		if (!$j || !defined $j->{id})
		{
			push @{ $self->{bad} }, $text;
			next;
		}
		push @{ $self->{got} },
		  {
			id => $j->{id},
			key => $j->{key},
			barrier => $j->{barrier},
			payload => $j->{payload},
			json => $text
		  };
		$n++;
	}
	$self->{alive} = 0 if $state eq 'EXIT';
	return $n;
}

sub got { return $_[0]->{got} }
sub ids { return map { $_->{id} } @{ $_[0]->{got} } }
sub alive { return $_[0]->{alive} }

# Notification texts that were not {"id": ..., ...} JSON.
sub unparsed { return @{ $_[0]->{bad} } }

# Poll until every id of @$want has arrived, at most $secs seconds;
# returns whether they all did.
sub wait_ids
{
	my ($self, $want, $secs) = @_;
	my $t0 = time;
	my %have;
	while (1)
	{
		$self->poll;
		%have = map { $_ => 1 } $self->ids;
		return 1 unless grep { !$have{$_} } @$want;
		return 0 if time - $t0 > $secs || !$self->{alive};
		usleep(20_000);
	}
}

sub quit { $_[0]->{s}->quit; return; }

1;

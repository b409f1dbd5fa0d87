
# Shared helpers for the spool_ext TAP tests (PostgreSQL 15 test framework).
#
#   spool_node($name, %conf)      a started node with spool_ext preloaded and
#                                 the extension created in 'postgres'
#   SpoolTest::Session->new(...)  a long-lived psql driven through IPC::Run
#                                 pipes: query() returns output and SQLSTATE
#   start_pgbench / finish_pgbench  bounded pgbench runs in the background
#   poll_ok                       poll_query_until as a test assertion
#   wait_pid_gone                 wait until a server process has exited
package SpoolTest;

use strict;
use warnings;

use Exporter 'import';
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

our @EXPORT = qw(spool_node poll_ok poll_within start_pgbench finish_pgbench
  wait_pid_gone wait_workers worker_row sql_list crash_restart_ok
  terminate_busy_nonce_workers create_call_functions start_logged_call);

# A node with spool_ext preloaded and created in database 'postgres'.
# %conf overrides or adds postgresql.conf settings (values verbatim);
# _init => { ... } passes parameters to init (e.g. allows_streaming => 1).
sub spool_node
{
	my ($name, %conf) = @_;
	my $init = delete $conf{_init} // {};
	my %c = (
		shared_preload_libraries => "'spool_ext'",
		'spool.database' => "'postgres'",
		max_worker_processes => 32,
		max_connections => 40,
		log_line_prefix => "'%m [%p] %b '",
		%conf);
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%$init);
	$node->append_conf('postgresql.conf',
		join('', map { "$_ = $c{$_}\n" } sort keys %c));
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION spool_ext');
	return $node;
}

# poll_query_until as an assertion, with a message saying what we waited for.
sub poll_ok
{
	my ($node, $query, $what, $expected) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $t0 = time;
	my $ok = $node->poll_query_until('postgres', $query,
		defined $expected ? $expected : 't');
	ok($ok, sprintf('waited for %s (%.1fs)', $what, time - $t0));
	return $ok;
}

# Wait until process $pid is gone (from the OS and from pg_stat_activity).
# poll_within($node, $secs, $query, $what): poll until $query returns 't',
# at most $secs seconds; one ok() saying how long it took.  For waits with a
# bound of their own (poll_ok uses the framework's default timeout).
sub poll_within
{
	my ($node, $secs, $query, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $t0 = time;
	my $got = '';
	while (time - $t0 < $secs)
	{
		$got = $node->safe_psql('postgres', $query);
		last if $got eq 't';
		select(undef, undef, undef, 0.2);
	}
	return ok($got eq 't', sprintf('waited for %s (%.1fs)', $what, time - $t0));
}

# crash_restart_ok($node, $pid, $log_offset [, $what]): after process $pid
# (a backend or a background worker) was killed with SIGKILL, assert from
# the log (read from $log_offset) that the postmaster noticed the kill and
# restarted every backend, then wait for the server to accept connections
# again.  The log is waited for (bounded), not read once: a connection can
# still succeed in the moment between the kill and the postmaster noticing
# it, so "accepts connections" alone does not say the restart happened.
# $what prefixes the test names.
sub crash_restart_ok
{
	my ($node, $pid, $log_offset, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $p = defined $what ? "$what: " : '';

	ok(log_wait($node,
			qr/(?:server process|background worker "[^"]+") \(PID $pid\) was terminated by signal 9/,
			$log_offset),
		"${p}the postmaster noticed the killed process $pid");
	my $reinit = log_wait($node, qr/all server processes terminated; reinitializing/, $log_offset);
	ok($reinit, "${p}the whole server restarted");
	log_wait($node, qr/database system is ready to accept connections/, $reinit) if $reinit;
	poll_ok($node, 'SELECT true', "${p}the server to accept connections after the crash");
}

# log_wait($node, $regexp, $offset [, $secs]): wait (up to $secs, default
# 180) for the server log after $offset to match; returns the log offset
# just past the match, or 0 when it never matched.
sub log_wait
{
	my ($node, $re, $offset, $secs) = @_;
	$secs //= 180;
	for (1 .. $secs * 10)
	{
		my $log = PostgreSQL::Test::Utils::slurp_file($node->logfile, $offset);
		return $offset + $+[0] if $log =~ $re;
		select(undef, undef, undef, 0.1);
	}
	return 0;
}

sub wait_pid_gone
{
	my ($node, $pid, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	return 0
	  unless poll_ok($node,
		"SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $pid",
		"$what (pid $pid) to exit");

	# A backend leaves pg_stat_activity before its process ends, and the
	# postmaster reaps it a moment later: wait for that too (up to 60 s).
	my $gone = 0;
	for (1 .. 1200)
	{
		$gone = !kill(0, $pid);
		last if $gone;
		select(undef, undef, undef, 0.05);
	}
	return ok($gone, "$what (pid $pid) no longer exists");
}

# create_call_functions($node): in database postgres, what the nonce tests'
# clients call through: table calls and call_logged(tag, stmt), which runs
# stmt (returning one bigint) and records its result or SQLSTATE under tag;
# and retry(stmt), for client steps under worker terminations, which runs
# stmt until it succeeds, at most 30 times 50 ms apart, and returns (r,
# tries, errs: the SQLSTATEs seen).
sub create_call_functions
{
	my ($node) = @_;
	$node->safe_psql('postgres', <<'EOSQL');
CREATE TABLE calls (tag text PRIMARY KEY, result bigint, sqlstate text);
-- Run one call and record what it returned or raised.
CREATE FUNCTION call_logged(p_tag text, p_stmt text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE r bigint;
BEGIN
	EXECUTE p_stmt INTO r;
	INSERT INTO calls VALUES (p_tag, r, '00000');
EXCEPTION WHEN OTHERS THEN
	INSERT INTO calls VALUES (p_tag, NULL, SQLSTATE);
END
$$;
-- Repeat a call until it succeeds; returns (result, tries, errors seen).
CREATE FUNCTION retry(p_stmt text, OUT r bigint, OUT tries int, OUT errs text)
LANGUAGE plpgsql AS $$
BEGIN
	tries := 0;
	errs := '';
	LOOP
		tries := tries + 1;
		BEGIN
			EXECUTE p_stmt INTO r;
			RETURN;
		EXCEPTION WHEN OTHERS THEN
			errs := errs || SQLSTATE || ' ';
			IF tries >= 30 THEN RAISE; END IF;
			PERFORM pg_sleep(0.05);
		END;
	END LOOP;
END
$$;
EOSQL
}

# start_logged_call($node, $tag, $stmt): run call_logged($tag, $stmt) in
# a client of its own, in the background (finish it with finish_pgbench).
sub start_logged_call
{
	my ($node, $tag, $stmt) = @_;
	return start_pgbench($node, $tag,
		"SELECT call_logged('$tag', \$q\$$stmt\$q\$);\n", '-c', 1, '-t', 1);
}

# terminate_busy_nonce_workers($node, $done_sql, $done_n, $what): four
# rounds, taking turns between nonce workers 0 and 1 (two terminations per
# worker: the launcher backs off when a worker exits again soon after its
# start); each waits (bounded) for the worker to have $what pending, unless
# $done_sql already counts $done_n, terminates it and waits for the launcher
# to replace it.  Returns how many workers were terminated.
sub terminate_busy_nonce_workers
{
	my ($node, $done_sql, $done_n, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $sql = sub { $node->safe_psql('postgres', $_[0]) };
	my $kills = 0;
	my %killed;
	for my $round (1 .. 4)
	{
		my $row;
		my $tw = $round % 2;
		for my $i (0 .. 400)
		{
			my $r = $sql->('SELECT worker || \'|\' || pid FROM spool.nonce_workers'
				  . " WHERE worker = $tw AND queued + in_progress > 0 AND pid IS NOT NULL");
			if ($r ne '') { $row = $r; last; }
			last if $sql->($done_sql) >= $done_n;
			select(undef, undef, undef, 0.05);
		}
		last unless defined $row;
		my ($kw, $pid) = split /\|/, $row;
		next if $killed{$pid}++;
		if ($sql->("SELECT pg_terminate_backend($pid)") eq 't')
		{
			$kills++;
			note "round $round: terminated nonce worker $kw (pid $pid) with $what pending";
			poll_ok($node,
				"SELECT pid IS NOT NULL AND pid <> $pid FROM spool.nonce_workers WHERE worker = $kw",
				"the launcher to replace nonce worker $kw");
		}
	}
	return $kills;
}

# Wait until all $n nonce workers run; returns { worker => pid }.
sub wait_workers
{
	my ($node, $n, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	poll_ok($node,
		"SELECT count(*) = $n FROM spool.nonce_workers w"
		  . " JOIN pg_stat_activity a ON a.pid = w.pid"
		  . " WHERE a.application_name = 'spool nonce worker ' || w.worker",
		$what || "$n nonce workers to run");
	my %w = map { split /\|/ } split /\n/,
	  $node->safe_psql('postgres',
		'SELECT worker, pid FROM spool.nonce_workers WHERE pid IS NOT NULL');
	return \%w;
}

# One row of spool.nonce_workers as a hash.
sub worker_row
{
	my ($node, $w) = @_;
	my @cols = qw(worker pid generation owner queued in_progress served
	  batches last_batch takeovers);
	my $r = $node->safe_psql('postgres',
		'SELECT ' . join(', ', map { "coalesce(${_}::text, '')" } @cols)
		  . " FROM spool.nonce_workers WHERE worker = $w");
	my %h;
	@h{@cols} = split /\|/, $r, -1;
	return \%h;
}

# 'a','b' for IN lists.
sub sql_list
{
	return join(', ', map { "'$_'" } @_);
}

# Start pgbench in the background with $script (text) and extra @args.
sub start_pgbench
{
	my ($node, $name, $script, @args) = @_;
	my $file = "$PostgreSQL::Test::Utils::tmp_check/$name.pgbench";
	open my $fh, '>', $file or die "cannot write $file: $!";
	print $fh $script;
	close $fh;
	my %run = (out => '', err => '', name => $name);
	my @cmd = (
		'pgbench', '-n', '-h', $node->host, '-p', $node->port,
		'-f', $file, @args, 'postgres');
	note "starting: @cmd";
	$run{h} = IPC::Run::start(\@cmd, '>', \$run{out}, '2>', \$run{err},
		IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
	return \%run;
}

# Wait for a pgbench run; returns its exit code.  The output goes to the log.
sub finish_pgbench
{
	my ($run) = @_;
	$run->{h}->finish;
	my $rc = $run->{h}->result(0);
	note "pgbench $run->{name} exited with $rc\n$run->{out}\n"
	  . substr($run->{err}, 0, 4000);
	return $rc;
}

package SpoolTest::Session;

use strict;
use warnings;
use IPC::Run;
use Test::More;

# A long-lived psql session without ON_ERROR_STOP: every query reports its
# SQLSTATE, and a lost connection ends the session.  $user: log in as that
# role (default: the test's superuser).
sub new
{
	my ($class, $node, $name, $user) = @_;
	my $self = bless {
		in => '',
		out => '',
		err => '',
		n => 0,
		name => $name || 'session',
		node => $node
	}, $class;
	$self->{timer} =
	  IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default);
	$self->{h} = IPC::Run::start(
		[
			'psql', '-XAtq', '-v', 'ON_ERROR_STOP=0',
			'-v', 'VERBOSITY=default',
			'-d', $node->connstr('postgres') . (defined $user ? " user=$user" : ''), '-f', '-'
		],
		'<', \$self->{in},
		'>', \$self->{out},
		'2>', \$self->{err},
		$self->{timer});
	$self->{pid} = $self->query_ok('SELECT pg_backend_pid()');
	return $self;
}

sub pid { return $_[0]->{pid} }

# Run $sql; returns (output, sqlstate, stderr).  sqlstate is '00000' on
# success and 'EXIT' when psql ended (connection lost).
sub query
{
	my ($self, $sql) = @_;
	$sql =~ s/;\s*\z//;
	my $mark = '__spool_done_' . (++$self->{n}) . '__';
	$self->{out} = '';
	$self->{err} = '';
	return ('', 'EXIT', 'session already ended') unless $self->{h}->pumpable;
	$self->{in} .= "$sql;\n\\echo $mark :SQLSTATE\n";
	$self->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	while ($self->{out} !~ /\Q$mark\E (\S*)\n/)
	{
		last unless $self->{h}->pumpable;
		$self->{h}->pump;
	}
	my ($out, $state) = ($self->{out}, 'EXIT');
	# After a lost connection psql echoes an empty SQLSTATE.
	if ($out =~ s/\Q$mark\E (\S*)\n//) { $state = $1 eq '' ? 'EXIT' : $1; }
	chomp $out;
	my $err = $self->{err};
	note "[$self->{name}] $sql => $state" . ($err ne '' ? " ($err)" : '');
	return ($out, $state, $err);
}

# Run $sql and fail the test unless it succeeded; returns its output.
sub query_ok
{
	my ($self, $sql) = @_;
	my ($out, $state, $err) = $self->query($sql);
	die "[$self->{name}] query failed ($state): $sql\n$err" if $state ne '00000';
	return $out;
}

# Close the session (harmlessly if psql already ended).
sub quit
{
	my ($self) = @_;
	$self->{in} .= "\\q\n" if $self->{h}->pumpable;
	eval { $self->{h}->finish; };
	return;
}

1;

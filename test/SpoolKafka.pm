# A test Kafka cluster for the spool_ext TAP tests.
#
# Drives test/kafka/spool_kafka_mock (a librdkafka mock cluster on
# 127.0.0.1, see the comment at the top of spool_kafka_mock.c for the full
# command protocol) through IPC::Run pipes.
#
#   use SpoolKafka;
#   my $kafka = SpoolKafka->start(brokers => 3, topics => ['t1:4']);
#   my $bootstrap = $kafka->bootstrap;        # "127.0.0.1:p1,127.0.0.1:p2,..."
#   $kafka->cmd('produce t1 1000');           # "OK produced 1000"
#   my ($low, $high) = $kafka->wmarks('t1', 0);
#   my $ans = $kafka->cmd('down 1', allow_error => 1);   # no die on ERR
#   my @msgs = $kafka->consume_all('t1', 4);  # every message, with headers
#   $kafka->stop;                              # or just let it go out of scope
#
# The program is $ENV{SPOOL_KAFKA_MOCK} or kafka/spool_kafka_mock next to
# this module; build it with "make -C test/kafka".  Every wait is bounded:
# start-up by $SpoolKafka::START_TIMEOUT seconds, each command by the
# object's timeout (default $SpoolKafka::CMD_TIMEOUT, overridable with
# $ENV{SPOOL_KAFKA_TIMEOUT}, with start(timeout => S) or per command).
package SpoolKafka;

use strict;
use warnings;

use Carp;
use File::Basename qw(dirname);
use File::Spec;
use File::Temp;
use IPC::Run;

our $START_TIMEOUT = 30;
our $CMD_TIMEOUT = $ENV{SPOOL_KAFKA_TIMEOUT} || 180;
our $STOP_TIMEOUT = 30;

# Path of the mock cluster program.
sub program
{
	return $ENV{SPOOL_KAFKA_MOCK} if $ENV{SPOOL_KAFKA_MOCK};
	return File::Spec->catfile(dirname(File::Spec->rel2abs(__FILE__)),
		'kafka', 'spool_kafka_mock');
}

# SpoolKafka->start(%opt) starts a cluster and waits for its BOOTSTRAP line.
#   brokers => N              number of brokers (ids 1..N), default 1
#   topics => ['name:parts']  topics created before start-up
#   message_timeout => MS     internal producer's message.timeout.ms
#   timeout => S              default per-command timeout in seconds
#   verbose => 1              keep librdkafka's log lines (on stderr)
#   stderr => FILE            send the program's stderr to FILE (else it is
#                             kept in memory: see ->stderr)
sub start
{
	my ($class, %opt) = @_;
	my $prog = program();
	croak "SpoolKafka: $prog is not built (run: make -C test/kafka)"
	  unless -x $prog;

	my @cmd = ($prog);
	push @cmd, '--brokers', $opt{brokers} if defined $opt{brokers};
	push @cmd, '--topic', $_ for @{ $opt{topics} || [] };
	push @cmd, '--message-timeout', $opt{message_timeout}
	  if defined $opt{message_timeout};
	push @cmd, '--quiet' unless $opt{verbose};

	my $self = bless {
		in => '',
		out => '',
		err => '',
		timeout => $opt{timeout} || $CMD_TIMEOUT,
		timer => IPC::Run::timer($START_TIMEOUT),
	}, $class;

	$self->{harness} = IPC::Run::start(
		\@cmd,
		'<' => \$self->{in},
		'>' => \$self->{out},
		'2>' => (defined $opt{stderr} ? $opt{stderr} : \$self->{err}),
		$self->{timer});

	my $line = $self->_read_line($START_TIMEOUT, 'BOOTSTRAP line');
	unless ($line =~ /^BOOTSTRAP (\S+)$/)
	{
		$self->_kill;
		croak "SpoolKafka: unexpected first line '$line'";
	}
	$self->{bootstrap} = $1;
	return $self;
}

# The bootstrap.servers list of the cluster.
sub bootstrap { return $_[0]->{bootstrap}; }

# What the program wrote on stderr so far (when not sent to a file).
sub stderr { return $_[0]->{err}; }

# The IPC::Run harness (e.g. for ->signal).
sub harness { return $_[0]->{harness}; }

# $kafka->cmd($line, %opt): send one command line and return its answer
# line (without newline).  Dies on an "ERR ..." answer unless
# allow_error => 1; timeout => S overrides the per-command timeout.
sub cmd
{
	my ($self, $line, %opt) = @_;
	croak "SpoolKafka: not running" unless $self->{harness} && !$self->{stopped};
	croak "SpoolKafka: a command is one line" if $line =~ /[\r\n]/;

	$self->{in} .= "$line\n";
	my $ans = $self->_read_line($opt{timeout} || $self->{timeout},
		"answer to '$line'");
	croak "SpoolKafka: '$line' failed: $ans"
	  if $ans =~ /^ERR/ && !$opt{allow_error};
	croak "SpoolKafka: '$line': malformed answer '$ans'"
	  unless $ans =~ /^(?:OK|ERR)\b/;
	return $ans;
}

# Convenience wrappers.
sub produce
{
	my ($self, $topic, $count, @rest) = @_;
	return $self->cmd(join(' ', 'produce', $topic, $count, @rest));
}

# $kafka->produce_next($topic, $n, $size, \$seq): produce $n messages of
# about $size bytes numbered $seq .. $seq + $n - 1 over every partition,
# check (a test) that all were produced, and move $seq past them.
sub produce_next
{
	my ($self, $topic, $n, $size, $seq) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	Test::More::is($self->produce($topic, $n, -1, $size, $$seq), "OK produced $n",
		"produce seq $$seq .. " . ($$seq + $n - 1));
	$$seq += $n;
	return;
}

sub wmarks
{
	my ($self, $topic, $partition) = @_;
	my $ans = $self->cmd("wmarks $topic $partition");
	my ($low, $high) = $ans =~ /^OK (-?\d+) (-?\d+)$/
	  or croak "SpoolKafka: bad wmarks answer '$ans'";
	return ($low, $high);
}

# $kafka->consume($topic, $partition, %opt): the messages of one partition
# read with the "consume" command, in offset order, as a list of hashes
#   { partition, offset, key, outbox_id, barrier, value,
#     headers => [ [name, value], ... ], timestamp }
# key, value and header values are bytes, undef for NULL; outbox_id and
# barrier are the values of the headers spool-outbox-id and spool-barrier
# (undef when absent); timestamp is the message's CreateTime in unix ms
# (-1 when it has none).  Options:
#   from => N        first offset (default 0; -2 = the log start)
#   max => N         at most N messages (default: up to the end)
#   timeout_ms => MS bound of the read (default the program's, 30 s)
# Dies on an ERR answer, e.g. "Offset out of range" when from is below the
# log start (the mock drops old batches beyond ~5 MiB per partition).
sub consume
{
	my ($self, $topic, $partition, %opt) = @_;
	my $from = defined $opt{from} ? $opt{from} : 0;
	my $max = defined $opt{max} ? $opt{max} : 100_000_000;
	my $tmp = File::Temp->new(TMPDIR => 1, TEMPLATE => 'spool_consume_XXXXXX');
	my $file = $tmp->filename;
	croak "SpoolKafka: temporary file name '$file' has spaces" if $file =~ /\s/;
	my $line = "consume $topic $partition $from $max $file";
	my %cmd_opt;
	if ($opt{timeout_ms})
	{
		$line .= " $opt{timeout_ms}";
		$cmd_opt{timeout} = int($opt{timeout_ms} / 1000) + 30;
	}
	my $ans = $self->cmd($line, %cmd_opt);
	my ($n) = $ans =~ /^OK consumed (\d+) -?\d+$/
	  or croak "SpoolKafka: bad consume answer '$ans'";

	my @msgs;
	open my $fh, '<', $file or croak "SpoolKafka: cannot read $file: $!";
	binmode $fh;
	while (my $l = <$fh>)
	{
		chomp $l;
		my @f = split /\t/, $l, -1;
		croak "SpoolKafka: consume line with " . scalar(@f) . " fields: $l"
		  unless @f == 8;
		my @headers;
		for my $h (split /,/, $f[6])
		{
			my ($name, $value) = split /=/, $h, 2;
			push @headers, [ _unescape($name), _unescape($value) ];
		}
		push @msgs,
		  {
			partition => $f[0],
			offset => $f[1],
			key => _unescape($f[2]),
			outbox_id => _unescape($f[3]),
			barrier => _unescape($f[4]),
			value => _unescape($f[5]),
			headers => \@headers,
			timestamp => $f[7],
		  };
	}
	close $fh;
	croak "SpoolKafka: consume answered $n but the file has " . scalar(@msgs)
	  . " lines"
	  unless @msgs == $n;
	return @msgs;
}

# $kafka->consume_all($topic, $nparts, %opt): every message of partitions
# 0 .. $nparts - 1 (by partition, then offset), as consume() returns them.
# Reads from offset 0, so it dies if the mock dropped the start of a
# partition; from => -2 reads from the log start instead.
sub consume_all
{
	my ($self, $topic, $nparts, %opt) = @_;
	return map { $self->consume($topic, $_, %opt) } 0 .. $nparts - 1;
}

# Undo the escapes of a consume field (COPY text format plus \xHH).
sub _unescape
{
	my ($s) = @_;
	return undef if !defined $s || $s eq '\N';
	my %esc = ('\\' => '\\', t => "\t", n => "\n", r => "\r");
	$s =~ s/\\(?:x([0-9a-fA-F]{2})|(.))/
	  defined $1 ? chr(hex $1) : (exists $esc{$2} ? $esc{$2} : $2)/ges;
	return $s;
}

# Stop the cluster: "quit", then wait (bounded) for a clean exit, killing
# the program if it does not exit in time.  Returns its exit status.
sub stop
{
	my ($self) = @_;
	return $self->{exit} if $self->{stopped} || !$self->{harness};
	$self->{stopped} = 1;

	my $ok = eval {
		$self->{in} .= "quit\n";
		$self->{timer}->start($STOP_TIMEOUT);
		$self->{harness}->pump
		  while $self->{harness}->pumpable
		  && $self->{out} !~ /\n/
		  && !$self->{timer}->is_expired;
		$self->{timer}->start($STOP_TIMEOUT);
		$self->{harness}->finish;
		1;
	};
	if (!$ok)
	{
		carp "SpoolKafka: stop: $@";
		$self->_kill;
		return $self->{exit} = -1;
	}
	return $self->{exit} = $self->{harness}->result(0);
}

# Read one stdout line, waiting at most $timeout seconds.
sub _read_line
{
	my ($self, $timeout, $what) = @_;
	my $h = $self->{harness};

	$self->{timer}->start($timeout);
	while ($self->{out} !~ /\n/)
	{
		if ($self->{timer}->is_expired)
		{
			# A late answer would be taken for the next command's: the
			# conversation cannot go on, so the program is stopped.
			$self->_kill;
			croak "SpoolKafka: timed out after ${timeout}s waiting for "
			  . "$what; stderr: $self->{err}";
		}
		if (!$h->pumpable)
		{
			croak "SpoolKafka: program exited while waiting for $what; "
			  . "stderr: $self->{err}";
		}
		# pump returns on I/O or when the timer fires; it dies if the
		# program goes away in the middle.
		eval { $h->pump; 1 }
		  or croak "SpoolKafka: waiting for $what: $@; stderr: $self->{err}";
		# Keep an in-memory stderr from growing without bound.
		substr($self->{err}, 0, length($self->{err}) - 65536, '')
		  if length($self->{err}) > 131072;
	}
	$self->{out} =~ s/^([^\n]*)\n//;
	return $1;
}

# TERM, then KILL after a grace period.  The program exits 0 on TERM.
sub _kill
{
	my ($self) = @_;
	return unless $self->{harness};
	$self->{stopped} = 1;
	eval { $self->{harness}->kill_kill(grace => 5); 1 };
	return;
}

sub DESTROY
{
	my ($self) = @_;
	local ($@, $!, $?);
	$self->_kill if $self->{harness} && !$self->{stopped};
	return;
}

1;

#!/usr/bin/perl
# Reads docs/prometheus/queries.yaml and alerts.yaml (in the layout they are
# written in: no YAML module needed) and prints one JSON document for the
# regression test sql/prometheus.sql:
#   {"queries": [{"name", "query", "columns": [...], "usages": [...]}, ...],
#    "unknown": [metric names alerts.yaml uses that no query produces]}
use strict;
use warnings;
use JSON::PP;

my ($queries, $alerts) = @ARGV;
my (@q, $cur, $in_query);
open(my $fh, '<', $queries) or die "$queries: $!";
while (my $l = <$fh>)
{
	chomp $l;
	next if $l =~ /^\s*#/;
	if ($l =~ /^([a-z_]+):\s*$/)
	{
		$cur = { name => $1, query => '', columns => [], usages => [] };
		push @q, $cur;
		$in_query = 0;
	}
	elsif ($l =~ /^  query: \|\s*$/) { $in_query = 1; }
	elsif ($in_query && ($l =~ /^    (.*)$/ || $l eq ''))
	{
		$cur->{query} .= ($1 // '') . "\n";
	}
	elsif ($l =~ /^  metrics:\s*$/) { $in_query = 0; }
	elsif ($l =~ /^    - ([a-z_]+):\s*$/) { push @{ $cur->{columns} }, $1; }
	elsif ($l =~ /^        usage: "([A-Z]+)"\s*$/) { push @{ $cur->{usages} }, $1; }
	elsif ($l =~ /^        description: "[^"]*"\s*$/ || $l eq '') { }
	else { die "$queries:$.: unexpected line: $l\n"; }
}
close $fh;

# The metric names the queries produce.
my %produced;
for my $e (@q)
{
	for my $i (0 .. $#{ $e->{columns} })
	{
		my ($c, $u) = ($e->{columns}[$i], $e->{usages}[$i] // '');
		next if $u eq 'LABEL';
		my $m = "$e->{name}_$c";
		$produced{$m} = 1;
		@produced{ map { "${m}_$_" } qw(bucket sum count) } = (1, 1, 1) if $u eq 'HISTOGRAM';
	}
}
my %unknown;
open($fh, '<', $alerts) or die "$alerts: $!";
while (my $l = <$fh>)
{
	next unless $l =~ /^\s*expr:|^\s{10}\S/;
	$unknown{$_} = 1 for grep { !$produced{$_} } ($l =~ /\b(spool_[a-z_]+)\b/g);
}
close $fh;
delete $unknown{$_} for grep { !/^spool_/ } keys %unknown;

print JSON::PP->new->canonical->encode({
	queries => [ map { {
		name => $_->{name}, query => $_->{query},
		columns => $_->{columns}, usages => $_->{usages} } } @q ],
	unknown => [ sort keys %unknown ] }), "\n";

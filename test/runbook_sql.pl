#!/usr/bin/perl
# Prints, as one JSON array, every SQL statement of the ```sql blocks in the
# "## Runbook" section of docs/operations.md, for the regression test
# sql/runbook.sql, which plans each one (EXPLAIN) so that a renamed view,
# column or function signature breaks a test instead of the runbook.  The
# placeholder N (a nonce read from the chain) becomes 5.
use strict;
use warnings;
use JSON::PP;

my ($file) = @ARGV;
open(my $fh, '<', $file) or die "$file: $!";
my ($in_section, $in_sql, $stmt, @stmts) = (0, 0, '');
while (my $l = <$fh>)
{
	chomp $l;
	if ($l =~ /^## /) { $in_section = ($l eq '## Runbook'); next; }
	next unless $in_section;
	if ($l =~ /^```sql\s*$/) { $in_sql = 1; next; }
	if ($l =~ /^```\s*$/) { $in_sql = 0; next; }
	next unless $in_sql;
	$l =~ s/\s+--.*$//;
	next if $l =~ /^\s*$/;
	$stmt .= "$l\n";
	if ($l =~ /;\s*$/)
	{
		$stmt =~ s/(?<=, )N(?=[,)])/5/g;
		$stmt =~ s/;\s*$//;
		push @stmts, $stmt;
		$stmt = '';
	}
}
close $fh;
die "no runbook statements found in $file\n" unless @stmts;
die "unterminated statement: $stmt\n" if $stmt ne '';

print JSON::PP->new->encode(\@stmts), "\n";

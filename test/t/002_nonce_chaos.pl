
# Nonce allocation under lease chaos: many clients with distinct owners and
# very short TTLs allocate, consume and recycle nonces on a few signers while
# they keep stealing each other's (expired) signer leases; some clients
# re-acquire on every step, some write with stale or foreign tokens on
# purpose.  Every successful operation, and every new grant, writes an audit
# row in the same transaction.  Replaying the audit in commit order
# (track_commit_timestamp) must show:
#   - grant tokens per signer strictly increase (by one: every grant audited)
#   - every committed write carries the token and owner of the latest grant
#     committed before it (no write with an old token after a newer grant)
#   - a nonce is handed out again only after it was RELEASED; the lowest
#     RELEASED nonce is reused first, otherwise the next new one
#   - the final tables match the replay, and nonces are gap-free.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use FindBin;
use lib "$FindBin::RealBin/..";    # SpoolTest.pm
use SpoolTest;
use Test::More;

my $clients = 10;
my $steps = 400;                   # per client
my @signers = qw(s1 s2 s3);

my $node = spool_node(
	'nonce_chaos',
	track_commit_timestamp => 'on',
	'spool.nonce_workers' => 1,
	deadlock_timeout => "'100ms'");

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql(<<'EOSQL');
CREATE SEQUENCE rid_seq;
CREATE TABLE audit (
	seq		bigserial PRIMARY KEY,
	xid		xid8 NOT NULL DEFAULT pg_current_xact_id(),
	kind	text NOT NULL CHECK (kind IN ('grant', 'alloc', 'use', 'release')),
	signer	text NOT NULL,
	owner	text NOT NULL,
	token	bigint NOT NULL,
	nonce	bigint
);
CREATE TABLE client_lease (
	client	int,
	signer	text,
	token	bigint,
	PRIMARY KEY (client, signer)
);
CREATE TABLE errs (sqlstate text, what text);

CREATE FUNCTION chaos_step(p_client int) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	v_signer text := 's' || (1 + floor(random() * 3))::int;
	v_owner  text := 'c' || p_client;
	v_tok    bigint;
	v_nonce  bigint;
	l        spool.lease;
	n        bigint;
	r        float8;
	what     text := 'acquire';
BEGIN
	SELECT token INTO v_tok FROM client_lease
	 WHERE client = p_client AND signer = v_signer;

	-- Even clients acquire on every step (renewing or stealing an expired
	-- lease); odd ones only now and then, so they often write after expiry.
	IF v_tok IS NULL OR p_client % 2 = 0 OR random() < 0.3 THEN
		BEGIN
			l := spool.lease_acquire('signer:' || v_signer, v_owner,
									 make_interval(secs => 0.02 + random() * 0.1));
			IF l.token IS NOT NULL AND l.token IS DISTINCT FROM v_tok THEN
				INSERT INTO audit (kind, signer, owner, token)
				VALUES ('grant', v_signer, v_owner, l.token);
				INSERT INTO client_lease VALUES (p_client, v_signer, l.token)
				ON CONFLICT (client, signer) DO UPDATE SET token = EXCLUDED.token;
			END IF;
			IF l.token IS NOT NULL THEN
				v_tok := l.token;
			END IF;
		EXCEPTION WHEN SQLSTATE 'SP000' OR SQLSTATE '40P01' THEN
			INSERT INTO errs VALUES (SQLSTATE, what);
		END;
	END IF;

	-- Sometimes write with a stale token, or with another client's token.
	r := random();
	IF v_tok IS NULL THEN
		IF random() < 0.8 THEN
			RETURN 'no lease';
		END IF;
		v_tok := 1;
		what := 'no-lease ';
	ELSIF r < 0.1 THEN
		v_tok := v_tok - 1;
		what := 'stale ';
	ELSIF r < 0.2 THEN
		SELECT token INTO v_tok FROM client_lease
		 WHERE signer = v_signer AND client <> p_client
		 ORDER BY random() LIMIT 1;
		v_tok := coalesce(v_tok, 1);
		what := 'foreign ';
	ELSE
		what := '';
	END IF;

	r := random();
	BEGIN
		IF r < 0.6 THEN
			what := what || 'alloc';
			n := spool.nonce_allocate(v_signer, v_owner, v_tok,
				CASE WHEN random() < 0.5 THEN 'rq-' || nextval('rid_seq') END);
			INSERT INTO audit (kind, signer, owner, token, nonce)
			VALUES ('alloc', v_signer, v_owner, v_tok, n);
		ELSE
			SELECT nonce INTO v_nonce FROM spool.nonce_store
			 WHERE signer = v_signer AND state = 'allocated'
			 ORDER BY random() LIMIT 1;
			IF v_nonce IS NULL THEN
				RETURN 'nothing to mark';
			END IF;
			IF r < 0.8 THEN
				what := what || 'use';
				PERFORM spool.nonce_mark_used(v_signer, v_nonce, v_owner, v_tok);
				INSERT INTO audit (kind, signer, owner, token, nonce)
				VALUES ('use', v_signer, v_owner, v_tok, v_nonce);
			ELSE
				what := what || 'release';
				PERFORM spool.nonce_mark_recyclable(v_signer, v_nonce, v_owner, v_tok);
				INSERT INTO audit (kind, signer, owner, token, nonce)
				VALUES ('release', v_signer, v_owner, v_tok, v_nonce);
			END IF;
		END IF;
	EXCEPTION WHEN SQLSTATE 'SP000' OR SQLSTATE '40P01' THEN
		INSERT INTO errs VALUES (SQLSTATE, what);
		RETURN SQLSTATE;
	END;
	RETURN what;
END
$$;

-- Create the signer rows (first grants), audited like every other grant.
INSERT INTO audit (kind, signer, owner, token)
SELECT 'grant', s, 'setup', (spool.lease_acquire('signer:' || s, 'setup', '10 ms')).token
  FROM unnest(ARRAY['s1', 's2', 's3']) s;
EOSQL

my $run = start_pgbench($node, 'chaos', 
	"\\set pause random(0, 15)\n\\sleep :pause ms\nSELECT chaos_step(:client_id);\n",
	'-c', $clients, '-j', 2, '-t', $steps);
my $rc = finish_pgbench($run);
is($rc, 0, 'pgbench finished without aborted clients');
like($run->{out}, qr/number of transactions actually processed: @{[$clients * $steps]}\//,
	'every chaos step ran');

# Not vacuous: there was real contention.
my %errs = map { split /\|/ } split /\n/,
  sql(q{SELECT sqlstate, count(*) FROM errs GROUP BY 1});
note 'errors by SQLSTATE: ' . join(', ', map { "$_=$errs{$_}" } sort keys %errs);
note sql(q{SELECT string_agg(what || ' ' || sqlstate || ' ' || n, E'\n') FROM
           (SELECT what, sqlstate, count(*) n FROM errs GROUP BY 1, 2 ORDER BY 1, 2) x});
ok(($errs{SP003} // 0) > 0, 'some writes were fenced off (SP003)');
ok(($errs{SP002} // 0) > 0, 'some writes were rejected for the wrong owner (SP002)');
is($errs{'40P01'} // 0, 0, 'no deadlocks');
my %kinds = map { split /\|/ } split /\n/,
  sql(q{SELECT kind, count(*) FROM audit GROUP BY 1});
note 'audit rows: ' . join(', ', map { "$_=$kinds{$_}" } sort keys %kinds);
cmp_ok($kinds{grant} // 0, '>=', 20, 'leases changed hands many times');
cmp_ok($kinds{alloc} // 0, '>=', 100, 'many allocations committed');
cmp_ok($kinds{release} // 0, '>=', 10, 'many nonces were recycled');

is(sql(q{SELECT count(*) FROM audit WHERE pg_xact_commit_timestamp(xid(xid)) IS NULL}),
	'0', 'every audit row has a commit timestamp');

# Replay the audit in commit order, per signer.
my @viol;
my %replay;
my @rows = split /\n/, sql(
	q{SELECT signer, kind, owner, token, coalesce(nonce::text, ''), seq
	    FROM audit ORDER BY signer, pg_xact_commit_timestamp(xid(xid)), seq});
my $reused = 0;
for my $row (@rows)
{
	my ($signer, $kind, $owner, $token, $nonce, $seq) = split /\|/, $row;
	my $s = $replay{$signer} //= { grant => 0, owner => '', next => 0, state => {} };
	if ($kind eq 'grant')
	{
		push @viol, "seq $seq: grant of token $token after token $s->{grant}"
		  unless $token == $s->{grant} + 1;
		$s->{grant} = $token;
		$s->{owner} = $owner;
		next;
	}
	push @viol, "seq $seq: $kind by $owner with token $token committed while "
	  . "the current grant is $s->{grant} to $s->{owner}"
	  unless $token == $s->{grant} && $owner eq $s->{owner};
	my $st = $s->{state};
	my $prev = $st->{$nonce} // 'none';
	if ($kind eq 'alloc')
	{
		my @rel = sort { $a <=> $b } grep { $st->{$_} eq 'released' } keys %$st;
		my $expect = @rel ? $rel[0] : $s->{next};
		push @viol, "seq $seq: allocated $signer/$nonce, expected $expect" if $nonce != $expect;
		push @viol, "seq $seq: $signer/$nonce handed out again while $prev"
		  unless $prev eq 'none' || $prev eq 'released';
		$reused++ if $prev eq 'released';
		$s->{next} = $nonce + 1 if $nonce >= $s->{next};
		$st->{$nonce} = 'allocated';
	}
	elsif ($kind eq 'use')
	{
		push @viol, "seq $seq: $signer/$nonce consumed while $prev"
		  unless $prev eq 'allocated' || $prev eq 'consumed';
		$st->{$nonce} = 'consumed';
	}
	else
	{
		push @viol, "seq $seq: $signer/$nonce released while $prev"
		  unless $prev eq 'allocated' || $prev eq 'released';
		$st->{$nonce} = 'released';
	}
}
is(scalar(@viol), 0, 'the audit replays cleanly in commit order')
  or diag join("\n", @viol[ 0 .. ($#viol < 20 ? $#viol : 19) ]);
cmp_ok($reused, '>', 0, "released nonces were handed out again ($reused times)");

# The tables agree with the replay.
for my $signer (@signers)
{
	my $s = $replay{$signer};
	my ($next, $released, $lease_token) = split /\|/,
	  sql("SELECT next_nonce, released, lease_token FROM spool.nonce_signer WHERE signer = '$signer'");
	is($next, $s->{next}, "$signer: next_nonce matches the replay ($next)");
	is($lease_token, $s->{grant}, "$signer: nonce_signer.lease_token is the last grant");
	is(sql("SELECT token || '/' || owner FROM spool.lease_store WHERE resource = 'signer:$signer'"),
		"$s->{grant}/$s->{owner}", "$signer: the lease is the last audited grant");
	is( sql("SELECT count(*) || '/' || coalesce(min(nonce), 0) || '/' || coalesce(max(nonce), -1)"
			  . " FROM spool.nonces WHERE signer = '$signer'"),
		"$next/0/" . ($next - 1),
		"$signer: nonces are gap-free (0 .. next_nonce - 1 all exist)");
	my %table = map { split /\|/ } split /\n/,
	  sql("SELECT nonce, state FROM spool.nonces WHERE signer = '$signer'");
	my @diff = grep { ($table{$_} // 'missing') ne $s->{state}{$_} } keys %{ $s->{state} };
	is(scalar(@diff), 0, "$signer: every nonce's state matches the replay")
	  or diag join(', ', map { "$_: table $table{$_} replay $s->{state}{$_}" } @diff[0 .. 9]);
	is($released, scalar(grep { $_ eq 'released' } values %{ $s->{state} }),
		"$signer: the released counter matches");
}

$node->stop;
done_testing();

#!/usr/bin/env bash
# Benchmark: processors (issue 4), on one throwaway server and one test Kafka
# cluster in one run:
#   (1) entries/s through spool.window_alert (C, native state) with 2 replicas,
#       over ENTRIES preloaded spool entries, timed from start_processor until
#       both replicas' cursors reach the end of the spool;
#   (2) the same through an equivalent PL/pgSQL handler (jsonb state), and the
#       ratio (1)/(2); its outputs are checked against window_alert's over the
#       same entries;
#   (3) takeover latency on a continuously growing spool (a background loop
#       produces PRODUCE_BATCH messages every ~100 ms), with a PL/pgSQL
#       handler that emits one output per entry (replicas 2, batch_size 100):
#       (a) TAKEOVERS clean exits (pg_terminate_backend of the active), and
#       (b) STALLS stalls (SIGSTOP of the active) with lease_ttl '1 s',
#           stopped while it sleeps in its handler (the handler sleeps 40 ms
#           per batch there: a hung handler; a process stopped inside its
#           commit's WAL flush holds locks every commit in the server needs);
#       each starts while the active has >= 300 entries to do (so outputs
#       are being committed, and the latency does not include waiting for
#       input); latency = the commit time (track_commit_timestamp) of the
#       first outbox row with the new token minus the time of the terminate
#       (clock_timestamp() right before it, in the same statement) or of the
#       stop.  A stall that leaves no takeover after lease_ttl + 2 s is
#       reported as blocked (the active was stopped inside its fenced commit)
#       and then continued.  At the end every spool entry of the source has
#       exactly one output (none lost, none duplicated) across all takeovers;
#   (4) for comparison, bench/rebalance_bench.sh 3 1: a Kafka consumer group's
#       takeover on the same test cluster (SKIP_REBALANCE=1 skips it).
# Prints per-run lines, then a markdown table with medians and ratios.
#
# Usage: bash bench/processor_bench.sh [ENTRIES] [RUNS] [TAKEOVERS]
#   (defaults 1000000, 3, 50)
# Environment:
#   PLPGSQL_ENTRIES=N   entries for (2) (default: ENTRIES, at most 200000):
#                       the last N entries of the same spool ("start": cursor)
#   STALLS=N            stall takeovers (default: max(5, TAKEOVERS / 10))
#   PRODUCE_BATCH=N     messages per produce command in (3) (default 1000,
#                       one command every ~100 ms: well below what the
#                       handler keeps up with on 2 cores, so that the standby
#                       follows closely; each burst gives the active a backlog)
#   SKIP_REBALANCE=1    skip (4)
#   SPOOL_BENCH_PORT    server port (default 54353; unix socket only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-1000000}
RUNS=${2:-3}
TAKEOVERS=${3:-50}
N2=${PLPGSQL_ENTRIES:-$((N < 200000 ? N : 200000))}
STALLS=${STALLS:-$((TAKEOVERS / 10 > 5 ? TAKEOVERS / 10 : 5))}
PRODUCE_BATCH=${PRODUCE_BATCH:-1000}
# Takeovers start only while the active has at least this many entries to do.
MIN_BACKLOG=300
SKIP_REBALANCE=${SKIP_REBALANCE:-0}
[ "$N" -ge 1000 ] && [ "$RUNS" -ge 1 ] && [ "$TAKEOVERS" -ge 1 ] && [ "$N2" -ge 1000 ] && [ "$N2" -le "$N" ] ||
	{ echo "usage: $0 [ENTRIES >= 1000] [RUNS >= 1] [TAKEOVERS >= 1]  (PLPGSQL_ENTRIES from 1000 to ENTRIES)" >&2; exit 2; }
bench_start=$(date +%s)

"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-processor-bench.XXXXXX)
PORT=${SPOOL_BENCH_PORT:-54353}
PRODUCER_PID=
STOPPED_PID=
server_up=0
cleanup() {
	# A SIGSTOPped backend would keep the server from stopping.
	[ -n "$STOPPED_PID" ] && kill -CONT "$STOPPED_PID" 2>/dev/null || true
	if [ -n "$PRODUCER_PID" ]; then
		kill "$PRODUCER_PID" 2>/dev/null || true
		wait "$PRODUCER_PID" 2>/dev/null || true
		PRODUCER_PID=
	fi
	stop_kafka
	KAFKA_PID=
	[ "$server_up" = 1 ] && stop_server "$work"
	server_up=0
}
on_exit() {
	local rc=$?
	cleanup
	keep_failed_log "$rc" "$work" processor_bench
	rm -rf "$work" "$tree"
}
trap on_exit EXIT

# ---------------------------------------------------------------------------
# Server, Kafka, schema
# ---------------------------------------------------------------------------
# The mock keeps at most ~5 MiB per partition (~40k messages of SIZE 100):
# at most 30000 per partition here.
WA_PARTS=$(((N + 29999) / 30000))
[ "$WA_PARTS" -lt 64 ] && WA_PARTS=64
TK_PARTS=128
TK_MAX=$((TK_PARTS * 30000))

start_server "$work" "$PORT" "shared_buffers = 1GB
max_wal_size = 4GB
max_worker_processes = 32
spool.nonce_workers = 0
track_commit_timestamp = on
spool.outbox_segment_size = 100000000"
server_up=1
sql() { as_user "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
# sql_t SECS ARGS...: sql with a client-side time limit, for while a backend
# is SIGSTOPped: it may hold an LWLock (a WAL insertion lock, a buffer content
# lock) that a query, or even a new connection, then waits for without end.
sql_t() {
	local secs=$1
	shift
	as_user timeout -k 2 "$secs" "$PG_BIN/psql" -X -q -At -h "$work" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"
}

start_kafka "$work" "$tree" --brokers 1 --topic "wa:$WA_PARTS" --topic "tk:$TK_PARTS"
BOOT=$KAFKA_BOOTSTRAP
log() { echo "$*" >&2; }

sql >/dev/null <<'SQL'
CREATE EXTENSION spool_ext;
-- The targets of the outputs: window_alert's and its PL/pgSQL equivalent's
-- alerts, bench_echo's echoes (outputs to a target that does not exist fail
-- the batch).  NOTIFY with nobody listening is the cheapest delivery; the
-- outbox segment size above is large enough that rotation never removes the
-- delivered rows this benchmark counts.
SELECT spool.create_target('alerts', 'notify', '{"channel": "bench_alerts"}');
SELECT spool.create_target('echo', 'notify', '{"channel": "bench_echo"}');
-- Handlers run as this role (a member of spool_admin, not a superuser).
CREATE ROLE bench_owner NOLOGIN;
GRANT spool_admin TO bench_owner;

-- (2) spool.window_alert's semantics for this configuration (count window,
-- sum, op '>=') in PL/pgSQL, the state as jsonb:
--   {"skipped": n, "keys": {key: {"armed": bool, "sum": s, "items": [v, ...]}}}
-- Per key, in cursor order: the value joins the key's last `size` values;
-- when the sum holds (>= threshold) and the key is armed, one output (the
-- payload window_alert writes) and the key is disarmed; when it does not
-- hold, the key is re-armed.  Written for speed as PL/pgSQL goes: entries
-- are grouped by key, so that each key's items are read from the jsonb state
-- once per batch, and the changed keys are merged into the state once per
-- batch (merging key by key with || is ~10x slower); the outputs are put
-- back in cursor order.
CREATE FUNCTION bench_wa_plpgsql(state jsonb, entries spool.entries[])
RETURNS spool.step LANGUAGE plpgsql AS $$
DECLARE
	cfg jsonb := spool.handler_settings();
	kpath text := cfg->>'key';
	vpath text := cfg->>'value';
	wsize int := (cfg->'window'->>'size')::int;
	thr float8 := (cfg->>'threshold')::float8;
	tgt text := cfg->>'target';
	keys jsonb := coalesce(state->'keys', '{}');
	ckeys text[] := '{}';
	cvals jsonb[] := '{}';
	g record;
	ks jsonb;
	items float8[];
	armed boolean;
	s float8;
	i int;
	outs spool.output[] := '{}';
	skipped bigint;
BEGIN
	IF cfg->'window'->>'type' IS DISTINCT FROM 'count' OR coalesce(cfg->>'aggregate', 'sum') <> 'sum'
	   OR coalesce(cfg->>'op', '>=') <> '>=' THEN
		RAISE EXCEPTION 'bench_wa_plpgsql does only count windows, sum and >=';
	END IF;
	skipped := coalesce((state->>'skipped')::bigint, 0)
		+ (SELECT count(*) FROM unnest(entries) e
		    WHERE e.value->>kpath IS NULL OR jsonb_typeof(e.value->vpath) IS DISTINCT FROM 'number');
	FOR g IN
		SELECT b.*, keys->b.k AS ks,
			   ARRAY(SELECT x::float8 FROM jsonb_array_elements_text(keys->b.k->'items') x) AS items0
		  FROM (SELECT e.value->>kpath AS k,
			   array_agg((e.value->>vpath)::float8 ORDER BY e.cursor) AS vals,
			   array_agg(e.cursor ORDER BY e.cursor) AS curs,
			   array_agg(e.source ORDER BY e.cursor) AS srcs,
			   array_agg(e.kafka_partition ORDER BY e.cursor) AS parts,
			   array_agg(e.kafka_offset ORDER BY e.cursor) AS offs
		  FROM unnest(entries) e
		 WHERE e.value->>kpath IS NOT NULL AND jsonb_typeof(e.value->vpath) = 'number'
		 GROUP BY 1) b
	LOOP
		ks := g.ks;
		IF ks IS NULL THEN
			items := '{}';
			armed := true;
			s := 0;
		ELSE
			items := g.items0;
			armed := (ks->>'armed')::boolean;
			s := (ks->>'sum')::float8;
		END IF;
		FOR i IN 1 .. cardinality(g.vals) LOOP
			items := items || g.vals[i];
			s := s + g.vals[i];
			IF cardinality(items) > wsize THEN
				s := s - items[1];
				items := items[2:];
			END IF;
			IF s >= thr THEN
				IF armed THEN
					outs := outs || ROW(tgt, g.k, jsonb_build_object(
						'key', g.k, 'aggregate', 'sum', 'value', s, 'op', '>=', 'threshold', thr,
						'count', cardinality(items), 'sum', s,
						'min', (SELECT min(x) FROM unnest(items) x),
						'max', (SELECT max(x) FROM unnest(items) x),
						'window', jsonb_build_object('type', 'count', 'size', wsize),
						'cursor', g.curs[i], 'source', g.srcs[i],
						'kafka_partition', g.parts[i], 'kafka_offset', g.offs[i]))::spool.output;
					armed := false;
				END IF;
			ELSE
				armed := true;
			END IF;
		END LOOP;
		ckeys := ckeys || g.k;
		cvals := cvals || jsonb_build_object('armed', armed, 'sum', s, 'items', to_jsonb(items));
	END LOOP;
	IF cardinality(outs) > 1 THEN
		outs := ARRAY(SELECT o FROM unnest(outs) o ORDER BY (o.payload->>'cursor')::bigint);
	END IF;
	IF cardinality(ckeys) > 0 THEN
		keys := keys || (SELECT jsonb_object_agg(k, v) FROM unnest(ckeys, cvals) AS c(k, v));
	END IF;
	RETURN ROW(jsonb_build_object('skipped', skipped, 'keys', keys), outs)::spool.step;
END $$;

-- (3) one output per entry, its cursor in the payload; the state counts.
CREATE FUNCTION bench_echo(state jsonb, entries spool.entries[])
RETURNS spool.step LANGUAGE plpgsql AS $$
DECLARE
	outs spool.output[];
BEGIN
	-- (3b) simulates a slow handler: it is where a hung handler stalls.
	IF spool.handler_settings() ? 'sleep_ms' THEN
		PERFORM pg_sleep((spool.handler_settings()->>'sleep_ms')::float8 / 1000);
	END IF;
	SELECT array_agg(ROW('echo', e.value->>'key',
						 jsonb_build_object('cursor', e.cursor, 'seq', e.value->'seq'))::spool.output
					 ORDER BY e.cursor)
	  INTO outs FROM unnest(entries) e;
	RETURN ROW(jsonb_build_object('n', coalesce((state->>'n')::bigint, 0) + cardinality(entries)),
			   outs)::spool.step;
END $$;
GRANT EXECUTE ON FUNCTION bench_wa_plpgsql(jsonb, spool.entries[]), bench_echo(jsonb, spool.entries[])
	TO bench_owner;

-- Server-side waits (no psql start-up in the timed sections), all bounded.

-- Until every replica of p has its cursor >= target: "first|all" as epoch
-- seconds (first: when the first replica got there), NULL after timeout_s.
CREATE FUNCTION bench_wait_done(p text, target bigint, replicas int, timeout_s float8)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	t_first timestamptz;
	n int;
BEGIN
	LOOP
		SELECT count(*) FILTER (WHERE cursor >= target) INTO n
		  FROM spool.processor_status WHERE processor = p;
		IF n >= 1 AND t_first IS NULL THEN
			t_first := clock_timestamp();
		END IF;
		IF n >= replicas THEN
			RETURN extract(epoch FROM t_first) || '|' || extract(epoch FROM clock_timestamp());
		END IF;
		IF clock_timestamp() > deadline THEN
			RETURN NULL;
		END IF;
		PERFORM pg_sleep(0.02);
	END LOOP;
END $$;

-- Until p has exactly one active replica (not victim) and one standby that
-- follows it closely: at the committed cursor seen 20 ms earlier, or within
-- 1000 entries of the committed cursor (while the active works off a
-- backlog, the standby trails it by a batch or a few).  Returns 'ok', or
-- after timeout_s what it saw last: 'pair, standby N behind' when the pair
-- is there but the standby never got close, else 'no pair: ...'.
CREATE FUNCTION bench_wait_pair(p text, victim int, timeout_s float8)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	na int;
	nall int;
	ns int;
	scur bigint;
	comm bigint;
	prev bigint;
BEGIN
	LOOP
		SELECT count(*) FILTER (WHERE role = 'active' AND pid IS DISTINCT FROM victim),
			   count(*) FILTER (WHERE role = 'active'),
			   count(*) FILTER (WHERE role = 'standby' AND pid IS NOT NULL),
			   min(cursor) FILTER (WHERE role = 'standby'),
			   max(committed_cursor)
		  INTO na, nall, ns, scur, comm
		  FROM spool.processor_status WHERE processor = p;
		IF na = 1 AND nall = 1 AND ns = 1 THEN
			IF prev IS NOT NULL AND (scur >= prev OR scur >= comm - 1000) THEN
				RETURN 'ok';
			END IF;
			prev := comm;
		ELSE
			prev := NULL;
		END IF;
		IF clock_timestamp() > deadline THEN
			IF na = 1 AND nall = 1 AND ns = 1 THEN
				RETURN format('pair, standby %s behind', comm - scur);
			END IF;
			RETURN format('no pair: %s active (%s not pid %s), %s standby', nall, na, victim, ns);
		END IF;
		PERFORM pg_sleep(0.02);
	END LOOP;
END $$;

-- The commit time (epoch seconds) of the first outbox row of p with a token
-- above old_token (and an id above min_id), NULL after timeout_s.
CREATE FUNCTION bench_wait_token(p text, old_token bigint, min_id bigint, timeout_s float8)
RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	t1 timestamptz;
BEGIN
	LOOP
		SELECT min(pg_xact_commit_timestamp(xmin)) INTO t1
		  FROM spool.outbox_store WHERE id > min_id AND processor = p AND token > old_token;
		IF t1 IS NOT NULL THEN
			RETURN extract(epoch FROM t1);
		END IF;
		IF clock_timestamp() > deadline THEN
			RETURN NULL;
		END IF;
		PERFORM pg_sleep(0.005);
	END LOOP;
END $$;

-- Until p has at least min_backlog spool entries after its committed cursor
-- (its active has work queued, so outputs are being committed); false after
-- timeout_s.
CREATE FUNCTION bench_wait_backlog(p text, min_backlog bigint, timeout_s float8)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
BEGIN
	LOOP
		IF (SELECT (SELECT next_cursor - 1 FROM spool.spool_state) - committed_cursor
			  FROM spool.processor_checkpoints WHERE processor = p) >= min_backlog THEN
			RETURN true;
		END IF;
		IF clock_timestamp() > deadline THEN
			RETURN false;
		END IF;
		PERFORM pg_sleep(0.002);
	END LOOP;
END $$;

-- The busy active replica of p: "pid|token|max outbox id", once the backlog
-- is there (NULL if it never came).
CREATE FUNCTION bench_busy_active(p text, min_backlog bigint, in_handler boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	deadline timestamptz := clock_timestamp() + interval '30 s';
BEGIN
	IF NOT bench_wait_backlog(p, min_backlog, 30) THEN
		RETURN NULL;
	END IF;
	-- With in_handler: until the active sleeps in its handler.
	WHILE in_handler AND clock_timestamp() < deadline AND NOT EXISTS (
			SELECT 1 FROM pg_stat_activity a JOIN spool.processor_status s ON s.pid = a.pid
			 WHERE s.processor = p AND s.role = 'active' AND a.wait_event = 'PgSleep') LOOP
		PERFORM pg_sleep(0.001);
	END LOOP;
	RETURN (SELECT pid || '|' || token FROM spool.processor_status WHERE processor = p AND role = 'active')
		|| '|' || (SELECT coalesce(max(id), 0) FROM spool.outbox_store);
END $$;

-- A clean-exit takeover of the busy active: t0 = clock_timestamp() right
-- before pg_terminate_backend(its pid); returns "pid|token|t0|t1" (epoch
-- seconds), t1 the commit time of the first output with a newer token (empty
-- after timeout_s); NULL if no backlog came.
CREATE FUNCTION bench_terminate(p text, min_backlog bigint, timeout_s float8)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	a text[] := string_to_array(bench_busy_active(p, min_backlog), '|');
	t0 timestamptz;
BEGIN
	IF a IS NULL THEN
		RETURN NULL;
	END IF;
	t0 := clock_timestamp();
	IF NOT pg_terminate_backend(a[1]::int) THEN
		RAISE EXCEPTION 'could not terminate %', a[1];
	END IF;
	RETURN a[1] || '|' || a[2] || '|' || extract(epoch FROM t0) || '|'
		|| coalesce(bench_wait_token(p, a[2]::bigint, a[3]::bigint, timeout_s)::text, '');
END $$;

-- When the first entry of src after the old active's last committed batch
-- became visible (commit time of the promoter's transaction, epoch seconds):
-- if that is after t0, the processor was idle (caught up) when it lost its
-- active and the takeover also waited for input.
CREATE FUNCTION bench_work_visible(p text, src text, old_token bigint) RETURNS numeric
LANGUAGE sql AS $$
	SELECT extract(epoch FROM pg_xact_commit_timestamp(e.xmin))
	  FROM spool.entries e
	 WHERE e.source = src
	   AND e.cursor > (SELECT o.cursor FROM spool.outbox_store o
					    WHERE o.processor = p AND o.token <= old_token ORDER BY o.id DESC LIMIT 1)
	 ORDER BY e.cursor LIMIT 1
$$;
SQL

now() { date +%s.%N; }
# stats VALUES...: "min median p99 max" (p99 by nearest rank); "- - - -" for none
stats() {
	printf '%s\n' "$@" | sort -g | awk 'NF {a[++n] = $1} END {
		if (!n) { print "- - - -"; exit }
		p = int(0.99 * n); if (p < 0.99 * n) p++;
		med = (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2;
		printf "%.1f %.1f %.1f %.1f", a[1], med, a[p], a[n] }'
}
spool_end() { sql -c "SELECT next_cursor - 1 FROM spool.spool_state"; }

# ---------------------------------------------------------------------------
# (1) and (2): throughput over a preloaded spool
# ---------------------------------------------------------------------------
log "producing $N messages (~100-byte JSON) over $WA_PARTS partitions to $BOOT ..."
reply=$(kafka "produce wa $N -1 100")
case $reply in OK*) ;; *) echo "produce failed: $reply"; exit 1 ;; esac
sql -c "SELECT spool.create_source('wa', '$BOOT', '{wa}', '{\"batch_size\": 20000}')" \
	-c "SELECT spool.start_source('wa')" >/dev/null
log "ingesting them into the spool ..."
for i in $(seq 1 $((600 + N / 2000))); do
	done_n=$(sql -c "SELECT coalesce(sum(next_offset), 0) FROM spool.offsets WHERE source = 'wa'")
	[ "$done_n" -ge "$N" ] && break
	[ "$i" -eq $((600 + N / 2000)) ] && { echo "ingest stalled at $done_n of $N"; exit 1; }
	sleep 0.5
done
sql -c "SELECT spool.stop_source('wa')" >/dev/null
got=$(sql -c "SELECT count(*) FROM spool.entries WHERE source = 'wa'")
[ "$got" -eq "$N" ] || { echo "the spool has $got of $N entries"; exit 1; }
END_WA=$(spool_end)
# The last N2 entries for (2): entries after this cursor.
if [ "$N2" -lt "$N" ]; then
	START2=$(sql -c "SELECT cursor FROM spool.entries WHERE source = 'wa' ORDER BY cursor DESC OFFSET $N2 LIMIT 1")
else
	START2=0
fi
# The sum of the last 100 seqs of a key grows with seq: every key crosses
# this once, about half way through the spool (a few hundred to 1000 alerts).
THRESHOLD=$((N * 50))
wa_options() {	# wa_options START
	echo "{\"sources\": [\"wa\"], \"replicas\": 2, \"batch_size\": 5000, \"checkpoint_every\": 200000,
	  \"run_as\": \"bench_owner\", \"start\": $1,
	  \"handler\": {\"key\": \"amount\", \"value\": \"seq\", \"aggregate\": \"sum\",
	                \"window\": {\"type\": \"count\", \"size\": 100}, \"threshold\": $THRESHOLD, \"target\": \"alerts\"}}"
}

# time_processor NAME HANDLER START ENTRIES: create, start, wait until both
# replicas are at the end of the spool; sets RATE (entries/s per replica),
# FIRST_S (when the first replica got there), OUTPUTS.
time_processor() {
	local name=$1 handler=$2 start=$3 n=$4 out t0 t1 first
	sql -c "CHECKPOINT" -c "SELECT spool.create_processor('$name', '$handler', '$(wa_options "$start")')" >/dev/null
	mapfile -t out < <(sql -c "SELECT extract(epoch FROM clock_timestamp())" \
		-c "SELECT spool.start_processor('$name')" \
		-c "SELECT bench_wait_done('$name', $END_WA, 2, $((120 + n / 1000)))")
	t0=${out[0]}
	if [ -z "${out[2]:-}" ]; then
		echo "processor $name did not reach cursor $END_WA in time (or the server went away):"
		sql -c "SELECT replica, pid, role, cursor, committed_cursor, last_error FROM spool.processor_status WHERE processor = '$name'" || true
		exit 1
	fi
	first=${out[2]%|*}
	t1=${out[2]#*|}
	RATE=$(echo "$n / ($t1 - $t0)" | bc -l)
	FIRST_S=$(echo "$first - $t0" | bc -l)
	OUTPUTS=$(sql -c "SELECT count(*) FROM spool.outbox_store WHERE processor = '$name'")
	HASHES=$(sql -c "SELECT coalesce(sum(hash_mismatches), 0) || ' state hash mismatches'
	                 FROM spool.processor_status WHERE processor = '$name'")
}

wa_rate=()
pl_rate=()
log
log "(1) spool.window_alert, 2 replicas, $N entries; (2) PL/pgSQL equivalent, $N2 entries (start cursor $START2)"
for run in $(seq 1 "$RUNS"); do
	time_processor "wa_c$run" 'spool.window_alert(jsonb, spool.entries[])' 0 "$N"
	wa_rate[$run]=$RATE
	wa_out=$OUTPUTS
	log "$(printf '  run %d: (1) window_alert %9.0f entries/s per replica (%.2f s; active done after %.2f s), %s outputs, %s' \
		"$run" "$RATE" "$(echo "$N / $RATE" | bc -l)" "$FIRST_S" "$OUTPUTS" "$HASHES")"
	sql -c "SELECT spool.drop_processor('wa_c$run')" >/dev/null

	time_processor "wa_p$run" 'bench_wa_plpgsql(jsonb, spool.entries[])' "$START2" "$N2"
	pl_rate[$run]=$RATE
	pl_out=$OUTPUTS
	log "$(printf '  run %d: (2) PL/pgSQL     %9.0f entries/s per replica (%.2f s; active done after %.2f s), %s outputs, %s' \
		"$run" "$RATE" "$(echo "$N2 / $RATE" | bc -l)" "$FIRST_S" "$OUTPUTS" "$HASHES")"
	sql -c "SELECT spool.drop_processor('wa_p$run')" >/dev/null
done

# Same outputs?  Against window_alert over the same entries (a 1-replica
# check processor when (2) ran over fewer entries).
ref=wa_c$RUNS
if [ "$N2" -lt "$N" ]; then
	ref=wa_check
	sql -c "SELECT spool.create_processor('wa_check', 'spool.window_alert(jsonb, spool.entries[])',
	            '$(wa_options "$START2")'::jsonb || '{\"replicas\": 1}')" \
		-c "SELECT spool.start_processor('wa_check')" >/dev/null
	[ -n "$(sql -c "SELECT bench_wait_done('wa_check', $END_WA, 1, 600)")" ] || { echo "wa_check did not finish"; exit 1; }
	sql -c "SELECT spool.drop_processor('wa_check')" >/dev/null
fi
read -r diff_n ref_n < <(sql -F ' ' -c "
	WITH a AS (SELECT key, payload FROM spool.outbox_store WHERE processor = '$ref'),
	     b AS (SELECT key, payload FROM spool.outbox_store WHERE processor = 'wa_p$RUNS')
	SELECT (SELECT count(*) FROM ((SELECT * FROM a EXCEPT ALL SELECT * FROM b)
	                              UNION ALL (SELECT * FROM b EXCEPT ALL SELECT * FROM a)) d),
	       (SELECT count(*) FROM a)")
if [ "$diff_n" -eq 0 ]; then
	equiv="same $ref_n outputs (key and payload) as window_alert over the same entries"
else
	equiv="DIFFERENT outputs from window_alert over the same entries: $diff_n rows differ (window_alert: $ref_n)"
fi
log "  (2) vs window_alert: $equiv"

# ---------------------------------------------------------------------------
# (3) takeovers on a growing spool
# ---------------------------------------------------------------------------
producer() {
	local start=0 r
	while [ ! -e "$work/stop_producing" ] && [ $((start + PRODUCE_BATCH)) -le "$TK_MAX" ]; do
		r=$(KAFKA_WAIT_S=60 kafka "produce tk $PRODUCE_BATCH -1 100 $start")
		case $r in
			OK*) ;;
			*) echo "producer: $r" > "$work/producer_error"; return ;;
		esac
		start=$((start + PRODUCE_BATCH))
		echo "$start" > "$work/produced.tmp"
		mv "$work/produced.tmp" "$work/produced"
		sleep 0.1
	done
}
producing() { [ -n "$PRODUCER_PID" ] && kill -0 "$PRODUCER_PID" 2>/dev/null && [ ! -e "$work/producer_error" ]; }
stop_producer() {
	touch "$work/stop_producing"
	if [ -n "$PRODUCER_PID" ]; then
		wait "$PRODUCER_PID" 2>/dev/null || true
		PRODUCER_PID=
	fi
}

log
log "(3) takeovers: PL/pgSQL handler, one output per entry, replicas 2, batch_size 100; producing $PRODUCE_BATCH messages every ~100 ms over $TK_PARTS partitions"
echo 0 > "$work/produced"
sql -c "SELECT spool.create_source('tk', '$BOOT', '{tk}', '{\"batch_size\": 20000, \"batch_ms\": 20}')" \
	-c "SELECT spool.create_processor('tk_exit', 'bench_echo(jsonb, spool.entries[])',
	        '{\"sources\": [\"tk\"], \"replicas\": 2, \"batch_size\": 100, \"run_as\": \"bench_owner\", \"start\": \"latest\"}')" \
	-c "SELECT spool.start_source('tk')" >/dev/null
producer &
PRODUCER_PID=$!
sql -c "SELECT spool.start_processor('tk_exit')" >/dev/null

wait_pair() {	# wait_pair PROCESSOR VICTIM_PID
	local r
	r=$(sql -c "SELECT bench_wait_pair('$1', ${2:-0}, 60)")
	case $r in
		ok) return 0 ;;
		pair*)	# go on, but say so: the next takeover may include a catch-up
			trailing=$((trailing + 1))
			log "  note: $1's standby did not get within 1000 entries of the committed cursor in 60 s ($r)"
			return 0 ;;
	esac
	echo "processor $1: no active + standby after 60 s ($r):"
	sql -c "SELECT replica, pid, role, cursor, committed_cursor, token, last_error FROM spool.processor_status WHERE processor = '$1'"
	exit 1
}
trailing=0
check_producer() {
	producing || { echo "the producer stopped: $(cat "$work/producer_error" 2>/dev/null || echo "reached $TK_MAX messages")"; exit 1; }
}

exit_ms=()
exit_adj=()
exit_ext=()
exit_idle=0
wait_pair tk_exit 0
for i in $(seq 1 "$TAKEOVERS"); do
	check_producer
	res=$(sql -c "SELECT bench_terminate('tk_exit', $MIN_BACKLOG, 30)")
	[ -n "$res" ] || { echo "takeover $i: tk_exit never had $MIN_BACKLOG entries to do"; exit 1; }
	IFS='|' read -r apid atok t0 t1 <<< "$res"
	[ -n "$t1" ] || { echo "takeover $i: no output with a new token 30 s after terminating $apid"; exit 1; }
	wv=$(sql -c "SELECT bench_work_visible('tk_exit', 'tk', $atok)")
	ms=$(echo "($t1 - $t0) * 1000" | bc -l)
	if [ -n "$wv" ] && [ "$(echo "$wv > $t0" | bc)" = 1 ]; then
		exit_idle=$((exit_idle + 1))
		adj=$(echo "($t1 - $wv) * 1000" | bc -l)
	else
		adj=$ms
	fi
	wait_pair tk_exit "$apid"
	ext=$(sql -c "SELECT round(last_takeover_ms::numeric, 1) FROM spool.processor_status WHERE processor = 'tk_exit' AND role = 'active'")
	exit_ms[$i]=$ms
	exit_adj[$i]=$adj
	exit_ext[$i]=${ext:-0}
	log "$(printf '  exit %2d: terminated %s (token %s): first commit with a new token after %7.1f ms (from work available: %7.1f ms; extension: %s ms)' \
		"$i" "$apid" "$atok" "$ms" "$adj" "${ext:-?}")"
done

# The stall phase: a second processor with lease_ttl '1 s', from where the first stopped.
sql -c "SELECT spool.stop_processor('tk_exit')" >/dev/null
for _ in $(seq 1 300); do
	[ "$(sql -c "SELECT count(*) FROM pg_stat_activity WHERE (backend_type LIKE 'spool processor tk_exit/%' OR application_name LIKE 'spool processor tk_exit/%')")" -eq 0 ] && break
	sleep 0.1
done
EXIT_END=$(sql -c "SELECT committed_cursor FROM spool.processor_checkpoints WHERE processor = 'tk_exit'")
sql -c "SELECT spool.create_processor('tk_stall', 'bench_echo(jsonb, spool.entries[])',
	        '{\"sources\": [\"tk\"], \"replicas\": 2, \"batch_size\": 100, \"run_as\": \"bench_owner\",
	          \"lease_ttl\": \"1 s\", \"start\": $EXIT_END, \"handler\": {\"sleep_ms\": 40}}')" \
	-c "SELECT spool.start_processor('tk_stall')" >/dev/null
stall_ms=()
stall_free=()
stall_ext=()
stall_idle=0
stall_blocked=0
TTL_MS=1000
wait_pair tk_stall 0
for i in $(seq 1 "$STALLS"); do
	check_producer
	# Stop it inside its handler (a hung handler), not inside a commit.
	res=$(sql -c "SELECT bench_busy_active('tk_stall', $MIN_BACKLOG, true)")
	[ -n "$res" ] || { echo "stall $i: tk_stall never had $MIN_BACKLOG entries to do"; exit 1; }
	IFS='|' read -r apid atok maxid <<< "$res"
	t0=$(now)
	kill -STOP "$apid"
	STOPPED_PID=$apid
	# Bounded from the client too: see sql_t.
	t1=$(sql_t $((TTL_MS / 1000 + 4)) -c "SELECT bench_wait_token('tk_stall', $atok, $maxid, $((TTL_MS / 1000 + 2)))" 2>/dev/null) || t1=
	note=
	if [ -z "$t1" ]; then
		# Stopped inside its fenced commit (the grant waits for its lock on
		# the lease row), or holding an LWLock every commit needs: nobody can
		# take over until it continues (and dies of the termination the new
		# grant sent it, or fails its fence).  What was everyone waiting for?
		stall_blocked=$((stall_blocked + 1))
		why=$(sql_t 5 -c "SELECT string_agg(CASE WHEN pid = $apid THEN 'stopped ' ELSE '' END
		                      || substr(coalesce(nullif(application_name, ''), backend_type), 7) || ' ' || coalesce(wait_event_type || ':' || wait_event, 'on CPU'),
		                      '; ' ORDER BY pid)
		                   FROM pg_stat_activity
		                  WHERE backend_type LIKE 'spool %' AND backend_type <> 'spool launcher'" 2>/dev/null) ||
			why="the server did not answer in 5 s: the stopped replica holds an LWLock every query needs"
		note=" BLOCKED: no takeover while it was stopped ($((TTL_MS / 1000 + 2)) s): $why; continued it"
		kill -CONT "$apid"
		STOPPED_PID=
		t1=$(sql -c "SELECT bench_wait_token('tk_stall', $atok, $maxid, 30)")
		[ -n "$t1" ] || { echo "stall $i: no takeover 30 s after continuing $apid"; exit 1; }
	else
		kill -CONT "$apid"
		STOPPED_PID=
	fi
	wv=$(sql -c "SELECT bench_work_visible('tk_stall', 'tk', $atok)")
	ms=$(echo "($t1 - $t0) * 1000" | bc -l)
	[ -n "$wv" ] && [ "$(echo "$wv > $t0" | bc)" = 1 ] && stall_idle=$((stall_idle + 1))
	wait_pair tk_stall 0
	ext=$(sql -c "SELECT round(last_takeover_ms::numeric, 1) FROM spool.processor_status WHERE processor = 'tk_stall' AND role = 'active'")
	stall_ms[$i]=$ms
	[ -z "$note" ] && stall_free+=("$ms")
	stall_ext[$i]=${ext:-0}
	log "$(printf '  stall %d: stopped %s (token %s): first commit with a new token after %7.1f ms (extension: last_takeover_ms %s)%s' \
		"$i" "$apid" "$atok" "$ms" "${ext:-?}" "$note")"
done

# Every entry of tk has exactly one output (across both processors).
stop_producer
[ -e "$work/producer_error" ] && { echo "$(cat "$work/producer_error")"; exit 1; }
PRODUCED=$(cat "$work/produced")
log "  produced $PRODUCED messages; waiting for the spool and tk_stall to catch up ..."
for i in $(seq 1 1200); do
	done_n=$(sql -c "SELECT coalesce(sum(next_offset), 0) FROM spool.offsets WHERE source = 'tk'")
	[ "$done_n" -ge "$PRODUCED" ] && break
	[ "$i" -eq 1200 ] && { echo "ingest of tk stalled at $done_n of $PRODUCED"; exit 1; }
	sleep 0.25
done
END_TK=$(spool_end)
[ -n "$(sql -c "SELECT bench_wait_done('tk_stall', $END_TK, 2, 600)")" ] ||
	{ echo "tk_stall did not reach cursor $END_TK"; exit 1; }
sql -c "SELECT spool.stop_processor('tk_stall')" >/dev/null
for _ in $(seq 1 300); do
	[ "$(sql -c "SELECT count(*) FROM pg_stat_activity WHERE (backend_type LIKE 'spool processor tk_stall/%' OR application_name LIKE 'spool processor tk_stall/%')")" -eq 0 ] && break
	sleep 0.1
done
IFS='|' read -r tk_entries tk_seqs tk_outputs tk_lost tk_dup tk_stray < <(sql -c "
	WITH o AS (SELECT (payload->>'cursor')::bigint AS c, count(*) AS n
	             FROM spool.outbox_store WHERE processor IN ('tk_exit', 'tk_stall') GROUP BY 1),
	     e AS (SELECT cursor, value FROM spool.entries WHERE source = 'tk' AND cursor <= $END_TK)
	SELECT (SELECT count(*) FROM e),
	       (SELECT count(DISTINCT value->>'seq') FROM e),
	       (SELECT sum(n) FROM o),
	       (SELECT count(*) FROM e LEFT JOIN o ON o.c = e.cursor WHERE o.c IS NULL),
	       (SELECT coalesce(sum(n - 1), 0) FROM o WHERE n > 1),
	       (SELECT count(*) FROM o WHERE c NOT IN (SELECT cursor FROM e))")
log "  outputs: $tk_entries entries of tk ($tk_seqs distinct seqs of $PRODUCED produced), $tk_outputs outputs; lost $tk_lost, duplicated $tk_dup, for no entry $tk_stray"
exactly_once=no
[ "$tk_entries" -eq "$PRODUCED" ] && [ "$tk_seqs" -eq "$PRODUCED" ] && [ "$tk_lost" -eq 0 ] &&
	[ "$tk_dup" -eq 0 ] && [ "$tk_stray" -eq 0 ] && exactly_once=yes

PGVER=$(sql -c "SHOW server_version")
cleanup

# ---------------------------------------------------------------------------
# (4) Kafka consumer-group takeover, for comparison
# ---------------------------------------------------------------------------
rb_table=
if [ "$SKIP_REBALANCE" = 1 ]; then
	log
	log "(4) skipped (SKIP_REBALANCE=1)"
else
	log
	log "(4) bench/rebalance_bench.sh 3 1 (takes minutes) ..."
	set +e
	bash "$here/bench/rebalance_bench.sh" 3 1 > "$work/rebalance.out"
	rb_rc=$?
	set -e
	rb_table=$(cat "$work/rebalance.out")
	[ "$rb_rc" -eq 0 ] || log "rebalance_bench.sh exited with $rb_rc"
fi

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
m1=$(median "${wa_rate[@]}")
m2=$(median "${pl_rate[@]}")
read -r e_min e_med e_p99 e_max <<< "$(stats "${exit_ms[@]}")"
read -r ea_min ea_med ea_p99 ea_max <<< "$(stats "${exit_adj[@]}")"
read -r ee_min ee_med ee_p99 ee_max <<< "$(stats "${exit_ext[@]}")"
read -r s_min s_med s_p99 s_max <<< "$(stats "${stall_ms[@]}")"
read -r se_min se_med se_p99 se_max <<< "$(stats "${stall_ext[@]}")"
read -r sf_min sf_med sf_p99 sf_max <<< "$(stats "${stall_free[@]}")"
ok() { [ "$(echo "$1" | bc -l)" = 1 ] && echo "met" || echo "NOT met"; }

echo
echo "Processors, $(nproc) cores, PostgreSQL $PGVER, $(date -u +%Y-%m-%d); ENTRIES=$N RUNS=$RUNS TAKEOVERS=$TAKEOVERS STALLS=$STALLS"
echo
echo "(1)/(2) entries/s per replica (ENTRIES / time from start_processor until both replicas' cursors reach the end of the spool):"
printf '%-62s %12s %12s %12s\n' "case" "median" "min" "max"
printf '%-62s %12.0f %12.0f %12.0f\n' "(1) spool.window_alert (C), 2 replicas, $N entries" "$m1" \
	"$(printf '%s\n' "${wa_rate[@]}" | sort -g | head -1)" "$(printf '%s\n' "${wa_rate[@]}" | sort -g | tail -1)"
printf '%-62s %12.0f %12.0f %12.0f\n' "(2) PL/pgSQL equivalent (jsonb state), 2 replicas, $N2 entries" "$m2" \
	"$(printf '%s\n' "${pl_rate[@]}" | sort -g | head -1)" "$(printf '%s\n' "${pl_rate[@]}" | sort -g | tail -1)"
printf 'ratio (1)/(2): %.1fx; (2): %s\n' "$(echo "$m1 / $m2" | bc -l)" "$equiv"
bench_result "(1) window_alert, entries/s per replica" "$m1" higher
bench_result "(2) PL/pgSQL handler, entries/s per replica" "$m2" higher
[ "$N2" -lt "$N" ] && echo "note: (2) ran over the last $N2 of the $N entries (options \"start\": $START2), (1) over all of them"
echo "handler settings: key amount (1000 keys), value seq, sum over a count window of 100, threshold $THRESHOLD (each key alerts once);"
echo "batch_size 5000, checkpoint_every 200000; outputs per run: (1) $wa_out, (2) $pl_out"
echo
echo "(3) takeover latency, ms: commit time of the first output with the new token - the time of the terminate / SIGSTOP"
printf '%-62s %8s %8s %8s %8s %8s\n' "case" "n" "min" "median" "p99" "max"
printf '%-62s %8d %8s %8s %8s %8s\n' "(3a) clean exit (pg_terminate_backend), lease_ttl 5 s" "$TAKEOVERS" "$e_min" "$e_med" "$e_p99" "$e_max"
printf '%-62s %8d %8s %8s %8s %8s\n' "     from work available (see below)" "$TAKEOVERS" "$ea_min" "$ea_med" "$ea_p99" "$ea_max"
printf '%-62s %8d %8s %8s %8s %8s\n' "     extension's last_takeover_ms (exit -> ready)" "$TAKEOVERS" "$ee_min" "$ee_med" "$ee_p99" "$ee_max"
printf '%-62s %8d %8s %8s %8s %8s\n' "(3b) stall (SIGSTOP), lease_ttl 1 s" "$STALLS" "$s_min" "$s_med" "$s_p99" "$s_max"
printf '%-62s %8d %8s %8s %8s %8s\n' "     not stopped inside a fenced commit (not blocked)" "${#stall_free[@]}" "$sf_min" "$sf_med" "$sf_p99" "$sf_max"
printf '%-62s %8d %8s %8s %8s %8s\n' "     extension's last_takeover_ms (expiry or exit -> ready)" "$STALLS" "$se_min" "$se_med" "$se_p99" "$se_max"
bench_result "(3a) takeover after a clean exit, median ms" "$e_med" lower
bench_result "(3a) extension's last_takeover_ms, median" "$ee_med" lower
bench_result "(3b) takeover after a stall, median ms" "$s_med" lower
echo "each takeover starts while the active has >= $MIN_BACKLOG entries to do; if it was idle (caught up) all the same, 'from work"
echo "available' counts from when the next entry became visible: clean exits idle $exit_idle of $TAKEOVERS, stalls idle $stall_idle of $STALLS"
[ "$trailing" -gt 0 ] &&
	echo "a takeover started before the standby was within 1000 entries of the committed cursor: $trailing time(s) (see the notes above)"
[ "$stall_blocked" -gt 0 ] &&
	echo "stalls BLOCKED (stopped inside its fenced commit: no takeover while stopped; continued after lease_ttl + 2 s): $stall_blocked of $STALLS"
echo "exactly once: $tk_entries entries of the source (all $PRODUCED produced), $tk_outputs outputs: lost $tk_lost, duplicated $tk_dup, without an entry $tk_stray"
if [ -n "$rb_table" ]; then
	echo
	echo "(4) bench/rebalance_bench.sh 3 1:"
	echo "$rb_table"
fi

rb_leave=$(echo "$rb_table" | awk -F'|' '$2 ~ /^ leave / && $5 ~ /[0-9]/ {gsub(/ /, "", $5); print $5}')
rb_stall=$(echo "$rb_table" | awk -F'|' '$2 ~ /^ stall / && $5 ~ /[0-9]/ {gsub(/ /, "", $5); print $5}')
echo
echo "| case | runs | median | ratio / target |"
echo "|------|-----:|-------:|----------------|"
printf '| (1) window_alert, 2 replicas, entries/s per replica | %d | %.0f | target >= 200000: %s (%.2fx) |\n' \
	"$RUNS" "$m1" "$(ok "$m1 >= 200000")" "$(echo "$m1 / 200000" | bc -l)"
printf '| (2) PL/pgSQL equivalent, entries/s per replica%s | %d | %.0f | (1)/(2) = %.1fx |\n' \
	"$([ "$N2" -lt "$N" ] && echo " ($N2 entries)")" "$RUNS" "$m2" "$(echo "$m1 / $m2" | bc -l)"
printf '| (3a) takeover after a clean exit, ms | %d | %s | p99 %s ms, target < 100: %s |\n' \
	"$TAKEOVERS" "$e_med" "$e_p99" "$(ok "$e_p99 < 100")"
printf '| (3b) takeover after a stall (lease_ttl 1 s), ms | %d | %s | max %s ms, target <= 1200: %s%s |\n' \
	"$STALLS" "$s_med" "$s_max" "$(ok "$s_max <= 1200")" \
	"$([ "$stall_blocked" -gt 0 ] && echo "; $stall_blocked blocked until continued, the others max $sf_max ms")"
printf '| (3) outputs lost / duplicated | %d entries | %s / %s | target 0 / 0: %s |\n' \
	"$tk_entries" "$tk_lost" "$tk_dup" "$([ "$exactly_once" = yes ] && echo met || echo "NOT met")"
if [ -n "$rb_leave" ]; then
	printf '| (4) Kafka group takeover, member leaves, ms | 3 | %s | %.0fx (3a) |\n' "$rb_leave" "$(echo "$rb_leave / $e_med" | bc -l)"
fi
if [ -n "$rb_stall" ]; then
	printf '| (4) Kafka group takeover, member stalls, ms | 1 | %s | %.0fx (3b) |\n' "$rb_stall" "$(echo "$rb_stall / $s_med" | bc -l)"
fi
echo
echo "total run time of this benchmark (all cases): $(($(date +%s) - bench_start)) s"
[ "$exactly_once" = yes ]

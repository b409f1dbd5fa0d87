#!/usr/bin/env bash
# Benchmark: a processor's takeover after the promotion of a hot standby,
# without and with replicas on the standby (spool.standby_processors), on
# throwaway servers and one test Kafka cluster in one run.
#
# Each round builds a primary and a streaming hot standby (pg_basebackup),
# with the setting off or on on the standby.  The primary runs a source and
# a processor 'p' (1 replica, batch_size 200, checkpoint_every CHECKPOINT)
# whose PL/pgSQL handler does WORK md5 rounds per entry, so that replaying
# entries costs something.  ENTRIES messages are produced; once the active
# has committed at least GAP entries past its last snapshot (the replay a
# restart needs), the primary is stopped in immediate mode (a crash); once
# the standby has replayed all it received, it is promoted with
# pg_promote(wait => false) and a server-side loop (1 ms) times the moment
# the promoted server's processor has an active replica at the committed
# cursor of the promotion:
#   takeover ms      from pg_promote() to that moment (and, within it, to
#                    the first time pg_is_in_recovery() is false);
#   entries applied  what the new active applied before it was ready, from
#                    its log line ("it applied N entries ... since its start"
#                    without standby replicas, "... since the promotion"
#                    with them).
# Rounds alternate off and on.  Prints per-round lines, then a markdown
# table with medians and ratios (off / on).
#
# Usage: bash bench/standby_takeover_bench.sh [ROUNDS] [ENTRIES]
#   (defaults 5, 20000)
# Environment:
#   GAP=N          entries past the last snapshot at the crash (default 3000)
#   CHECKPOINT=N   the processor's checkpoint_every (default 5000, > GAP)
#   WORK=N         md5 rounds per entry in the handler (default 50)
#   SPOOL_BENCH_PORT  first server port (default 54363; unix sockets only)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-5}
N=${2:-20000}
GAP=${GAP:-3000}
CHECKPOINT=${CHECKPOINT:-5000}
WORK=${WORK:-50}
[ "$ROUNDS" -ge 1 ] && [ "$GAP" -lt "$CHECKPOINT" ] && [ "$N" -gt $((GAP * 2)) ] ||
	{ echo "usage: $0 [ROUNDS >= 1] [ENTRIES > 2 * GAP]  (GAP < CHECKPOINT)" >&2; exit 2; }

"$here/scripts/deps.sh"
. "$here/scripts/common.sh"
tree=$(prepare_build_tree "$(bench_src "$here")")
work=$(mktemp -d /tmp/spool_ext-standby-bench.XXXXXX)
[ "$(id -u)" -eq 0 ] && chown "$RUN_AS" "$work"
PORT=${SPOOL_BENCH_PORT:-54363}
SPORT=$((PORT + 1))
p_up=
s_up=
cleanup() {
	[ -n "$s_up" ] && as_user pg_ctl -D "$s_up" -m immediate stop >/dev/null 2>&1 || true
	[ -n "$p_up" ] && as_user pg_ctl -D "$p_up" -m immediate stop >/dev/null 2>&1 || true
	s_up=
	p_up=
	stop_kafka
}
on_exit() {
	local rc=$?
	cleanup
	if [ "$rc" -ne 0 ]; then
		for l in "$work"/*/log "$work"/*/s/log; do
			[ -s "$l" ] && cp "$l" "/tmp/standby_takeover_bench-$$-$(basename "$(dirname "$l")").log" &&
				echo "server log kept: /tmp/standby_takeover_bench-$$-$(basename "$(dirname "$l")").log" >&2
		done
	fi
	rm -rf "$work" "$tree"
}
trap on_exit EXIT
log() { echo "$*" >&2; }

topics=()
for r in $(seq 1 "$ROUNDS"); do topics+=(--topic "off$r:4" --topic "on$r:4"); done
start_kafka "$work" "$tree" --brokers 1 "${topics[@]}"
BOOT=$KAFKA_BOOTSTRAP

# round MODE R: one primary and standby pair; writes "ms end applied lag
# cursor" into $work/result (run in this shell, so cleanup sees its servers).
round() {
	local mode=$1 r=$2 w=$work/$1$2 c ms applied lag line
	mkdir -p "$w" "$w/s"
	[ "$(id -u)" -eq 0 ] && chown "$RUN_AS" "$w" "$w/s"
	psql_p() { as_user psql -X -q -At -h "$w" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }
	psql_s() { as_user psql -X -q -At -h "$w/s" -p "$SPORT" -d postgres -v ON_ERROR_STOP=1 "$@"; }

	start_server "$w" "$PORT" "spool.nonce_workers = 0
max_wal_senders = 4"
	p_up=$w/data
	psql_p >/dev/null <<SQL
CREATE EXTENSION spool_ext;
CREATE ROLE bench_owner NOLOGIN;
GRANT spool_admin TO bench_owner;
-- WORK md5 rounds per entry: replaying entries costs what processing them did.
CREATE FUNCTION bench_cost(state jsonb, entries spool.entries[])
RETURNS spool.step LANGUAGE plpgsql AS \$\$
DECLARE
	e spool.entries;
	h text := coalesce(state->>'h', '');
	i int;
BEGIN
	FOREACH e IN ARRAY entries LOOP
		h := md5(h || e.value::text);
		FOR i IN 2..$WORK LOOP
			h := md5(h);
		END LOOP;
	END LOOP;
	RETURN ROW(jsonb_build_object('n', coalesce((state->>'n')::bigint, 0) + cardinality(entries),
								  'h', h), NULL)::spool.step;
END \$\$;
GRANT EXECUTE ON FUNCTION bench_cost(jsonb, spool.entries[]) TO bench_owner;
SELECT spool.create_source('src', '$BOOT', '{$mode$r}', '{"batch_ms": 20}');
SELECT spool.start_source('src');
SELECT spool.create_processor('p', 'bench_cost(jsonb, spool.entries[])',
	'{"run_as": "bench_owner", "replicas": 1, "batch_size": 200, "checkpoint_every": $CHECKPOINT}');
SELECT spool.start_processor('p');
SQL
	as_user pg_basebackup -h "$w" -p "$PORT" -D "$w/s/data" -R -X stream -c fast >/dev/null
	cat >> "$w/s/data/postgresql.conf" <<CONF
port = $SPORT
unix_socket_directories = '$w/s'
spool.standby_processors = $mode
CONF
	as_user pg_ctl -D "$w/s/data" -l "$w/s/log" -w start >/dev/null
	s_up=$w/s/data
	if [ "$mode" = on ]; then
		psql_s -c "SET statement_timeout = '120s'" -c "DO \$\$ BEGIN
			WHILE NOT EXISTS (SELECT FROM spool.processor_status WHERE processor = 'p' AND role = 'standby') LOOP
				PERFORM pg_sleep(0.01);
			END LOOP; END \$\$" >/dev/null
	fi

	[ "$(kafka "produce $mode$r $N -1 100")" = "OK produced $N" ] || { log "produce failed"; return 1; }
	# Bounded (120 s): the active is GAP entries past its last snapshot.
	psql_p -c "SET statement_timeout = '120s'" -c "DO \$\$ BEGIN
		WHILE NOT EXISTS (SELECT FROM spool.processor_checkpoints WHERE processor = 'p'
						  AND committed_cursor - coalesce(state_cursor, 0) >= $GAP) LOOP
			PERFORM pg_sleep(0.002);
		END LOOP; END \$\$" >/dev/null
	as_user pg_ctl -D "$w/data" -m immediate stop >/dev/null
	p_up=
	# Replayed all it received: no receiver streaming and the replay position
	# still for 300 ms (after a crash the received WAL may end in a partial
	# record, so the receive position can stay ahead of the replay position).
	psql_s -c "SET statement_timeout = '120s'" -c "DO \$\$
		DECLARE
			last pg_lsn;
			still int := 0;
		BEGIN
			WHILE still < 30 LOOP
				IF EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')
				   OR last IS DISTINCT FROM pg_last_wal_replay_lsn() THEN
					still := 0;
				ELSE
					still := still + 1;
				END IF;
				last := pg_last_wal_replay_lsn();
				PERFORM pg_sleep(0.01);
			END LOOP;
		END \$\$" >/dev/null
	c=$(psql_s -c "SELECT committed_cursor FROM spool.processor_checkpoints WHERE processor = 'p'")
	lag=$(psql_s -c "SELECT coalesce($c - max(cursor), -1) FROM spool.processor_status WHERE processor = 'p' AND pid IS NOT NULL")
	# Timed on the server: pg_promote() to an active replica at the cursor c.
	ms=$(psql_s -c "SET statement_timeout = '120s'" -c "DO \$\$
		DECLARE
			t0 timestamptz := clock_timestamp();
			t_end timestamptz;
		BEGIN
			PERFORM pg_promote(false);
			WHILE NOT EXISTS (SELECT FROM spool.processor_status WHERE processor = 'p'
							  AND role = 'active' AND cursor >= $c) LOOP
				IF t_end IS NULL AND NOT pg_is_in_recovery() THEN
					t_end := clock_timestamp();
				END IF;
				PERFORM pg_sleep(0.001);
			END LOOP;
			RAISE NOTICE 'ms % %', round(extract(epoch FROM clock_timestamp() - t0) * 1000, 1),
				round(extract(epoch FROM coalesce(t_end, clock_timestamp()) - t0) * 1000, 1);
		END \$\$" 2>&1 | sed -n 's/.*NOTICE:  ms //p')
	line=$(grep -o 'is ready at cursor [0-9]*: it applied [0-9]* entries' "$w/s/log" | head -n 1)
	applied=$(echo "$line" | sed -n 's/.*it applied \([0-9]*\) entries/\1/p')
	as_user pg_ctl -D "$w/s/data" -m fast stop >/dev/null
	s_up=
	rm -rf "$w"
	echo "$ms ${applied:--1} $lag $c" > "$work/result"
}

declare -A MS END APPLIED
for r in $(seq 1 "$ROUNDS"); do
	for mode in off on; do
		round "$mode" "$r"
		read -r ms end applied lag c < "$work/result"
		log "round $r standby_processors=$mode: committed cursor $c, standby replica lag $lag, end of recovery $end ms, takeover $ms ms, applied $applied entries"
		MS[$mode]="${MS[$mode]:-} $ms"
		END[$mode]="${END[$mode]:-} $end"
		APPLIED[$mode]="${APPLIED[$mode]:-} $applied"
	done
done

# shellcheck disable=SC2086
ms_off=$(median ${MS[off]})
# shellcheck disable=SC2086
ms_on=$(median ${MS[on]})
# shellcheck disable=SC2086
end_off=$(median ${END[off]})
# shellcheck disable=SC2086
end_on=$(median ${END[on]})
# shellcheck disable=SC2086
ap_off=$(median ${APPLIED[off]})
# shellcheck disable=SC2086
ap_on=$(median ${APPLIED[on]})
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }
since_end() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
bench_result standby_takeover_off_ms "$ms_off" lower
bench_result standby_takeover_on_ms "$ms_on" lower
bench_result standby_takeover_off_applied "$ap_off" lower
bench_result standby_takeover_on_applied "$ap_on" lower

echo
echo "Takeover after promoting a hot standby: $ROUNDS rounds each, $N entries, crash at >= $GAP entries past the snapshot"
echo "(checkpoint_every $CHECKPOINT, batch_size 200, handler $WORK md5 rounds per entry, 1 replica per server)"
echo
echo "| median over $ROUNDS rounds | standby_processors off | on | off / on |"
echo "|---|---|---|---|"
echo "| pg_promote() to an active replica at the committed cursor (ms) | $ms_off | $ms_on | $(ratio "$ms_off" "$ms_on") |"
echo "| of which pg_promote() to the end of recovery (ms) | $end_off | $end_on | |"
echo "| of which the end of recovery to that replica (ms, difference of the medians) | $(since_end "$ms_off" "$end_off") | $(since_end "$ms_on" "$end_on") | $(ratio "$(since_end "$ms_off" "$end_off")" "$(since_end "$ms_on" "$end_on")") |"
echo "| entries the new active applied before it was ready | $ap_off | $ap_on | $(ratio "$ap_off" "$ap_on") |"
echo
echo "per round (ms): off${MS[off]}; on${MS[on]}"
echo "per round (entries): off${APPLIED[off]}; on${APPLIED[on]}"

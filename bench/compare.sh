#!/usr/bin/env bash
# Side by side in one run: a benchmark built from this tree against the same
# benchmark built from another commit (the "before" of a change).  The bench
# script of this tree runs both times; only the extension it builds differs
# (SPOOL_SRC).  Rounds alternate A B B A ... so that neither build always runs
# first.  Each bench records its figures with bench_result (scripts/common.sh);
# the table shows, per figure, the median over the rounds of each build and
# the ratio this tree / REV, and says which is better.
#
# Usage: bash bench/compare.sh REV BENCH [BENCH ARGS...]
#   REV    a commit (e.g. HEAD~3); BENCH: nonce, outbox, processor or ingest
#   ROUNDS rounds per build (default 2: A B B A)
#   LOGS   a directory to keep each run's full output in (default: dropped)
# Example: bash bench/compare.sh e584403 nonce 2 10 16
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { echo "usage: $0 REV BENCH [BENCH ARGS...]" >&2; exit 2; }
rev=$1
bench=$2
shift 2
ROUNDS=${ROUNDS:-2}
. "$here/scripts/common.sh"
script="$here/bench/${bench}_bench.sh"
[ -f "$script" ] || { echo "no such benchmark: $script" >&2; exit 2; }
revname=$(git -C "$here" rev-parse --short "$rev")
headname=$(git -C "$here" rev-parse --short HEAD)
[ -z "$(git -C "$here" status --porcelain)" ] || headname="$headname+changes"

work=$(mktemp -d /tmp/spool_ext-compare.XXXXXX)
trap '[ -n "${LOGS:-}" ] && mkdir -p "$LOGS" && cp "$work"/*.log "$LOGS"/; rm -rf "$work"' EXIT
mkdir "$work/rev"
git -C "$here" archive "$rev" | tar -x -C "$work/rev"

run() {	# run WHICH ROUND [BENCH ARGS...]
	local which=$1 round=$2 src
	shift 2
	[ "$which" = rev ] && src="$work/rev" || src="$here"
	echo "== round $round: $bench bench built from $([ "$which" = rev ] && echo "$revname" || echo "$headname")" >&2
	SPOOL_SRC=$src BENCH_RESULTS="$work/$which.results" bash "$script" "$@" > "$work/$which.$round.log" 2>&1 ||
		{ echo "benchmark failed; its output:" >&2; tail -n 40 "$work/$which.$round.log" >&2; exit 1; }
	tail -n 25 "$work/$which.$round.log" >&2
}
for r in $(seq 1 "$ROUNDS"); do
	if [ $((r % 2)) -eq 1 ]; then run rev "$r" "$@"; run head "$r" "$@"; else run head "$r" "$@"; run rev "$r" "$@"; fi
done

echo
echo "$bench bench, side by side: $revname (before) vs $headname (after), $ROUNDS rounds each (A B B A ...), args: $*"
echo "$(nproc) cores, $(date -u +%Y-%m-%d)"
printf '%-58s %12s %12s %8s  %s\n' "figure (median over rounds)" "$revname" "$headname" "ratio" "after is"
cut -f1 "$work/rev.results" "$work/head.results" | awk '!seen[$0]++' | while IFS= read -r c; do
	a=$(median $(awk -F'\t' -v c="$c" '$1 == c {print $2}' "$work/rev.results"))
	b=$(median $(awk -F'\t' -v c="$c" '$1 == c {print $2}' "$work/head.results"))
	better=$(awk -F'\t' -v c="$c" '$1 == c {print $3; exit}' "$work/rev.results" "$work/head.results")
	if [ -z "$a" ] || [ -z "$b" ]; then	# a figure only one of the builds has
		printf '%-58s %12s %12s %8s  %s\n' "$c" "${a:--}" "${b:--}" "" "(one build only)"
		continue
	fi
	r=$(echo "$b / $a" | bc -l)
	if [ "$better" = higher ]; then pct=$(echo "($r - 1) * 100" | bc -l); else pct=$(echo "(1 - $r) * 100" | bc -l); fi
	verdict=$(printf '%+.1f%% %s' "$pct" "$([ "$(echo "$pct >= 0" | bc -l)" = 1 ] && echo better || echo worse)")
	printf '%-58s %12.2f %12.2f %7.3fx  %s\n' "$c" "$a" "$b" "$r" "$verdict"
done

#!/usr/bin/env bash
# Run every spool_ext test: pg_regress, isolation specs, and TAP tests, each
# against throwaway servers run by an unprivileged user.  Exits non-zero if
# any test fails.
#
# Usage: bash scripts/test.sh [all|regress|isolation|tap] [TAP test file ...]
set -euo pipefail
layer=${1:-all}
shift || true
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"

# The source tree's layering first: folders include each other without a cycle.
bash "$here/scripts/check_layers.sh" >/dev/null

tree=$(prepare_build_tree "$here")
echo "spool_ext: testing in $tree"
status=0
case $layer in
	all) only=() ;;
	regress) only=(ISOLATION= TAP_TESTS=) ;;
	isolation) only=(REGRESS= TAP_TESTS=) ;;
	tap) only=(REGRESS= ISOLATION=)
		[ $# -gt 0 ] && only+=("PROVE_TESTS=$*") ;;
	*) echo "usage: $0 [all|regress|isolation|tap] [TAP test files]" >&2; exit 2 ;;
esac
# The libraries of released versions, for the upgrade test (TAP 028):
# SPOOL_RELEASE_0_1=<installation> and so on.
releases=()
release_dir=$(mktemp -d /tmp/spool_ext-releases.XXXXXX)
chmod 755 "$release_dir"
if [ "$layer" = all ] || [ "$layer" = tap ]; then
	while read -r version rev; do
		case $version in '' | '#'*) continue ;; esac
		if dir=$(prepare_release "$version" "$release_dir"); then
			releases+=("SPOOL_RELEASE_${version//./_}=$dir")
		else
			echo "spool_ext: the library of release $version cannot be built; the upgrade test skips it" >&2
		fi
	done < "$here/test/releases"
fi
as_user env "${releases[@]}" make -C "$tree" PG_CONFIG="$PG_CONFIG" "${only[@]}" installcheck || status=$?
if [ $status -ne 0 ]; then
	for f in "$tree"/regression.diffs "$tree"/output_iso/regression.diffs; do
		[ -s "$f" ] && { echo "==== $f"; head -c 20000 "$f"; }
	done
	# Failed TAP files: the failures, then the tail of each of their servers' logs.
	for f in "$tree"/tmp_check/log/regress_log_*; do
		[ -f "$f" ] && grep -qE '^\[[^]]*\]\([^)]*\) not ok|Looks like your test exited|Bail out' "$f" || continue
		t=${f##*/regress_log_}
		echo "==== failures in $f"
		grep -A4 -E '^\[[^]]*\]\([^)]*\) not ok|Looks like your test exited|Bail out' "$f" | head -n 80
		for l in "$tree"/tmp_check/log/"${t}"_*.log; do
			[ -f "$l" ] && { echo "==== tail of $l"; tail -n 80 "$l"; }
		done
	done
	echo "spool_ext: TESTS FAILED (tree kept at $tree)"
	exit $status
fi
echo "spool_ext: all tests passed"
rm -rf "$tree" "$release_dir"

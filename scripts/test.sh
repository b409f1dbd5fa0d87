#!/usr/bin/env bash
# Run every spool_ext test: pg_regress, isolation specs, and TAP tests, each
# against throwaway servers run by an unprivileged user.  Exits non-zero if
# any test fails.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/deps.sh"
. "$here/scripts/common.sh"

tree=$(prepare_build_tree "$here")
echo "spool_ext: testing in $tree"
status=0
as_user make -C "$tree" PG_CONFIG="$PG_CONFIG" installcheck || status=$?
if [ $status -ne 0 ]; then
	for f in "$tree"/regression.diffs "$tree"/output_iso/regression.diffs; do
		[ -s "$f" ] && { echo "==== $f"; head -c 20000 "$f"; }
	done
	for f in "$tree"/tmp_check/log/regress_log_*; do
		[ -f "$f" ] && { echo "==== tail of $f"; tail -n 60 "$f"; }
	done
	echo "spool_ext: TESTS FAILED (tree kept at $tree)"
	exit $status
fi
echo "spool_ext: all tests passed"
rm -rf "$tree"

#!/usr/bin/env bash
# The layering of src/: each folder is a subsystem whose header X/X.h is its
# only door, and the folders include each other without a cycle.  Prints the
# edges (folder -> folders it includes) and exits non-zero on a cycle or on an
# include of another folder's private header.
#
# Usage: bash scripts/check_layers.sh
set -euo pipefail
cd "$(dirname "$0")/../src"
status=0
edges=$(mktemp)
trap 'rm -f "$edges"' EXIT
folders=" $(ls -d */ | tr -d / | tr '\n' ' ')"
for dir in */; do
	d=${dir%/}
	echo "$d $d" >> "$edges"	# every folder is a node, even one that includes nothing
	grep -ho '^#include "[a-z_]*/[a-z_]*\.h"' "$d"/*.[ch] | sed 's/#include "//; s/"$//' | sort -u |
		while IFS=/ read -r to header; do
			[ "$to" = "$d" ] && continue
			case $folders in *" $to "*) ;; *) continue ;; esac	# PostgreSQL's own headers
			if [ "$header" != "$to.h" ]; then
				echo "layering: $d includes $to/$header, which is not $to's door ($to/$to.h)" >&2
				echo BAD
			fi
			echo "$d $to" >> "$edges"
		done | grep -q BAD && status=1 || true
done
# tsort reports a loop in its input on stderr.
loop=$(tsort "$edges" 2>&1 >/dev/null || true)
if [ -n "$loop" ]; then
	echo "layering: the folders include each other in a cycle:" >&2
	echo "$loop" >&2
	status=1
fi
echo "folder -> folders it includes"
awk '$1 != $2 {to[$1] = to[$1] " " $2} $1 == $2 {seen[$1] = 1}
	END {for (d in seen) printf "%-10s ->%s\n", d, (d in to) ? to[d] : " (none)"}' "$edges" | sort
echo "order (each folder after those it includes): $(tsort "$edges" 2>/dev/null | tac | tr '\n' ' ')"
[ $status -eq 0 ] && echo "layering: ok, no cycles"
exit $status

# Shared by the scripts: where PostgreSQL is, which user runs servers, and a
# private, writable copy of the source tree for that user.
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BIN=$("$PG_CONFIG" --bindir)
export PATH="$PG_BIN:$PATH"
RUN_AS=${SPOOL_RUN_AS:-postgres}

# as_user CMD...: run CMD as the unprivileged server user (PostgreSQL refuses root).
as_user() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u "$RUN_AS" -- env PATH="$PATH" "$@"
	else
		"$@"
	fi
}

# as_root CMD...: run CMD with rights to write into PostgreSQL's directories.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# prepare_build_tree SRC: copy SRC into a fresh directory the server user owns,
# build and install the extension from it, and print the directory.
prepare_build_tree() {
	local src=$1 tree
	tree=$(mktemp -d /tmp/spool_ext-build.XXXXXX)
	rsync -a --exclude .git --exclude 'tmp_*' --exclude '*.o' --exclude '*.so' \
		--exclude results --exclude output_iso --exclude log "$src"/ "$tree"/
	[ "$(id -u)" -eq 0 ] && chown -R "$RUN_AS" "$tree"
	chmod 755 "$tree"
	as_user make -s -C "$tree" PG_CONFIG="$PG_CONFIG" -j2 >&2
	as_root make -s -C "$tree" PG_CONFIG="$PG_CONFIG" install >&2
	echo "$tree"
}

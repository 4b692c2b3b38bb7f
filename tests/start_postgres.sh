#!/usr/bin/env bash
# Start a throw-away PostgreSQL server (Debian's package) for the search tests and print its URL.
# usage: tests/start_postgres.sh DIR PORT   — installs the package when it is missing (root, Debian).
set -euo pipefail
dir=$1
port=$2
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
password="ps-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mkdir -p "$dir"
printf '%s\n' "$password" > "$dir/pwfile"
run_as=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system postgres
  chown -R postgres "$dir"
  run_as=(runuser -u postgres --)
fi
"${run_as[@]}" "$bin/initdb" -D "$dir/data" --auth=scram-sha-256 --username=postgres --pwfile="$dir/pwfile" >/dev/null
"${run_as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null
echo "postgresql://postgres:${password}@127.0.0.1:${port}/postgres"

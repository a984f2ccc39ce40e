#!/usr/bin/env bash
# Debezium for the `debezium` benchmark group, in .tools/debezium/ (ignored by git). Idempotent:
# quiet when everything is in place.
#
#   bench/debezium/setup.sh                      # install / verify
#   bench/debezium/setup.sh --update-checksums   # after changing pom.xml: download and rewrite
#                                                # checksums.sha256 (review the diff)
#
# What it installs:
#   .tools/debezium/libs/    the runtime jars of bench/debezium/pom.xml (Kafka Connect 4.3.0, the
#                            Debezium 3.6.1.Final PostgreSQL connector, log4j2), each checked
#                            against bench/debezium/checksums.sha256; exactly that set
#   .tools/debezium/classes/ Launch.class (javac from Launch.java) and log4j2.properties
#
# The benchmark then runs `java -cp '.tools/debezium/classes:.tools/debezium/libs/*' Launch
# worker.properties connector.properties`. Needs a JDK 17+ (javac) and Maven; where they are
# missing it names the Debian packages rather than installing them (`make up` installs Java and
# Maven for the broker; javac comes with default-jdk-headless).
set -euo pipefail

log() { printf '[debezium] %s\n' "$*" >&2; }
die() { printf '[debezium] error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/bench/debezium"
TOOLS="$ROOT/.tools/debezium"

update=()
case "${1:-}" in
  "") ;;
  --update-checksums) update=(--update-checksums) ;;
  *) die "unknown argument '$1' (only --update-checksums)" ;;
esac

command -v java >/dev/null || die "java is not on PATH: install a JDK 17+ (apt-get install default-jdk-headless)"
command -v javac >/dev/null || die "javac is not on PATH (a JRE is not enough): apt-get install default-jdk-headless"
command -v mvn >/dev/null || die "mvn is not on PATH: apt-get install maven"

"$ROOT/scripts/maven-libs.sh" "$HERE/pom.xml" "$HERE/checksums.sha256" "$TOOLS/libs" "${update[@]}" \
  || die "could not resolve the pinned Debezium jars (Maven Central reachable?)"

# Compiled again only when the source or the log configuration changed.
classes="$TOOLS/classes"
if ! cmp -s "$HERE/Launch.java" "$classes/Launch.java" || ! cmp -s "$HERE/log4j2.properties" "$classes/log4j2.properties" \
   || ! [ -f "$classes/Launch.class" ]; then
  rm -rf "$classes.new" && mkdir -p "$classes.new"
  javac -nowarn --release 17 -cp "$TOOLS/libs/*" -d "$classes.new" "$HERE/Launch.java" \
    || die "javac Launch.java failed"
  cp "$HERE/Launch.java" "$HERE/log4j2.properties" "$classes.new/"
  rm -rf "$classes" && mv "$classes.new" "$classes"
  log "compiled Launch.java into ${classes#"$ROOT"/}"
fi

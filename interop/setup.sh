#!/usr/bin/env bash
# The foreign-client toolkit's libraries, in .tools/interop/ (ignored by git). Idempotent: when
# everything is in place and still matches the pinned versions it checks the jars and returns.
#
#   interop/setup.sh                      # install / verify; quiet when nothing changes
#   interop/setup.sh --update-checksums   # after changing interop/java/pom.xml: download and
#                                         # rewrite interop/java/checksums.sha256 (review the diff)
#
# What it installs:
#   .tools/interop/venv/        Python venv with interop/python/requirements.txt (exact pins:
#                               fastavro, confluent-kafka)
#   .tools/interop/java/libs/   the runtime jars of interop/java/pom.xml (Apache Avro, the Kafka
#                               client and their dependencies), each checked against
#                               interop/java/checksums.sha256; exactly that set, nothing more
#
# Java programs then run as single-file sources, no build step:
#   java -cp '.tools/interop/java/libs/*' interop/java/Produce.java ...
#
# Needs a JDK (the source launcher compiles; a JRE is not enough), Maven and python3-venv. On a
# Debian machine without them it installs `default-jdk-headless maven python3-venv` with apt-get
# (root or sudo), like scripts/chromium.sh.
set -euo pipefail

log() { printf '[interop] %s\n' "$*" >&2; }
die() { printf '[interop] error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools/interop"
VENV="$TOOLS/venv"
LIBS="$TOOLS/java/libs"
POM="$ROOT/interop/java/pom.xml"
CHECKSUMS="$ROOT/interop/java/checksums.sha256"
REQUIREMENTS="$ROOT/interop/python/requirements.txt"

update_checksums=false
case "${1:-}" in
  "") ;;
  --update-checksums) update_checksums=true ;;
  *) die "unknown argument '$1' (only --update-checksums)" ;;
esac

# --- system packages -------------------------------------------------------------------------
have_jdk() { command -v java >/dev/null && command -v javac >/dev/null; }
have_venv() { python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }
missing=()
have_jdk || missing+=(default-jdk-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v python3 >/dev/null && have_venv || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (or install sudo) to install ${missing[*]}"
    SUDO="sudo"
  fi
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  out="$(mktemp)"
  trap 'rm -f "$out"' EXIT
  $SUDO apt-get update -qq >"$out" 2>&1 || { cat "$out" >&2; die "apt-get update failed"; }
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$out" 2>&1 \
    || { cat "$out" >&2; die "apt-get install ${missing[*]} failed"; }
  have_jdk || die "java/javac still not on PATH after installing default-jdk-headless"
  command -v mvn >/dev/null || die "mvn still not on PATH after installing maven"
  have_venv || die "python3 cannot create a venv after installing python3-venv"
fi

mkdir -p "$TOOLS/java"

# --- Python ----------------------------------------------------------------------------------
# The stamp is the requirements file as installed: a changed pin reinstalls.
py_stamp="$VENV/.requirements"
if ! [ -x "$VENV/bin/python" ] || ! cmp -s "$REQUIREMENTS" "$py_stamp"; then
  log "creating the Python venv in ${VENV#"$ROOT"/}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQUIREMENTS" \
    || die "pip install -r ${REQUIREMENTS#"$ROOT"/} failed"
  "$VENV/bin/python" -c 'import fastavro, confluent_kafka' \
    || die "fastavro / confluent_kafka do not import in $VENV"
  cp "$REQUIREMENTS" "$py_stamp"
fi

# --- Java ------------------------------------------------------------------------------------
# The jars in libs/ must be exactly the pinned set: names and sha256 as in checksums.sha256.
update=()
$update_checksums && update=(--update-checksums)
"$ROOT/scripts/maven-libs.sh" "$POM" "$CHECKSUMS" "$LIBS" "${update[@]}"

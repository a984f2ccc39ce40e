#!/usr/bin/env bash
# What building trialflow needs beyond Rust: rdkafka's `ssl` feature compiles librdkafka against
# the system's OpenSSL (found with pkg-config), which TLS and SASL/SCRAM connections to Kafka
# need; the Kafka security test generates its certificates with the `openssl` command.
# Idempotent: installs Debian's pkg-config, libssl-dev and openssl only where missing (needs root
# or sudo then).
#
# Why the system's OpenSSL and not `ssl-vendored` (OpenSSL built from source into the binary):
# Debian patches its libssl for security fixes without a rebuild of trialflow, and a cold build
# stays minutes shorter on two cores.
set -euo pipefail

log() { printf '[build-deps] %s\n' "$*" >&2; }
die() { printf '[build-deps] error: %s\n' "$*" >&2; exit 1; }

missing=()
command -v pkg-config >/dev/null || missing+=(pkg-config)
{ command -v pkg-config >/dev/null && pkg-config --exists openssl; } || missing+=(libssl-dev)
command -v openssl >/dev/null || missing+=(openssl)
[ "${#missing[@]}" -eq 0 ] && exit 0

command -v apt-get >/dev/null || die "${missing[*]} missing and apt-get is not available: install them (OpenSSL's development files and pkg-config)"
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
pkg-config --exists openssl || die "pkg-config still finds no openssl after installing libssl-dev"

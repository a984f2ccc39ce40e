#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the browser test of the researcher inbox
# (consumers/tests/alert_api.rs). Idempotent: prints the two paths when both are installed,
# otherwise installs Debian's `chromium` and `chromium-driver` first (needs root or sudo).
#
#   scripts/chromium.sh          # prints `CHROMIUM=<path>` and `CHROMEDRIVER=<path>`
#
# Debian's packages, not a browser build downloaded by a tool: the machines reach the Debian
# archive but not the sites such tools download from.
set -euo pipefail

log() { printf '[chromium] %s\n' "$*" >&2; }
die() { printf '[chromium] error: %s\n' "$*" >&2; exit 1; }

find_browser() { command -v chromium || command -v chromium-browser || true; }
find_driver() { command -v chromedriver || true; }

if [ -z "$(find_browser)" ] || [ -z "$(find_driver)" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (or install sudo) to install chromium and chromium-driver"
    SUDO="sudo"
  fi
  log "installing chromium and chromium-driver with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine has no package lists yet; an old list may name versions no longer served.
  # Quiet unless it fails: then apt's own output says why.
  out="$(mktemp)"
  trap 'rm -f "$out"' EXIT
  $SUDO apt-get update -qq >"$out" 2>&1 || { cat "$out" >&2; die "apt-get update failed"; }
  $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >"$out" 2>&1 \
    || { cat "$out" >&2; die "apt-get install chromium chromium-driver failed"; }
fi

browser="$(find_browser)"
driver="$(find_driver)"
[ -n "$browser" ] || die "chromium is still not on PATH after installing"
[ -n "$driver" ] || die "chromedriver is still not on PATH after installing"
echo "CHROMIUM=$browser"
echo "CHROMEDRIVER=$driver"

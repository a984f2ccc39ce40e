#!/usr/bin/env bash
# The foreign OpenAPI validator of the OpenAPI test (trialflow/tests/openapi.rs):
# openapi-spec-validator from PyPI, in a venv under .tools/openapi-validator/ (ignored by git),
# with every package pinned to an exact version. Idempotent: when the venv holds exactly these
# pins it only prints the tool's path.
#
#   scripts/openapi-validator.sh     # prints `OPENAPI_SPEC_VALIDATOR=<path>`
#
# Needs python3 with venv (Debian: python3-venv; installed with apt-get when missing, root or
# sudo, like scripts/chromium.sh).
set -euo pipefail

log() { printf '[openapi-validator] %s\n' "$*" >&2; }
scratch="$(mktemp)"
trap 'rm -f "$scratch"' EXIT
die() { printf '[openapi-validator] error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.tools/openapi-validator"
TOOL="$VENV/bin/openapi-spec-validator"

# openapi-spec-validator and everything it pulls in, as `pip freeze` listed them in a clean venv.
# To upgrade: install the new version in a scratch venv, copy its `pip freeze` here.
PINS='annotated-types==0.8.0
attrs==26.1.0
jsonschema==4.26.0
jsonschema-path==0.5.0
jsonschema-specifications==2025.9.1
lazy-object-proxy==1.13.0
openapi-schema-validator==0.9.0
openapi-spec-validator==0.9.0
pathable==0.6.0
pydantic==2.14.4
pydantic-settings==2.16.3
pydantic_core==2.50.5
python-dotenv==1.2.4
PyYAML==6.0.4
referencing==0.37.0
rfc3339-validator==0.1.4
rpds-py==2026.9.1
six==1.17.0
typing-inspection==0.4.5
typing_extensions==4.16.0'

have_venv() { command -v python3 >/dev/null && python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }
if ! have_venv; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (or install sudo) to install python3-venv"
    SUDO="sudo"
  fi
  log "installing python3-venv with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >"$scratch" 2>&1 || { cat "$scratch" >&2; die "apt-get update failed"; }
  $SUDO apt-get install -y -qq --no-install-recommends python3-venv >"$scratch" 2>&1 \
    || { cat "$scratch" >&2; die "apt-get install python3-venv failed"; }
fi

# Names compared case- and separator-insensitively, as pip does (PyYAML, typing_extensions).
normalize() { tr 'A-Z_' 'a-z-' | sort; }
installed() { "$VENV/bin/pip" freeze --all --exclude pip --exclude setuptools --exclude wheel 2>/dev/null | normalize; }

if [ ! -x "$TOOL" ] || [ "$(installed)" != "$(printf '%s\n' "$PINS" | normalize)" ]; then
  log "installing openapi-spec-validator into ${VENV#"$ROOT"/}"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  printf '%s\n' "$PINS" >"$scratch"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r "$scratch" \
    || die "pip install failed (is PyPI reachable?)"
  "$VENV/bin/pip" check -q >/dev/null || { "$VENV/bin/pip" check >&2; die "the pinned set is inconsistent"; }
fi
[ -x "$TOOL" ] || die "$TOOL is still missing after installing"
echo "OPENAPI_SPEC_VALIDATOR=$TOOL"

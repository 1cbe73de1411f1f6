#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian/Ubuntu machine, into ./.venv, and prepare the demo data.
#   bash scripts/setup.sh          # runtime dependencies + Fashion-MNIST in ./data
#   bash scripts/setup.sh --test   # the same + the test dependencies
# Offline, Fashion-MNIST comes from Debian's package dataset-fashion-mnist (installed here when apt-get can);
# online, torchvision downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REQS=requirements.txt
[ "${1:-}" = "--test" ] && REQS=requirements-test.txt

# -- 1. Debian's Fashion-MNIST files (optional: without them torchvision downloads the data)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=$(command -v sudo || true); fi
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "[setup] apt-get install -y dataset-fashion-mnist"
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "[setup] could not install dataset-fashion-mnist; torchvision will try to download the data"
  fi
fi

# -- 2. Python environment
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[setup] pip install -r $REQS (PyTorch takes about a minute)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQS"

# -- 3. Demo data
.venv/bin/python -m src.datasets.fashion_mnist --root data
echo "[setup] done: use .venv/bin/python"

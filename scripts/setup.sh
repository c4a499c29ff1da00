#!/usr/bin/env bash
# Set up sdrepl in ./.venv: a virtual environment, torch (the CPU build unless an NVIDIA GPU is present,
# then the CUDA build), and the project in editable mode with its test extras and Ray Serve (serve --ray).
# Safe to run again: it does nothing when .venv is already up to date with pyproject.toml.
#   SDREPL_VENV=DIR   where the environment goes (default .venv)
#   PYTHON=python3.X  which interpreter creates it
#   TORCH_VERSION=X   which torch release (default 2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SDREPL_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.sdrepl-setup"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
    exit 0
fi

say() { printf 'setup: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment in $VENV"
    "$PY" -m venv "$VENV"
fi
# pip's warnings about index folders this machine's pip config names but lacks are noise here.
pip_install() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
        pip_install "torch==$TORCH_VERSION"
    else
        say "no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
        # A local CPU wheel (pip's find-links) is used where there is one; otherwise PyTorch's CPU index.
        pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
                   --extra-index-url https://pypi.org/simple
    fi
fi

say "installing sdrepl, its test tools and Ray Serve (serve --ray)"
pip_install -e ".[test,ray]"
touch "$STAMP"
say "ready: $VENV"

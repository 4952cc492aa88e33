#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with dlibbridge and
# everything its tests use.  Idempotent; safe to re-run.  Everything comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build available locally; an unpinned torch
# would pull a multi-GB CUDA build.
"$VPY" -m pip install -q "torch==2.13.0"
# Editable, so that commands run from the checkout (python -m dlibbridge, pytest) import
# the installed build, compiled extension included, not a half-built source tree.
"$VPY" -m pip install -q -e ".[test,onnx,fuzz]"
"$VPY" -c "import dlibbridge, dlibbridge._codec, torch, dlib; print('dlibbridge', dlibbridge.__version__, '| torch', torch.__version__, '| dlib', dlib.__version__)"

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
CHECK="import dlibbridge, dlibbridge._codec, torch, dlib; print('dlibbridge', dlibbridge.__version__, '| torch', torch.__version__, '| dlib', dlib.__version__)"
# A rerun with nothing changed takes seconds: the stamp hashes what the install depends on
# (build files, the C++ core, this script, the interpreter, and the list of Python modules,
# which the editable install maps one by one) and pip runs only when it differs or the
# imports fail.
stamp() {
  { cat pyproject.toml CMakeLists.txt tools/setup.sh; find cpp -type f | LC_ALL=C sort | xargs cat;
    find dlibbridge -name '*.py' | LC_ALL=C sort; "$VPY" -V; } | sha256sum | cut -d' ' -f1
}
STAMP=.venv/.dlibbridge-setup-stamp
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp)" ] && "$VPY" -c "$CHECK" 2>/dev/null; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build available locally; an unpinned torch
# would pull a multi-GB CUDA build.
"$VPY" -m pip install -q "torch==2.13.0"
# Editable, so that commands run from the checkout (python -m dlibbridge, pytest) import
# the installed build, compiled extension included, not a half-built source tree.
"$VPY" -m pip install -q -e ".[test,onnx,fuzz]"
# The face_recognition package, for tests/test_face_recognition.py: without its dependencies,
# whose `dlib` is a source build (dlib-bin provides dlib; the others are in the test extra).
"$VPY" -m pip install -q --no-deps "face_recognition==1.3.0"
"$VPY" -c "$CHECK"
stamp > "$STAMP"

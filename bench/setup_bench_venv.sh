#!/usr/bin/env bash
# Create bench/.venv-mecha: the sd-mecha baseline for bench/bench_merge.py, kept apart from the project venv.
# torch is pinned to the project's version so pip takes the local CPU build (an unpinned torch pulls
# gigabytes of CUDA wheels). sd-mecha 1.1.8 asks for torch>=2.1.0, which the pin satisfies, so its own
# dependency list is installed as declared.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${here}/.venv-mecha"
python="${PYTHON:-python3}"

if [ ! -x "${venv}/bin/python" ]; then
    "${python}" -m venv "${venv}"
fi
"${venv}/bin/pip" install -q \
    "torch==2.13.0" \
    "sd-mecha==1.1.8" \
    "safetensors==0.8.0" \
    "numpy" \
    "psutil"
"${venv}/bin/python" - <<'PY'
import sd_mecha
import torch
print(f"sd-mecha venv ready: torch {torch.__version__}, sd_mecha from {sd_mecha.__file__}")
PY

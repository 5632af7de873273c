#!/usr/bin/env bash
# GPU smoke test (< 5 min on one GPU): tiny recipe on CUDA in bf16 with the HF engine, and with
# vLLM when it is importable; prints step time, tokens/s, accuracy and peak GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
"$PY" -c "import hapo_cli" 2>/dev/null || "$PY" -m pip install -q -e .
exec "$PY" scripts/gpu_smoke.py "${1:-10}"

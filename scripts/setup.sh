#!/usr/bin/env bash
# Create a virtual environment with pinned torch and fairseq, and fairseq_kd installed editable.
# Usage: bash scripts/setup.sh   (VENV=path to put it elsewhere; default .venv in the repository)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
TORCH=torch==2.13.0
FAIRSEQ=ve-fairseq==0.12.3

echo "[setup] virtual environment $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

echo "[setup] $TORCH, first, so that nothing later pulls another build"
pip_install "$TORCH"

echo "[setup] $FAIRSEQ without its declared dependencies (they name torchaudio, which would replace torch)"
pip_install --no-deps "$FAIRSEQ"

echo "[setup] fairseq_kd (editable) with fairseq's run-time needs and the test tools"
echo "        (pip then reports that ve-fairseq wants torchaudio: expected, see README)"
pip_install -e "$ROOT[test]"
"$VENV/bin/python" -c "import fairseq, fairseq_kd, torch; print(f'[setup] ok: torch {torch.__version__}, fairseq {fairseq.__version__}')"

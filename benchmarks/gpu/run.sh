#!/usr/bin/env bash
# rayft's GPU benchmark on the lent GPU machine, from the repo root:
#   bash benchmarks/gpu/run.sh [parts...]        (default: all; see bench_gpu.py)
# Needs, carried from the development machine: .whl (ray, deepspeed, datasets, pydantic:
# built by ../shared/tools/device-wheels.sh .whl) and .gpu-assets/minilm (MiniLM's
# tokenizer files and config: `make gpu-assets`). Results go to $OUT (the device tool's
# folder) or benchmarks/results/gpu.
set -euo pipefail
SHARED="$(ls -d ../shared shared .gpu-assets/shared 2>/dev/null | head -1 || true)"
SITE=/tmp/site
if ! PYTHONPATH="$SITE" python3 -c 'import ray, deepspeed' 2>/dev/null; then
  source "$SHARED/tools/device-install.sh" .whl "$SITE"
  set -euo pipefail  # the install script switches these off at its end
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT_DIR="${OUT:-benchmarks/results/gpu}"
python3 benchmarks/gpu/bench_gpu.py --out "$OUT_DIR" "$@" 2>&1 | grep --line-buffered -v -E "FutureWarning|warnings.warn|return func|PlacementGroupCleaner|row/s"
python3 benchmarks/gpu/bench_gpu.py table --out "$OUT_DIR"

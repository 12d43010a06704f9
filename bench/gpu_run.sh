#!/bin/bash
# The prepared GPU call (issue 15): run on the lent GPU machine from the repository root, e.g. through
# the device tool with carry [".whl", ".gpucarry"]:
#   bash bench/gpu_run.sh
# .whl holds the duckdb wheel for Python 3.12 (the GPU image has every other requirement);
# .gpucarry/tokenizer holds SmolLM2's tokenizer files (cp ~/.cache/kledger/models/smollm2-135m/tokenizer*).
# Writes $OUT/model_scale_gpu.jsonl, $OUT/device.txt and $OUT/log.txt; stays inside ~7 minutes (--budget-s).
set -o pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/pkg/kledger
[ -n "$SKIP_PIP" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
cp -r kledger/* /tmp/pkg/kledger/
for d in ledger editors audit cli; do ln -sfn "$PWD/$d" "/tmp/pkg/kledger/$d"; done
export PYTHONPATH=/tmp/pkg:/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; nproc; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
python3 bench/model_scale.py run --device ${DEVICE:-cuda} --shapes ${SHAPES:-8b 1b 0.5b} --tokenizer .gpucarry/tokenizer \
  --workdir ${WORKDIR:-/tmp/ms} --out "$OUT/model_scale_gpu.jsonl" --threads 8 --budget-s ${BUDGET:-400} 2>&1 | tee "$OUT/log.txt"

#!/usr/bin/env bash
# bench/speed.py on one GPU (written for a fresh H100/H200 machine), within ~9 minutes of wall time.
# Run from the repository root after installing the wheels (diffusers, webdataset, braceexpand, lpips;
# torchvision must import too); results go to $OUT (default ~/.cache/flash_speed/gpu, outside the repository):
#     OUT=/path/to/results bash bench/speed_gpu.sh
# SDXL real, 1024 px, bf16. $OUT gets env.txt, one JSON per run and log.txt; the tables are printed at the
# end, and `python bench/speed.py --table FILE.json` prints one again. Each run is guarded by `timeout`, so
# an overrun does not lose the others, and saves its JSON as soon as a pattern finishes. The runs:
#   1. batch 2, eager: ours vs the reference pattern (also eager, as the original code ran)
#   2. batch 1, --gradient_checkpointing: memory, ours only
#   3. batch 2, --gradient_checkpointing: memory, ours only
#   4. batch 2, --compile (COMPILE_BLOCKS, in place) and --eager_too: compiled vs eager on the same models;
#      its warm-up is the compile time
# The caps below come from the times of the runs in bench/results/speed_h200_*.json (run 4 compiles first).
set -u
OUT=${OUT:-$HOME/.cache/flash_speed/gpu}
BUDGET=${BUDGET:-560}  # seconds for all four; the last run gets what is left
RES=$(mktemp -d)  # each run's full output; the results are copied to $OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
PY=${PY:-python3}
START=$SECONDS

if [ ! -f bench/speed.py ]; then
    echo "run this from the repository root (bench/speed.py not found in $PWD)"; exit 2
fi
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("torchvision", "diffusers", "transformers", "peft", "lpips", "webdataset", "braceexpand"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "(imported)"))
    except Exception as e:
        print(name, "MISSING:", repr(e))
PYEOF
if grep -q MISSING "$OUT/env.txt"; then
    echo "a package is missing (see above): install the wheels first"; exit 3
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$OUT/env.txt"

run() {  # run NAME CAP_SECONDS ARGS...: one guarded benchmark run, its log and results under $OUT
    local name=$1 cap=$2; shift 2
    echo "=== $name (cap ${cap}s, started at $((SECONDS - START))s)"
    timeout --signal=TERM --kill-after=10 "$cap" $PY bench/speed.py --backbone sdxl --size real --resolution 1024 \
        --mixed_precision bf16 "$@" --out "$RES/speed_$name.md" > "$RES/log_$name.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - START))s"
    cp "$RES/speed_$name.json" "$OUT/" 2>/dev/null
    { echo "=== $name"; grep -v "it/s\]\|s/it\]" "$RES/log_$name.txt"; } >> "$OUT/log.txt"
    grep -v "it/s\]\|s/it\]" "$RES/log_$name.txt" | tail -n 4
}

run sdxl_b2_eager 200 --batch_size 2 --warmup 1 --steps 2
run sdxl_b1_ckpt 60 --batch_size 1 --gradient_checkpointing --no_reference --no_flops --warmup 1 --steps 2
run sdxl_b2_ckpt 60 --batch_size 2 --gradient_checkpointing --no_reference --no_flops --warmup 1 --steps 2
run sdxl_b2_compile $((BUDGET - (SECONDS - START))) --batch_size 2 --compile --eager_too --no_reference \
    --warmup 2 --steps 4

echo "=== total $((SECONDS - START))s"
for f in "$RES"/speed_*.md; do echo; echo "##### $f"; cat "$f"; done

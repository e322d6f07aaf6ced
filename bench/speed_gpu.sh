#!/usr/bin/env bash
# bench/speed.py on one GPU (written for a fresh H200 machine), at most ~7 minutes of wall time in all.
# Run from the repository root with $OUT set (the device tool sets it), after installing the wheels
# (diffusers, webdataset, braceexpand, lpips; torchvision must import too), e.g.
#     bash bench/speed_gpu.sh
# Four runs, each guarded by `timeout` so that one failure or overrun does not lose the others; each
# writes its markdown table and JSON under $OUT as soon as a pattern finishes (a run cut off by its
# timeout still leaves what it had finished). Ordered so that the comparison that needs no compilation
# comes first:
#   1. SDXL real, 1024 px, batch 2, bf16, eager: ours vs the reference pattern              (cap  90 s)
#   2. SDXL real, 1024 px, batch 1, bf16, gradient checkpointing: memory, ours only         (cap  45 s)
#   3. SD1.5 real, 512 px, batch 4, bf16, ours compiled vs the reference (eager)            (cap 100 s)
#   4. SDXL real, 1024 px, batch 2, bf16, ours compiled vs the reference (eager)            (cap 150 s)
# Compilation: our step compiles several graphs (student forward+backward, the teacher with the LoRA
# off, the DMD fake score, the mid-block features forward+backward); for SDXL that may take 2-3 min on
# 16 cores. The reference runs eager in the compiled runs (--reference_compile no: the original code was
# eager, and compiling its fp32 copy would cost another minute or two); run 1 compares both eager.
# If run 4 is cut off during compilation, run 1 still holds the SDXL comparison.
# Measured on an H200 (2026-11-26): these caps were too short for three of the four runs. Run 1's
# reference pattern did not finish within 90 s (after our step's), and runs 3 and 4 were still compiling
# when their caps ended; only run 2 and our half of run 1 completed. Allow about 300 s for each of those.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor_cache}
PY=${PY:-python3}
START=$SECONDS

if [ ! -f bench/speed.py ]; then
    echo "run this from the repository root (bench/speed.py not found in $PWD)"; exit 2
fi
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("torchvision", "diffusers", "transformers", "peft", "lpips", "webdataset", "braceexpand"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "(imported)"))
    except Exception as e:
        print(name, "MISSING:", repr(e))
EOF
if grep -q MISSING "$OUT/env.txt"; then
    echo "a package is missing (see above): install the wheels first"; exit 3
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee -a "$OUT/env.txt"

run() {  # run NAME CAP_SECONDS ARGS...: one guarded benchmark run, its log and results under $OUT
    local name=$1 cap=$2; shift 2
    echo "=== $name (cap ${cap}s, started at $((SECONDS - START))s)"
    timeout --signal=TERM --kill-after=10 "$cap" $PY bench/speed.py "$@" --out "$OUT/speed_$name.md" \
        > "$OUT/log_$name.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - START))s"
    grep -v "it/s\]\|s/it\]" "$OUT/log_$name.txt" | tail -n 5
}

run sdxl_1024_b2_eager 90 --backbone sdxl --size real --resolution 1024 --batch_size 2 \
    --mixed_precision bf16 --warmup 1 --steps 3
run sdxl_1024_b1_ckpt 45 --backbone sdxl --size real --resolution 1024 --batch_size 1 \
    --mixed_precision bf16 --gradient_checkpointing --no_reference --no_flops --warmup 1 --steps 3
run sd15_512_b4_compile 100 --backbone sd --size real --resolution 512 --batch_size 4 \
    --mixed_precision bf16 --compile --reference_compile no --warmup 2 --steps 5
run sdxl_1024_b2_compile 150 --backbone sdxl --size real --resolution 1024 --batch_size 2 \
    --mixed_precision bf16 --compile --reference_compile no --warmup 2 --steps 4

echo "=== total $((SECONDS - START))s"
for f in "$OUT"/speed_*.md; do echo; echo "##### $f"; cat "$f"; done

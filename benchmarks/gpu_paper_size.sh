#!/usr/bin/env bash
# The paper-sized GPU figures of benchmarks/README.md in one run on one H100 / H200: about five minutes for the
# first five (measured), up to four more for `lavcap caption` (not yet measured on a GPU; its time limit is 240 s):
# training throughput, peak memory and the OT module's share of a step at batch 4 (precomputed CLIP embeddings as
# in the paper's recipe, then with gradient checkpointing, then with frames through the frozen CLIP tower),
# captioning latency of one 10 s clip and of 32 (shared prefill, per-beam prefill, compiled decoding step), each
# beside its hardware limit, the OT module against the per-sample loop on the GPU, and `lavcap caption` over 128
# synthetic 10 s clips with 0, 2, 4 and 8 decoding workers against the model-only bound, and (at most ten minutes
# more, not yet measured on a GPU) the memory of captioning and of a (Q)LoRA step with the decoder in bf16, 8-bit and
# 4-bit (bench_memory.py; needs bitsandbytes, the quantization extra).
# Random weights, nothing downloaded. Logs go to the folder given as $1 (default benchmarks/gpu-results). Exits with
# status 1 if any benchmark failed (the others still run).
#
#     bash benchmarks/gpu_paper_size.sh [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-benchmarks/gpu-results}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

failed=0
run() {  # run NAME SECONDS SCRIPT ARGS...: one benchmark, its output in $logs/NAME.log; a failure does not stop the rest
    local name=$1 seconds=$2 status
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$python" "$@" 2>&1 | tee "$logs/$name.log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status"
    [ "$status" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)"
train=(benchmarks/bench_train.py --config paper --device cuda --batch-size 4 --steps 25 --warmup 5)
run train_embeds 150 "${train[@]}" --workers 4
run generate 300 benchmarks/bench_generate.py --paper-size  # with the compiled variant (one compilation per batch size)
run ot 150 benchmarks/bench_ot.py --device cuda --repeats 10
run train_embeds_checkpointing 120 "${train[@]}" --workers 4 --gradient-checkpointing
run train_frames 150 "${train[@]}" --workers 12 --visual frames
run caption 240 benchmarks/bench_caption.py --paper-size --device cuda --workers 0 2 4 8
run memory 600 benchmarks/bench_memory.py --device cuda  # bf16, 8-bit, 4-bit: weights, captioning, (Q)LoRA step
echo "== summary"
grep -h "^| paper" "$logs"/train_*.log
grep -h "^| \|^batch\|^device" "$logs/generate.log"
grep -h "^| \|^device\|^model\|^serial\|^workers\|^peak" "$logs/caption.log"
grep -h "^| \|^measured" "$logs/memory.log"
exit $failed

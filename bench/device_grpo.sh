#!/usr/bin/env bash
# On the GPU machine: install the SGLang kit (.sglang-device/) and small wheels (.whl/), then run
# bench/grpo_step.py for the sglang and native backends. Results go to $OUT.
# Knobs: BACKENDS ("sglang native"), STEPS, SIZE (0.5B | 1.5B), REUSE (use_rollout_log_probs), NAME (output name).
#   run(command="bash bench/device_grpo.sh", carry=[".sglang-device", ".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d /tmp/site/sglang ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .sglang-device/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.sglang-device/stubs:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
sed -i 's/^AutoConfig.register("qwen3_asr\(_thinker\)\?", \(Qwen3ASR[A-Za-z]*Config\))/AutoConfig.register("qwen3_asr\1", \2, exist_ok=True)/' /tmp/site/sglang/srt/configs/qwen3_asr.py
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SGL="rollout.attention_backend=triton rollout.engine_kwargs.sglang.sampling_backend=pytorch \
rollout.engine_kwargs.sglang.grammar_backend=none rollout.engine_kwargs.sglang.mm_feature_transport=cpu \
rollout.engine_kwargs.sglang.cuda_graph_max_bs=256"
NAME=${NAME:-grpo_step}
python3 bench/grpo_step.py --backend ${BACKENDS:-sglang native} --steps ${STEPS:-4} --size ${SIZE:-0.5B} \
  --out "$OUT/$NAME.json" rollout.free_cache_engine=true rollout.use_rollout_log_probs=${REUSE:-false} $SGL 2>&1 \
  | grep -vE "it/s\]|s/it\]|seq/s\]|\[A|already exists" | tee "$OUT/$NAME.log"
cp /tmp/hybridrl_bench/run_sglang/sglang_server.log "$OUT/" 2>/dev/null
exit 0

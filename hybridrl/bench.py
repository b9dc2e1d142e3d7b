"""`hybridrl bench`: hybridrl's GRPO step beside the references, one machine, one run, one table.

    hybridrl bench --size 0.5B --steps 5 --out docs/benchmarks/bench [key=value ...]   # GPU, every row
    hybridrl bench --smoke --out /tmp/b                                                # CPU, tiny model, < 60 s

The standard workload (docs/benchmarks/README.md): a Qwen2.5 shape with random weights, 32 prompts x 8
samples, prompts ~130 tokens, completions forced to 256 tokens. Each row runs in its own subprocess with a
timeout (`python -m hybridrl.bench ROW SPEC RESULT`), so GPU memory is clean and a crash loses only its row:

  hybridrl-sglang / hybridrl-native  `hybridrl.train.train` for --steps steps; medians of steps 2..N
  trl              TRL GRPOTrainer (HF generate) on the same model folder, prompts and a cheap reward
  sglang-generate  SGLang alone: one /generate carrying all 256 requests (dummy weights)
  hf-generate      HF `model.generate` on the same 256 prompts
  ceilings         matmul TFLOP/s, device copy GB/s, and the update's 6 x params x tokens FLOP at that rate

`key=value` overrides go to the hybridrl rows and to the sglang-generate server (rollout.* keys).
Writes <out>.md (the table), <out>.json (versions, command, every row's figures and per-step metrics) and
<out>.png (stacked bars of the breakdown), rewritten after every row so a killed run keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from hybridrl import HybridRLError

ROWS = ("hybridrl-sglang", "hybridrl-native", "trl", "sglang-generate", "hf-generate", "ceilings")
TIMEOUT_S = {"hybridrl-sglang": 420, "hybridrl-native": 300, "trl": 300, "sglang-generate": 300,
             "hf-generate": 180, "ceilings": 120}
SMOKE = dict(prompts=4, n=2, new_tokens=8, steps=2, micro=8, words=12)
PARTS = ("gen", "old_log_prob", "update", "sync", "sleep", "reward", "adv")   # timing/* keys a step is made of
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    # random weights produce random text: score a property of it so groups have non-zero advantages
    return (sum(map(ord, solution_str)) % 7) / 6.0
'''
WORDS = "the of and to in is was for on that with as by at from it an be this are or which".split()


class Skip(Exception):
    """A row that cannot run here (package missing, no GPU): its cell says why."""


@dataclasses.dataclass
class Workload:
    size: str = "0.5B"
    prompts: int = 32
    n: int = 8
    new_tokens: int = 256
    steps: int = 5
    micro: int = 32
    words: int = 110
    smoke: bool = False
    root: str = "/tmp/hybridrl_bench"
    overrides: list = dataclasses.field(default_factory=list)
    model_dir: str = ""                                         # filled by prepare()
    data: str = ""
    reward: str = ""
    prompt_tokens: list = dataclasses.field(default_factory=list)   # chat-templated length of each prompt

    @property
    def completions(self) -> int:
        return self.prompts * self.n


# ---------------------------------------------------------------- inputs (the same as bench/grpo_step.py)

def make_inputs(root: Path, size: str, n_prompts: int, words: int = 110, smoke: bool = False) -> tuple[str, str, str]:
    """A random-weight model folder (Qwen2.5 shape, or tiny with smoke), a prompt parquet and the reward file."""
    from hybridrl.data import write_rows
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / ("tiny" if smoke else f"qwen25_{size}")
    if not (model_dir / "tokenizer_config.json").exists() and smoke:
        _save_model(model_dir, size, smoke)
    elif not (model_dir / "tokenizer_config.json").exists():   # in a child: it may use the GPU, which it then frees
        code = ("import sys, pathlib; from hybridrl.bench import _save_model; "
                "_save_model(pathlib.Path(sys.argv[1]), sys.argv[2], False)")
        done = subprocess.run([sys.executable, "-c", code, str(model_dir), size], capture_output=True, text=True)
        if done.returncode != 0:
            raise HybridRLError(f"building the {size} model failed: {done.stderr.strip()[-1500:]}")
    rng = random.Random(0)
    rows = [{"prompt": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))}],
             "data_source": "bench", "reward_model": {"style": "rule", "ground_truth": ""}, "extra_info": {"i": i}}
            for i in range(n_prompts * 4)]
    write_rows(rows, str(root / "prompts.parquet"))
    (root / "reward.py").write_text(REWARD)
    return str(model_dir), str(root / "prompts.parquet"), str(root / "reward.py")


def _save_model(model_dir: Path, size: str, smoke: bool) -> None:
    """Random init (on the GPU when there is one: 7B takes seconds there), written to a temporary folder and
    renamed, so a killed run never leaves half a model."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from hybridrl.models import qwen25_shape_config, qwen25_tokenizer
    from hybridrl.testing import save_tiny_model
    tmp = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if smoke:
        save_tiny_model(tmp)
    else:
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**qwen25_shape_config(size)), dtype=torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        qwen25_tokenizer().save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def prepare(w: Workload) -> Workload:
    from hybridrl.data import load_prompts
    from hybridrl.models import load_tokenizer
    model_dir, data, reward = make_inputs(Path(w.root), w.size, w.prompts, w.words, w.smoke)
    samples = load_prompts([data], load_tokenizer(model_dir), 256)[:w.prompts]
    return dataclasses.replace(w, model_dir=model_dir, data=data, reward=reward,
                               prompt_tokens=[len(s.prompt_ids) for s in samples])


def prompt_ids(w: Workload) -> list[list[int]]:
    """The workload's prompts as the trainer sees them, each repeated n times: [completions][prompt_len]."""
    from hybridrl.data import load_prompts
    from hybridrl.models import load_tokenizer
    samples = load_prompts([w.data], load_tokenizer(w.model_dir), 256)[:w.prompts]
    return [list(s.prompt_ids) for s in samples for _ in range(w.n)]


# ---------------------------------------------------------------- rows (each runs in its own subprocess)

def row_hybridrl(w: Workload, backend: str) -> dict:
    from hybridrl.config import load_config
    from hybridrl.train import train
    server = " ".join(_need_sglang(w) or ["sglang"]) if backend == "sglang" else None
    run_dir = Path(w.root) / f"run_{backend}"
    shutil.rmtree(run_dir, ignore_errors=True)
    over = [f"model.path={w.model_dir}", f"data.train_files=[{w.data}]", f"reward.custom_path={w.reward}",
            f"data.train_batch_size={w.prompts}", f"rollout.n={w.n}", f"actor.ppo_mini_batch_size={w.prompts}",
            f"actor.ppo_micro_batch_size_per_gpu={w.micro}", f"rollout.log_prob_micro_batch_size_per_gpu={w.micro}",
            "data.max_prompt_length=256", f"data.max_response_length={w.new_tokens}", "rollout.ignore_eos=true",
            f"rollout.name={backend}", "rollout.load_format=dummy", "rollout.gpu_memory_utilization=0.5",
            "rollout.free_cache_engine=true", "rollout.use_rollout_log_probs=false",
            f"trainer.total_training_steps={w.steps}", "trainer.val_before_train=false", "trainer.test_freq=-1",
            "trainer.logger=[console,jsonl]", f"trainer.default_local_dir={run_dir}", "trainer.resume_mode=disable",
            "actor.lr=1e-6", *(["trainer.device=cpu"] if w.smoke else []), *w.overrides]
    train(load_config(over))
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {**summarize_steps(steps, w), "server_cmd": server, "overrides": over, "per_step": steps}


def summarize_steps(steps: list[dict], w: Workload) -> dict:
    """Medians over steps 2..N (all steps if only one); unaccounted = step - its parts, per step, then the median."""
    steady = steps[1:] or steps

    def med(key):
        vals = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(vals) if vals else None
    for r in steady:
        r["timing/unaccounted"] = r["timing/step"] - sum(r.get(f"timing/{p}", 0.0) for p in PARTS)
    out = {f"{p}_s": med(f"timing/{p}") for p in PARTS}
    out.update(step_s=med("timing/step"), unaccounted_s=med("timing/unaccounted"), other_s=med("timing/other"),
               collate_s=med("timing/collate"), metrics_s=med("timing/metrics"),
               all_tokens_per_s=med("perf/tokens_per_s"), response_length=med("response_length/mean"),
               steps_timed=len(steady))
    peaks = [r["perf/gpu_peak_gb"] for r in steps if r.get("perf/gpu_peak_gb") is not None]
    out["peak_gb"] = max(peaks) if peaks else None
    gen_tokens = w.completions * (out["response_length"] or w.new_tokens)
    out["tokens_per_s"] = gen_tokens / out["step_s"] if out["step_s"] else None
    return out


def row_trl(w: Workload) -> dict:
    """TRL's GRPOTrainer with its HF generation, the settings of /work/shared/trl-device/README.md."""
    try:
        import trl
        from datasets import Dataset
    except Exception as e:                                   # not installed, or a broken install
        raise Skip(f"trl not installed ({type(e).__name__}: {e})"[:200]) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from hybridrl.data import read_rows
    cuda = torch.cuda.is_available()
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(cuda)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(cuda)
            times.append(time.perf_counter() - self.t)

    def reward(completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [(sum(map(ord, t)) % 7) / 6.0 for t in texts]
    accum = 8 if w.completions % 8 == 0 else 1               # 32 x 8: one optimizer step per 256 completions
    args = trl.GRPOConfig(output_dir=str(Path(w.root) / "trl"), per_device_train_batch_size=w.completions // accum,
                          gradient_accumulation_steps=accum, num_generations=w.n, max_completion_length=w.new_tokens,
                          generation_kwargs={"min_new_tokens": w.new_tokens}, beta=0.0, learning_rate=1e-6,
                          max_steps=w.steps, logging_steps=1, report_to="none", save_strategy="no",
                          disable_tqdm=True, bf16=cuda, use_cpu=not cuda, seed=0)
    model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in read_rows(w.data)])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=prompts,
                              processing_class=AutoTokenizer.from_pretrained(w.model_dir), callbacks=[StepTimer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = times[1:] or times
    step = statistics.median(steady)
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    length = statistics.median(lengths) if lengths else w.new_tokens
    return {"step_s": step, "steps_timed": len(steady), "step_times_s": times, "trl": trl.__version__,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None, "response_length": length,
            "tokens_per_s": w.completions * length / step, "per_step": trainer.state.log_history}


def row_sglang_generate(w: Workload) -> dict:
    """SGLang's own batched call: one POST /generate with every request's input_ids, after one warm-up call."""
    import urllib.request
    from hybridrl.config import load_config
    from hybridrl.rollout.sglang.launch import launch
    stand_in = _need_sglang(w)
    run_dir = Path(w.root) / "run_sglang_generate"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config([f"model.path={w.model_dir}", "rollout.name=sglang", "rollout.load_format=dummy",
                       f"rollout.max_num_seqs={max(256, w.completions)}", *w.overrides,
                       "rollout.free_cache_engine=false"])
    ids = prompt_ids(w)
    body = json.dumps({"input_ids": ids, "return_logprob": True,     # as hybridrl's rollout asks
                       "sampling_params": {"max_new_tokens": w.new_tokens, "ignore_eos": True, "temperature": 1.0,
                                           "top_p": 1.0}}).encode()
    t = time.perf_counter()
    proc, url = launch(cfg, w.model_dir, str(run_dir), launch_cmd=stand_in)
    start_s = time.perf_counter() - t

    def call() -> tuple[float, int]:
        req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as resp:
            outs = json.loads(resp.read())
        return time.perf_counter() - t0, sum(len(o["output_ids"]) for o in outs)
    try:
        warm = call()
        timed = [call() for _ in range(3)]
    finally:
        proc.stop()
    secs = statistics.median(s for s, _ in timed)
    tokens = timed[0][1]
    if tokens != w.completions * w.new_tokens:
        raise HybridRLError(f"SGLang returned {tokens} tokens, expected {w.completions} x {w.new_tokens}")
    return {"gen_s": secs, "tokens_per_s": tokens / secs, "calls_s": [s for s, _ in timed], "warmup_s": warm[0],
            "server_start_s": start_s, "requests": len(ids), "server_cmd": " ".join(stand_in or ["sglang"]),
            "sglang": _version("sglang")}


def row_hf_generate(w: Workload) -> dict:
    """HF generate, sampling, exactly new_tokens per sequence; the batch halves on an out-of-memory error."""
    import torch
    from transformers import AutoModelForCausalLM
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to(dev).eval()
    prompts = prompt_ids(w)
    pad = model.generation_config.pad_token_id or 0

    def generate(batch: list[list[int]], new: int) -> None:
        width = max(map(len, batch))                          # left padding: every row ends at the same column
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=dev)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
        assert out.shape[1] == width + new
    chunk = len(prompts)
    while True:
        try:
            with torch.inference_mode():
                generate(prompts[:chunk], 8)                  # warm-up
                _sync(cuda)
                t = time.perf_counter()
                for i in range(0, len(prompts), chunk):
                    generate(prompts[i:i + chunk], w.new_tokens)
                _sync(cuda)
            break
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk //= 2
            torch.cuda.empty_cache()
    secs = time.perf_counter() - t
    return {"gen_s": secs, "tokens_per_s": len(prompts) * w.new_tokens / secs, "batch": chunk,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}


def row_ceilings(w: Workload) -> dict:
    """bf16 GEMM (fp32 on CPU) and device copy, medians of 10 after warm-up; the training pass's FLOP."""
    import torch
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n, copy_bytes = (8192, 2 << 30) if cuda else (512, 64 << 20)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    gemm_s = _median_time(lambda: a @ b, cuda)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = _median_time(lambda: dst.copy_(src), cuda)
    tflops = 2 * n ** 3 / gemm_s / 1e12
    params = count_params(w.model_dir)
    tokens = w.n * sum(w.prompt_tokens) + w.completions * w.new_tokens
    flop = 6 * params * tokens                                # forward + backward of every token, once
    return {"matmul_tflops": tflops, "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gb_s": 2 * copy_bytes / copy_s / 1e9, "copy_bytes": copy_bytes, "params": params,
            "train_tokens": tokens, "train_flop": flop, "update_s": flop / (tflops * 1e12)}


def count_params(model_dir: str) -> int:
    """Parameters of the model folder, built on the meta device (tied embeddings count once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def _median_time(fn, cuda: bool, warmup: int = 3, trials: int = 10) -> float:
    """Seconds per call, median of `trials` after `warmup` calls; CUDA events on the GPU."""
    import torch
    for _ in range(warmup):
        fn()
    _sync(cuda)
    times = []
    for _ in range(trials):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


def _need_sglang(w: Workload) -> list[str] | None:
    """None: the real SGLang (needs a GPU); a command: HYBRIDRL_SGLANG_CMD, a stand-in such as `hybridrl serve`."""
    import torch
    if os.environ.get("HYBRIDRL_SGLANG_CMD"):
        return os.environ["HYBRIDRL_SGLANG_CMD"].split()
    if importlib.util.find_spec("sglang") is None:
        raise Skip("sglang not installed")
    if w.smoke:
        raise Skip("--smoke runs on CPU (set HYBRIDRL_SGLANG_CMD for a stand-in server)")
    if not torch.cuda.is_available():
        raise Skip("SGLang needs a GPU (none here)")
    return None


ROW_FNS = {"hybridrl-sglang": lambda w: row_hybridrl(w, "sglang"),
           "hybridrl-native": lambda w: row_hybridrl(w, "native"),
           "trl": row_trl, "sglang-generate": row_sglang_generate, "hf-generate": row_hf_generate,
           "ceilings": row_ceilings}


def child_main(argv: list[str]) -> int:
    """`python -m hybridrl.bench ROW SPEC RESULT`: run one row, write its figures (or why not) to RESULT."""
    if len(argv) != 3 or argv[0] not in ROW_FNS:
        print(f"usage: python -m hybridrl.bench {{{','.join(ROW_FNS)}}} SPEC.json RESULT.json "
              "(one row, as `hybridrl bench` runs it)", file=sys.stderr)
        return 2
    name, spec, result = argv
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # atexit stops a launched server
    w = Workload(**json.loads(Path(spec).read_text()))
    t = time.perf_counter()
    try:
        res = {"status": "ok", **ROW_FNS[name](w)}
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        traceback.print_exc()
        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000]}
    res.update(wall_s=time.perf_counter() - t, device=_device_name())
    Path(result).write_text(json.dumps(res, indent=1, default=str))
    return 0


def _device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- the parent: rows one after another

def run_row(name: str, w: Workload, timeout: float) -> dict:
    """The row in a subprocess of its own session; on timeout SIGTERM (its server stops), then SIGKILL."""
    logs = Path(w.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec, result, log = logs / f"{name}.spec.json", logs / f"{name}.result.json", logs / f"{name}.log"
    spec.write_text(json.dumps(dataclasses.asdict(w)))
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "hybridrl.bench", name, str(spec), str(result)], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _stop_group(proc)
    wall = time.perf_counter() - t
    if rc is None:
        res = {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    elif result.exists():
        res = json.loads(result.read_text())
    else:
        res = {"status": "failed", "reason": f"the row's process exited with code {rc} and no result"}
    if res["status"] == "failed":
        res["log_tail"] = _tail(log)
    return {"row": name, "size": w.size, **res, "wall_s": wall, "log": str(log)}


def _stop_group(proc: subprocess.Popen, grace: float = 45.0) -> None:
    """SIGTERM the row's group (a launched server stops through the row's own exit path), then SIGKILL every
    process of the row's tree that is still there, servers in sessions of their own included."""
    tree = [proc.pid] + _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def skip_reason(name: str) -> str | None:
    """Rows known not to run, decided without starting a process (nothing is imported)."""
    if name == "trl" and importlib.util.find_spec("trl") is None:
        return "trl not installed"
    if name in ("hybridrl-sglang", "sglang-generate") and importlib.util.find_spec("sglang") is None \
            and not os.environ.get("HYBRIDRL_SGLANG_CMD"):
        return "sglang not installed"
    return None


def main(args) -> None:
    rows, sizes, overrides = _split_args(args)
    out = Path(args.out)
    root = args.root or (str(out) + "_work" if args.smoke else "/tmp/hybridrl_bench")
    base = Workload(root=root, overrides=overrides, smoke=args.smoke, **(SMOKE if args.smoke else {}))
    base = dataclasses.replace(base, **({"steps": args.steps} if args.steps else {}))
    report = header(args, rows, sizes, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for size in sizes:
        try:
            w = prepare(dataclasses.replace(base, size=size))
            report["workloads"].append({**dataclasses.asdict(w), "label": size})
            no_inputs = None
        except Exception as e:                     # every row of this size says why; the other sizes still run
            no_inputs = f"no inputs: {type(e).__name__}: {e}"[:500]
        for name in rows:
            left = deadline - time.monotonic() if deadline else float("inf")
            reason = skip_reason(name) or (f"out of time (--budget-s {args.budget_s:.0f})" if left < 30 else None)
            if no_inputs:
                res = {"row": name, "size": size, "status": "failed", "reason": no_inputs}
            elif reason:
                res = {"row": name, "size": size, "status": "skipped", "reason": reason}
            else:
                print(f"bench: {name} ({size}) ...", file=sys.stderr, flush=True)
                res = run_row(name, w, min(args.timeout or (120 if args.smoke else TIMEOUT_S[name]), left - 10))
                res["size"] = size
            took = f" in {res['wall_s']:.0f} s" if "wall_s" in res else ""
            print(f"bench: {name} ({size}): {res['status']}{took} {res.get('reason', '')}", file=sys.stderr,
                  flush=True)
            report["rows"].append(res)
            report["device"] = report["device"] or res.get("device")
            write_outputs(report, out)
    print(report["markdown"])
    for suffix in (".md", ".json", ".png"):
        if Path(str(out) + suffix).exists():
            print(f"wrote {out}{suffix}")
    failed = [f"{r['row']} ({r['size']})" for r in report["rows"] if r["status"] == "failed"]
    if failed:
        raise HybridRLError(f"{len(failed)} row(s) failed: {', '.join(failed)}; reasons in the table, "
                            f"log tails in {out}.json")


def _split_args(args) -> tuple[list[str], list[str], list[str]]:
    """Rows, sizes, overrides. `--rows a b key=value`: argparse hands the override to --rows; it goes back to
    the overrides. Unknown rows or sizes are an error before anything runs."""
    from hybridrl.models import QWEN25_SHAPES
    given = list(args.rows) + list(args.size)
    overrides = list(getattr(args, "overrides", []) or []) + [a for a in given if "=" in a]
    rows, sizes = ([a for a in x if "=" not in a] for x in (args.rows, args.size))
    bad_rows, bad_sizes = [r for r in rows if r not in ROWS], [s for s in sizes if s not in QWEN25_SHAPES]
    if bad_rows or (bad_sizes and not args.smoke):
        raise HybridRLError(f"unknown bench row(s) {bad_rows} / size(s) {bad_sizes}; rows: {list(ROWS)}, "
                            f"sizes: {list(QWEN25_SHAPES)}")
    return rows, ["tiny"] if args.smoke else sizes, overrides


def header(args, rows: list[str], sizes: list[str], overrides: list[str]) -> dict:
    import torch
    return {"device": None, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": _version("transformers"), "sglang": _version("sglang"),
            "trl": _version("trl"), "hybridrl": _version("hybridrl"), "git": _git(),
            "python": sys.version.split()[0], "argv": sys.argv, "rows_asked": rows,
            "command": " ".join(["hybridrl", "bench", *_argv_of(args, rows, sizes, overrides)]),
            "workloads": [], "rows": [], "markdown": ""}


def _argv_of(args, rows: list[str], sizes: list[str], overrides: list[str]) -> list[str]:
    """The command line that repeats this run (defaults spelled out)."""
    out = ["--smoke"] if args.smoke else ["--size", *sizes]
    for flag, value in (("--steps", args.steps), ("--budget-s", args.budget_s), ("--timeout", args.timeout),
                        ("--root", args.root)):
        out += [flag, f"{value:g}" if isinstance(value, float) else str(value)] if value else []
    return out + ["--rows", *rows, "--out", str(args.out), *overrides]


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())} if head.returncode == 0 else None


# ---------------------------------------------------------------- outputs: one table, JSON, a bar chart

COLUMNS = ("what", "step s", "gen", "old log-probs", "update", "sync", "sleep", "unaccounted", "tokens/s", "peak GB",
           "ratio to TRL")
CELLS = ("step_s", "gen_s", "old_log_prob_s", "update_s", "sync_s", "sleep_s", "unaccounted_s")
BARS = (("gen", ("gen_s",)), ("old log-probs", ("old_log_prob_s",)), ("update", ("update_s",)), ("sync", ("sync_s",)),
        ("sleep", ("sleep_s",)), ("reward + adv", ("reward_s", "adv_s")), ("unaccounted", ("unaccounted_s",)))


def _num(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def _what(r: dict) -> str:
    name = f"{r['row']} ({r['size']})"
    if r.get("server_cmd") not in (None, "sglang"):
        name += f", stand-in server `{r['server_cmd'].replace(sys.executable, 'python')}`"
    if r["row"] == "ceilings" and r["status"] == "ok":
        return (f"{name}: {r['matmul_dtype']} matmul {r['matmul_tflops']:.3g} TFLOP/s, copy {r['copy_gb_s']:,.0f} GB/s;"
                f" update = 6·N·T at that rate")
    return name


def table_rows(rows: list[dict]) -> list[list[str]]:
    trl = {r["size"]: r["step_s"] for r in rows if r["row"] == "trl" and r["status"] == "ok"}
    out = []
    for r in rows:
        if r["status"] != "ok":
            reason = " ".join(str(r.get("reason", "")).split())[:160].replace("|", "/")
            out.append([_what(r), f"{r['status']}: {reason}"] + [""] * (len(COLUMNS) - 2))
            continue
        ratio = trl.get(r["size"]) / r["step_s"] if r.get("step_s") and trl.get(r["size"]) else None
        out.append([_what(r), *(_num(r.get(k)) for k in CELLS), _num(r.get("tokens_per_s"), 0),
                    _num(r.get("peak_gb"), 1), f"{ratio:.2f}x" if ratio else ""])
    return out


def markdown(report: dict) -> str:
    git = report.get("git") or {}
    commit = (git.get("commit", "")[:10] + (" (dirty)" if git.get("dirty") else "")) if git else "unknown"
    head = (f"**{report.get('device') or 'device unknown'}**, {report['date']}, commit {commit}; "
            f"torch {report['torch']}, transformers {report['transformers']}, sglang {report['sglang'] or '-'}, "
            f"trl {report['trl'] or '-'}")
    lines = ["# hybridrl bench", "", head, "", f"`{report['command']}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report["rows"])]
    return "\n".join(lines + [""] + notes(report)) + "\n"


def notes(report: dict) -> list[str]:
    out = []
    for w in report["workloads"]:
        mean = statistics.mean(w["prompt_tokens"]) if w["prompt_tokens"] else 0
        out.append(f"- workload {w['label']}: {w['prompts']} prompts x {w['n']} samples, prompts {mean:.0f} tokens "
                   f"on average, {w['new_tokens']} new tokens forced, {w['steps']} steps (medians of steps 2..N)")
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    for c in (r for r in ok if r["row"] == "ceilings"):
        mfu = [f"{r['row']} {c['update_s'] / r['update_s']:.0%}" for r in ok
               if r["size"] == c["size"] and r["row"].startswith("hybridrl") and r.get("update_s")]
        out.append(f"- {c['size']}: a training pass is 6 x {c['params']:.3g} params x {c['train_tokens']:,} "
                   f"tokens = {c['train_flop']:.2e} FLOP, {c['update_s']:.3g} s at the matmul ceiling"
                   + (f"; update MFU: {', '.join(mfu)}" if mfu else ""))
    for r in (r for r in ok if r["row"].startswith("hybridrl")):
        small = (r.get("reward_s") or 0) + (r.get("adv_s") or 0)
        out.append(f"- {r['row']} ({r['size']}): reward + adv {_num(small)} s (in no column); "
                   f"all tokens/s (prompt + response) {_num(r.get('all_tokens_per_s'), 0)}")
    out += ["- unaccounted = step - (gen + old log-probs + update + sync + sleep + reward + adv), per step, median "
            "(collate, metrics, Python between the timers)",
            "- tokens/s: generated tokens per second of the step (step rows) or of the generate call (generate rows); "
            "sglang-generate: median of 3 calls after a warm-up call, log-probs on; hf-generate: one pass, "
            "no log-probs",
            "- peak GB: torch.cuda.max_memory_allocated of the row's own process; for hybridrl-sglang that is the "
            "trainer alone (the SGLang server's memory is set by rollout.gpu_memory_utilization)",
            "- ratio to TRL: TRL's step time / the row's step time (same size, same run)"]
    if report.get("png_error"):
        out.append(f"- no chart: {report['png_error']}")
    return out


def write_outputs(report: dict, out: Path) -> None:
    report["markdown"] = markdown(report)
    report["png_error"] = plot(report, Path(str(out) + ".png"))
    report["markdown"] = markdown(report)
    Path(str(out) + ".md").write_text(report["markdown"])
    Path(str(out) + ".json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def plot(report: dict, png: Path) -> str | None:
    """Stacked horizontal bars of each row's breakdown (TRL and the generate rows as one bar); None or the error."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib unavailable ({type(e).__name__}: {e})"[:300]
    rows = report["rows"][::-1]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.6))
    for i, r in enumerate(rows):
        left = 0.0
        if r["status"] == "ok" and r["row"] == "trl":
            ax.barh(i, r["step_s"], color="tab:gray", label="TRL step" if "TRL step" not in _labels(ax) else None)
            left = r["step_s"]
        elif r["status"] == "ok":
            for j, (label, keys) in enumerate(BARS):
                v = sum(r.get(k) or 0.0 for k in keys)
                if v > 0:
                    ax.barh(i, v, left=left, color=f"C{j}", label=label if label not in _labels(ax) else None)
                    left += v
        text = f" {left:.3g} s" if left else f" {r['status']}: {str(r.get('reason', ''))[:60]}"
        ax.text(left, i, text, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['row']} ({r['size']})" for r in rows], fontsize=8)
    ax.set_xlabel("seconds (a GRPO step; a generate call; the update at the matmul ceiling)")
    ax.set_title(f"hybridrl bench: {report.get('device') or ''}, {report['date'][:10]}", fontsize=10)
    handles = dict(zip(_labels(ax), ax.get_legend_handles_labels()[0]))
    order = [b for b in ["TRL step"] + [label for label, _ in BARS] if b in handles]
    if order:
        ax.legend([handles[b] for b in order], order, fontsize=7, loc="lower right")
    ax.set_xlim(0, max([1e-3] + [r.get("step_s") or r.get("gen_s") or r.get("update_s") or 0
                                 for r in rows if r["status"] == "ok"]) * 1.35)
    fig.tight_layout()
    try:
        fig.savefig(png, dpi=110)
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:300]
    finally:
        plt.close(fig)
    return None


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))

"""The `hybridrl` command: train, generate, serve, prepare data and models, show the config.

    hybridrl train [--config FILE] [key=value ...]       # our keys or verl's: rollout.n=8, actor_rollout_ref.rollout.n=8
    hybridrl merge --checkpoint RUN/checkpoints/step_N --out DIR   # a sharded checkpoint as one HF folder
    hybridrl generate [--config FILE] [key=value ...]
    hybridrl serve [--config FILE] [--host H] [--port P] [key=value ...]
    hybridrl prepare-data gsm8k --out DIR [--multi-turn]
    hybridrl prepare-data reasoning-gym --task NAME --size N --out DIR [--seed S] [--val-size M]
    hybridrl prepare-model smollm2 --out DIR
    hybridrl config show [--config FILE] [--comments] [key=value ...]
    hybridrl bench [--size 0.5B ...] [--rows ...] [--steps 5] [--out PATH] [--smoke] [key=value ...]

Each handler imports its module when it runs, so `hybridrl config show` never imports torch.
A `HybridRLError` prints as `error: <message>` with exit code 2 and no stack trace.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from hybridrl import HybridRLError

OVERRIDES_HELP = "dotted overrides, our keys or verl's (rollout.n=8, actor_rollout_ref.actor.optim.lr=1e-6, +key=value)"


def _load(args):
    """The validated config from --config and the overrides; warnings print as `warning: ...`."""
    from hybridrl import config_verl
    from hybridrl.config import resolve_config
    base = config_verl.VERL_DEFAULTS if getattr(args, "verl_defaults", False) else ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, mapped = resolve_config(args.overrides, args.config, base=base)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return cfg, mapped


def cmd_train(args) -> None:
    from hybridrl.train import train
    train(_load(args)[0])


def cmd_generate(args) -> None:
    from hybridrl.generate import generate
    generate(_load(args)[0])


def cmd_serve(args) -> None:
    from hybridrl.rollout.native.server import serve
    serve(_load(args)[0], host=args.host, port=args.port)


def cmd_config_show(args) -> None:
    from hybridrl.config import to_yaml
    cfg, mapped = _load(args)
    print(to_yaml(cfg, comments=args.comments), end="")
    for verl_key, ours in mapped:
        print(f"mapped: {verl_key} -> {ours} = {_get(cfg, ours)!r}")


def cmd_prepare_data(args) -> None:
    from hybridrl import data
    if args.dataset == "gsm8k":
        written = data.prepare_gsm8k(args.out, multi_turn=args.multi_turn)
    else:
        extra = {} if args.val_size is None else {"val_size": args.val_size}
        written = data.prepare_reasoning_gym(args.task, args.size, args.out, seed=args.seed, **extra)
    for path in (written.values() if isinstance(written, dict) else [written]):
        print(f"wrote {path}")


def cmd_prepare_model(args) -> None:
    from hybridrl import models
    print(f"wrote {models.prepare_smollm2(args.out)}")


def cmd_merge(args) -> None:
    from hybridrl import checkpoint
    print(f"wrote {checkpoint.merge(args.checkpoint, args.out)}")


def cmd_bench(args) -> None:
    from hybridrl import bench
    bench.main(args)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, metavar="FILE", help="YAML file, our layout or verl's nested one")
    p.add_argument("--config-path", "-cp", default=None, help=argparse.SUPPRESS)   # Hydra's spelling
    p.add_argument("--config-name", "-cn", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _add_verl_defaults(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verl-defaults", action="store_true",
                   help="start from verl's algorithm defaults (adv_estimator=gae, rollout.n=1), as main_ppo does")


def build_parser() -> argparse.ArgumentParser:
    from hybridrl import __version__
    parser = argparse.ArgumentParser(prog="hybridrl", description="RL post-training of LLMs with SGLang rollouts")
    parser.add_argument("--version", action="version", version=f"hybridrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn, help in (("train", cmd_train, "run RL training (PPO / GRPO / ...)"),
                           ("generate", cmd_generate, "generate responses for a prompt file (verl main_generation)"),
                           ("serve", cmd_serve, "serve the native engine over HTTP")):
        p = sub.add_parser(name, help=help, description=help)
        _add_config_args(p)
        p.set_defaults(fn=fn)
        if name == "train":
            _add_verl_defaults(p)
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=30000)

    data = sub.add_parser("prepare-data", help="write prompt parquet files in verl's layout")
    dsub = data.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    gsm = dsub.add_parser("gsm8k", help="GSM8K test split from the offline package, as verl's preprocess writes it")
    gsm.add_argument("--out", required=True, metavar="DIR")
    gsm.add_argument("--multi-turn", action="store_true",
                     help="rows for the tool loop: a system prompt naming the calculator, extra_info.tools_kwargs")
    rg = dsub.add_parser("reasoning-gym", help="generated reasoning-gym tasks with their ground truth")
    rg.add_argument("--task", required=True, help="reasoning-gym task name, e.g. basic_arithmetic")
    rg.add_argument("--size", required=True, type=int, help="training prompts to generate")
    rg.add_argument("--out", required=True, metavar="DIR")
    rg.add_argument("--seed", type=int, default=0)
    rg.add_argument("--val-size", type=int, default=None, help="validation prompts (default: none)")
    data.set_defaults(fn=cmd_prepare_data)

    model = sub.add_parser("prepare-model", help="build a Hugging Face model folder from offline assets")
    msub = model.add_subparsers(dest="model", required=True, metavar="MODEL")
    sm = msub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the offline GGUF")
    sm.add_argument("--out", required=True, metavar="DIR")
    model.set_defaults(fn=cmd_prepare_model)

    merge = sub.add_parser("merge", help="write one Hugging Face folder from a sharded checkpoint (verl's model_merger)")
    merge.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder: .../checkpoints/step_N")
    merge.add_argument("--out", required=True, metavar="DIR", help="the new Hugging Face folder (must not hold files)")
    merge.set_defaults(fn=cmd_merge)

    bench = sub.add_parser("bench", help="hybridrl's GRPO step beside TRL, SGLang and HF generate, one table",
                           description="Run the standard GRPO workload row by row (each in its own subprocess) and "
                                       "write <out>.md, <out>.json and <out>.png; see docs/benchmarks/README.md")
    bench.add_argument("--size", nargs="+", default=["0.5B"], help="Qwen2.5 shapes: 0.5B 1.5B 7B")
    bench.add_argument("--rows", nargs="+", default=["hybridrl-sglang", "hybridrl-native", "trl", "sglang-generate",
                                                     "hf-generate", "ceilings"], help="rows to run, in this order")
    bench.add_argument("--steps", type=int, default=None,
                       help="GRPO steps per step row, the first a warm-up (default 5; --smoke: 2)")
    bench.add_argument("--out", default="docs/benchmarks/bench", help="writes OUT.md, OUT.json, OUT.png")
    bench.add_argument("--smoke", action="store_true", help="CPU-sized: tiny model, 4 prompts x 2, 8 tokens, 2 steps")
    bench.add_argument("--root", default=None, help="model folder, prompts, run folders, row logs "
                                                    "(default /tmp/hybridrl_bench; --smoke: OUT_work)")
    bench.add_argument("--budget-s", type=float, default=0, help="stop starting rows after this many seconds (0: none)")
    bench.add_argument("--timeout", type=float, default=0, help="seconds per row (0: each row's own default)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="for the hybridrl rows and SGLang's server")
    bench.set_defaults(fn=cmd_bench, config=None, config_name=None, config_path=None)

    config = sub.add_parser("config", help="inspect the configuration")
    csub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config as YAML, and how verl keys were mapped")
    _add_config_args(show)
    show.add_argument("--comments", action="store_true", help="print each field's help after it")
    _add_verl_defaults(show)
    show.set_defaults(fn=cmd_config_show)
    return parser


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Overrides may come before or after options: leftovers shaped `key=value` join the overrides."""
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error("unrecognized arguments: " + " ".join(a for a in rest if a not in extra or
                                                            not hasattr(args, "overrides")))
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
        if args.config is None and args.config_name:      # Hydra: --config-path DIR --config-name NAME
            import os
            name = args.config_name if args.config_name.endswith((".yaml", ".yml")) else args.config_name + ".yaml"
            args.config = os.path.join(args.config_path or ".", name)
        elif args.config_path and not args.config_name:
            parser.error(f"--config-path {args.config_path} needs --config-name NAME (the YAML file in it)")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else argv)
    try:
        args.fn(args)
    except HybridRLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

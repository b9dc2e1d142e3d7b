"""verl's `python -m verl.trainer.main_ppo <overrides>`, here: `python -m hybridrl.main_ppo <overrides>`.

Same as `hybridrl train --verl-defaults <overrides>`: verl's keys (actor_rollout_ref.rollout.n=8, ...) are mapped
onto ours, and verl's defaults that shape the algorithm (algorithm.adv_estimator=gae, rollout.n=1) come first, so a
verl command that leaves them out trains what it trained under verl.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from hybridrl.cli import main as cli_main
    return cli_main(["train", "--verl-defaults", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

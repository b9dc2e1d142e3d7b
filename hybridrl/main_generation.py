"""verl's `python -m verl.trainer.main_generation <overrides>`, here: `python -m hybridrl.main_generation ...`.

Same as `hybridrl generate <overrides>` (data.path, data.output_path, data.n_samples, model.path, rollout.*).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from hybridrl.cli import main as cli_main
    return cli_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

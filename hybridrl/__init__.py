"""hybridrl: RL post-training of LLMs (PPO, GRPO, ...) whose rollouts run on SGLang.

`import hybridrl` is cheap: it never imports torch-heavy backends, sglang, ray or vllm.
"""
__version__ = "0.1.0"


class HybridRLError(Exception):
    """An error meant for the user: its message names the thing and the fix.

    The CLI prints it as one line and exits non-zero, without a stack trace.
    """

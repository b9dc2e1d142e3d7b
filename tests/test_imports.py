"""`import hybridrl` and the whole RL loop never import sglang, ray or vllm: backends load only when chosen."""
import subprocess
import sys


def test_core_modules_import_no_backend():
    code = ("import sys, hybridrl, hybridrl.train, hybridrl.step, hybridrl.rollout.base, hybridrl.rollout.sglang, "
            "hybridrl.rollout.native.engine, hybridrl.trainer.actor; "
            "print(sorted(m for m in ('sglang', 'ray', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

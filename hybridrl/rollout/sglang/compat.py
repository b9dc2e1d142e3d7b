"""Version shims for the SGLang HTTP API: which releases we drive, and what moved between them.

Supported: SGLang >= 0.4.8 (memory tags on release/resume) and < 0.6; tested on 0.5.17.
`hybridrl serve` reports `version = "hybridrl-<ours>"` plus `sglang_api_version = "0.5.17"`,
the API subset it implements; the client treats it as that SGLang version.
"""
from __future__ import annotations

import re

from hybridrl import HybridRLError

SUPPORTED = (">=0.4.8", "<0.6")
MIN_VERSION, MAX_VERSION = (0, 4, 8), (0, 6, 0)
NATIVE_PREFIX = "hybridrl-"             # version string prefix of our own `hybridrl serve`
NATIVE_API_VERSION = "0.5.17"           # the SGLang API subset `hybridrl serve` speaks


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.5.17.post1' → (0, 5, 17); 'v0.4.10rc1' → (0, 4, 10)."""
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", str(text).strip())
    if not m:
        raise HybridRLError(f"cannot read the SGLang server version {text!r}: expected something like '0.5.17'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_version(info: dict) -> tuple[tuple[int, int, int], bool]:
    """From a /server_info reply → (API version, is_native). Refuses versions outside SUPPORTED."""
    raw = str(info.get("version", ""))
    native = raw.startswith(NATIVE_PREFIX)
    version = parse_version(info.get("sglang_api_version", NATIVE_API_VERSION) if native else raw)
    if not MIN_VERSION <= version < MAX_VERSION:
        raise HybridRLError(
            f"SGLang server version {raw} is not supported: hybridrl drives SGLang {' '.join(SUPPORTED)} "
            f"(tested on 0.5.17); install one with `pip install \"sglang>=0.4.8,<0.6\"` or `pip install hybridrl[sglang]`")
    return version, native


def supports_memory_tags(version: tuple[int, int, int]) -> bool:
    return version >= (0, 4, 8)


# Tried in order (a 404 moves on): the get_ forms are the older names, deprecated aliases in 0.5.x.
SERVER_INFO_PATHS = ("/server_info", "/get_server_info")
MODEL_INFO_PATHS = ("/model_info", "/get_model_info")


def supports_flattened_bucket(version: tuple[int, int, int]) -> bool:
    """`load_format="flattened_bucket"` in /update_weights_from_tensor (one tensor per bucket)."""
    return version >= (0, 5, 0)


def local_serialized_tensor_class(version: tuple[int, int, int]):
    """SGLang's LocalSerializedTensor (one CUDA IPC handle per TP rank); its module moved in 0.5.16."""
    if version >= (0, 5, 16):
        from sglang.srt.model_executor.model_runner_components.weight_updater import LocalSerializedTensor
    else:
        from sglang.srt.model_executor.model_runner import LocalSerializedTensor
    return LocalSerializedTensor


def tp_memory_check_env(version: tuple[int, int, int], check: bool) -> dict[str, str]:
    """Env var that turns SGLang's 'memory capacity is unbalanced' TP check on/off.

    Renamed in 0.5.7 (sglang #15802) with inverted meaning: SGL_DISABLE_... → SGLANG_ENABLE_....
    """
    if version >= (0, 5, 7):
        return {"SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK": "true" if check else "false"}
    return {"SGL_DISABLE_TP_MEMORY_INBALANCE_CHECK": "false" if check else "true"}


def installed_sglang_version() -> tuple[int, int, int] | None:
    """Version of the sglang package importable here, or None when it is not installed."""
    from importlib import metadata
    try:
        return parse_version(metadata.version("sglang"))
    except metadata.PackageNotFoundError:
        return None

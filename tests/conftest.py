"""Shared test set-up: offline hub, tiny tokenizer and tiny random models, gpu / sglang / slow markers.

Markers: `gpu` skips without CUDA; `sglang` skips unless sglang imports and CUDA is present;
`slow` runs by default (each such test keeps itself under ~60 s on 2 cores), HYBRIDRL_SKIP_SLOW=1 skips them.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import importlib  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _imports(name: str) -> bool:
    """True when `import name` works (not just when the package is found)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    cuda = _cuda()
    has_sglang = cuda and any("sglang" in item.keywords for item in items) and _imports("sglang")
    skip_slow = os.environ.get("HYBRIDRL_SKIP_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "sglang" in item.keywords and not (cuda and has_sglang):
            item.add_marker(pytest.mark.skip(reason="needs sglang and a CUDA GPU"))
        if "slow" in item.keywords and skip_slow:
            item.add_marker(pytest.mark.skip(reason="HYBRIDRL_SKIP_SLOW=1"))


@pytest.fixture(scope="session")
def tiny_tok():
    from hybridrl.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    from hybridrl.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from hybridrl.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")

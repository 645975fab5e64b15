import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Hermetic: no test reads or writes the user's caches (hardware profiles, ...). Set before any test
# runs, so subprocesses (CLI, server) inherit it too.
_HOME = tempfile.mkdtemp(prefix="daop-test-home-")
os.environ["HOME"] = _HOME
os.environ["XDG_CACHE_HOME"] = os.path.join(_HOME, ".cache")

from tiny_models import FAMILIES, hf_model, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Hardware profiles are cached under a temporary XDG_CACHE_HOME, never in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: (family, variant) -> (transformers model, checkpoint folder), built once per session."""
    cache: dict = {}

    def make(family: str, dtype=None, shard_mb=None):
        import torch

        key = (family, str(dtype), shard_mb)
        if key not in cache:
            model = hf_model(family)
            path = tmp_path_factory.mktemp(f"{family}-{str(dtype).split('.')[-1]}-{shard_mb}")
            save_checkpoint(model, path, dtype or torch.float32, shard_mb)
            cache[key] = (model.float(), path)
        return cache[key]

    return make


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param

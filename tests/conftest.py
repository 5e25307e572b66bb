"""Test setup: 8 fake CPU devices, configured before jax initialises.

Every sharded code path runs on a real 8-device mesh in CI; tests compare sharded
results with single-device results.

Compiled programs go to a persistent compilation cache that lives for one test session
(a fresh directory, removed at exit; ``JAX_COMPILATION_CACHE_DIR`` set beforehand is
used as it is): many tests compile the same programs, and the launchers' subprocesses
and pytest-xdist's workers (``make test`` runs two) inherit the directory. It caches
compiled XLA programs, never results.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="saejax-test-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402


def pytest_configure(config):
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


@pytest.fixture(scope="session")
def devices():
    return jax.devices()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny byte-level LM (2 training steps: a real checkpoint, not a good model) on a
    made-up corpus of 40 files."""
    import numpy as np

    from experiments import lm_tiny
    from saejax.config import from_config
    from saejax.data.corpus import CorpusConfig, CorpusJobConfig
    from saejax.data.tokenizer import TokenizerConfig
    from saejax.data.corpus import build_token_store
    from saejax.lm.config import LMTrainConfig
    from saejax.lm.train import train as train_lm

    root = tmp_path_factory.mktemp("pipeline")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":", "\n", "    "]
    for i in range(40):
        (src / f"{i}.txt").write_text(" ".join(rng.choice(words, 400)))
    build_token_store(CorpusJobConfig(
        corpus=CorpusConfig(source="text", path=str(src), seq_len=33, val_fraction=0.2,
                            out_dir=str(root / "tokens")),
        tokenizer=TokenizerConfig(kind="byte")))
    cd = lm_tiny.get_config()
    cd.store_dir = str(root / "tokens")
    cd.workdir = str(root / "lm")
    cd.num_steps = 2
    cd.optim.warmup_steps = 1
    cd.progress_bar = False
    train_lm(from_config(LMTrainConfig, cd))
    return str(root / "lm")

"""Reliability: provenance, resumes that would change the experiment, damaged checkpoints,
verified store reads, read-only uses, failed builds; one line and an exit code for every
user error through the real launchers."""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from saejax.config import ConfigError, from_config
from saejax.data.token_store import CorruptStoreError
from saejax.record import load_record, load_sae
from saejax.train import train
from saejax.train_config import HarvestConfig, SAETrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(lm_dir, workdir, **overrides):
    from experiments import sae_tiny

    cd = sae_tiny.get_config()
    cd.lm.dir = lm_dir
    cd.workdir = str(workdir)
    cd.progress_bar = False
    cd.eval.every = 1000
    cd.update_from_flattened_dict(overrides)
    return from_config(SAETrainConfig, cd)


def tree_hashes(*roots) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(glob.glob(os.path.join(str(root), "**"), recursive=True)):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def params(workdir):
    bundle, record = load_sae(str(workdir))
    return jax.tree.map(np.asarray, bundle.params), record


# ------------------------------------------------------------------- provenance


@pytest.fixture(scope="module")
def harvested(tiny_lm_dir, tmp_path_factory):
    """Two small stores of the tiny LM: at mlp.post and at mlp.pre (same width, 64)."""
    from saejax.harvest import run_harvest

    root = tmp_path_factory.mktemp("harvested")
    out = {}
    for site in ("mlp.post", "mlp.pre"):
        out[site] = str(root / site)
        run_harvest(HarvestConfig(lm_dir=tiny_lm_dir, site=site, out_dir=out[site],
                                  lm_batch_size=16, sae_batch_size=256, chunk_mb=0.06,
                                  num_contexts=64))
    return out


def test_a_store_from_another_site_is_refused(tiny_lm_dir, harvested, tmp_path):
    cfg = tiny(tiny_lm_dir, tmp_path / "w", **{"source.kind": "store",
                                               "source.store_dir": harvested["mlp.pre"]})
    with pytest.raises(ConfigError, match="activations of site 'blocks.0.mlp.pre', but the run "
                                          "reads 'blocks.0.mlp.post'"):
        train(cfg)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # refused before anything


def test_resuming_on_other_activations_is_refused(tiny_lm_dir, harvested, tmp_path):
    from saejax.harvest import run_harvest

    store = str(tmp_path / "acts")
    hcfg = HarvestConfig(lm_dir=tiny_lm_dir, out_dir=store, lm_batch_size=16,
                         sae_batch_size=256, chunk_mb=0.06, num_contexts=64)
    run_harvest(hcfg)
    cfg = tiny(tiny_lm_dir, tmp_path / "w", **{"source.kind": "store", "source.store_dir": store,
                                               "num_steps": 20})
    train(cfg, stop_at=10)
    # The same directory, harvested again from other contexts: another normalisation.
    run_harvest(HarvestConfig(**{**vars(hcfg), "start_context": 64, "overwrite": True}))
    with pytest.raises(ConfigError, match="started on other activations"):
        train(cfg)


# ------------------------------------------------------------------- resumes


def test_config_changes_on_resume_are_refused_or_recorded(tiny_lm_dir, tmp_path):
    work = tmp_path / "w"
    train(tiny(tiny_lm_dir, work, num_steps=10))
    before = tree_hashes(work / "checkpoints")
    cases = [({"sae.n_features": 512}, r"sae.n_features: 256 -> 512.*--allow_changes="
                                       r"sae.n_features"),
             ({"sae.l1_coefficient": 0.5}, r"sae.l1_coefficient: 0.001 -> 0.5"),
             ({"num_steps": 5}, r"'num_steps' = 5 is invalid: .* is at step 10 already"),
             ({"num_steps": 20}, r"num_steps: 10 -> 20")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            train(tiny(tiny_lm_dir, work, **{"num_steps": 10, **change}))
    assert tree_hashes(work / "checkpoints") == before  # refused: nothing written
    # Allowed: extend the run and change the eval cadence (a whole section allowed); the
    # record keeps each change with its step.
    summary = train(tiny(tiny_lm_dir, work, **{"num_steps": 20, "eval.every": 5,
                                               "progress_bar": True}),
                    allow_changes=("num_steps", "eval"))
    assert summary["step"] == 20
    record = load_record(str(work))
    assert record.config.num_steps == 20 and record.config.eval.every == 5
    assert {"step": 10, "field": "num_steps", "old": 10, "new": 20} in record.changes
    assert {c["field"] for c in record.changes} == {"num_steps", "eval.every", "progress_bar"}


def test_lm_config_changes_on_resume_are_refused_or_recorded(tiny_lm_dir, tmp_path):
    import shutil

    from saejax.checkpoint import Checkpointer
    from saejax.lm.config import LMTrainConfig
    from saejax.lm.train import train as train_lm

    work = tmp_path / "lm"
    shutil.copytree(tiny_lm_dir, work)  # the fixture's 2-step run
    meta = Checkpointer(work / "checkpoints", read_only=True).restore_metadata()
    cd = dict(meta["train"], workdir=str(work), num_steps=4)
    with pytest.raises(ConfigError, match=r"num_steps: 2 -> 4"):
        train_lm(from_config(LMTrainConfig, cd))
    cd["optim"] = dict(cd["optim"], lr=0.5)
    with pytest.raises(ConfigError, match=r"optim.lr: .* -> 0.5"):
        train_lm(from_config(LMTrainConfig, cd), allow_changes=("num_steps",))
    out = train_lm(from_config(LMTrainConfig, cd), allow_changes=("num_steps", "optim.lr"))
    assert out["step"] == 4
    changes = Checkpointer(work / "checkpoints", read_only=True).restore_metadata()["changes"]
    assert {(c["step"], c["field"]) for c in changes} == {(2, "num_steps"), (2, "optim.lr"),
                                                          (2, "workdir")}  # copied: moved


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_lm_dir, tmp_path,
                                                                   caplog):
    over = {"num_steps": 20, "sae.resample_steps": ()}
    train(tiny(tiny_lm_dir, tmp_path / "ref", **over))
    want, _ = params(tmp_path / "ref")
    work = tmp_path / "w"
    train(tiny(tiny_lm_dir, work, **over), stop_at=20)
    data = [p for p in glob.glob(str(work / "checkpoints" / "20" / "state" / "**" / "d" / "*"),
                                 recursive=True) if os.path.isfile(p)]
    assert data
    for path in data:  # truncated array data, as a failing disk might leave it
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    # Analysis reads the newest intact step (without moving anything).
    _, record = params(work)
    assert record.step == 10
    # Training resumes from step 10, sets the damaged step aside and ends where it would have.
    with caplog.at_level("WARNING"):
        train(tiny(tiny_lm_dir, work, **over))
    assert "step 20" in caplog.text and "could not be read" in caplog.text
    assert os.path.isdir(work / "checkpoints" / "20.damaged")
    got, record = params(work)
    assert record.step == 20
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- reads


def _small_store(tmp_path, name="store"):
    from saejax.data.corpus import CorpusConfig, CorpusJobConfig, build_token_store
    from saejax.data.tokenizer import TokenizerConfig

    src = tmp_path / f"{name}_src"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.txt").write_text(" ".join(f"word{j % 17} {i}" for j in range(400)))
    return build_token_store(CorpusJobConfig(
        corpus=CorpusConfig(source="text", path=str(src), seq_len=16, val_fraction=0.25,
                            out_dir=str(tmp_path / name), chunk_mb=0.001),
        tokenizer=TokenizerConfig(kind="byte")))


def test_token_store_reads_are_verified(tmp_path):
    from saejax.data.token_store import TokenStore, chunk_checksum, open_array, write_json_atomic

    store = _small_store(tmp_path)
    assert len(store.metadata["splits"]["train"]["chunks"]) >= 3
    rows = store.chunk_rows
    chunk = tmp_path / "store" / "train.zarr" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0x10
    chunk.write_bytes(bytes(raw))
    fresh = TokenStore.open(store.directory)
    fresh.read("train", 0, rows)  # chunk 0 is intact
    with pytest.raises(CorruptStoreError, match=r"train.zarr chunk 1 .* does not match its "
                                                r"recorded sha256.*build_corpus.py"):
        fresh.read("train", rows + 2, rows + 3)  # one row of chunk 1: the whole chunk checked
    # Token ids outside the vocabulary, with a matching checksum: a clear error too.
    arr = open_array(store.directory, "train", write=True)
    block = arr[2 * rows:3 * rows].read().result()
    block[0, 0] = store.vocab_size + 5
    arr[2 * rows:3 * rows].write(block).result()
    meta = dict(store.metadata)
    meta["splits"]["train"]["chunks"][2] = chunk_checksum(block)
    write_json_atomic(os.path.join(store.directory, "metadata.json"), meta)
    with pytest.raises(CorruptStoreError, match=f"token id {store.vocab_size + 5}, outside "
                                                f"the vocabulary of {store.vocab_size}"):
        TokenStore.open(store.directory).read("train", 2 * rows, 3 * rows)
    # A malformed metadata.json is named.
    with open(os.path.join(store.directory, "metadata.json"), "w") as f:
        f.write('{"kind": "token_store", "status": ')
    with pytest.raises(CorruptStoreError, match=r"metadata.json is not valid JSON"):
        TokenStore.open(store.directory)


def test_read_only_uses_create_nothing(tmp_path):
    from saejax.analysis.restore import restore_run
    from saejax.lm.restore import load_lm

    missing = tmp_path / "no" / "such" / "run"
    for call in (lambda: load_sae(str(missing)), lambda: load_record(str(missing)),
                 lambda: restore_run(str(missing)), lambda: load_lm(str(missing))):
        with pytest.raises(FileNotFoundError, match="no"):
            call()
    assert not os.path.exists(tmp_path / "no")


def test_a_failed_corpus_build_does_not_block_the_corrected_command(tmp_path, monkeypatch):
    from saejax.data import corpus as corpus_mod
    from saejax.data.corpus import CorpusConfig, CorpusJobConfig, build_token_store
    from saejax.data.sources import CorpusError
    from saejax.data.tokenizer import TokenizerConfig

    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"{i}.txt").write_text(f"some text {i} " * 200)

    def job(path, seq_len=16):
        return CorpusJobConfig(corpus=CorpusConfig(source="text", path=str(path),
                                                   seq_len=seq_len, val_fraction=0.3,
                                                   out_dir=str(tmp_path / "out")),
                               tokenizer=TokenizerConfig(kind="byte"))

    with pytest.raises(CorpusError, match="does not exist"):
        build_token_store(job(tmp_path / "srcc"))  # a typo in the path
    assert not os.path.exists(tmp_path / "out")   # nothing written
    # A build that died half-way with other settings no longer blocks the corrected one.
    real = corpus_mod._ChunkWriter.commit
    calls = {"n": 0}

    def crash(self, split, block):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(self, split, block)

    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(job(src, seq_len=8))
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", real)
    store = build_token_store(job(src))
    assert store.seq_len == 16 and store.rows("train") > 0


# ------------------------------------------------------------------- launchers


def run_launcher(script: str, *args: str, timeout: int = 300):
    env = dict(os.environ)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_one_line(res, prog: str, code: int, pattern: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, (res.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"{prog}: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert res.stderr.rstrip().endswith(lines[0])  # the last thing said


BAD = [  # (script, args, exit code, what the line must say)
    ("train_sae.py", ["--config=experiments/sae_tiny.py", "--config.sae.d_inn=3"], 2,
     r"flag --config.sae.d_inn names an unknown config field.*d_inn.*\"d_in\""),
    ("train_sae.py", ["--config=experiments/no_such.py"], 2, r"no_such.py"),
    ("train_sae.py", ["--config=experiments/sae_tiny.py", "--config.sae.d_in=abc"], 2,
     r"--config.sae.d_in=abc"),
    ("train_sae.py", ["--bogus_flag"], 2, r"bogus_flag"),
    ("train_sae.py", ["--config=experiments/sae_tiny.py", "--config.sae.architecture=gelu"], 2,
     r"'sae.architecture' = 'gelu'"),
    ("train_sae.py", ["--config=experiments/sae_tiny.py", "--config.source.kind=files"], 2,
     r"'source.kind' = 'files'"),
    ("train_sae.py", ["--config=experiments/sae_tiny.py", "--config.batch_size=-4"], 2,
     r"'batch_size' = -4"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.optim.lr=-1"], 2,
     r"'optim.lr' = -1"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.model.n_layrs=2"], 2,
     r"n_layrs"),
    ("build_corpus.py", ["--config=experiments/corpus_stdlib.py", "--config.corpus.seq_len=1"], 2,
     r"'corpus.seq_len' = 1"),
    ("harvest.py", ["--config=experiments/harvest.py", "--config.dtype=float16"], 2,
     r"'dtype' = 'float16'"),
    ("steer.py", ["--feature=3"], 2, r"exactly one of --value .* or --scale"),
    ("steer.py", ["--feature=3", "--value=1"], 2, r"exactly one of --workdir .* or --sae"),
]


@pytest.mark.parametrize("script,args,code,pattern", BAD[:6], ids=lambda v: str(v)[:40])
def test_bad_inputs_give_one_line(script, args, code, pattern):
    assert_one_line(run_launcher(script, *args), script[:-3], code, pattern)


@pytest.mark.slow
@pytest.mark.parametrize("script,args,code,pattern", BAD[6:], ids=lambda v: str(v)[:40])
def test_more_bad_inputs_give_one_line(script, args, code, pattern):
    assert_one_line(run_launcher(script, *args), script[:-3], code, pattern)

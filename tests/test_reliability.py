"""Reliability: provenance, resumes that would change the experiment, damaged checkpoints,
verified store reads, read-only uses, failed builds; one line and an exit code for every
user error through the real launchers."""

import glob
import hashlib
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


def test_another_lm_checkpoint_is_refused(tiny_lm_dir, harvested, tmp_path):
    """A store harvested from the LM at step 2 does not feed an SAE of the same LM trained
    on to step 3; an SAE run does not resume on the LM once that run was continued."""
    import shutil

    from saejax.checkpoint import Checkpointer
    from saejax.lm.config import LMTrainConfig
    from saejax.lm.train import train as train_lm

    lm2 = tmp_path / "lm2"
    shutil.copytree(tiny_lm_dir, lm2)
    sae = tmp_path / "sae"
    train(tiny(str(lm2), sae, num_steps=10))  # an SAE on lm2 at step 2
    meta = Checkpointer(lm2 / "checkpoints", read_only=True).restore_metadata()
    train_lm(from_config(LMTrainConfig, dict(meta["train"], workdir=str(lm2), num_steps=3)),
             allow_changes=("num_steps", "workdir"))  # the LM run continued to step 3
    cfg = tiny(str(lm2), tmp_path / "w", **{"source.kind": "store",
                                           "source.store_dir": harvested["mlp.post"]})
    with pytest.raises(ConfigError, match=r"harvested from another LM checkpoint .*\(2, .*\(3, "):
        train(cfg)
    with pytest.raises(ConfigError, match=r"started on LM checkpoint .*\(2, .* now holds \(3, "):
        train(tiny(str(lm2), sae, num_steps=20), allow_changes=("num_steps",))


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

    def crash_after(n):
        calls = {"n": 0}

        def crash(self, split, block):
            calls["n"] += 1
            if calls["n"] > n:
                raise KeyboardInterrupt
            return real(self, split, block)
        return crash

    # Died before committing anything, with other settings: replaced by the corrected build.
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", crash_after(0))
    with pytest.raises(KeyboardInterrupt):
        build_token_store(job(src, seq_len=8))
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", real)
    store = build_token_store(job(src))
    assert store.seq_len == 16 and store.rows("train") > 0
    # A half-written store that holds committed rows is not thrown away without asking.
    import shutil

    shutil.rmtree(tmp_path / "out")
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", crash_after(1))
    with pytest.raises(KeyboardInterrupt):
        build_token_store(job(src, seq_len=8))
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", real)
    from saejax.data.token_store import StoreExistsError

    with pytest.raises(StoreExistsError, match="half-written store built with different "
                                               "settings.*corpus.overwrite=true"):
        build_token_store(job(src))


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


# ------------------------------------------------------------------- the table


def _flipped_copy(src: str, dst: str, array: str, offset: int, mask: int) -> str:
    """A copy of store ``src`` whose first chunk of ``array`` has one byte's bits flipped."""
    import shutil

    shutil.copytree(src, dst)
    chunk = os.path.join(dst, array, "c", "0", "0")
    raw = bytearray(open(chunk, "rb").read())
    raw[offset] ^= mask
    open(chunk, "wb").write(bytes(raw))
    return dst


@pytest.fixture(scope="module")
def world(tiny_lm_dir, tmp_path_factory):
    """Existing files a bad command must leave alone, and broken inputs to feed it."""
    import shutil

    from saejax.harvest import run_harvest
    from saejax.lm.restore import load_lm

    root = tmp_path_factory.mktemp("world")
    w = {"lm": tiny_lm_dir, "missing": str(root / "no" / "such")}
    _, meta = load_lm(tiny_lm_dir)
    w["tokens"] = meta["store_dir"]
    for site in ("post", "pre"):
        w[f"acts_{site}"] = str(root / f"acts_{site}")
        run_harvest(HarvestConfig(lm_dir=tiny_lm_dir, site=f"mlp.{site}", out_dir=w[f"acts_{site}"],
                                  lm_batch_size=16, sae_batch_size=256, chunk_mb=0.06,
                                  num_contexts=64))
    w["acts_corrupt"] = _flipped_copy(w["acts_post"], str(root / "acts_corrupt"), "acts.zarr", 64, 0x40)
    w["tokens_corrupt"] = _flipped_copy(w["tokens"], str(root / "tokens_corrupt"), "train.zarr", 40, 0x01)
    w["tokens_badmeta"] = str(root / "tokens_badmeta")
    shutil.copytree(w["tokens"], w["tokens_badmeta"])
    with open(os.path.join(w["tokens_badmeta"], "metadata.json"), "w") as f:
        f.write('{"kind": "token_store", ')
    w["sae_run"] = str(root / "sae_run")
    train(tiny(tiny_lm_dir, w["sae_run"], num_steps=10))
    rows = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    np.save(root / "good.npy", rows)
    w["good_npy"] = str(root / "good.npy")
    w["arrays_run"] = str(root / "arrays_run")
    from experiments import sae_arrays

    cd = sae_arrays.get_config()
    cd.update_from_flattened_dict({
        "sae.d_in": 8, "sae.n_features": 32, "sae.k": 4, "sae.aux_k": 0, "batch_size": 64,
        "num_steps": 2, "eval.every": 2, "workdir": w["arrays_run"], "progress_bar": False,
        "sae.geometric_median_iters": 5})
    train(from_config(SAETrainConfig, cd), activations=rows)
    (root / "notnpy.npy").write_text("this is not an array")
    w["notnpy"] = str(root / "notnpy.npy")
    np.save(root / "vec.npy", np.zeros(10, np.float32))
    w["vec"] = str(root / "vec.npy")
    nan = rows.copy()
    nan[123, 4] = np.inf
    np.save(root / "nan.npy", nan)
    w["nan"] = str(root / "nan.npy")
    (root / "bogus.npz").write_bytes(os.urandom(256))
    w["bogus_npz"] = str(root / "bogus.npz")
    (root / "empty").mkdir()
    w["empty"] = str(root / "empty")
    w["precious"] = [v for k, v in w.items() if k not in ("missing",)]
    return w


SAE = ["--config=experiments/sae_tiny.py", "--config.lm.dir={lm}", "--config.progress_bar=false"]
ARR = ["--config=experiments/sae_arrays.py", "--config.progress_bar=false",
       "--config.workdir={missing}"]
STEER = ["--feature=1", "--value=1", "--num_tokens=2"]
TABLE = [  # (script, args, exit code, what the one line must say)
    ("train_sae.py", [*SAE, "--config.lm.dir={missing}", "--config.workdir={missing}"], 2,
     r"'lm.dir' = .* is invalid: no LM checkpoint in .* give an LM training workdir"),
    ("train_sae.py", [*SAE, "--config.lm.site=mlp.bogus", "--config.workdir={missing}"], 2,
     r"'lm.site' = 'mlp.bogus' is invalid: unknown activation site"),
    ("train_sae.py", [*SAE, "--config.sae.d_in=32", "--config.workdir={missing}"], 2,
     r"'sae.d_in' = 32 is invalid: site 'blocks.0.mlp.post' .* has width 64"),
    ("train_sae.py", [*SAE, "--config.source.kind=store", "--config.source.store_dir={tokens}",
                      "--config.workdir={missing}"], 2,
     r"'source.store_dir' = .* holds a 'token_store', not an activation store"),
    ("train_sae.py", [*SAE, "--config.source.kind=store", "--config.source.store_dir={missing}",
                      "--config.workdir={missing}"], 2, r"'source.store_dir' = .* no activation store at"),
    ("train_sae.py", [*SAE, "--config.source.kind=store",
                      "--config.source.store_dir={acts_pre}", "--config.workdir={missing}"],
     2, r"activations of site 'blocks.0.mlp.pre', but the run reads 'blocks.0.mlp.post'"),
    ("train_sae.py", [*SAE, "--config.source.kind=store",
                      "--config.source.store_dir={acts_corrupt}", "--config.workdir={missing}"],
     1, r"chunk 0 .* fails its crc32 check"),
    ("train_sae.py", [*SAE, "--config.workdir={sae_run}", "--config.num_steps=10",
                      "--config.sae.n_features=512"], 2, r"sae.n_features: 256 -> 512"),
    ("train_sae.py", [*SAE, "--config.workdir={sae_run}", "--config.num_steps=5"], 2,
     r"'num_steps' = 5 is invalid: .* is at step 10 already"),
    ("train_sae.py", [*SAE, "--config.workdir={missing}", "--config.eval.contexts=7"], 2,
     r"'eval.contexts' = 7 is invalid"),
    ("train_sae.py", [*SAE, "--config.workdir={missing}", "--config.source.buffer_rows=1000"],
     2, r"'source.buffer_rows' = 1000 is invalid"),
    ("train_sae.py", [*SAE, "--config.workdir={missing}", "--config.mesh.data=3"], 2,
     r"'mesh' = \(data=3, model=1\) is invalid"),
    ("train_sae.py", [*SAE, "--config.workdir={missing}", "--config.mesh.data=1",
                      "--config.mesh.model=8", "--config.sae.n_features=100"], 2,
     r"'sae.n_features' = 100 is invalid: must be divisible"),
    ("train_sae.py", [*ARR, "--config.source.paths={missing}.npy"], 2, r"no .npy file matches"),
    ("train_sae.py", [*ARR, "--config.source.paths={notnpy}"], 2,
     r"cannot read activations from .*notnpy.npy.* as a .npy array"),
    ("train_sae.py", [*ARR, "--config.source.paths={vec}"], 2, r"have shape \(10,\)"),
    ("train_sae.py", [*ARR, "--config.source.paths={nan}", "--config.batch_size=64",
                      "--config.sae.d_in=8"], 2, r"nan.npy hold NaN or Inf \(first at row 123\)"),
    ("train_sae.py", [*ARR, "--config.source.paths={good_npy}", "--config.batch_size=64"], 2,
     r"'sae.d_in' = 512 is invalid: the arrays activations have width 8"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.store_dir={missing}",
                     "--config.workdir={missing}"], 2, r"'store_dir' = .* no token store at"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.store_dir={tokens_corrupt}",
                     "--config.workdir={missing}"], 1,
     r"train.zarr chunk 0 .* does not match its recorded sha256"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.store_dir={acts_post}",
                     "--config.workdir={missing}"], 2,
     r"'store_dir' = .* holds a 'activation_store', not a token store"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.store_dir={tokens_badmeta}",
                     "--config.workdir={missing}"], 1, r"metadata.json is not valid JSON"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.store_dir={tokens}",
                     "--config.model.vocab_size=10", "--config.workdir={missing}"], 2,
     r"'model.vocab_size' = 10 is invalid"),
    ("train_lm.py", ["--config=experiments/lm_tiny.py", "--config.store_dir={tokens}",
                     "--config.workdir={lm}", "--config.num_steps=1",
                     "--config.optim.warmup_steps=0"], 2,
     r"'num_steps' = 1 is invalid: .* is at step 2 already"),
    ("build_corpus.py", ["--config=experiments/corpus_text.py",
                         "--config.corpus.path={missing}", "--config.corpus.out_dir={missing}"],
     2, r"'corpus.path' = .* is invalid: it does not exist"),
    ("build_corpus.py", ["--config=experiments/corpus_text.py", "--config.corpus.path={empty}",
                         "--config.corpus.out_dir={missing}"], 2, r"matched no files"),
    ("build_corpus.py", ["--config=experiments/corpus_stdlib.py",
                         "--config.corpus.out_dir={tokens}"], 2,
     r"refusing to write a token store .* different settings"),
    ("harvest.py", ["--config=experiments/harvest.py", "--config.lm_dir={missing}",
                    "--config.out_dir={missing}"], 2, r"'lm_dir' = .* no LM checkpoint in"),
    ("harvest.py", ["--config=experiments/harvest.py", "--config.lm_dir={lm}",
                    "--config.out_dir={tokens}", "--config.sae_batch_size=256",
                    "--config.lm_batch_size=16", "--config.num_contexts=64",
                    "--config.chunk_mb=0.06"], 2,
     r"refusing to write an activation store into .*: it holds a token store"),
    ("harvest.py", ["--config=experiments/harvest.py", "--config.lm_dir={lm}",
                    "--config.out_dir={missing}", "--config.num_contexts=100000"], 2,
     r"'num_contexts' = 100000 is invalid"),
    ("harvest.py", ["--config=experiments/harvest.py", "--config.lm_dir={lm}",
                    "--config.out_dir={missing}", "--config.site=resid.bogus"], 2,
     r"'site' = 'resid.bogus' is invalid"),
    ("steer.py", [*STEER, "--workdir={missing}"], 2,
     r"--workdir: no checkpoints in .*no such directory"),
    ("steer.py", [*STEER, "--sae={bogus_npz}"], 2,
     r"--sae: .*bogus.npz' is not a readable SAE export"),
    ("steer.py", [*STEER, "--sae={missing}.npz"], 2, r"--sae: no SAE export at"),
    ("steer.py", ["--feature=99999", "--value=1", "--workdir={sae_run}"], 2,
     r"--feature=99999 is out of range: the dictionary has 256 features"),
    ("steer.py", [*STEER, "--workdir={arrays_run}"], 2, r"names no LM site"),
    ("export.py", ["--workdir={missing}", "--out={missing}"], 2,
     r"--workdir: no checkpoints in .*no such directory"),
    ("export.py", ["--workdir={sae_run}", "--out={tokens}"], 2, r"--out: .* is not empty"),
    ("export.py", ["--workdir={sae_run}", "--out={tokens}", "--overwrite"], 2,
     r"--out: .* holds files other than a SAELens export"),
    ("export.py", ["--workdir={sae_run}", "--out={missing}", "--density={notnpy}"], 2,
     r"--density: .*notnpy.npy' is not a .npy array"),
    ("export.py", ["--workdir={sae_run}", "--out={missing}", "--density={bogus_npz}"], 2,
     r"--density: .*bogus.npz' is not a .npy array"),
    ("export.py", ["--workdir={sae_run}", "--out={missing}", "--density={vec}"], 2,
     r"--density: .*vec.npy' has shape \(10,\), the dictionary has 256 features"),
    ("export.py", ["--workdir={sae_run}", "--out={missing}", "--density={missing}.npy"], 2,
     r"--density: no file"),
    ("export.py", ["--workdir={sae_run}", "--out={missing}", "--context_size=0"], 2,
     r"--context_size=0 must be >= 1"),
    ("export.py", ["--workdir={sae_run}", "--out={missing}", "--format=onnx"], 2,
     r"--format.*onnx"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,code,pattern", TABLE,
                         ids=[f"{i}-{c[0][:-3]}" for i, c in enumerate(TABLE)])
def test_bad_input_table_one_line_exit_code_and_files_untouched(world, script, args, code,
                                                                pattern, tmp_path):
    paths = {**world, "missing": str(tmp_path / "no" / "such")}
    before = tree_hashes(*world["precious"])
    res = run_launcher(script, *[a.format(**paths) for a in args])
    assert_one_line(res, script[:-3], code, pattern)
    assert tree_hashes(*world["precious"]) == before
    if code == 2 or script == "steer.py":  # refused before anything is written; read-only
        assert not os.path.exists(tmp_path / "no")


@pytest.mark.slow
def test_disk_full_mid_run_one_line_last_checkpoint_intact_and_resume(tiny_lm_dir, tmp_path):
    """A 1 MB tmpfs fills up at a checkpoint write: one line, exit 1, the last complete
    checkpoint intact; with space freed the same command resumes and ends where an
    uninterrupted run ends (bit for bit)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root in a privileged sandbox)")
    try:
        args = ["--config=experiments/sae_tiny.py", f"--config.lm.dir={tiny_lm_dir}",
                "--config.progress_bar=false", "--config.eval.every=1000",
                "--config.checkpoint.async_save=false"]
        ref = run_launcher("train_sae.py", *args, f"--config.workdir={tmp_path / 'ref'}")
        assert ref.returncode == 0, ref.stderr[-3000:]
        work = mnt / "run"
        full = run_launcher("train_sae.py", *args, f"--config.workdir={work}")
        assert_one_line(full, "train_sae", 1, r"no space left on the device .* free some space "
                                              r"and re-run the same command to resume")
        _, record = params(work)  # the last complete checkpoint restores
        assert 0 < record.step < 60
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        again = run_launcher("train_sae.py", *args, f"--config.workdir={work}")
        assert again.returncode == 0, again.stderr[-3000:]
        want, _ = params(tmp_path / "ref")
        got, record = params(work)
        assert record.step == 60
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)

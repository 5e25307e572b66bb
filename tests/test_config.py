"""Typed configs: building from ConfigDicts, validation messages, absl flag overrides."""

import dataclasses
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from saejax.config import ConfigError, DistributedConfig, MeshConfig, from_config
from saejax.data.corpus import CorpusConfig, CorpusJobConfig
from saejax.data.loader import LoaderConfig
from saejax.data.tokenizer import TokenizerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_from_config_builds_nested_frozen_dataclasses():
    cd = ml_collections.ConfigDict({"corpus": {"seq_len": 64, "val_fraction": 0.1},
                                    "tokenizer": {"kind": "byte"}})
    job = from_config(CorpusJobConfig, cd)
    assert job.corpus == CorpusConfig(seq_len=64, val_fraction=0.1)
    assert job.tokenizer.kind == "byte"
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.corpus.seq_len = 3


@pytest.mark.parametrize("section,key,value,needle", [
    ("corpus", "seq_len", 1, "'corpus.seq_len' = 1"),
    # One field-name style for every message (issue 12): the dataclasses' own, no "config.".
    ("corpus", "seq_len", "long", "'corpus.seq_len' = 'long' is invalid: must be an integer"),
    ("corpus", "val_fraction", 1.5, "'corpus.val_fraction' = 1.5 is invalid: must be in [0, 1)"),
    ("corpus", "source", "s3", "'corpus.source' = 's3' is invalid: must be one of"),
    ("corpus", "chunk_mb", 0, "'corpus.chunk_mb' = 0"),
    ("tokenizer", "kind", "wordpiece", "must be one of ['byte', 'bpe', 'file']"),
    ("tokenizer", "vocab_size", 100, "'tokenizer.vocab_size' = 100 is invalid"),
])
def test_invalid_values_name_field_value_and_allowed(section, key, value, needle):
    cd = {"corpus": {}, "tokenizer": {}}
    cd[section][key] = value
    with pytest.raises(ConfigError) as e:
        from_config(CorpusJobConfig, cd)
    assert needle in str(e.value)


def test_unknown_field_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"config.corpus.seqlen.*accepts"):
        from_config(CorpusJobConfig, {"corpus": {"seqlen": 4}})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="corpus.path"):
        CorpusConfig(source="text")
    with pytest.raises(ConfigError, match="tokenizer.path"):
        TokenizerConfig(kind="file")
    with pytest.raises(ConfigError, match="at most one"):
        MeshConfig(data=-1, model=-1)
    with pytest.raises(ConfigError, match="mesh.model"):
        MeshConfig(model=0)
    with pytest.raises(ConfigError, match="distributed.process_id"):
        DistributedConfig(num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="loader.batch_size"):
        LoaderConfig(batch_size=0)


def test_absl_flags_override_any_field(monkeypatch):
    argv = ["prog", f"--config={ROOT}/experiments/corpus_stdlib.py", "--config.corpus.seq_len=64",
            "--config.tokenizer.kind=byte", "--config.corpus.path=/data/x",
            "--config.corpus.val_fraction=0.2"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
    fv(argv)
    job = from_config(CorpusJobConfig, fv.config)
    assert (job.corpus.seq_len, job.tokenizer.kind, job.corpus.path,
            job.corpus.val_fraction) == (64, "byte", "/data/x", 0.2)


def test_launcher_rejects_invalid_value_with_clear_message(tmp_path):
    r = subprocess.run([sys.executable, f"{ROOT}/launch/build_corpus.py",
                        f"--config={ROOT}/experiments/corpus_stdlib.py",
                        "--config.corpus.seq_len=1", f"--config.corpus.out_dir={tmp_path}/s"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert "'corpus.seq_len' = 1 is invalid" in r.stderr
    assert not os.path.exists(tmp_path / "s")

"""Corpus sources and the token store: content, splits, bad input, resume, corruption."""

import hashlib
import json
import os

import numpy as np
import pytest

from saejax.data.corpus import CorpusConfig, CorpusJobConfig
from saejax.data.tokenizer import TokenizerConfig
from saejax.data import corpus as corpus_mod
from saejax.data import sources
from saejax.data.corpus import build_token_store, split_of
from saejax.data.token_store import (CorruptStoreError, IncompleteStoreError, StoreExistsError,
                                     TokenStore)

EOT = 256


def write_docs(root, n=40, size=300):
    """n small text files with unique markers; returns {relative name: text}."""
    docs = {}
    for i in range(n):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        text = f"<doc {i:03d}>" + "".join(chr(97 + (i * 7 + k) % 26) for k in range(size)) + "\n"
        (sub / f"f{i:03d}.txt").write_text(text)
        docs[f"d{i % 3}/f{i:03d}.txt"] = text
    return docs


def job(tmp_path, src, **kw):
    tok = kw.pop("tokenizer", TokenizerConfig(kind="byte"))
    defaults = dict(source="text", path=str(src), seq_len=32, val_fraction=0.0,
                    out_dir=str(tmp_path / "store"), chunk_mb=0.004)
    defaults.update(kw)
    return CorpusJobConfig(corpus=CorpusConfig(**defaults), tokenizer=tok)


def expected_rows(texts, seq_len):
    stream = np.concatenate([list(t.encode()) + [EOT] for t in texts]).astype(np.int32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def test_store_holds_documents_in_sorted_order_separated_by_eot(tmp_path):
    docs = write_docs(tmp_path / "src")
    store = build_token_store(job(tmp_path, tmp_path / "src"))
    want = expected_rows([docs[k] for k in sorted(docs)], 32)
    assert store.rows("train") == len(want) and store.rows("val") == 0
    assert store.chunk_rows < store.rows("train")  # several chunks were written
    np.testing.assert_array_equal(store.read("train", 0, store.rows("train")), want)
    meta = store.metadata
    assert meta["splits"]["train"]["documents"] == 40
    assert meta["splits"]["train"]["tokens"] == sum(len(t.encode()) + 1 for t in docs.values())
    manifest = {m["path"]: m for m in meta["manifest"]}
    for name, text in docs.items():
        assert manifest[name]["bytes"] == len(text.encode())
        assert manifest[name]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    store.verify()
    assert store.tokenizer().decode(store.read("train", 0, 1)[0]).startswith("<doc 000>")


def test_split_is_by_document(tmp_path):
    docs = write_docs(tmp_path / "src", n=60)
    store = build_token_store(job(tmp_path, tmp_path / "src", val_fraction=0.3, seq_len=16))
    tok = store.tokenizer()
    text = {s: tok.decode(store.read(s, 0, store.rows(s)).ravel()) for s in ("train", "val")}
    n_val = 0
    for name, doc in docs.items():
        split = split_of(name, 0, 0.3)
        other = "train" if split == "val" else "val"
        marker = doc[:9]
        assert marker not in text[other], name
        n_val += split == "val"
    assert 5 <= n_val <= 35
    assert store.metadata["splits"]["val"]["documents"] == n_val


def test_bad_files_are_skipped_or_repaired_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("x" * 200)
    (src / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (src / "latin1.txt").write_bytes(b"caf\xe9 na\xefve " * 10 + b"\xff\xfe end")
    os.symlink(src / "does-not-exist", src / "broken-link.txt")
    store = build_token_store(job(tmp_path, src, seq_len=8))
    report = store.metadata["report"]
    assert report["skipped_binary"] == 1 and store.metadata["skipped_binary"] == ["blob.bin"]
    assert report["skipped_unreadable"] == 1
    assert store.metadata["skipped_unreadable"] == ["broken-link.txt"]
    assert report["bytes_replaced"] == 22 and report["files_with_replacements"] == 1
    assert report["documents"] == 2


def test_decode_utf8_counts_replaced_bytes():
    assert sources.decode_utf8("ok é".encode()) == ("ok é", 0)
    text, n = sources.decode_utf8(b"a\xffb\xc3")
    assert text == "a\ufffdb\ufffd" and n == 2


def test_jsonl_source(tmp_path):
    lines = [json.dumps({"text": f"record number {i} " * 5, "id": i}) for i in range(20)]
    lines[3] = "{broken json"
    lines[7] = json.dumps({"body": "no text field"})
    lines[9] = json.dumps({"text": 17})
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    store = build_token_store(job(tmp_path, tmp_path / "*.jsonl", source="jsonl", seq_len=16))
    assert store.metadata["report"]["bad_jsonl_lines"] == 3
    assert store.metadata["splits"]["train"]["documents"] == 17
    texts = [json.loads(ln)["text"] for i, ln in enumerate(lines) if i not in (3, 7, 9)]
    np.testing.assert_array_equal(store.read("train", 0, store.rows("train")),
                                  expected_rows(texts, 16))


@pytest.mark.parametrize("setup,match", [
    ("empty", "matched no files"),
    ("binary_only", "no readable text documents"),
    ("missing", "does not exist"),
])
def test_unusable_corpus_errors(tmp_path, setup, match):
    src = tmp_path / "src"
    if setup != "missing":
        src.mkdir()
    if setup == "binary_only":
        (src / "a.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(sources.CorpusError, match=match):
        build_token_store(job(tmp_path, src))


def test_corpus_shorter_than_one_context(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("tiny")
    with pytest.raises(sources.CorpusError, match="corpus too short.*corpus.seq_len=32"):
        build_token_store(job(tmp_path, tmp_path / "src"))
    with pytest.raises(IncompleteStoreError):
        TokenStore.open(str(tmp_path / "store"))


def test_existing_store_is_reused_or_refused(tmp_path):
    write_docs(tmp_path / "src")
    first = build_token_store(job(tmp_path, tmp_path / "src"))
    again = build_token_store(job(tmp_path, tmp_path / "src"))
    assert again.metadata["build_seconds"] == first.metadata["build_seconds"]  # not rebuilt
    with pytest.raises(StoreExistsError, match=r"different settings.*'corpus'.*overwrite=true"):
        build_token_store(job(tmp_path, tmp_path / "src", seq_len=16))
    replaced = build_token_store(job(tmp_path, tmp_path / "src", seq_len=16, overwrite=True))
    assert replaced.seq_len == 16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("precious")
    with pytest.raises(StoreExistsError, match="not a token store"):
        build_token_store(job(tmp_path, tmp_path / "src", out_dir=str(tmp_path / "other")))
    assert (tmp_path / "other" / "keep.txt").read_text() == "precious"


def test_interrupted_build_is_detected_and_resumes(tmp_path, monkeypatch):
    write_docs(tmp_path / "src", n=60)
    ref = build_token_store(job(tmp_path, tmp_path / "src", out_dir=str(tmp_path / "ref"),
                                val_fraction=0.2))
    real_commit = corpus_mod._ChunkWriter.commit
    calls = {"n": 0}

    def crash_after_two(self, split, block):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated kill")
        return real_commit(self, split, block)

    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(job(tmp_path, tmp_path / "src", val_fraction=0.2))
    with pytest.raises(IncompleteStoreError, match="half-written.*resume"):
        TokenStore.open(str(tmp_path / "store"))

    writes = []
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", real_commit)
    real_write = corpus_mod.token_store.write_json_atomic
    monkeypatch.setattr(corpus_mod.token_store, "write_json_atomic",
                        lambda p, o: (writes.append(1), real_write(p, o)))
    store = build_token_store(job(tmp_path, tmp_path / "src", val_fraction=0.2))
    n_chunks = sum(len(store.metadata["splits"][s]["chunks"]) for s in ("train", "val"))
    assert len(writes) == n_chunks - 2 + 1  # only the missing chunks, then "complete"
    for split in ("train", "val"):
        assert store.metadata["splits"][split]["chunks"] == ref.metadata["splits"][split]["chunks"]
        np.testing.assert_array_equal(store.read(split, 0, store.rows(split)),
                                      ref.read(split, 0, ref.rows(split)))


def test_resume_refuses_a_changed_corpus(tmp_path, monkeypatch):
    docs = write_docs(tmp_path / "src")
    real_commit = corpus_mod._ChunkWriter.commit
    calls = {"n": 0}

    def crash(self, split, block):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_commit(self, split, block)

    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", crash)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(job(tmp_path, tmp_path / "src"))
    monkeypatch.setattr(corpus_mod._ChunkWriter, "commit", real_commit)
    first = sorted(docs)[0]
    (tmp_path / "src" / first).write_text("changed " + docs[first])
    with pytest.raises(CorruptStoreError, match="corpus changed"):
        build_token_store(job(tmp_path, tmp_path / "src"))


def test_verify_detects_a_corrupted_chunk(tmp_path):
    write_docs(tmp_path / "src")
    store = build_token_store(job(tmp_path, tmp_path / "src"))
    chunk = tmp_path / "store" / "train.zarr" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="chunk 1"):
        TokenStore.open(store.directory).verify()


def test_stdlib_source_excludes_tests_and_site_packages():
    root, files = sources.stdlib_files()
    rel = [os.path.relpath(f, root) for f in files]
    assert len(rel) > 300 and rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    parts = {p for r in rel for p in r.split(os.sep)[:-1]}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}
    assert "os.py" in rel and os.path.join("json", "decoder.py") in rel


def test_default_corpus_builds_on_a_clean_machine(tmp_path):
    """The embedded default: the real stdlib, BPE 4096, exactly as `make demo` builds it."""
    from experiments import corpus_stdlib
    from saejax.config import from_config

    cd = corpus_stdlib.get_config()
    cd.corpus.out_dir = str(tmp_path / "stdlib")
    store = build_token_store(from_config(CorpusJobConfig, cd))
    meta = store.metadata
    assert meta["tokenizer"]["vocab_size"] == 4096
    assert meta["report"]["files_read"] > 300 and meta["report"]["skipped_binary"] == 0
    assert store.rows("train") > 10_000 and store.rows("val") > 200
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 2.5 < meta["report"]["bytes_read"] / tokens < 5  # BPE actually compresses
    row = store.read("val", 0, 1)[0]
    assert (row < 4096).all() and (row >= 0).all()

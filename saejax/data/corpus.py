"""Corpus -> token store: tokenize documents, pack into contexts, write resumably.

Documents are split into train/validation *by document* (a stable hash of the document
name and the seed), tokenized, joined with the end-of-text token and packed into
fixed-length contexts [N, T]. Contexts are written a chunk at a time; after each chunk the
metadata records the rows written and the chunk's sha256, so a killed build resumes where
it stopped (see :mod:`saejax.data.token_store`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Literal, get_args

import numpy as np
from absl import logging

from saejax.config import check, check_choice, check_fraction, check_positive, to_dict
from saejax.data import sources, token_store
from saejax.data.tokenizer import TokenizerConfig, load_tokenizer, make_tokenizer

_ENCODE_BATCH = 64  # documents per encode_batch call
_MAX_LISTED = 100   # skipped-file names kept in the metadata


CorpusSource = Literal["stdlib", "text", "jsonl"]


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Corpus -> token store.

    source: "stdlib" (the running Python's standard library source, the embedded default),
      "text" (a directory, searched recursively, or a glob of text files) or "jsonl"
      (a file or glob of JSON-lines files with a text field).
    """

    source: CorpusSource = "stdlib"
    path: str | None = None
    text_field: str = "text"
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0
    out_dir: str = "runs/corpus/stdlib"
    chunk_mb: float = 16.0
    overwrite: bool = False

    def __post_init__(self):
        check_choice("corpus.source", self.source, get_args(CorpusSource))
        if self.source in ("text", "jsonl"):
            check("corpus.path", self.path, bool(self.path),
                  f"must name a directory, file or glob when corpus.source={self.source!r}")
        check("corpus.seq_len", self.seq_len, isinstance(self.seq_len, int) and self.seq_len >= 2,
              "must be an integer >= 2 (tokens per context)")
        check_fraction("corpus.val_fraction", self.val_fraction)
        check_positive("corpus.chunk_mb", self.chunk_mb)
        check("corpus.out_dir", self.out_dir, bool(self.out_dir), "must be a non-empty path")


@dataclasses.dataclass(frozen=True)
class CorpusJobConfig:
    """``launch/build_corpus.py``: everything needed to build a token store."""

    corpus: CorpusConfig = CorpusConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()


def split_of(name: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train' for a document, stable across runs and corpus additions."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    u = int.from_bytes(h[:8], "little") / 2.0**64
    return "val" if u < val_fraction else "train"


def settings_fingerprint(job: CorpusJobConfig) -> tuple[str, dict]:
    """A digest of every setting that changes the store's contents."""
    corpus = {k: v for k, v in to_dict(job.corpus).items() if k not in ("out_dir", "overwrite")}
    settings = {"format": token_store.FORMAT_VERSION, "corpus": corpus,
                "tokenizer": to_dict(job.tokenizer), "source": sources.source_identity(job.corpus)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return digest, settings


def chunk_rows_for(config: CorpusConfig, itemsize: int) -> int:
    """Rows per chunk so one chunk is about ``chunk_mb`` megabytes."""
    return max(1, int(config.chunk_mb * 2**20) // (config.seq_len * itemsize))


class _Packer:
    """Accumulates token ids and cuts them into [chunk_rows, T] blocks."""

    def __init__(self, seq_len: int, chunk_rows: int, dtype: np.dtype):
        self.seq_len, self.chunk_rows, self.dtype = seq_len, chunk_rows, dtype
        self._parts: list[np.ndarray] = []
        self._n = 0
        self.tokens = 0
        self.documents = 0

    def add(self, ids: list[int], eot: int) -> Iterator[np.ndarray]:
        arr = np.asarray(ids + [eot], dtype=self.dtype)
        self._parts.append(arr)
        self._n += arr.size
        self.tokens += arr.size
        self.documents += 1
        per_chunk = self.seq_len * self.chunk_rows
        while self._n >= per_chunk:
            flat = np.concatenate(self._parts)
            yield flat[:per_chunk].reshape(self.chunk_rows, self.seq_len)
            rest = flat[per_chunk:]
            self._parts, self._n = [rest], rest.size

    def finish(self) -> tuple[np.ndarray | None, int]:
        """The last, partial chunk (whole contexts only) and the tokens dropped."""
        flat = np.concatenate(self._parts) if self._parts else np.zeros(0, self.dtype)
        rows = flat.size // self.seq_len
        block = flat[: rows * self.seq_len].reshape(rows, self.seq_len) if rows else None
        return block, int(flat.size - rows * self.seq_len)


def _prepare_directory(job: CorpusJobConfig, fingerprint: str, settings: dict) -> dict | None:
    """Returns the resumable metadata, or None to start fresh. Refuses to clobber.

    A half-written store built with other settings that committed no rows yet (e.g. a
    build that failed early) cannot be resumed by these settings and holds nothing: it is
    replaced, with a warning, so that it does not block the corrected command. One with
    committed rows, or a complete one, is refused unless ``corpus.overwrite``; with it, even
    a store whose metadata.json is damaged is replaced.
    """
    out = job.corpus.out_dir
    try:
        meta = token_store.read_metadata(out)
    except token_store.CorruptStoreError:
        if not job.corpus.overwrite:
            raise
        meta = {"kind": "damaged"}
    if meta is not None and meta.get("fingerprint") == fingerprint and not job.corpus.overwrite:
        return meta
    empty_half = (meta is not None and meta.get("kind") == "token_store"
                  and meta.get("status") != "complete"
                  and not any(v.get("rows") for v in meta.get("splits", {}).values()))
    if empty_half:
        logging.warning("replacing the half-written token store in %s (built with other "
                        "settings, no rows committed)", out)
    if meta is not None or (os.path.isdir(out) and os.listdir(out)):
        if not job.corpus.overwrite and not empty_half:
            if meta is None:
                why = "it is a non-empty directory that is not a token store"
            else:
                old = meta.get("settings", {})
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                state = "a half-written store" if meta.get("status") != "complete" else "a store"
                why = f"it holds {state} built with different settings (differing: {diff})"
            raise token_store.StoreExistsError(
                f"refusing to write a token store to {out!r}: {why}. Choose another "
                f"corpus.out_dir or set corpus.overwrite=true to replace it")
        logging.warning("overwriting %s", out)
        shutil.rmtree(out)
    return None


def _train_texts(config: CorpusConfig) -> Iterator[str]:
    report = sources.SourceReport()
    for doc in sources.iter_documents(config, report):
        if split_of(doc.name, config.seed, config.val_fraction) == "train":
            yield doc.text


def build_token_store(job: CorpusJobConfig) -> token_store.TokenStore:
    """Builds (or resumes, or reuses) the token store a config describes.

    Args:
      job: corpus and tokenizer settings.

    Returns:
      The completed, opened store.

    Raises:
      sources.CorpusError: no readable documents, or too little text for one context.
      token_store.StoreExistsError: a different store is in ``out_dir`` and overwrite is off.
    """
    cfg = job.corpus
    out = cfg.out_dir
    t0 = time.perf_counter()
    if cfg.source in ("text", "jsonl"):
        sources.expand_path(cfg.path)  # a mistyped path fails here, before anything is written
    fingerprint, settings = settings_fingerprint(job)
    meta = _prepare_directory(job, fingerprint, settings)
    if meta is not None and meta["status"] == "complete":
        logging.info("token store %s is already complete; nothing to do", out)
        return token_store.TokenStore.open(out)
    os.makedirs(out, exist_ok=True)
    resuming = meta is not None

    # Tokenizer: reuse the one saved by the interrupted build, else make it.
    if resuming:
        tokenizer = load_tokenizer(out)
        logging.info("resuming token store %s: %s", out,
                     {s: meta["splits"][s]["rows"] for s in token_store.SPLITS})
    else:
        tokenizer = make_tokenizer(job.tokenizer, texts=_train_texts(cfg)
                                   if job.tokenizer.kind == "bpe" else None)
        tokenizer.save(out)
        logging.info("tokenizer: %s", tokenizer.describe())

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    chunk_rows = chunk_rows_for(cfg, dtype.itemsize)
    if not resuming:
        meta = {
            "kind": "token_store", "status": "writing", "fingerprint": fingerprint,
            "settings": settings, "tokenizer": tokenizer.describe(), "seq_len": cfg.seq_len,
            "dtype": dtype.name, "chunk_rows": chunk_rows,
            "splits": {s: {"rows": 0, "chunks": []} for s in token_store.SPLITS},
        }
        for split in token_store.SPLITS:
            token_store.create_array(out, split, cfg.seq_len, chunk_rows, dtype.name)
        token_store.write_json_atomic(os.path.join(out, token_store.METADATA_FILE), meta)
    arrays = {s: token_store.open_array(out, s, write=True) for s in token_store.SPLITS}
    writer = _ChunkWriter(out, meta, arrays)

    report = sources.SourceReport()
    packers = {s: _Packer(cfg.seq_len, chunk_rows, dtype) for s in token_store.SPLITS}
    docs = sources.iter_documents(cfg, report)
    batch: list[sources.Document] = []

    def flush():
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch]), strict=True):
            split = split_of(doc.name, cfg.seed, cfg.val_fraction)
            for block in packers[split].add(ids, tokenizer.eot_id):
                writer.commit(split, block)
        batch.clear()

    last_log = time.perf_counter()
    for doc in docs:
        batch.append(doc)
        if len(batch) >= _ENCODE_BATCH:
            flush()
            if time.perf_counter() - last_log > 5:
                last_log = time.perf_counter()
                logging.info("tokenized %d documents (%.1f MB), %d contexts written",
                             report.documents, report.bytes_read / 1e6, writer.rows_written())
    flush()

    if report.documents == 0:
        raise sources.CorpusError(
            f"no readable text documents in the corpus ({json.dumps(report.summary())}); "
            f"check corpus.source/corpus.path")
    dropped = {}
    for split, packer in packers.items():
        block, dropped[split] = packer.finish()
        if block is not None:
            writer.commit(split, block)
    total_tokens = sum(p.tokens for p in packers.values())
    if meta["splits"]["train"]["rows"] == 0:
        raise sources.CorpusError(
            f"corpus too short: the train split has {packers['train'].tokens} tokens, fewer than "
            f"one context of corpus.seq_len={cfg.seq_len} (all splits: {total_tokens} tokens); "
            f"add text or lower corpus.seq_len")
    if cfg.val_fraction > 0 and meta["splits"]["val"]["rows"] == 0:
        raise sources.CorpusError(
            f"the validation split is empty ({packers['val'].documents} documents, "
            f"{packers['val'].tokens} tokens < one context of {cfg.seq_len}); raise "
            f"corpus.val_fraction, lower corpus.seq_len or set corpus.val_fraction=0")

    for split, packer in packers.items():
        meta["splits"][split].update(documents=packer.documents, tokens=packer.tokens,
                                     tokens_dropped=dropped[split])
    summary = report.summary()
    meta["report"] = summary
    meta["skipped_binary"] = report.skipped_binary[:_MAX_LISTED]
    meta["skipped_unreadable"] = report.skipped_unreadable[:_MAX_LISTED]
    meta["manifest"] = report.manifest
    meta["build_seconds"] = round(time.perf_counter() - t0, 3)
    meta["status"] = "complete"
    writer.save()
    logging.info("token store %s complete: %s in %.1f s", out,
                 {s: meta["splits"][s]["rows"] for s in token_store.SPLITS}, meta["build_seconds"])
    return token_store.TokenStore.open(out)


@dataclasses.dataclass
class _ChunkWriter:
    """Writes chunks in order; skips (and checks) chunks an interrupted build committed."""

    directory: str
    meta: dict
    arrays: dict
    _seen: dict = dataclasses.field(default_factory=lambda: {s: 0 for s in token_store.SPLITS})

    def rows_written(self) -> int:
        return sum(v["rows"] for v in self.meta["splits"].values())

    def save(self) -> None:
        token_store.write_json_atomic(os.path.join(self.directory, token_store.METADATA_FILE),
                                      self.meta)

    def commit(self, split: str, block: np.ndarray) -> None:
        info = self.meta["splits"][split]
        index = self._seen[split]
        self._seen[split] += 1
        digest = token_store.chunk_checksum(block)
        if index < len(info["chunks"]):  # committed before an interruption
            if info["chunks"][index] != digest:
                raise token_store.CorruptStoreError(
                    f"cannot resume {self.directory}: chunk {index} of split {split!r} differs "
                    f"from the one written before (the corpus changed since); set "
                    f"corpus.overwrite=true to rebuild")
            return
        lo = index * self.meta["chunk_rows"]
        hi = lo + block.shape[0]
        arr = self.arrays[split]
        if arr.shape[0] < hi:
            arr = arr.resize(exclusive_max=[hi, arr.shape[1]]).result()
            self.arrays[split] = arr
        arr[lo:hi].write(block).result()
        info["chunks"].append(digest)
        info["rows"] = hi
        self.save()

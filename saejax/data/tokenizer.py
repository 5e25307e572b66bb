"""Tokenizers: byte-level (no files), BPE trained locally, or a user's tokenizer.json.

Every tokenizer exposes ``encode(text) -> list[int]``, ``encode_batch(texts)``,
``decode(ids) -> str``, ``vocab_size``, ``eot_id`` (the end-of-text id that separates
documents in the token store) and ``save(directory)``. A token store records which
tokenizer made it; :func:`load_tokenizer` gets it back from the store directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
import dataclasses
from typing import Any, Literal, Protocol, get_args

from saejax.config import ConfigError, check, check_choice

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_INFO = "tokenizer_info.json"


TokenizerKind = Literal["byte", "bpe", "file"]


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer turns text into ids.

    kind: "byte" (256 byte ids + end-of-text, no files), "bpe" (trained on the corpus with
      HF ``tokenizers``, saved next to the token store) or "file" (a user's tokenizer.json).
    """

    kind: TokenizerKind = "bpe"
    vocab_size: int = 4096
    path: str | None = None
    eot_token: str = "<|endoftext|>"

    def __post_init__(self):
        check_choice("tokenizer.kind", self.kind, get_args(TokenizerKind))
        if self.kind == "bpe":
            check("tokenizer.vocab_size", self.vocab_size, 258 <= self.vocab_size <= 1 << 20,
                  "must be in [258, 1048576] for a BPE tokenizer (256 bytes + end-of-text + merges)")
        if self.kind == "file":
            check("tokenizer.path", self.path, bool(self.path),
                  "must name a tokenizer.json when tokenizer.kind='file'")


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: str) -> None: ...
    def describe(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text = 256. Needs no files.

    ``decode(encode(s)) == s`` for every Python string (lone surrogates included, via
    ``surrogatepass``); ids >= 256 decode to nothing, so decoding a multi-document span
    drops the separators.
    """

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:  # a window cut mid-character
            return data.decode("utf-8", "replace")

    def save(self, directory: str) -> None:
        _write_info(directory, self.describe())

    def describe(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (trained BPE or a user's tokenizer.json)."""

    def __init__(self, tok: Any, eot_token: str, kind: str):
        eot = tok.token_to_id(eot_token)
        if eot is None:
            raise ConfigError(
                f"config field 'tokenizer.eot_token' = {eot_token!r} is invalid: the tokenizer "
                f"has no such token; set tokenizer.eot_token to its end-of-text/separator token")
        self._tok = tok
        self.kind = kind
        self.eot_token = eot_token
        self.eot_id = int(eot)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        _write_info(directory, self.describe())

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "eot_token": self.eot_token, "file": TOKENIZER_FILE}


def train_bpe(texts: Iterable[str], vocab_size: int, eot_token: str = "<|endoftext|>") -> HFTokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    Byte-level pre-tokenisation means every string is encodable and decodes back exactly.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eot_token], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, eot_token, kind="bpe")


def load_tokenizer_file(path: str, eot_token: str = "<|endoftext|>") -> HFTokenizer:
    """Loads a user's ``tokenizer.json`` (HF ``tokenizers`` format)."""
    from tokenizers import Tokenizer as _Tok

    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"config field 'tokenizer.path' = {path!r} is invalid: no such file "
                          f"(expected a Hugging Face tokenizer.json)")
    try:
        tok = _Tok.from_file(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ConfigError(f"config field 'tokenizer.path' = {path!r} is invalid: not a "
                          f"readable tokenizer.json ({e})") from None
    return HFTokenizer(tok, eot_token, kind="file")


def make_tokenizer(config: TokenizerConfig, texts: Iterable[str] | None = None) -> Tokenizer:
    """Builds the tokenizer a config asks for; BPE trains on ``texts``."""
    if config.kind == "byte":
        return ByteTokenizer()
    if config.kind == "file":
        return load_tokenizer_file(config.path, config.eot_token)
    if texts is None:
        raise ValueError("a BPE tokenizer needs texts to train on")
    return train_bpe(texts, config.vocab_size, config.eot_token)


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads the tokenizer saved next to a token store (``Tokenizer.save``)."""
    info_path = os.path.join(directory, TOKENIZER_INFO)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no {TOKENIZER_INFO} in {directory!r}: not a saejax token store "
                                f"directory, or its tokenizer was never saved")
    with open(info_path) as f:
        info = json.load(f)
    if info["kind"] == "byte":
        return ByteTokenizer()
    tok = load_tokenizer_file(os.path.join(directory, info["file"]), info["eot_token"])
    tok.kind = info["kind"]
    return tok


def _write_info(directory: str, info: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, TOKENIZER_INFO + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(directory, TOKENIZER_INFO))

"""Byte-level and BPE tokenizers, and loading a user's tokenizer.json."""

import os

import pytest

from saejax.config import ConfigError
from saejax.data.tokenizer import TokenizerConfig
from saejax.data.tokenizer import (ByteTokenizer, load_tokenizer, load_tokenizer_file,
                                   make_tokenizer, train_bpe)

SAMPLES = ["", "hello world", "def f(x):\n    return x ** 2  # 🐍\n", "naïve café — 東京 \t\r\n",
           "\x00\x7f\u200b", "a\udc80b"]  # the last holds a lone surrogate

CORPUS = [f"def function_{i}(value):\n    return value * {i} + offset_{i % 7}\n" for i in range(300)]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_roundtrip_is_exact(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_eot_is_dropped_on_decode():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode(tok.encode("ab") + [tok.eot_id] + tok.encode("c")) == "abc"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


def test_bpe_trains_to_the_requested_vocab_and_compresses(bpe):
    assert 258 <= bpe.vocab_size <= 300
    text = CORPUS[5]
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert bpe.id_to_token(bpe.eot_id) == "<|endoftext|>"


@pytest.mark.parametrize("text", SAMPLES[:5] + [CORPUS[3]])
def test_bpe_roundtrip_is_exact(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_save_load_and_user_file(bpe, tmp_path):
    bpe.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(CORPUS[7]) == bpe.encode(CORPUS[7])
    assert again.eot_id == bpe.eot_id
    user = make_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "tokenizer.json")))
    assert user.encode(CORPUS[9]) == bpe.encode(CORPUS[9])


def test_user_file_errors(tmp_path, bpe):
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer_file(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable tokenizer.json"):
        load_tokenizer_file(str(tmp_path / "bad.json"))
    bpe.save(str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="tokenizer.eot_token"):
        load_tokenizer_file(str(tmp_path / "t" / "tokenizer.json"), eot_token="</s>")
    with pytest.raises(FileNotFoundError, match="tokenizer_info.json"):
        load_tokenizer(str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "nowhere")

"""Text sources: the embedded default (Python's own stdlib), text files, JSON lines.

A source yields :class:`Document` objects in a deterministic (sorted) order and fills a
:class:`SourceReport` as it goes: the manifest (path, size, sha256 of each file read) and
the counts of what was skipped or repaired. Bad input never crashes a build: binary and
unreadable files are skipped and counted, non-UTF-8 bytes are replaced and counted.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import threading
from collections.abc import Iterator
from typing import Protocol

from saejax.config import ConfigError

# Directory names never read from the stdlib (tests and installed third-party code).
_STDLIB_EXCLUDE = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                             "__pycache__"})
_BINARY_SNIFF = 8192


class DocumentSpec(Protocol):
    """Which documents to read (``saejax.data.corpus.CorpusConfig`` is one)."""

    source: str             # "stdlib" | "text" | "jsonl"
    path: str | None        # directory, file or glob ("text", "jsonl")
    text_field: str         # the JSON field holding the text ("jsonl")


class CorpusError(ValueError):
    """The corpus cannot be built (no readable text, too short for one context, ...)."""


class CorpusPathError(CorpusError, ConfigError):
    """``corpus.path`` names nothing readable (a config error: exit code 2 in the launchers)."""


@dataclasses.dataclass(frozen=True)
class Document:
    name: str   # stable identifier: relative path, or "file.jsonl:LINE"
    text: str


@dataclasses.dataclass
class SourceReport:
    root: str = ""
    manifest: list[dict] = dataclasses.field(default_factory=list)
    files_read: int = 0
    skipped_binary: list[str] = dataclasses.field(default_factory=list)
    skipped_unreadable: list[str] = dataclasses.field(default_factory=list)
    bytes_replaced: int = 0
    files_with_replacements: int = 0
    bad_jsonl_lines: int = 0
    documents: int = 0
    bytes_read: int = 0

    def summary(self) -> dict:
        return {
            "root": self.root, "files_read": self.files_read, "documents": self.documents,
            "bytes_read": self.bytes_read,
            "skipped_binary": len(self.skipped_binary),
            "skipped_unreadable": len(self.skipped_unreadable),
            "bytes_replaced": self.bytes_replaced,
            "files_with_replacements": self.files_with_replacements,
            "bad_jsonl_lines": self.bad_jsonl_lines,
        }


# -- UTF-8 decoding that counts what it had to replace ---------------------------------

_counter = threading.local()


def _count_and_replace(err: UnicodeDecodeError):
    _counter.n = getattr(_counter, "n", 0) + (err.end - err.start)
    return ("\ufffd", err.end)


codecs.register_error("saejax.count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decodes UTF-8, replacing invalid bytes with U+FFFD; returns (text, bytes replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _counter.n = 0
        text = data.decode("utf-8", "saejax.count_replace")
        return text, _counter.n


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:_BINARY_SNIFF]


# -- file discovery ---------------------------------------------------------------------


def stdlib_root() -> str:
    """The running interpreter's standard library source directory."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> tuple[str, list[str]]:
    """(root, sorted .py files of the stdlib without tests and site-packages)."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDE)
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return root, sorted(out, key=lambda p: os.path.relpath(p, root))


def expand_path(path: str) -> tuple[str, list[str]]:
    """(root, sorted files) for a directory (recursive), a single file or a glob."""
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
        root = path
    elif os.path.isfile(path):
        files, root = [path], os.path.dirname(path) or "."
    else:
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        root = os.path.dirname(path.split("*", 1)[0]) or "."
        if not files and not glob.has_magic(path):
            raise CorpusPathError(f"config field 'corpus.path' = {path!r} is invalid: it does "
                                  f"not exist")
    files = sorted(files, key=lambda p: os.path.relpath(p, root))
    if not files:
        raise CorpusPathError(f"config field 'corpus.path' = {path!r} is invalid: it matched "
                              f"no files")
    return root, files


def _read(path: str, root: str, report: SourceReport) -> str | None:
    rel = os.path.relpath(path, root)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        report.skipped_unreadable.append(rel)
        return None
    if _looks_binary(data):
        report.skipped_binary.append(rel)
        return None
    text, replaced = decode_utf8(data)
    report.files_read += 1
    report.bytes_read += len(data)
    if replaced:
        report.bytes_replaced += replaced
        report.files_with_replacements += 1
    report.manifest.append({"path": rel, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
    return text


def _text_documents(root: str, files: list[str], report: SourceReport) -> Iterator[Document]:
    report.root = root
    for path in files:
        text = _read(path, root, report)
        if text:
            report.documents += 1
            yield Document(os.path.relpath(path, root), text)


def _jsonl_documents(root: str, files: list[str], field: str, report: SourceReport
                     ) -> Iterator[Document]:
    report.root = root
    for path in files:
        text = _read(path, root, report)
        if text is None:
            continue
        rel = os.path.relpath(path, root)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                report.bad_jsonl_lines += 1
                continue
            if not isinstance(value, str):
                report.bad_jsonl_lines += 1
                continue
            if value:
                report.documents += 1
                yield Document(f"{rel}:{lineno}", value)


def iter_documents(config: DocumentSpec, report: SourceReport) -> Iterator[Document]:
    """Documents of the configured source, in a deterministic order."""
    if config.source == "stdlib":
        root, files = stdlib_files()
        return _text_documents(root, files, report)
    root, files = expand_path(config.path)
    if config.source == "text":
        return _text_documents(root, files, report)
    return _jsonl_documents(root, files, config.text_field, report)


def source_identity(config: DocumentSpec) -> dict:
    """What identifies the source's *location* (contents are checked chunk by chunk)."""
    if config.source == "stdlib":
        import sys
        return {"source": "stdlib", "python": sys.version.split()[0]}
    return {"source": config.source, "path": os.path.abspath(config.path),
            "text_field": config.text_field if config.source == "jsonl" else None}

"""Where the text comes from: the built-in offline corpus, local files, or a Hugging Face hub dataset.

Every source is an iterator of documents (strings) in a fixed order, plus a ``fingerprint`` that names it in
the cache.

* The **default corpus** (``python-stdlib``) is the source code of the Python standard library of the
  interpreter that runs it — the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (docstrings,
  comments and code; about 10 MB in ~550 files for CPython 3.11), without ``site-packages``, the test
  suites, IDLE, turtledemo, tkinter and lib2to3. It is on every machine where Python is installed, so the
  recipes train with no network. One file is one document; files are read in sorted path order.
* **Local files** (``.txt``, ``.jsonl``/``.json``, ``.parquet``, globs allowed) are read with ``datasets``
  (``load_dataset("text" | "json" | "parquet", data_files=..., streaming=True)``); a ``.txt`` file is one
  document unless ``text_sample_by="line" | "paragraph"``.
* A **hub dataset** (``"HuggingFaceFW/fineweb-edu"``, with ``dataset_config`` such as ``"sample-10BT"``) is
  streamed with ``load_dataset(name, config, split=..., streaming=True)`` — the only path that needs the
  network.

**Files that cannot be read.** Local data files are the user's data, so nothing is dropped silently: a file
that is not UTF-8 (a binary file matched by a glob, another encoding), a ``.jsonl`` line that is not a JSON
object, a record without ``text_field`` or whose text is not a string, or a file that is not parquet raises
:class:`DataFileError` naming the file (and the line, for text and JSON lines) and the cause. Reading stays
one streamed ``load_dataset`` over all the files; only when it fails are the files re-read one by one, with
strict readers, to find the culprit. The default corpus keeps its behaviour of skipping a stdlib file that
cannot be read (it is the interpreter's own tree; one odd file must not stop offline training), but now with
a warning naming the file.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["TextSource", "stdlib_files", "DEFAULT_CORPUS", "DataFileError"]

DEFAULT_CORPUS = "python-stdlib"
_STDLIB_SKIP = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "ensurepip", "turtledemo",
    "lib2to3", "tkinter",
}
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


class DataFileError(ValueError):
    """A data file that cannot be read as its format: ``path``, ``line`` (1-based, or ``None``) and ``reason``."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = Path(path), line, reason
        where = f"{self.path}, line {line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``.py`` files of the default corpus, sorted (see the module docstring)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    out: list[Path] = []
    for d, dirs, files in os.walk(base):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP and not x.startswith("config-"))
        out.extend(Path(d) / f for f in sorted(files) if f.endswith(".py"))
    return sorted(out)


@dataclass
class TextSource:
    """A fixed-order stream of documents.

    Args:
        dataset: a hub dataset name, or ``None``.
        data_files: local file(s) or glob(s) (txt / jsonl / json / parquet), or ``None``.
        dataset_config, split: passed to ``load_dataset`` for a hub dataset.
        text_field: the column holding the text (jsonl / parquet / hub).
        text_sample_by: ``document`` (a .txt file is one document), ``paragraph`` or ``line``.
        max_bytes: stop after about this many bytes of text (``None``: all of it).
    With neither ``dataset`` nor ``data_files`` the source is the default corpus.
    """

    dataset: str | None = None
    data_files: Sequence[str] | str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    text_sample_by: str = "document"
    max_bytes: int | None = None
    _files: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dataset and self.data_files:
            raise ValueError("give either a hub dataset or local data_files, not both")
        if self.data_files:
            self._files = _expand(self.data_files)
            if not self._files:
                raise FileNotFoundError(f"no files match {self.data_files!r}")
            kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in self._files}
            if None in kinds:
                bad = [f for f in self._files if Path(f).suffix.lower() not in _BUILDERS]
                raise ValueError(f"unsupported file type(s) {bad[:3]}; use {', '.join(sorted(_BUILDERS))}")
            if len(kinds) > 1:
                raise ValueError(f"data_files mix formats {sorted(kinds)}; use one format per data module")
        if self.text_sample_by not in ("document", "paragraph", "line"):
            raise ValueError("text_sample_by must be document, paragraph or line")

    @property
    def name(self) -> str:
        if self.dataset:
            return self.dataset + (f"/{self.dataset_config}" if self.dataset_config else "")
        if self._files:
            return f"{len(self._files)} local file(s)"
        return DEFAULT_CORPUS

    def fingerprint(self) -> str:
        """Names the source and its content version (file sizes and mtimes; the Python version for stdlib)."""
        h = hashlib.sha256()
        h.update(repr((self.dataset, self.dataset_config, self.split, self.text_field, self.text_sample_by,
                       self.max_bytes)).encode())
        if self.dataset is None:
            files = [Path(f) for f in self._files] if self._files else stdlib_files()
            if not self._files:
                h.update(sys.version.encode())
            for f in files:
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]

    def __iter__(self) -> Iterator[str]:
        budget = self.max_bytes
        for doc in self._documents():
            if not doc:
                continue
            yield doc
            if budget is not None:
                budget -= len(doc)
                if budget <= 0:
                    return

    def _documents(self) -> Iterator[str]:
        if self.dataset is None and not self._files:
            for f in stdlib_files():
                try:
                    yield f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError) as e:
                    warnings.warn(f"default corpus: skipping {f}, which cannot be read as UTF-8 text ({e})",
                                  stacklevel=3)
            return
        from datasets import load_dataset

        if self.dataset is not None:
            for row in load_dataset(self.dataset, self.dataset_config, split=self.split, streaming=True):
                yield self._text_of(row)
            return
        builder = _BUILDERS[Path(self._files[0]).suffix.lower()]
        kwargs = {"sample_by": self.text_sample_by} if builder == "text" else {}
        try:
            for row in load_dataset(builder, data_files=self._files, split="train", streaming=True, **kwargs):
                yield self._text_of(row)
        except Exception as e:  # find which file, and where, with strict readers (only on this failure path)
            culprit = _find_unreadable(self._files, builder, self.text_field)
            if culprit is None:
                raise
            raise culprit from e

    def _text_of(self, row: dict) -> str:
        text = row.get(self.text_field)
        if text is None:
            raise KeyError(f"documents have no field {self.text_field!r} (fields: {sorted(row)}); set text_field")
        if not isinstance(text, str):
            raise TypeError(f"field {self.text_field!r} holds {type(text).__name__}, not text")
        return text


def _find_unreadable(files: Sequence[str], builder: str, text_field: str) -> DataFileError | None:
    """The first of ``files`` that cannot be read as ``builder`` ("text" / "json" / "parquet"), or ``None``."""
    check = {"text": _check_text_file, "json": _check_json_file, "parquet": _check_parquet_file}[builder]
    for f in files:
        try:
            problem = check(Path(f), text_field)
        except OSError as e:
            problem = DataFileError(f, None, f"cannot be read ({e})")
        if problem is not None:
            return problem
    return None


def _utf8_fault(path: Path, offset: int, err: UnicodeDecodeError, line: int) -> DataFileError:
    bad = err.object[err.start:err.start + 1].hex()
    return DataFileError(path, line, f"is not UTF-8 text (byte 0x{bad} at byte offset {offset + err.start}: "
                                     f"{err.reason}); a binary file, or text in another encoding?")


def _check_text_file(path: Path, text_field: str) -> DataFileError | None:
    """Decode ``path`` strictly as UTF-8 in chunks; the line of the first invalid byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, line = 0, 1
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.object is the pending bytes plus this chunk
                pending = len(e.object) - len(chunk)
                return _utf8_fault(path, offset - pending, e, line + e.object.count(b"\n", 0, e.start))
            if not chunk:
                return None
            offset += len(chunk)
            line += chunk.count(b"\n")


def _check_json_file(path: Path, text_field: str) -> DataFileError | None:
    """Check ``path`` as JSON lines (or, for ``.json``, one JSON document that datasets accepts)."""
    if path.suffix.lower() == ".json":
        try:
            json.loads(path.read_bytes().decode("utf-8"))
            return None  # one JSON document: not something these line checks can fault
        except ValueError:
            pass
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return _utf8_fault(path, offset, e, number)
            offset += len(raw)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                return DataFileError(path, number, f"is not valid JSON ({e.msg}, column {e.colno})")
            if not isinstance(record, dict):
                return DataFileError(path, number, f"is a JSON {type(record).__name__}, not an object")
            if text_field not in record:
                return DataFileError(path, number, f"has no field {text_field!r} (fields: {sorted(record)}); "
                                                   "set text_field")
            if not isinstance(record[text_field], str):
                return DataFileError(path, number, f"field {text_field!r} holds "
                                                   f"{type(record[text_field]).__name__}, not a string")
    return None


def _check_parquet_file(path: Path, text_field: str) -> DataFileError | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            return DataFileError(path, None, f"has no column {text_field!r} (columns: {names}); set text_field")
        kind = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return DataFileError(path, None, f"column {text_field!r} holds {kind}, not strings")
        for _ in pf.iter_batches(columns=[text_field]):  # reads (and so checks) every page of the column
            pass
    except (pa.ArrowException, ValueError) as e:
        return DataFileError(path, None, f"is not a readable parquet file ({e})")
    return None


def _expand(data_files: Sequence[str] | str) -> list[str]:
    import glob

    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    out: list[str] = []
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        matches = sorted(glob.glob(pat, recursive=True)) if any(c in pat for c in "*?[") else [pat]
        for m in matches:
            if Path(m).is_dir():
                out.extend(str(p) for p in sorted(Path(m).rglob("*")) if p.suffix.lower() in _BUILDERS)
            elif Path(m).exists():
                out.append(str(Path(m).resolve()))
            else:
                raise FileNotFoundError(m)
    return out

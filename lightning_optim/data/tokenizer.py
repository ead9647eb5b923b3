"""Tokenizers: a ``transformers`` name or path, or a byte-level BPE trained locally with ``tokenizers``.

``load_tokenizer(spec, source, cache_dir)``:

* ``spec = "bpe"`` or ``"bpe:8192"``: a byte-level BPE (GPT-2's pre-tokenizer, ``<|endoftext|>`` as the
  document separator) trained offline on the first ``train_bytes`` of ``source``, cached as
  ``tokenizer.json`` under a key of the source's fingerprint and the vocabulary size, so it is trained once.
* a directory or ``tokenizer.json`` path: loaded from disk;
* anything else: ``transformers.AutoTokenizer.from_pretrained(spec)`` (a hub name such as ``gpt2`` needs the
  network or the Hugging Face cache), whose fast backend does the encoding.

All three come back as :class:`Tokenizer`: one ``tokenizers.Tokenizer`` plus the end-of-text id and a
``digest`` (SHA-256 of the tokenizer's canonical serialization, ``tokenizers.Tokenizer.to_str()``), which the
token cache key includes, so tokens made by a different tokenizer of the same name are never reused.

**Integrity of the trained BPE.** Its ``meta.json`` (written after ``tokenizer.json``) records the size and
SHA-256 of ``tokenizer.json``; each load checks both (the file is small: well under a millisecond), parses the
file, and checks the vocabulary size and the ``<|endoftext|>`` token. A cached BPE that fails any check is
retrained with a :class:`CacheWarning` naming the file and the fault. A cache written before checksums
existed (``meta.json`` without ``sha256``) that passes the other checks gets its checksum recorded once, with a
note. Checks run under a shared file lock and retraining under the exclusive one, so DDP ranks sharing the
cache never read a half-replaced entry. A ``tokenizer.json`` given by path cannot be rebuilt: if it is not a
valid tokenizer file the error names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lightning_optim.data._cache import (CacheError, CacheWarning, atomic_dir, atomic_write_text, file_lock,
                                        file_sha256, refuse_unwritable)

__all__ = ["Tokenizer", "load_tokenizer", "train_bpe"]

EOT = "<|endoftext|>"


@dataclass
class Tokenizer:
    backend: "object"  # tokenizers.Tokenizer
    eos_id: int
    name: str
    digest: str = ""  # filled in from the backend when not given

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids))


def _bytes_prefix(docs: Iterable[str], limit: int) -> Iterator[str]:
    used = 0
    for doc in docs:
        if used >= limit:
            return
        doc = doc[: limit - used]
        used += len(doc)
        yield doc


def train_bpe(docs: Iterable[str], vocab_size: int, out_file: str | os.PathLike, train_bytes: int = 20_000_000,
              show_progress: bool = False) -> None:
    """Train a byte-level BPE on the first ``train_bytes`` characters of ``docs`` and save it to ``out_file``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress, min_frequency=2,
    )
    tok.train_from_iterator(_bytes_prefix(docs, train_bytes), trainer=trainer)
    tok.save(str(out_file))


def _parse(path: Path):
    """``tokenizers.Tokenizer.from_file(path)``; ``ValueError`` naming the file if it is not a tokenizer file."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception ("expected value at line 1 column 1", ...)
        raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({e})") from e


def _open_bpe(target: Path, vocab: int) -> tuple[object, bool]:
    """The verified BPE cached at ``target`` and whether its checksum is recorded; ``CacheError`` if damaged."""
    path, meta_path = target / "tokenizer.json", target / "meta.json"
    if not path.is_file():
        raise CacheError(path, "is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise CacheError(meta_path, "is missing") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CacheError(meta_path, f"cannot be read ({e})") from e
    checked = "sha256" in meta
    if checked:
        size, digest = file_sha256(path)
        if size != meta.get("bytes"):
            raise CacheError(path, f"is {size} bytes but meta.json records {meta.get('bytes')!r}")
        if digest != meta["sha256"]:
            raise CacheError(path, "content does not match the SHA-256 recorded in meta.json: the file was "
                                   "overwritten or damaged")
    try:
        backend = _parse(path)
    except ValueError as e:
        raise CacheError(path, f"is not a valid tokenizer file ({e.__cause__})") from e
    found = backend.get_vocab_size(with_added_tokens=True)
    if found != vocab:
        raise CacheError(path, f"has {found} tokens, expected {vocab}")
    if backend.token_to_id(EOT) is None:
        raise CacheError(path, f"has no {EOT!r} token")
    return backend, checked


def _write_bpe_meta(target: Path, source_name: str, vocab: int) -> None:
    size, digest = file_sha256(target / "tokenizer.json")
    atomic_write_text(target / "meta.json", json.dumps({"source": source_name, "vocab": vocab, "bytes": size,
                                                        "sha256": digest}))


def _cached_bpe(source, vocab: int, target: Path, train_bytes: int, show_progress: bool):
    """The BPE cached at ``target``: verified, upgraded or (re)trained under the lock (see the module docstring)."""
    lock = target.parent / f".{target.name}.lock"
    with file_lock(lock, shared=True):
        try:
            backend, checked = _open_bpe(target, vocab)
            if checked:
                return backend
            if not os.access(target, os.W_OK):  # an old read-only cache that passes every other check
                warnings.warn(f"{target / 'tokenizer.json'} was cached by an earlier version without a checksum and "
                              "its directory is read-only; using it as it is", CacheWarning, stacklevel=3)
                return backend
        except CacheError as fault:
            refuse_unwritable(fault, target.parent)
    with file_lock(lock):  # exclusive: re-check, since another process may have repaired it meanwhile
        try:
            backend, checked = _open_bpe(target, vocab)
            if not checked:
                _write_bpe_meta(target, source.name, vocab)
                warnings.warn(f"{target / 'tokenizer.json'} was cached by an earlier version without a checksum; "
                              "it parses and has the expected vocabulary, its checksum is now recorded in meta.json",
                              CacheWarning, stacklevel=3)
            return backend
        except CacheError as problem:
            if target.exists():
                warnings.warn(f"{problem}; retraining the tokenizer from {source.name}", CacheWarning, stacklevel=3)
        if show_progress:
            print(f"lightning-optim: training a {vocab}-token byte-level BPE on {source.name} "
                  f"(once; cached in {target})", flush=True)
        with atomic_dir(target) as tmp:
            train_bpe(iter(source), vocab, Path(tmp) / "tokenizer.json", train_bytes)
            _write_bpe_meta(Path(tmp), source.name, vocab)
        return _open_bpe(target, vocab)[0]


def load_tokenizer(spec: str, source=None, cache_dir: str | os.PathLike | None = None,
                   train_bytes: int = 20_000_000, show_progress: bool = True) -> Tokenizer:
    """See the module docstring."""
    if spec == "bpe" or spec.startswith("bpe:"):
        try:
            vocab = int(spec.split(":", 1)[1]) if ":" in spec else 4096
        except ValueError:
            raise ValueError(f"tokenizer {spec!r}: the vocabulary size after 'bpe:' must be an integer") from None
        if vocab < 300:
            raise ValueError("a byte-level BPE needs vocab_size >= 300 (256 bytes + merges)")
        if source is None or cache_dir is None:
            raise ValueError("training a BPE tokenizer needs a text source and a cache directory")
        key = f"bpe-{vocab}-{source.fingerprint()}-{train_bytes}"
        backend = _cached_bpe(source, vocab, Path(cache_dir) / "tokenizers" / key, train_bytes, show_progress)
        return Tokenizer(backend, backend.token_to_id(EOT), f"bpe:{vocab}:{source.fingerprint()}")

    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        backend = _parse(p)
        eos = backend.token_to_id(EOT)
        if eos is None:
            raise ValueError(f"{p} has no {EOT!r} token; give a transformers tokenizer directory instead")
        return Tokenizer(backend, eos, str(p.resolve()))

    from transformers import AutoTokenizer

    if p.exists():
        try:
            hf = AutoTokenizer.from_pretrained(str(p), use_fast=True)
        except Exception as e:  # a local directory: name it with the cause (transformers' message may not)
            raise ValueError(f"{p}: cannot load a transformers tokenizer from it ({type(e).__name__}: {e})") from e
    else:
        hf = AutoTokenizer.from_pretrained(spec, use_fast=True)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {spec!r} has no fast (Rust) backend; use a fast tokenizer")
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {spec!r} has no end-of-text token")
    return Tokenizer(backend, int(eos), spec)

"""Tokenizers: a ``transformers`` name or path, or a byte-level BPE trained locally with ``tokenizers``.

``load_tokenizer(spec, source, cache_dir)``:

* ``spec = "bpe"`` or ``"bpe:8192"``: a byte-level BPE (GPT-2's pre-tokenizer, ``<|endoftext|>`` as the
  document separator) trained offline on the first ``train_bytes`` of ``source``, cached as
  ``tokenizer.json`` under a key of the source's fingerprint and the vocabulary size, so it is trained once.
* a directory or ``tokenizer.json`` path: loaded from disk;
* anything else: ``transformers.AutoTokenizer.from_pretrained(spec)`` (a hub name such as ``gpt2`` needs the
  network or the Hugging Face cache), whose fast backend does the encoding.

All three come back as :class:`Tokenizer`: one ``tokenizers.Tokenizer`` plus the end-of-text id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lightning_optim.data._cache import atomic_dir, file_lock

__all__ = ["Tokenizer", "load_tokenizer", "train_bpe"]

EOT = "<|endoftext|>"


@dataclass
class Tokenizer:
    backend: "object"  # tokenizers.Tokenizer
    eos_id: int
    name: str

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


def load_tokenizer(spec: str, source=None, cache_dir: str | os.PathLike | None = None,
                   train_bytes: int = 20_000_000, show_progress: bool = True) -> Tokenizer:
    """See the module docstring."""
    from tokenizers import Tokenizer as HFTokenizer

    if spec == "bpe" or spec.startswith("bpe:"):
        vocab = int(spec.split(":", 1)[1]) if ":" in spec else 4096
        if vocab < 300:
            raise ValueError("a byte-level BPE needs vocab_size >= 300 (256 bytes + merges)")
        if source is None or cache_dir is None:
            raise ValueError("training a BPE tokenizer needs a text source and a cache directory")
        key = f"bpe-{vocab}-{source.fingerprint()}-{train_bytes}"
        target = Path(cache_dir) / "tokenizers" / key
        path = target / "tokenizer.json"
        if not path.exists():
            with file_lock(target.parent / f".{key}.lock"):
                if not path.exists():
                    if show_progress:
                        print(f"lightning-optim: training a {vocab}-token byte-level BPE on {source.name} "
                              f"(once; cached in {target})", flush=True)
                    with atomic_dir(target) as tmp:
                        train_bpe(iter(source), vocab, Path(tmp) / "tokenizer.json", train_bytes)
                        (Path(tmp) / "meta.json").write_text(json.dumps({"source": source.name, "vocab": vocab}))
        backend = HFTokenizer.from_file(str(path))
        return Tokenizer(backend, backend.token_to_id(EOT), f"bpe:{vocab}:{source.fingerprint()}")

    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        backend = HFTokenizer.from_file(str(p))
        eos = backend.token_to_id(EOT)
        if eos is None:
            raise ValueError(f"{p} has no {EOT!r} token; give a transformers tokenizer directory instead")
        return Tokenizer(backend, eos, str(p.resolve()))

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(p) if p.exists() else spec, use_fast=True)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {spec!r} has no fast (Rust) backend; use a fast tokenizer")
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {spec!r} has no end-of-text token")
    return Tokenizer(backend, int(eos), spec)

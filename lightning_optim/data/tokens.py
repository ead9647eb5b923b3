"""Tokens on disk: a source tokenized once into memory-mapped ``uint16``/``uint32`` shards, and windows over them.

Layout of a cache entry (published atomically; ``meta.json`` written last)::

    <cache>/tokens/<key>/meta.json
    <cache>/tokens/<key>/train_00000.bin  train_00001.bin ...   raw little-endian token ids
    <cache>/tokens/<key>/val_00000.bin

Documents are separated by the tokenizer's end-of-text id. The validation split is a deterministic set of
documents (a hash of the document's index, ``val_fraction`` of them); if that leaves fewer than
``min_val_tokens`` tokens, the tail of the training stream is moved to validation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_optim.data._cache import atomic_dir

__all__ = ["build_token_cache", "TokenShards", "splitmix64", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MASK = (1 << 64) - 1


def splitmix64(x: np.ndarray | int) -> np.ndarray | int:
    """A fast, well-mixed 64-bit hash (SplitMix64 finaliser); vectorised over uint64 arrays."""
    if isinstance(x, (int, np.integer)):
        z = (int(x) + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _is_val(doc_index: int, val_fraction: float) -> bool:
    return splitmix64(doc_index ^ 0x5EED5EED) < val_fraction * 2.0**64


class _ShardWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self.documents = 0

    def _current(self) -> dict[str, Any]:
        if not self.shards or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.shards.append({"file": f"{self.split}_{len(self.shards):05d}.bin", "tokens": 0})
        return self.shards[-1]

    def write(self, ids: np.ndarray) -> None:
        self._buf.append(ids)
        self._buffered += len(ids)
        self.documents += 1
        if self._buffered >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf).astype(self.dtype)
        self._buf, self._buffered = [], 0
        while len(data):
            shard = self._current()
            room = self.shard_tokens - shard["tokens"]
            chunk, data = data[:room], data[room:]
            with open(self.root / shard["file"], "ab") as fh:
                chunk.tofile(fh)
            shard["tokens"] += len(chunk)

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._buffered


def build_token_cache(source, tokenizer, target: str | os.PathLike, *, val_fraction: float = 0.01,
                      min_val_tokens: int = 16384, shard_tokens: int = 1 << 28, max_tokens: int | None = None,
                      batch_docs: int = 64, show_progress: bool = True) -> Path:
    """Tokenize ``source`` with ``tokenizer`` into shards under ``target`` (see the module docstring)."""
    target = Path(target)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    with atomic_dir(target) as tmp_name:
        tmp = Path(tmp_name)
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"tokenizing {source.name}", unit="B", unit_scale=True, mininterval=1.0)
        doc_index, done, batch = 0, False, []

        def flush() -> bool:
            nonlocal doc_index
            for ids in tokenizer.encode_batch(batch):
                split = "val" if _is_val(doc_index, val_fraction) else "train"
                writers[split].write(np.concatenate([np.asarray(ids, dtype=np.int64), eos]))
                doc_index += 1
            if bar is not None:
                bar.update(sum(len(d.encode("utf-8", "ignore")) for d in batch))
                bar.set_postfix(tokens=f"{writers['train'].total + writers['val'].total:,}", refresh=False)
            batch.clear()
            return max_tokens is not None and writers["train"].total + writers["val"].total >= max_tokens

        for doc in source:
            batch.append(doc)
            if len(batch) >= batch_docs and flush():
                done = True
                break
        if not done and batch:
            flush()
        if bar is not None:
            bar.close()
        for w in writers.values():
            w.flush()
        _ensure_val(writers, tmp, dtype, min_val_tokens)
        if writers["train"].total == 0:
            raise ValueError(f"{source.name} produced no training tokens")
        meta = {
            "format": FORMAT_VERSION, "dtype": dtype.name, "eos_id": int(tokenizer.eos_id),
            "vocab_size": int(tokenizer.vocab_size), "tokenizer": tokenizer.name, "source": source.name,
            "val_fraction": val_fraction,
            **{s: {"shards": w.shards, "documents": w.documents} for s, w in writers.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return target


def _ensure_val(writers: dict[str, _ShardWriter], root: Path, dtype: np.dtype, min_val_tokens: int) -> None:
    val, train = writers["val"], writers["train"]
    need = min(min_val_tokens, train.total // 10) - val.total
    while need > 0 and train.shards:
        shard = train.shards[-1]
        take = min(need, shard["tokens"])
        path = root / shard["file"]
        tail = np.fromfile(path, dtype=dtype, offset=(shard["tokens"] - take) * dtype.itemsize)
        os.truncate(path, (shard["tokens"] - take) * dtype.itemsize)
        shard["tokens"] -= take
        if shard["tokens"] == 0:
            train.shards.pop()
            path.unlink()
        val._buf.insert(0, tail)
        val._buffered += len(tail)
        need -= take
    val.flush()


class TokenShards:
    """Read-only view of one split of a token cache; windows never cross a shard boundary."""

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        shards = self.meta[split]["shards"]
        self.lengths = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self._files = [str(self.root / s["file"]) for s in shards]
        self._maps: list[np.memmap | None] = [None] * len(shards)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def shard(self, i: int) -> np.ndarray:
        m = self._maps[i]
        if m is None:
            m = self._maps[i] = np.memmap(self._files[i], dtype=self.dtype, mode="r")
        return m

    def starts_per_shard(self, window: int) -> np.ndarray:
        return np.maximum(self.lengths - window + 1, 0)

    def window(self, flat_start: int, window: int, counts: np.ndarray | None = None) -> np.ndarray:
        """The ``window`` tokens starting at valid start number ``flat_start`` (over all shards)."""
        counts = self.starts_per_shard(window) if counts is None else counts
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, flat_start, side="right"))
        offset = flat_start - (int(cum[i - 1]) if i else 0)
        return np.asarray(self.shard(i)[offset:offset + window])

    def __getstate__(self) -> dict[str, Any]:  # memmaps reopen in worker processes
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._files)
        return state

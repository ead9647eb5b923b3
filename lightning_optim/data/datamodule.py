"""``TokenDataModule``: text → tokens on disk (once, cached) → random windows of ``seq_len + 1`` tokens.

Usage::

    dm = TokenDataModule()                                         # offline: Python stdlib source, local BPE
    dm = TokenDataModule(data_files=["corpus/*.jsonl"], tokenizer="gpt2")
    dm = TokenDataModule(dataset="HuggingFaceFW/fineweb-edu", dataset_config="sample-10BT",
                         tokenizer="gpt2", max_tokens=2_000_000_000)   # streamed from the hub
    trainer.fit(model, dm)

**Batch geometry.** ``global_batch_size`` is in sequences per optimizer step. On ``W`` devices with
micro-batch ``B`` (default ``global_batch_size / W``, or ``micro_batch_size`` when it is smaller) the data
module sets ``trainer.accumulate_grad_batches = global_batch_size / (W·B)`` in ``setup`` — so one config is
the same optimisation on 1 or 8 devices — and turns ``val_every_n_steps`` into Lightning's
``val_check_interval`` (which counts micro-batches).

**Sampling.** Optimizer step ``s`` reads the global sample numbers ``s·G … (s+1)·G − 1``; rank ``r`` takes
the ``B`` consecutive numbers of its slot in each micro-batch. Sample ``n`` is the window starting at
``hash(seed, n) mod (number of valid starts)`` — a pure function of ``n``, so every rank, every DataLoader
worker and every device count sees the same data for the same step, and a resumed run continues at
``trainer.global_step`` exactly where the interrupted one stopped (nothing is replayed). Validation is a
fixed list of non-overlapping windows of the validation split (``val_sequences`` of them), sharded across
ranks by Lightning's distributed sampler.

**A damaged cache is rebuilt.** ``build`` (``prepare_data`` / ``setup``) verifies the token cache with
:func:`~lightning_optim.data.tokens.check_token_cache` (``verify_cache="full"``: sizes, SHA-256 and token-id
range, once per process; ``"size"``: sizes only, for caches too large to hash at every start) under a shared
file lock. A fault — a shard overwritten, truncated or holding ids outside the vocabulary, an unreadable
``meta.json`` — is reported as a :class:`~lightning_optim.data._cache.CacheWarning` naming the file and what is
wrong, and the entry is rebuilt from the source under the exclusive lock: one process (rank 0 in
``prepare_data`` under Lightning) rebuilds while the others wait, re-check, and find the repaired entry. If the
rebuild fails (the source is gone, the hub is unreachable, the cache is read-only) the error names the
damaged file and the cause. A read-only copy of a good cache is read as it is.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lightning_optim.data._cache import (CacheError, CacheWarning, default_cache_dir, file_lock,
                                        refuse_unwritable)
from lightning_optim.data.corpus import TextSource
from lightning_optim.data.tokenizer import Tokenizer, load_tokenizer
from lightning_optim.data.tokens import (FORMAT_VERSION, VERIFY_MODES, TokenShards, build_token_cache,
                                         check_token_cache, splitmix64)

__all__ = ["TokenDataModule", "WindowStream", "ValidationWindows", "batch_geometry"]


def batch_geometry(global_batch_size: int, world_size: int, micro_batch_size: int | None = None) -> tuple[int, int]:
    """``(micro_batch_size, accumulate_grad_batches)`` for ``global_batch_size`` sequences on ``world_size`` ranks."""
    if global_batch_size < 1 or world_size < 1:
        raise ValueError("global_batch_size and world_size must be >= 1")
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by {world_size} devices")
    per_rank = global_batch_size // world_size
    micro = per_rank if micro_batch_size is None else min(micro_batch_size, per_rank)
    if per_rank % micro:
        raise ValueError(f"{per_rank} sequences per device (global_batch_size={global_batch_size} on "
                         f"{world_size} devices) is not a multiple of micro_batch_size={micro}")
    return micro, per_rank // micro


class WindowStream(IterableDataset):
    """Endless ``(inputs, targets)`` micro-batches for one rank, starting at micro-batch ``start`` (see module doc)."""

    def __init__(self, shards: TokenShards, seq_len: int, global_batch: int, micro_batch: int, accumulate: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, start: int = 0) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.global_batch, self.micro_batch, self.accumulate = global_batch, micro_batch, accumulate
        self.world_size, self.rank, self.start = world_size, rank, start
        self.seed_mix = np.uint64(splitmix64(int(seed) & ((1 << 64) - 1)))
        self.counts = shards.starts_per_shard(seq_len + 1)
        self.total_starts = int(self.counts.sum())
        if self.total_starts <= 0:
            raise ValueError(f"the training split ({shards.num_tokens} tokens) is shorter than one window of "
                             f"{seq_len + 1} tokens")
        self._cum = np.cumsum(self.counts)

    def sample_numbers(self, micro_index: int) -> np.ndarray:
        step, slot = divmod(micro_index, self.accumulate)
        base = step * self.global_batch + (slot * self.world_size + self.rank) * self.micro_batch
        return np.arange(base, base + self.micro_batch, dtype=np.uint64)

    def starts(self, numbers: np.ndarray) -> np.ndarray:
        return (splitmix64(numbers ^ self.seed_mix) % np.uint64(self.total_starts)).astype(np.int64)

    def batch(self, micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.seq_len + 1
        rows, shard_of_row = [], []
        for flat in self.starts(self.sample_numbers(micro_index)):
            i = int(np.searchsorted(self._cum, flat, side="right"))
            offset = int(flat) - (int(self._cum[i - 1]) if i else 0)
            rows.append(self.shards.shard(i)[offset:offset + window])
            shard_of_row.append(i)
        stacked = np.stack(rows)
        if int(stacked.max()) >= self.shards.vocab_size:  # one max per batch; find the shard only on failure
            for row, i in zip(rows, shard_of_row):
                self.shards.check_ids(np.asarray(row), i)
        data = torch.from_numpy(stacked.astype(np.int64))
        return data[:, :-1], data[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + wid
        while True:
            yield self.batch(index)
            index += nw


class ValidationWindows(Dataset):
    """The first ``count`` non-overlapping windows of ``seq_len + 1`` tokens of the validation split."""

    def __init__(self, shards: TokenShards, seq_len: int, count: int) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.index: list[tuple[int, int]] = []
        for i, n in enumerate(shards.lengths):
            for off in range(0, int(n) - seq_len, seq_len):
                if len(self.index) >= count:
                    break
                self.index.append((i, off))
        if not self.index:
            warnings.warn(f"the validation split ({shards.num_tokens} tokens) holds no window of {seq_len + 1} "
                          "tokens; validation is empty", stacklevel=2)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, off = self.index[i]
        tokens = self.shards.check_ids(np.asarray(self.shards.shard(shard)[off:off + self.seq_len + 1]), shard)
        w = torch.from_numpy(tokens.astype(np.int64))
        return w[:-1], w[1:]


class TokenDataModule(L.LightningDataModule):
    """Tokenized text for causal language modelling (see the module docstring).

    Args:
        dataset: a Hugging Face hub dataset, streamed (needs the network); ``None`` for local files or the
            default corpus.
        data_files: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` files, directories or globs.
        dataset_config, split, text_field, text_sample_by: how to read the source.
        tokenizer: ``bpe`` / ``bpe:<vocab>`` (a byte-level BPE trained locally on the source, cached), a
            ``tokenizer.json`` file, or a ``transformers`` tokenizer name or directory.
        seq_len: tokens per training sequence (windows hold ``seq_len + 1``).
        global_batch_size: sequences per optimizer step, over all devices and accumulation.
        micro_batch_size: sequences per device per forward pass (default: as many as the global batch allows).
        val_fraction: share of documents held out for validation.
        val_sequences: validation windows per evaluation.
        val_every_n_steps: validate every this many optimizer steps (sets ``trainer.val_check_interval``).
        max_tokens: stop tokenizing after this many tokens (a sample of a large hub dataset).
        max_bytes: read at most about this many bytes of text.
        tokenizer_train_bytes: text used to train a local BPE.
        cache_dir: where tokenizers and tokens are cached (default ``$LIGHTNING_OPTIM_CACHE`` or
            ``~/.cache/lightning_optim``).
        num_workers: DataLoader workers for training.
        seed: sampling seed (independent of the model's seed).
        configure_trainer: set the trainer's gradient accumulation and validation interval in ``setup``.
        show_progress: print progress while training the tokenizer and tokenizing.
        verify_cache: ``"full"`` (check every shard's SHA-256 and token ids once per process) or ``"size"``
            (check ``meta.json`` and shard sizes only); a damaged cache is rebuilt (see the module docstring).
    """

    def __init__(
        self,
        dataset: str | None = None,
        data_files: list[str] | str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        text_sample_by: str = "document",
        tokenizer: str = "bpe:4096",
        seq_len: int = 256,
        global_batch_size: int = 16,
        micro_batch_size: int | None = None,
        val_fraction: float = 0.01,
        val_sequences: int = 64,
        val_every_n_steps: int | None = None,
        max_tokens: int | None = None,
        max_bytes: int | None = None,
        tokenizer_train_bytes: int = 20_000_000,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 1234,
        configure_trainer: bool = True,
        show_progress: bool = True,
        verify_cache: str = "full",
    ) -> None:
        super().__init__()
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError("seq_len and global_batch_size must be >= 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if verify_cache not in VERIFY_MODES:
            raise ValueError(f"verify_cache must be one of {VERIFY_MODES}, got {verify_cache!r}")
        self.save_hyperparameters()
        self.source = TextSource(dataset=dataset, data_files=data_files, dataset_config=dataset_config, split=split,
                                 text_field=text_field, text_sample_by=text_sample_by, max_bytes=max_bytes)
        self.tokenizer_spec = tokenizer
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, global_batch_size, micro_batch_size
        self.val_fraction, self.val_sequences, self.val_every_n_steps = val_fraction, val_sequences, val_every_n_steps
        self.max_tokens, self.tokenizer_train_bytes = max_tokens, tokenizer_train_bytes
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers, self.seed = num_workers, seed
        self.configure_trainer, self.show_progress = configure_trainer, show_progress
        self.verify_cache = verify_cache
        self._tokenizer: Tokenizer | None = None
        self._train: TokenShards | None = None
        self._val: TokenShards | None = None
        self.micro, self.accumulate = batch_geometry(global_batch_size, 1, micro_batch_size)

    # -- tokenizer and token cache ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec, self.source, self.cache_dir,
                                             self.tokenizer_train_bytes, show_progress=self.show_progress)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (trains or loads the tokenizer on first use)."""
        return self.tokenizer.vocab_size

    @property
    def token_dir(self) -> Path:
        key = json.dumps([FORMAT_VERSION, self.source.fingerprint(), self.tokenizer.name, self.tokenizer.digest,
                          self.val_fraction, self.max_tokens])
        return self.cache_dir / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:20]

    def _expected_meta(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer_digest": tok.digest}

    def _cache_fault(self, target: Path) -> CacheError | None:
        """What is wrong with the token cache at ``target`` (``None``: nothing; it is verified)."""
        try:
            check_token_cache(target, self.verify_cache, self._expected_meta())
        except CacheError as e:
            return e
        return None

    def build(self) -> Path:
        """Tokenize the source into the cache unless a verified entry is there; the cache directory.

        A damaged entry is rebuilt with a :class:`CacheWarning` naming the file (see the module docstring).
        """
        target = self.token_dir
        lock = target.parent / f".{target.name}.lock"
        with file_lock(lock, shared=True):
            fault = self._cache_fault(target)
        if fault is None:
            return target
        if target.exists():
            refuse_unwritable(fault, target.parent)
        with file_lock(lock):  # exclusive: one process rebuilds; the others re-check once it is done
            fault = self._cache_fault(target)
            if fault is None:
                return target
            damaged = target.exists()  # else this is the first build, nothing to warn about
            if damaged:
                warnings.warn(f"{fault}; rebuilding the token cache {target} from {self.source.name}", CacheWarning,
                              stacklevel=2)
            try:
                build_token_cache(self.source, self.tokenizer, target, val_fraction=self.val_fraction,
                                  max_tokens=self.max_tokens, show_progress=self.show_progress)
            except Exception as e:
                if damaged:
                    raise RuntimeError(f"the token cache is damaged ({fault}) and rebuilding it from "
                                       f"{self.source.name} failed: {e}") from e
                raise
            fault = self._cache_fault(target)
            if fault is not None:  # a fresh build that does not verify is a bug or a failing disk; never train on it
                raise RuntimeError(f"the token cache was just rebuilt but does not verify: {fault}")
        return target

    def prepare_data(self) -> None:
        self.build()

    def setup(self, stage: str | None = None) -> None:
        root = self.build()
        expect = self._expected_meta()
        self._train, self._val = (TokenShards(root, split, self.verify_cache, expect) for split in ("train", "val"))
        trainer = self._trainer_or_none()
        world = trainer.world_size if trainer is not None else 1
        self.micro, self.accumulate = batch_geometry(self.global_batch_size, world, self.micro_batch_size)
        if trainer is not None and self.configure_trainer:
            current = trainer.accumulate_grad_batches
            if current not in (1, self.accumulate):
                raise ValueError(f"trainer.accumulate_grad_batches={current} contradicts the data module's batch "
                                 f"geometry ({self.global_batch_size} sequences on {world} device(s) with micro-batch "
                                 f"{self.micro} → {self.accumulate}); leave it unset")
            trainer.accumulate_grad_batches = self.accumulate
            if self.val_every_n_steps:
                trainer.val_check_interval = self.val_every_n_steps * self.accumulate
                trainer.check_val_every_n_epoch = None

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    @property
    def train_tokens(self) -> TokenShards:
        if self._train is None:
            self.setup("fit")
        return self._train

    # -- loaders ---------------------------------------------------------------------------------------------------

    def train_dataset(self, start_step: int = 0, world_size: int = 1, rank: int = 0) -> WindowStream:
        micro, acc = batch_geometry(self.global_batch_size, world_size, self.micro_batch_size)
        return WindowStream(self.train_tokens, self.seq_len, self.global_batch_size, micro, acc, world_size, rank,
                            self.seed, start=start_step * acc)

    def train_dataloader(self) -> DataLoader:
        trainer = self._trainer_or_none()
        step = trainer.global_step if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        ds = self.train_dataset(step, world, rank)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False, prefetch_factor=4 if self.num_workers else None)

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            self.setup("validate")
        ds = ValidationWindows(self._val, self.seq_len, self.val_sequences)
        return DataLoader(ds, batch_size=self.micro, shuffle=False, num_workers=0)

    # -- checkpoint ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
                "tokens": self.token_dir.name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = {k: (v, mine.get(k)) for k, v in state_dict.items() if mine.get(k) != v}
        if changed:
            warnings.warn(f"resuming with different data settings {changed} (checkpoint, now): the data "
                          "order differs from the interrupted run", stacklevel=2)

"""Data: text sources (offline default corpus, local files, hub datasets), tokenizers, token caches and the
``TokenDataModule`` (loaded lazily: it imports Lightning)."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_optim.data._cache import CacheError, CacheWarning, default_cache_dir
from lightning_optim.data.corpus import DEFAULT_CORPUS, DataFileError, TextSource, stdlib_files
from lightning_optim.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from lightning_optim.data.tokens import TokenShards, build_token_cache, check_token_cache

_LAZY = {name: "lightning_optim.data.datamodule"
         for name in ("TokenDataModule", "WindowStream", "ValidationWindows", "batch_geometry")}

__all__ = ["DEFAULT_CORPUS", "TextSource", "stdlib_files", "DataFileError", "Tokenizer", "load_tokenizer",
           "train_bpe", "TokenShards", "build_token_cache", "check_token_cache", "CacheError", "CacheWarning",
           "default_cache_dir", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_optim.data' has no attribute {name!r}")

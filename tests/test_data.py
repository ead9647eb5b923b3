"""Data: local txt / jsonl / parquet sources, the offline default corpus and tokenizer, sampling, sharding."""

import json
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from lightning_optim.data import TextSource, TokenDataModule, batch_geometry, stdlib_files  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly brew strong coffee".split()


def _docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=200)) + f" doc{i}." for i in range(n)]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "lo_cache")


def test_batch_geometry():
    assert batch_geometry(256, 1, 32) == (32, 8)
    assert batch_geometry(256, 8, 32) == (32, 1)
    assert batch_geometry(256, 8, None) == (32, 1)
    assert batch_geometry(16, 2, 4) == (4, 2)
    with pytest.raises(ValueError):
        batch_geometry(10, 4)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path, fmt):
    docs = _docs()
    if fmt == "txt":
        for i, d in enumerate(docs):
            (tmp_path / f"d{i:03d}.txt").write_text(d)
        files = str(tmp_path / "*.txt")
    elif fmt == "jsonl":
        (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
        files = [str(tmp_path / "a.jsonl")]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
        files = str(tmp_path / "a.parquet")
    assert list(TextSource(data_files=files)) == docs
    dm = TokenDataModule(data_files=files, tokenizer="bpe:300", seq_len=16, global_batch_size=4,
                         cache_dir=str(tmp_path / "cache"), val_fraction=0.1, show_progress=False)
    assert dm.vocab_size == 300
    dm.setup("fit")
    meta = dm.train_tokens.meta
    assert meta["dtype"] == "uint16" and meta["val"]["documents"] >= 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape[1] == 16
    text = dm.tokenizer.decode(x[0].tolist())
    assert any(w in text for w in WORDS)
    # cached: a second module finds the same tokens without rebuilding
    dm2 = TokenDataModule(data_files=files, tokenizer="bpe:300", seq_len=16, global_batch_size=4,
                          cache_dir=str(tmp_path / "cache"), val_fraction=0.1, show_progress=False)
    assert dm2.token_dir == dm.token_dir


def test_default_corpus_offline(shared_cache):
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    dm = TokenDataModule(tokenizer="bpe:512", max_bytes=300_000, tokenizer_train_bytes=300_000, seq_len=32,
                         global_batch_size=4, cache_dir=shared_cache, show_progress=False)
    assert dm.vocab_size == 512
    dm.setup("fit")
    assert dm.train_tokens.num_tokens > 50_000
    assert dm._val.num_tokens > 0
    assert dm.tokenizer.decode(dm.tokenizer.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def test_sampling_is_a_function_of_step_and_shards_across_ranks(shared_cache):
    dm = TokenDataModule(tokenizer="bpe:512", max_bytes=300_000, tokenizer_train_bytes=300_000, seq_len=32,
                         global_batch_size=8, cache_dir=shared_cache, show_progress=False)
    dm.setup("fit")
    one = dm.train_dataset(0, world_size=1)  # micro 8, accumulate 1
    two = [dm.train_dataset(0, world_size=2, rank=r) for r in range(2)]
    it1, its = iter(one), [iter(d) for d in two]
    for _ in range(3):
        x1, _ = next(it1)
        parts = [next(i)[0] for i in its]
        assert torch.equal(torch.cat(parts), x1)  # same samples per step on 1 or 2 devices
    resumed = next(iter(dm.train_dataset(2, world_size=1)))[0]
    it1 = iter(one)
    for _ in range(2):
        next(it1)
    assert torch.equal(next(it1)[0], resumed)  # resuming at step 2 continues the stream
    # workers: the same order as the main process
    loader = torch.utils.data.DataLoader(one, batch_size=None, num_workers=2)
    it1, itw = iter(one), iter(loader)
    for _ in range(4):
        assert torch.equal(next(it1)[0], next(itw)[0])

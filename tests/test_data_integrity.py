"""Checked caches and data files: damaged token shards, tokenizer files and metadata are detected, named and
rebuilt (or refused when they cannot be); unreadable data files are named with the cause."""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from lightning_optim.data import (  # noqa: E402
    CacheError, CacheWarning, DataFileError, TextSource, TokenDataModule, TokenShards, check_token_cache,
    load_tokenizer,
)
from lightning_optim.data import corpus as corpus_module  # noqa: E402
from lightning_optim.data import datamodule as datamodule_module  # noqa: E402
from lightning_optim.data import tokens as tokens_module  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny corpus (~8 KB of .txt) and a cache built from it once: (files glob, cache dir, shard contents)."""
    base = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(0)
    for i in range(40):
        (base / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=30)) + f" end{i}.")
    files, cache = str(base / "doc*.txt"), base / "cache"
    dm = _module(files, cache)
    dm.setup("fit")
    contents = {p.name: p.read_bytes() for p in dm.token_dir.glob("*.bin")}
    assert set(contents) >= {"train_00000.bin", "val_00000.bin"}
    return files, cache, contents


def _module(files, cache, **kw):
    return TokenDataModule(data_files=files, tokenizer="bpe:300", seq_len=8, global_batch_size=4,
                           cache_dir=str(cache), val_fraction=0.1, show_progress=False, **kw)


def _copy(pristine, tmp_path):
    """A private copy of the pristine cache and a module reading it."""
    files, cache, _ = pristine
    shutil.copytree(cache, tmp_path / "cache")
    return _module(files, tmp_path / "cache")


def _assert_equals_fresh_build(dm, pristine):
    _, _, contents = pristine
    assert {p.name: p.read_bytes() for p in dm.token_dir.glob("*.bin")} == contents
    fresh = _module(pristine[0], pristine[1])
    fresh.setup("fit")
    for a, b in zip(iter(dm.train_dataloader()), iter(fresh.train_dataloader())):
        assert torch.equal(a[0], b[0])
        break
    meta = json.loads((dm.token_dir / "meta.json").read_text())
    assert meta["format"] == tokens_module.FORMAT_VERSION and meta["checksum"] == "sha256"


def test_shard_overwritten_with_valid_ids_is_detected_and_rebuilt(pristine, tmp_path):
    dm = _copy(pristine, tmp_path)
    shard = dm.token_dir / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    np.roll(ids, 1).tofile(shard)  # same size, every id valid: only the checksum can tell
    with pytest.warns(CacheWarning, match=r"train_00000\.bin: content does not match the SHA-256"):
        dm.setup("fit")
    _assert_equals_fresh_build(dm, pristine)


def test_truncated_shard_is_detected_and_rebuilt(pristine, tmp_path):
    dm = _copy(pristine, tmp_path)
    shard = dm.token_dir / "val_00000.bin"
    full = shard.stat().st_size
    os.truncate(shard, full - 6)
    with pytest.warns(CacheWarning, match=rf"val_00000\.bin: is {full - 6} bytes but meta.json records {full}"):
        dm.setup("fit")
    _assert_equals_fresh_build(dm, pristine)


def test_out_of_vocab_ids_are_detected_and_rebuilt(pristine, tmp_path):
    dm = _copy(pristine, tmp_path)
    shard = dm.token_dir / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = 40000
    ids.tofile(shard)
    with pytest.warns(CacheWarning, match=r"train_00000\.bin: holds token id 40000, outside the vocabulary of 300"):
        dm.setup("fit")
    _assert_equals_fresh_build(dm, pristine)


def test_size_only_verification_still_refuses_out_of_vocab_windows(pristine, tmp_path):
    dm = _copy(pristine, tmp_path)
    shard = dm.token_dir / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    np.full_like(ids, 299).tofile(shard)
    shards = TokenShards(dm.token_dir, "train", verify="size")  # the size check cannot see it ...
    assert shards.window(0, 9).tolist() == [299] * 9
    np.full_like(ids, 300).tofile(shard)
    with pytest.raises(CacheError, match=r"train_00000\.bin: holds token id 300"):  # ... every read can
        shards.window(0, 9)
    stream = datamodule_module.WindowStream(TokenShards(dm.token_dir, "train", verify="size"), 8, 4, 4, 1)
    with pytest.raises(CacheError, match=r"train_00000\.bin: holds token id 300"):
        stream.batch(0)
    with pytest.raises(CacheError, match=r"train_00000\.bin: holds token id 300"):
        TokenShards(dm.token_dir, "train", verify="full")


@pytest.mark.parametrize("damage", ["garbage", "not-an-object", "old-format", "missing-field"])
def test_bad_meta_json_is_detected_and_rebuilt(pristine, tmp_path, damage):
    dm = _copy(pristine, tmp_path)
    meta_path = dm.token_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "garbage":
        meta_path.write_bytes(b"\x00\xff{garbage")
        reason = "cannot be read"
    elif damage == "not-an-object":
        meta_path.write_text("[1, 2]")
        reason = "not a JSON object"
    elif damage == "old-format":  # a cache written before checksums existed, at the current key
        meta["format"] = 1
        for split in ("train", "val"):
            for s in meta[split]["shards"]:
                del s["bytes"], s["sha256"]
        meta_path.write_text(json.dumps(meta))
        reason = "has format 1; this version reads format 2"
    else:
        del meta["train"]["shards"][0]["sha256"]
        meta_path.write_text(json.dumps(meta))
        reason = r"train.shards\[0\] has no field 'sha256'"
    with pytest.raises(CacheError, match=reason) as err:
        check_token_cache(dm.token_dir)
    assert err.value.path == meta_path
    with pytest.warns(CacheWarning, match=rf"meta\.json: .*{reason}"):
        dm.setup("fit")
    _assert_equals_fresh_build(dm, pristine)


def test_meta_from_another_tokenizer_is_rebuilt(pristine, tmp_path):
    dm = _copy(pristine, tmp_path)
    meta_path = dm.token_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_digest"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(CacheWarning, match="records tokenizer_digest='0000000000000000' but"):
        dm.setup("fit")
    _assert_equals_fresh_build(dm, pristine)


def test_format_version_is_in_the_cache_key(pristine, tmp_path, monkeypatch):
    dm = _copy(pristine, tmp_path)
    current = dm.token_dir
    monkeypatch.setattr(datamodule_module, "FORMAT_VERSION", 1)
    assert dm.token_dir != current  # a format-1 cache lives under another key: it is never read, tokens rebuilt


def test_failed_rebuild_names_the_damaged_file_and_keeps_it(pristine, tmp_path, monkeypatch):
    dm = _copy(pristine, tmp_path)
    shard = dm.token_dir / "train_00000.bin"
    os.truncate(shard, 4)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datamodule_module, "build_token_cache", broken)
    with pytest.warns(CacheWarning), pytest.raises(RuntimeError, match=r"train_00000\.bin: is 4 bytes.*disk full"):
        dm.build()
    assert shard.stat().st_size == 4 and (dm.token_dir / "meta.json").exists()  # nothing else was lost


def test_garbage_tokenizer_json_is_retrained(pristine, tmp_path):
    files, cache, _ = pristine
    good = _module(files, cache).tokenizer
    dm = _copy(pristine, tmp_path)
    (path,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    size = path.stat().st_size
    path.write_bytes(b'{"version": "1.0", garbage'.ljust(size, b" "))  # same size: only the checksum can tell
    with pytest.warns(CacheWarning, match=r"tokenizer\.json: content does not match the SHA-256"):
        tok = dm.tokenizer
    assert tok.digest == good.digest and tok.vocab_size == 300  # retrained, the same tokenizer
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(CacheWarning, match=rf"tokenizer\.json: is 100 bytes but meta.json records {size}"):
        _module(pristine[0], tmp_path / "cache").tokenizer  # noqa: B018
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["bytes"] == path.stat().st_size
    # a garbage file whose checksum was recorded too (e.g. both rewritten) fails to parse: also retrained
    path.write_text("garbage{")
    (path.parent / "meta.json").write_text(json.dumps({"source": "x", "vocab": 300, "bytes": 8,
                                                       "sha256": tokens_module.file_sha256(path)[1]}))
    with pytest.warns(CacheWarning, match=r"tokenizer\.json: is not a valid tokenizer file"):
        tok = _module(files, tmp_path / "cache").tokenizer
    assert tok.digest == good.digest


def test_tokenizer_cached_before_checksums_is_upgraded_once(pristine, tmp_path):
    files, _, _ = pristine
    dm = _copy(pristine, tmp_path)
    (path,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    before = path.read_bytes()
    (path.parent / "meta.json").write_text(json.dumps({"source": "3 local file(s)", "vocab": 300}))  # old layout
    with pytest.warns(CacheWarning, match="without a checksum"):
        tok = dm.tokenizer
    assert path.read_bytes() == before and tok.vocab_size == 300
    assert json.loads((path.parent / "meta.json").read_text())["sha256"] == tokens_module.file_sha256(path)[1]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # upgraded: no second note
        _module(files, tmp_path / "cache").tokenizer


def test_tokenizer_file_given_by_path_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=rf"{bad}: not a valid tokenizers tokenizer.json"):
        load_tokenizer(str(bad))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=rf"{tmp_path}: cannot load a transformers tokenizer from it"):
        load_tokenizer(str(tmp_path))  # a directory: transformers' loader, named with the cause


def _read_only(monkeypatch, root):
    """Make ``root`` behave as read-only for this process (the tests run as root, so chmod would not)."""
    import builtins

    from lightning_optim.data import _cache

    real_open, real_access = builtins.open, os.access

    def open_(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(root)) and any(c in mode for c in "wa+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        return False if str(path).startswith(str(root)) and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(_cache, "open", open_, raising=False)
    monkeypatch.setattr(os, "access", access)


def test_read_only_cache_is_read_when_good_and_refused_by_name_when_damaged(pristine, tmp_path, monkeypatch):
    files, _, _ = pristine
    dm = _copy(pristine, tmp_path)
    for lock in (tmp_path / "cache").rglob(".*.lock"):
        lock.unlink()  # a copy without lock files: readers go unlocked
    _read_only(monkeypatch, tmp_path / "cache")
    dm.setup("fit")
    assert dm.train_tokens.num_tokens > 0
    os.truncate(dm.token_dir / "train_00000.bin", 10)
    with pytest.raises(CacheError, match=r"train_00000\.bin: is 10 bytes .* cannot be rebuilt because .* not writable"):
        _module(files, tmp_path / "cache").setup("fit")
    (path,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    path.write_bytes(b"garbage{")
    with pytest.raises(CacheError, match=r"tokenizer\.json: is 8 bytes .* cannot be rebuilt because .* not writable"):
        _module(files, tmp_path / "cache").tokenizer  # noqa: B018


def test_ranks_racing_on_a_damaged_cache_rebuild_it_once(pristine, tmp_path, monkeypatch):
    files, _, _ = pristine
    dm = _copy(pristine, tmp_path)
    shard = dm.token_dir / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    np.roll(ids, 3).tofile(shard)
    builds, real = [], datamodule_module.build_token_cache

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(datamodule_module, "build_token_cache", counting)
    modules = [_module(files, tmp_path / "cache") for _ in range(3)]
    for m in modules:
        m.tokenizer  # noqa: B018 - load before the race; it is not what is raced on
    start, errors = threading.Barrier(len(modules)), []

    def rank(m):  # flock locks belong to open file descriptions: threads contend like processes
        try:
            start.wait()
            m.setup("fit")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(m,)) for m in modules]
    with pytest.warns(CacheWarning):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors and len(builds) == 1
    _assert_equals_fresh_build(modules[0], pristine)


def test_full_verification_runs_once_per_process_for_an_unchanged_cache(pristine, tmp_path, monkeypatch):
    dm = _copy(pristine, tmp_path)
    scans, real = [], tokens_module._scan_shard

    def counting(path, dtype):
        scans.append(Path(path).name)
        return real(path, dtype)

    monkeypatch.setattr(tokens_module, "_scan_shard", counting)
    monkeypatch.setattr(tokens_module, "_RACY_NS", -(1 << 62))  # treat the just-copied files as old enough
    check_token_cache(dm.token_dir)
    first = len(scans)
    assert first >= 2
    check_token_cache(dm.token_dir)
    TokenShards(dm.token_dir, "val")
    assert len(scans) == first  # remembered
    shard = dm.token_dir / "val_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(CacheError, match="val_00000.bin: is"):
        check_token_cache(dm.token_dir)


def test_atomic_dir_keeps_the_old_entry_on_failure_and_replaces_it_on_success(tmp_path):
    from lightning_optim.data._cache import atomic_dir

    target = tmp_path / "entry"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with pytest.raises(OSError, match="boom"), atomic_dir(target) as tmp:
        (Path(tmp) / "new.bin").write_bytes(b"half")
        raise OSError("boom")
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    with atomic_dir(target) as tmp:
        (Path(tmp) / "new.bin").write_bytes(b"new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary or set-aside directory left


# -- data files ------------------------------------------------------------------------------------------------


def _good_txt(d, n=3):
    for i in range(n):
        (d / f"a{i}.txt").write_text(f"document {i}: " + " ".join(WORDS))


@pytest.mark.parametrize("sample_by", ["document", "line"])
def test_binary_file_in_a_glob_is_named(tmp_path, sample_by):
    _good_txt(tmp_path)
    (tmp_path / "b.txt").write_bytes(b"ok\n" + bytes(range(256)) * 4)
    with pytest.raises(DataFileError, match=rf"{tmp_path / 'b.txt'}, line 3: is not UTF-8 text \(byte 0x80"):
        list(TextSource(data_files=str(tmp_path / "*.txt"), text_sample_by=sample_by))


def test_bad_encoding_is_named_through_the_data_module(tmp_path):
    _good_txt(tmp_path)
    (tmp_path / "z.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    dm = TokenDataModule(data_files=str(tmp_path / "*.txt"), tokenizer="bpe:300", cache_dir=str(tmp_path / "c"),
                         show_progress=False)
    with pytest.raises(DataFileError, match=rf"{tmp_path / 'z.txt'}, line 2: is not UTF-8") as err:
        dm.vocab_size  # noqa: B018 - training the tokenizer reads the files
    assert err.value.line == 2 and err.value.path == tmp_path / "z.txt"
    assert not list((tmp_path / "c").glob("tokenizers/bpe-*/tokenizer.json"))  # nothing half-written published


@pytest.mark.parametrize("line, reason", [
    ('{"text": bad}', r"line 3: is not valid JSON \(Expecting value, column 10\)"),
    ('[1, 2]', "line 3: is a JSON list, not an object"),
    ('{"body": "x"}', r"line 3: has no field 'text' \(fields: \['body'\]\); set text_field"),
    ('{"text": 7}', "line 3: field 'text' holds int, not a string"),
])
def test_broken_jsonl_line_is_named(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n' + line + '\n{"text": "c"}\n')
    with pytest.raises(DataFileError, match=rf"{path}, {reason}"):
        list(TextSource(data_files=str(path)))


def test_unreadable_parquet_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"this is not parquet" * 20)
    with pytest.raises(DataFileError, match=rf"{tmp_path / 'b.parquet'}: is not a readable parquet file"):
        list(TextSource(data_files=str(tmp_path / "*.parquet")))


def test_default_corpus_skips_an_unreadable_file_with_a_warning(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("x = 1\n")
    bad.write_bytes(b"y = '\xff'\n")
    monkeypatch.setattr(corpus_module, "stdlib_files", lambda root=None: [good, bad])
    with pytest.warns(UserWarning, match=rf"default corpus: skipping {bad}"):
        assert list(TextSource()) == ["x = 1\n"]

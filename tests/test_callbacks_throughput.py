"""TokenThroughput: the tokens it counts, the window it times (validation left out), and a real Trainer run."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_optim.callbacks import throughput as tp
from lightning_optim.callbacks.throughput import TokenThroughput


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Logger:
    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((step, dict(metrics)))


class _Module:
    flops_per_token = 1e6

    def __init__(self) -> None:
        self.bar: list[float] = []

    def log(self, name, value, **kwargs) -> None:
        self.bar.append(value)


def _trainer(world_size: int = 1) -> SimpleNamespace:
    return SimpleNamespace(global_step=0, world_size=world_size, loggers=[_Logger()],
                           strategy=SimpleNamespace(root_device=torch.device("cpu")),
                           state=SimpleNamespace(fn="fit"))


def test_counts_micro_batches_times_world_and_leaves_validation_out(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(tp.time, "perf_counter", clock)
    cb, trainer, module = TokenThroughput(log_every_n_steps=2, warmup_steps=1), _trainer(world_size=3), _Module()
    batch = (torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.long))  # 32 tokens per rank
    # accumulate_grad_batches=2: global_step advances every second micro-batch
    steps = [0, 1, 1, 2, 2, 3, 3, 4]
    for i, step in enumerate(steps):
        trainer.global_step = step
        if i == 4:  # a 50 s validation inside the second window is not counted
            cb.on_validation_start(trainer, module)
            clock.now += 50.0
            cb.on_validation_end(trainer, module)
        clock.now += 1.0
        cb.on_train_batch_end(trainer, module, None, batch, i)
    rows = trainer.loggers[0].rows
    assert [s for s, _ in rows] == [2, 4]
    # window 1: t0 at the 2nd batch (step 1); 2 micro-batches x 32 tokens x 3 ranks over 2 s of clock
    assert rows[0][1]["throughput/tokens_per_sec"] == pytest.approx(2 * 32 * 3 / 2.0)
    assert rows[0][1]["throughput/tokens_per_sec_per_device"] == pytest.approx(2 * 32 / 2.0)
    assert rows[0][1]["throughput/tflops_per_device"] == pytest.approx(2 * 32 / 2.0 * 1e6 / 1e12)
    assert "throughput/mfu" not in rows[0][1]  # no known peak for a CPU
    # window 2: 4 micro-batches over 4 s of clock, the 50 s of validation excluded
    assert rows[1][1]["throughput/tokens_per_sec"] == pytest.approx(4 * 32 * 3 / 4.0)
    assert cb.mean_tokens_per_sec == pytest.approx((2 + 4) * 32 * 3 / (2.0 + 4.0))
    assert module.bar == [rows[0][1]["throughput/tokens_per_sec"], rows[1][1]["throughput/tokens_per_sec"]]


def test_rejects_a_zero_interval():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        TokenThroughput(log_every_n_steps=0)


class _TokenModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.out = torch.nn.Linear(8, 16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.out(self.emb(x)).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_trainer_run_logs_throughput(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 16, (24, 2, 6), generator=g)
    loader = torch.utils.data.DataLoader([(d[0], d[1]) for d in data], batch_size=2)
    cb = TokenThroughput(log_every_n_steps=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2, callbacks=[cb], logger=logger,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(_TokenModel(), loader)
    assert trainer.global_step == 6
    assert cb.mean_tokens_per_sec is not None and cb.mean_tokens_per_sec > 0
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "throughput/tokens_per_sec" in text

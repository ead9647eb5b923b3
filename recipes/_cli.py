"""The LightningCLI behind every recipe: model + data + Trainer with logging, throughput and checkpoints.

Each recipe script (``gpt124m.py``, ``llama210m.py``, ``tiny.py`` ...) calls :func:`main` with its preset's
defaults. Everything is a flag or a YAML key::

    python recipes/gpt124m.py --trainer.devices 8                       # DDP on 8 GPUs, AdamW, cosine
    python recipes/gpt124m.py --optim.name ademamix --optim.lr 1e-3     # swap the optimizer
    python recipes/gpt124m.py --config recipes/configs/optim/muon.yaml  # the benchmark's Muon settings
    python recipes/gpt124m.py --config recipes/configs/fsdp2.yaml       # shard with FSDP2
    python recipes/gpt124m.py --ckpt_path lightning_logs/gpt124m/version_0/checkpoints/last.ckpt   # resume
    python recipes/gpt124m.py --print_config                            # the whole configuration

Groups: ``--model.*`` (LanguageModel), ``--data.*`` (TokenDataModule), ``--optim.*`` (OptimConfig: name, lr,
betas, eps, weight_decay, momentum, nesterov, extra, scheduler, warmup_steps ...), ``--trainer.*``,
``--checkpoint.*`` (ModelCheckpoint: every 500 steps, keep the last 3, plus ``last.ckpt``),
``--lr_monitor.*``, ``--throughput.*`` (tokens/s and MFU), ``--ckpt_path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "lightning_optim").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # run from a checkout without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers after BPE training

import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from lightning_optim.data.datamodule import TokenDataModule  # noqa: E402
from lightning_optim.mixin import OptimConfig  # noqa: E402
from lightning_optim.models.module import LanguageModel  # noqa: E402
from lightning_optim.models.throughput import TokenThroughput  # noqa: E402

__all__ = ["RecipeCLI", "main", "RECIPES"]

_BENCH_ADAMW = {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                "scheduler": "cosine", "warmup_steps": 2000}

# Per preset: model, data, optimizer and trainer defaults. The benchmark sizes use its batch (256 x 512
# tokens), warmup 2000, clipping 0.5 (0.1 from 583M), cosine to 0.01 x peak; max_steps ~ 20 tokens/parameter.
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"preset": "tiny", "arch": "llama"},
        "data": {"seq_len": 128, "global_batch_size": 16, "val_every_n_steps": 50, "val_sequences": 64},
        "optim": {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.1, "scheduler": "cosine",
                  "warmup_steps": 20},
        "trainer": {"max_steps": 250, "gradient_clip_val": 1.0, "log_every_n_steps": 5},
    },
    "124m": {
        "model": {"preset": "124m"},
        "data": {"seq_len": 512, "global_batch_size": 256, "micro_batch_size": 32, "val_every_n_steps": 500},
        "optim": _BENCH_ADAMW,
        "trainer": {"max_steps": 19000, "gradient_clip_val": 0.5},
    },
    "210m": {
        "model": {"preset": "210m"},
        "data": {"seq_len": 512, "global_batch_size": 256, "micro_batch_size": 32, "val_every_n_steps": 500},
        "optim": _BENCH_ADAMW,
        "trainer": {"max_steps": 32000, "gradient_clip_val": 0.5},
    },
    "583m": {
        "model": {"preset": "583m"},
        "data": {"seq_len": 512, "global_batch_size": 256, "micro_batch_size": 16, "val_every_n_steps": 1000},
        "optim": _BENCH_ADAMW,
        "trainer": {"max_steps": 89000, "gradient_clip_val": 0.1},
    },
    "720m": {
        "model": {"preset": "720m"},
        "data": {"seq_len": 512, "global_batch_size": 256, "micro_batch_size": 16, "val_every_n_steps": 1000},
        "optim": _BENCH_ADAMW,
        "trainer": {"max_steps": 110000, "gradient_clip_val": 0.1},
    },
}


def _default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class RecipeCLI(LightningCLI):
    """LightningCLI with ``--optim.*``, ``--ckpt_path``, checkpoint / lr-monitor / throughput callbacks, and
    the data module's vocabulary and sequence length linked into the model."""

    recipe_defaults: dict[str, Any] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume training from this checkpoint (a path, or 'last').")
        parser.add_class_arguments(OptimConfig, "optim", help="Optimizer and LR schedule (lightning_optim registry).")
        parser.link_arguments("optim", "model.optim", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.block_size")
        parser.link_arguments("data", "model.tokenizer_vocab_size", compute_fn=lambda dm: dm.vocab_size,
                              apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        defaults = {
            "checkpoint.every_n_train_steps": 500, "checkpoint.save_top_k": 3, "checkpoint.monitor": "step",
            "checkpoint.mode": "max", "checkpoint.save_last": True, "checkpoint.filename": "step{step:07d}",
            "checkpoint.auto_insert_metric_name": False, "lr_monitor.logging_interval": "step",
        }
        for group in ("model", "data", "optim"):
            for key, value in self.recipe_defaults.get(group, {}).items():
                defaults[f"{group}.{key}"] = value
        parser.set_defaults(defaults)


def main(recipe: str, arch: str | None = None, name: str | None = None, args: Any = None) -> RecipeCLI:
    """Parse the command line for ``recipe`` (a key of :data:`RECIPES`) and train."""
    spec = RECIPES[recipe]
    model_defaults = dict(spec["model"])
    if arch is not None:
        model_defaults["arch"] = arch
    name = name or f"{model_defaults.get('arch', 'llama')}-{recipe}"
    trainer_defaults = {
        "precision": _default_precision(),
        "log_every_n_steps": 10,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": "lightning_logs", "name": name}},
        **spec["trainer"],
    }
    cls = type("RecipeCLI", (RecipeCLI,), {"recipe_defaults": {**spec, "model": model_defaults}})
    cli = cls(
        LanguageModel, TokenDataModule, run=False, auto_configure_optimizers=False, seed_everything_default=1337,
        trainer_defaults=trainer_defaults, save_config_kwargs={"overwrite": True}, args=args,
        parser_kwargs={"description": f"Train the {name} language model (lightning-optim recipe)."},
    )
    _guard_strategy(cli.trainer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


def _guard_strategy(trainer: Any) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy) and trainer.strategy.root_device.type != "cuda":
        raise SystemExit("configs/fsdp.yaml (FSDPStrategy) needs CUDA GPUs; on CPU use configs/fsdp2.yaml "
                         "(ModelParallelStrategy) or configs/ddp.yaml")

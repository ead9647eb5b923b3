"""The LightningCLI behind every recipe: model + data + Trainer with logging, throughput, stability and checkpoints.

Each recipe script (``gpt124m.py``, ``llama210m.py``, ``tiny.py`` ...) calls :func:`main` with its preset's
defaults. Everything is a flag or a YAML key::

    python recipes/gpt124m.py --trainer.devices 8                       # DDP on 8 GPUs, AdamW, cosine
    python recipes/gpt124m.py --optim.name ademamix --optim.lr 1e-3     # swap the optimizer
    python recipes/gpt124m.py --config recipes/configs/optim/muon.yaml  # the benchmark's Muon settings
    python recipes/gpt124m.py --config recipes/configs/fsdp2.yaml       # shard with FSDP2
    python recipes/gpt124m.py --ckpt_path last                          # resume the newest verified checkpoint
    python recipes/gpt124m.py --print_config                            # the whole configuration

Groups: ``--model.*`` (LanguageModel), ``--data.*`` (TokenDataModule), ``--optim.*`` (OptimConfig: name, lr,
betas, eps, weight_decay, momentum, nesterov, extra, scheduler, warmup_steps, mup_base_width ...), ``--trainer.*``,
``--checkpoint.*`` (ModelCheckpoint: every 500 steps, keep the last 3, plus ``last.ckpt``),
``--nonfinite.*`` / ``--spike.*`` / ``--clipping.*`` / ``--norms.*`` (the stability callbacks, on by default;
``--<group>.enabled false`` switches one off), ``--qk_clip.*`` (QK-clip, off unless ``--qk_clip.enabled true``),
``--lr_monitor.*``, ``--throughput.*`` (tokens/s and MFU),
``--ckpt_path`` (a path, or ``last``), ``--max_warmup_fraction``, ``--dist_timeout``.

How optimizer settings are layered (registry defaults → recipe → YAML → flags): see :mod:`_layering`.
Every configuration error is reported once, before any process is launched, and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "lightning_optim").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # run from a checkout without installing
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked DataLoader workers after BPE training

import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # noqa: E402

from _layering import TORCH_FIELDS, layer_optim_settings  # noqa: E402
from _resume import checkpoint_dirs, resolve_last_checkpoint  # noqa: E402
from lightning_optim.callbacks.collective_timeout import CollectiveTimeoutReport  # noqa: E402
from lightning_optim.callbacks.gradient_clipping import GradientClipping  # noqa: E402
from lightning_optim.callbacks.layer_norms import LayerNormMonitor  # noqa: E402
from lightning_optim.callbacks.loss_spike import LossSpikeDetector  # noqa: E402
from lightning_optim.callbacks.non_finite import NonFiniteGuard  # noqa: E402
from lightning_optim.models.gpt import model_config  # noqa: E402
from lightning_optim.callbacks.qk_clip import QKClip  # noqa: E402
from lightning_optim.callbacks.step_progress import StepProgressBar  # noqa: E402
from lightning_optim.checkpoint_io import VerifiedCheckpointIO  # noqa: E402
from lightning_optim.data.datamodule import TokenDataModule, batch_geometry  # noqa: E402
from lightning_optim.mixin import OptimConfig  # noqa: E402
from lightning_optim.models.module import LanguageModel  # noqa: E402
from lightning_optim.callbacks.throughput import TokenThroughput  # noqa: E402

__all__ = ["RecipeCLI", "main", "RECIPES", "ConfigError"]

# The benchmark's AdamW (Semenov, Pagliardini & Jaggi 2025, best 124M run). These values apply to AdamW only.
_BENCH_ADAMW = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}


def _benchmark(preset: str, micro_batch: int, val_every: int, max_grad_norm: float, max_steps: int) -> dict[str, Any]:
    """A benchmark-size preset: batch 256 x 512 tokens, the benchmark's AdamW, cosine with warmup 2000."""
    return {
        "model": {"preset": preset},
        "data": {"seq_len": 512, "global_batch_size": 256, "micro_batch_size": micro_batch,
                 "val_every_n_steps": val_every},
        "optimizer": "adamw", "optimizer_settings": _BENCH_ADAMW,
        "scheduler": "cosine", "warmup_steps": 2000, "max_grad_norm": max_grad_norm, "norms_every_n_steps": 500,
        "trainer": {"max_steps": max_steps},
    }


# Per preset: model, data, the optimizer the recipe was tuned with and its settings (for that optimizer only),
# the schedule, clipping and trainer defaults. The benchmark sizes use its batch (256 x 512 tokens), warmup 2000,
# clipping 0.5 (0.1 from 583M), cosine to 0.01 x peak; max_steps ~ 20 tokens/parameter.
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"preset": "tiny", "arch": "llama"},
        "data": {"seq_len": 128, "global_batch_size": 16, "val_every_n_steps": 50, "val_sequences": 64},
        "optimizer": "adamw", "optimizer_settings": {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
        "scheduler": "cosine", "warmup_steps": 20, "max_grad_norm": 1.0, "norms_every_n_steps": 50,
        "trainer": {"max_steps": 250, "log_every_n_steps": 5},
    },
    "124m": _benchmark("124m", micro_batch=32, val_every=500, max_grad_norm=0.5, max_steps=19000),
    "210m": _benchmark("210m", micro_batch=32, val_every=500, max_grad_norm=0.5, max_steps=32000),
    "583m": _benchmark("583m", micro_batch=16, val_every=1000, max_grad_norm=0.1, max_steps=89000),
    "720m": _benchmark("720m", micro_batch=16, val_every=1000, max_grad_norm=0.1, max_steps=110000),
}

# The stability callbacks every recipe turns on (each: --<group>.enabled false, or retune by flag / YAML).
# NonFiniteGuard(max_consecutive=5) and LossSpikeDetector(window=128, threshold=6.0) keep their own defaults;
# GradientClipping's max_norm is the recipe's max_grad_norm, LayerNormMonitor's interval its norms_every_n_steps.
STABILITY = {
    "nonfinite": (NonFiniteGuard, {}),
    "spike": (LossSpikeDetector, {"action": "skip"}),
    "clipping": (GradientClipping, {}),
    "norms": (LayerNormMonitor, {}),
}
# Opt-in callbacks: listed like the stability groups but off unless --<group>.enabled true.
# QK-clip (Kimi K2's MuonClip rule): --qk_clip.enabled true --qk_clip.threshold 100
OPT_IN = {
    "qk_clip": (QKClip, {"enabled": False}),
}


class ConfigError(ValueError):
    """A recipe configuration that cannot run; reported once, before anything is launched."""


def _default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _class_path(value: Any) -> str:
    if isinstance(value, str):
        return value
    path = getattr(value, "class_path", None)
    if path is None and isinstance(value, dict):
        path = value.get("class_path")
    return str(path or type(value).__name__)


class RecipeCLI(LightningCLI):
    """LightningCLI with ``--optim.*``, ``--ckpt_path``, stability / checkpoint / lr-monitor / throughput
    callbacks, a step-counting progress bar, and the data module's vocabulary and sequence length linked into
    the model. See the module docstring."""

    recipe: dict[str, Any] = {}
    run_name: str = ""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume from this checkpoint: a path, or 'last' (the newest verified checkpoint "
                                 "of this recipe's runs).")
        parser.add_argument("--max_warmup_fraction", type=float, default=0.25,
                            help="Warmup longer than this fraction of the run is capped to it (with a message).")
        parser.add_argument("--dist_timeout", type=float, default=600.0,
                            help="Seconds a collective may wait before the run fails (a stuck or dead rank).")
        parser.add_class_arguments(OptimConfig, "optim", help="Optimizer and LR schedule (lightning_optim registry).")
        parser.link_arguments("optim", "model.optim", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.block_size")
        parser.link_arguments("data", "model.tokenizer_vocab_size", compute_fn=lambda dm: dm.vocab_size,
                              apply_on="instantiate")
        for group, (cls, _) in {**STABILITY, **OPT_IN}.items():
            parser.add_lightning_class_args(cls, group)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        recipe = self.recipe
        defaults = {
            "checkpoint.every_n_train_steps": 500, "checkpoint.save_top_k": 3, "checkpoint.monitor": "step",
            "checkpoint.mode": "max", "checkpoint.save_last": True, "checkpoint.filename": "step{step:07d}",
            "checkpoint.auto_insert_metric_name": False, "lr_monitor.logging_interval": "step",
            "optim.name": recipe["optimizer"], "optim.warmup_steps": recipe["warmup_steps"],
            "clipping.max_norm": recipe["max_grad_norm"], "norms.every_n_steps": recipe["norms_every_n_steps"],
        }
        for group, (_, values) in {**STABILITY, **OPT_IN}.items():
            defaults.update({f"{group}.{k}": v for k, v in values.items()})
        for group in ("model", "data"):
            defaults.update({f"{group}.{k}": v for k, v in recipe.get(group, {}).items()})
        parser.set_defaults(defaults)

    # -- configuration checks and layering, before anything is built or launched --------------------------------

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI's, except that ``--print_config`` prints the *effective* configuration (the optimizer
        settings after :mod:`_layering`, the capped warmup) instead of the parser's unset values."""
        argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, tuple, type(None))) else None
        wants = [a for a in (argv or []) if a == "--print_config" or a.startswith("--print_config=")]
        if not wants:
            super().parse_arguments(parser, args)
            return
        super().parse_arguments(parser, [a for a in argv if a not in wants])
        self.before_instantiate_classes()
        print(parser.dump(self.config, skip_none=False), end="")
        raise SystemExit(0)

    def before_instantiate_classes(self) -> None:
        try:
            self._check_and_layer()
        except (ConfigError, ValueError, TypeError) as err:
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def _check_and_layer(self) -> None:
        config = self.config
        trainer = config.trainer
        strategy = _class_path(trainer.get("strategy"))
        if strategy.endswith("FSDPStrategy") and not torch.cuda.is_available():
            raise ConfigError("configs/fsdp.yaml (FSDPStrategy, FSDP1) needs CUDA GPUs; on CPU use "
                              "configs/fsdp2.yaml (ModelParallelStrategy) or configs/ddp.yaml")
        if trainer.get("gradient_clip_val") is not None and config.clipping.get("enabled", True):
            raise ConfigError("--trainer.gradient_clip_val and the recipe's GradientClipping callback would clip "
                              "twice: set --clipping.max_norm instead (or --clipping.enabled false to use the "
                              "Trainer's clipping)")
        if trainer.get("accumulate_grad_batches") not in (None, 1):
            raise ConfigError("the recipe derives gradient accumulation from --data.global_batch_size, "
                              "--data.micro_batch_size and the number of devices: leave "
                              "--trainer.accumulate_grad_batches unset")
        optim = {k: v for k, v in vars(config.optim).items() if not k.startswith("_")}
        max_steps = trainer.get("max_steps")
        horizon = optim.get("total_steps") or (max_steps if max_steps and max_steps > 0 else None)
        fraction = config.max_warmup_fraction
        if not 0 <= fraction < 1:
            raise ConfigError(f"--max_warmup_fraction must be in [0, 1), got {fraction}")
        layered, messages = layer_optim_settings(
            optim, self.recipe["optimizer"], self.recipe["optimizer_settings"], self.recipe["scheduler"],
            horizon, fraction)
        for message in messages:
            rank_zero_info(message)
        check = OptimConfig(**{**layered, "total_steps": layered.get("total_steps") or horizon})
        del check  # constructing it validated every field (names, ranges, the schedule against the horizon)
        if layered.get("mup_base_width") is not None:  # the model's muP checks (n_head divides the base width,
            m = config.model                           # RoPE's even head_dim) before the data is built
            model_config(m.preset, m.arch, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                         mlp_hidden=m.mlp_hidden, mup_base_width=layered["mup_base_width"])
        for key, value in layered.items():
            config.optim[key] = value
        if config.dist_timeout <= 0:
            raise ConfigError(f"--dist_timeout must be > 0 seconds, got {config.dist_timeout}")

    # -- building the Trainer ----------------------------------------------------------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config = self.config
        logger_on = config.trainer.get("logger") is not False
        callbacks = []
        for group in self._parser(self.subcommand).callback_keys:
            cb = self._get(self.config_init, group)
            if getattr(cb, "enabled", True) is False:
                continue
            if group == "lr_monitor" and not logger_on:
                continue  # LearningRateMonitor refuses a Trainer without a logger; the lr is in the progress bar
            callbacks.append(cb)
        if config.trainer.get("enable_progress_bar") is not False:
            callbacks.append(StepProgressBar())
        callbacks.append(CollectiveTimeoutReport())
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        trainer_config["plugins"] = _with_checkpoint_io(trainer_config.get("plugins"))
        trainer = self._instantiate_trainer(trainer_config, callbacks)
        timeout = getattr(trainer.strategy, "_timeout", None)
        if timeout is not None:
            trainer.strategy._timeout = timedelta(seconds=float(config.dist_timeout))
        return trainer

    def instantiate_classes(self) -> None:
        """A setting a class refuses when it is built (``--spike.threshold -1``, ``--qk_clip.threshold 0``) is a
        configuration error too: reported once, exit 2, before any process starts."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def after_instantiate_classes(self) -> None:
        trainer, dm, model = self.trainer, self.datamodule, self.model
        if trainer.accelerator.__class__.__name__ == "CPUAccelerator" and trainer.num_devices > _cpu_cores():
            rank_zero_warn(f"--trainer.devices {trainer.num_devices} starts {trainer.num_devices} processes on a "
                           f"machine with {_cpu_cores()} CPU cores: each gets a fraction of a core and the run is "
                           f"slower than on {_cpu_cores()} device(s). Use GPUs, or --trainer.devices <= {_cpu_cores()}.")
        try:
            micro, accumulate = batch_geometry(dm.global_batch_size, trainer.world_size, dm.micro_batch_size)
        except ValueError as err:
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        trainer.accumulate_grad_batches = accumulate
        self.config.trainer.accumulate_grad_batches = accumulate  # config.yaml records the effective value
        geometry = run_geometry(trainer, dm, micro, accumulate)
        model.record_run_settings({"geometry": geometry})
        rank_zero_info(describe_run(geometry, model.optim_config()))
        ckpt = self.config.get("ckpt_path")
        if ckpt == "last":
            self.config.ckpt_path = str(self._resolve_last())

    def _resolve_last(self) -> Path:
        logger = self.trainer.logger
        save_dir = getattr(logger, "save_dir", None) if logger is not None else None
        name = getattr(logger, "name", None) if logger is not None else None
        dirs = checkpoint_dirs(save_dir, name, self.config.checkpoint.get("dirpath"), self.trainer.default_root_dir)
        try:
            path, skipped = resolve_last_checkpoint(dirs)
        except FileNotFoundError as err:
            print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        for bad, why in skipped:
            rank_zero_warn(f"--ckpt_path last: skipping {bad}: {why}")
        rank_zero_info(f"--ckpt_path last: resuming from {path}")
        return path


def _with_checkpoint_io(plugins: Any) -> list[Any]:
    """The recipe's plugins with a verifying checkpoint writer unless the user gave their own CheckpointIO."""
    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in items):
        items.append(VerifiedCheckpointIO())
    return items


def run_geometry(trainer: Any, dm: Any, micro: int, accumulate: int) -> dict[str, Any]:
    """Devices, micro-batch, accumulation, global batch (sequences, tokens) and planned tokens of a run."""
    tokens_per_step = dm.global_batch_size * dm.seq_len
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    return {
        "devices": trainer.world_size, "micro_batch_size": micro, "accumulate_grad_batches": accumulate,
        "global_batch_sequences": dm.global_batch_size, "seq_len": dm.seq_len,
        "tokens_per_step": tokens_per_step, "max_steps": steps,
        "planned_tokens": tokens_per_step * steps if steps else None,
    }


def describe_run(geometry: dict[str, Any], optim: OptimConfig) -> str:
    """The block printed on rank 0 when a recipe starts."""
    g = geometry
    planned = f"{g['planned_tokens']:,} tokens in {g['max_steps']:,} steps" if g["planned_tokens"] else "no max_steps"
    hp = {k: getattr(optim, k) for k in TORCH_FIELDS if getattr(optim, k) is not None}
    hp.update(optim.extra)
    settings = ", ".join(f"{k}={v}" for k, v in hp.items())
    mup = ([f"  muP                     base width {optim.mup_base_width} (lr multipliers per layer: "
            "lightning_optim.routing_table(model, optimizer=...))"] if optim.mup_base_width is not None else [])
    return "\n".join([
        "run:",
        f"  devices                 {g['devices']}",
        f"  micro-batch             {g['micro_batch_size']} sequences per device",
        f"  gradient accumulation   {g['accumulate_grad_batches']}",
        f"  global batch            {g['global_batch_sequences']} sequences x {g['seq_len']} tokens "
        f"= {g['tokens_per_step']:,} tokens per optimizer step",
        f"  planned                 {planned}",
        f"  optimizer               {optim.name} ({settings})",
        f"  schedule                {optim.scheduler}, warmup {optim.warmup_steps} steps",
        *mup,
    ])


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
    cls = type("RecipeCLI", (RecipeCLI,), {"recipe": {**spec, "model": model_defaults}, "run_name": name})
    cli = cls(
        LanguageModel, TokenDataModule, run=False, auto_configure_optimizers=False, seed_everything_default=1337,
        trainer_defaults=trainer_defaults, save_config_kwargs={"overwrite": True}, args=args,
        parser_kwargs={"description": f"Train the {name} language model (lightning-optim recipe)."},
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli

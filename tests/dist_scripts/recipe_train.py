"""Run the tiny recipe under torchrun (2 CPU processes) and save the final full model state on rank 0.

    torchrun --nproc_per_node 2 tests/dist_scripts/recipe_train.py OUT_DIR STRATEGY_YAML [recipe args...]
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from _cli import main  # noqa: E402
from tests.dist_utils import finish  # noqa: E402

out, config, *args = sys.argv[1:]
cli = main("tiny", args=["--config", config, "--trainer.accelerator", "cpu", "--trainer.devices", "2", *args])
model = cli.model.model
if any(type(p).__name__ == "DTensor" for p in model.parameters()):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({"state": state, "accumulate": cli.trainer.accumulate_grad_batches, "micro": cli.datamodule.micro,
                "step": cli.trainer.global_step}, Path(out) / "final.pt")
finish(out)  # results written: barrier, destroy the group, leave without interpreter finalisation

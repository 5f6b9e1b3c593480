"""The resumable checkpoint of a run: heads, optimizer, scheduler, RNG, step and data order, under named keys,
written atomically by the main process; resuming checks the settings it was made with."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mtpkit import __version__
from mtpkit.files import atomic_write, atomic_write_text
from mtpkit.config import METRICS_NAME
from mtpkit.errors import MtpkitError

if TYPE_CHECKING:
    from mtpkit.train.recipe import Run

CHECKPOINT_FILE = "state.pt"
# the checkpoint's keys (torch.save of a dict, read with weights_only=True)
STEP_KEY, HEADS_KEY, LORA_KEY = "step", "heads", "lora"
OPTIMIZER_KEY, SCHEDULER_KEY, RNG_KEY = "optimizer", "scheduler", "rng"
ORDERS_KEY, SETTINGS_KEY, VERSION_KEY = "orders", "settings", "mtpkit_version"
# resume settings older checkpoints lack, with the value they ran with
SETTINGS_ADDED_LATER = {"feature_loss": 0.0, "teacher_forcing": 1.0}


def checkpoint_step(run: Run) -> int | None:
    """The step the checkpoint on disk was written at (None: unreadable)."""
    try:
        return int(torch.load(run.checkpoint_path, weights_only=True, map_location="cpu")[STEP_KEY])
    except Exception:  # an unreadable checkpoint is reported as such, not raised over the real error
        return None


def save_checkpoint(run: Run) -> Path | None:
    """Heads, optimizer, scheduler, RNG, step and data order, written atomically."""
    if not run.accelerator.is_main_process:
        return None
    state = {STEP_KEY: run.step, HEADS_KEY: {k: v.detach().cpu() for k, v in run.heads.state_dict().items()},
             OPTIMIZER_KEY: run.optimizer.state_dict(), SCHEDULER_KEY: run.scheduler.state_dict(),
             RNG_KEY: {"torch": torch.get_rng_state(), "python": random.getstate(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             ORDERS_KEY: {str(k): v for k, v in run.orders.items()}, SETTINGS_KEY: run.settings(),
             VERSION_KEY: __version__}
    if run.peft_model is not None:
        from peft import get_peft_model_state_dict

        state[LORA_KEY] = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(run.peft_model).items()}
    run.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(run.checkpoint_path, lambda tmp: torch.save(state, tmp))
    return run.checkpoint_path


def load_checkpoint(run: Run) -> None:
    """Restore a run from its checkpoint, refusing one made with other settings."""
    try:
        state = torch.load(run.checkpoint_path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types on a damaged file
        raise MtpkitError(f"cannot read the checkpoint {run.checkpoint_path}: {type(exc).__name__}") from None
    settings = run.settings()
    saved = {**SETTINGS_ADDED_LATER, **state[SETTINGS_KEY]}  # a checkpoint older than a setting ran with its default
    differ = [k for k in settings if saved.get(k) != settings[k]]
    if differ:
        raise MtpkitError(f"--resume: the checkpoint in {run.checkpoint_path.parent} was made with different "
                          f"settings ({', '.join(differ)}); rerun with the same options, or without --resume")
    run.heads.load_state_dict({k: v.to(run.accelerator.device) for k, v in state[HEADS_KEY].items()})
    if run.heads.has_draft_head:  # its draft vocabulary came back in d2t / t2d
        run.heads.set_draft_vocab(run.heads.draft_columns())
    run.optimizer.load_state_dict(state[OPTIMIZER_KEY])
    run.scheduler.load_state_dict(state[SCHEDULER_KEY])
    rng = state[RNG_KEY]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.orders = {int(k): list(v) for k, v in state[ORDERS_KEY].items()}
    run.step = int(state[STEP_KEY])
    if run.peft_model is not None and LORA_KEY in state:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(run.peft_model, state[LORA_KEY])
    _truncate_metrics(run)


def _truncate_metrics(run: Run) -> None:
    """Drop metrics logged after the checkpoint: the resumed run logs those steps again."""
    path = run.heads_dir / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= run.step:
            kept.append(record)
    run.history = kept
    if run.accelerator.is_main_process:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

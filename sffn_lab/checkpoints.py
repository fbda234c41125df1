"""Checkpoints: written atomically, read without running code and with a clear error when unusable, and
checked before a resume.

``checkpoints/last.ckpt`` is the run's latest state (every validation, every ``train.checkpoint_every``
steps and on Ctrl-C); ``checkpoints/best-<step>.ckpt`` the best by validation loss. A checkpoint holds only
tensors and plain values (the config and the corpus description as dicts, Lightning's loop, optimizer and
callback states), so every read uses ``torch.load(weights_only=True)`` with nothing added to torch's
allow-list: a file that asks the unpickler for any other global is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sffn_lab.config import Config, from_dict, load_config, read_yaml, to_dict
from sffn_lab.errors import UserError
from sffn_lab.lm_module import LanguageModelModule
from sffn_lab.run_dir import CONFIG_FILE, RunDir


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reads and writes: each write goes to a temporary file renamed into place, each
    read (a resume's ``trainer.fit(ckpt_path=...)``) through ``read_checkpoint``.

    A run killed mid-save leaves the previous checkpoint intact; a half-written file is never
    under the checkpoint's name; a file that would run code is refused whatever ``weights_only`` Lightning asks for.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(Path(path))

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"Could not write checkpoint '{path}': {exc.strerror or exc}. The run stopped at step "
                f"{checkpoint.get('global_step', '?')}; earlier checkpoints are intact. Free some space "
                f"(or fix the permissions) and continue with: sffn train --resume {RunDir.of_checkpoint(path).path}"
            ) from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of an sffn-lab checkpoint file (tensors memory-mapped); ``UserError`` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        refuse_foreign_globals(path)
        reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"Checkpoint '{path}' is not a valid sffn-lab checkpoint: it is cut short or corrupt "
            f"({reason}) and was not loaded. Use another checkpoint of the run: checkpoints/best-*.ckpt "
            "(copied to last.ckpt, --resume goes on from it)."
        ) from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint.get("hyper_parameters", {}):
        raise UserError(f"Checkpoint '{path}' is not a valid sffn-lab checkpoint (it holds no config).")
    return checkpoint


def refuse_foreign_globals(path: Path) -> None:
    """Raise ``UserError`` naming the globals ``path`` asks the unpickler for beyond torch's weights-only allow-list
    (read from the pickle's opcodes, nothing executed); return if there are none or the file cannot be scanned."""
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError):
        return  # not a readable zip checkpoint: the caller reports it as corrupt
    if foreign:
        raise UserError(
            f"Checkpoint '{path}' was refused: it asks to load {', '.join(foreign)}, which an sffn-lab checkpoint "
            "never holds (only tensors and plain values), and loading it could run code. Nothing in it was loaded "
            "or run. Use a checkpoint from a source you trust, or ask for a `sffn export` folder (safetensors)."
        )


# What a resumed run may change: its length, and how its processes are laid out (the global batch and the
# batches of every step do not depend on the number of processes, so the run continues exactly).
RESUME_MAY_CHANGE = {"train.max_steps", "train.devices", "train.num_nodes", "train.strategy", "train.accelerator",
                     "train.compile"}


def config_changes(saved: dict, config: Config) -> set[str]:
    """Dotted keys whose value differs between a saved config (as a dict: keys added to ``Config`` since it was
    saved take their defaults) and ``config``, except those a resumed run may change (``RESUME_MAY_CHANGE``)."""
    return _changed_keys(to_dict(from_dict(Config, saved)), to_dict(config)) - RESUME_MAY_CHANGE


def _changed_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in a.keys() | b.keys():
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys |= _changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.add(f"{prefix}{k}")
    return keys


def load_run_config(run_dir: Path, overrides: list[str]) -> Config:
    """The config a run was made with; only ``train.max_steps`` may be changed when resuming."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE} in it).")
    config = load_config(run.config, overrides)
    changed = config_changes(read_yaml(run.config), config)
    if changed:
        raise UserError(
            f"Cannot resume '{run_dir}' with a different config (changed: {', '.join(sorted(changed))}). "
            "Only train.max_steps may change when resuming; start a new run for anything else."
        )
    return config


def check_resumable(checkpoint: dict[str, Any], config: Config, path: Path) -> None:
    """Refuse to resume ``config`` from a checkpoint of a different model or training setup."""
    changed = config_changes(checkpoint["hyper_parameters"]["config"], config)
    if changed:
        raise UserError(
            f"Checkpoint '{path}' was written by a run with a different config (changed: "
            f"{', '.join(sorted(changed))}); it cannot continue this run."
        )


def checkpoint_file(path: Path) -> Path:
    """``path`` itself, or for a run directory its best checkpoint, else its last."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        path = (run.best_checkpoints() or [run.last_checkpoint])[-1]
    return path


def load_checkpoint(path: Path) -> LanguageModelModule:
    """A trained module from a checkpoint file, or a run directory (its best, else last, checkpoint)."""
    path = checkpoint_file(path)
    return module_from_checkpoint(read_checkpoint(path), path)


def module_from_checkpoint(checkpoint: dict[str, Any], path: Path) -> LanguageModelModule:
    """The module a checkpoint read from ``path`` describes, with its weights."""
    try:
        module = LanguageModelModule(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        raise UserError(
            f"Checkpoint '{path}' does not match the model its config describes: {problems[0]}"
        ) from None
    return module

"""Checkpoints on disk: OUT/checkpoints/step-NNNNNN/ with the trainable tensors, the optimizer, every process's RNG
and the trainer state. safetensors + JSON only (nothing is unpickled on resume)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.json"
# Train settings that may change between an interrupted run and its resumption (they do not change the result).
RESUME_MAY_CHANGE = {
    "train.log_every", "train.eval_every", "train.eval_examples", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.output_dir", "data.progress", "model.device",
}


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (a crash mid-write leaves only a temp folder)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, name + ".")
        elif a != b and name not in RESUME_MAY_CHANGE:
            keys.append(f"{name}: {a!r} -> {b!r}")
    return keys


def _current_layout(saved: dict) -> dict:
    """A checkpoint's stored config with its keys where they are now (a checkpoint written before the rejected
    recipes' options moved into train.experimental / router.experimental resumes as it did)."""
    from ..config import RunConfig
    from ..errors import ConfigError

    try:
        return RunConfig.from_dict(saved).to_dict()
    except ConfigError:
        return saved  # not valid any more: the diff names what differs


def write_checkpoint(path: Path, trainable: dict, optimizer_tensors: dict, rng: list, state: dict) -> None:
    """Write one checkpoint folder to a temp folder and rename it (main process only); `rng` has one entry per
    process, `state` holds the step, schedule, optimizer metadata and config."""
    from ..atomic import write_dir_atomically

    def fill(tmp: Path) -> None:
        save_file(trainable, str(tmp / TRAINABLE_FILE))
        save_file(optimizer_tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / RNG_FILE).write_text(json.dumps({str(r): s for r, s in enumerate(rng)}))
        (tmp / STATE_FILE).write_text(json.dumps(state, default=str))  # last: marks the folder complete

    write_dir_atomically(path, fill)


def read_state(path: Path, world: int, config: dict, trainable_names: list[str]) -> dict:
    """The trainer state of checkpoint `path`, after checking that this run may resume it (same process count,
    same config up to RESUME_MAY_CHANGE, same trainable parameters)."""
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != world:
        raise TrainingError(
            f"{path} was written by {state['world_size']} process(es); resume it with the same number "
            f"(this run has {world}): the data order and dropout streams are per process"
        )
    changed = _config_diff(_current_layout(state["config"]), config)
    if changed:
        raise TrainingError(f"cannot resume {path}: the config changed ({'; '.join(changed)})")
    if state["trainable_names"] != trainable_names:
        raise TrainingError(f"cannot resume {path}: its trainable parameters differ from this model's")
    return state


def restore_checkpoint(path: Path, state: dict, model, trainable_names: list[str], optimizer, scheduler,
                       rank: int) -> None:
    """Load checkpoint `path` (its `state` from read_state) into the model's trainable parameters, the optimizer,
    the lr schedule and this process's RNG."""
    tensors = load_file(str(path / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trainable_names:
            params[name].copy_(tensors[name])
    _optimizer_from_files(optimizer, load_file(str(path / OPTIMIZER_FILE)), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = json.loads((path / RNG_FILE).read_text())
    _set_rng_state(rng[str(rank)])

"""Atomic checkpoints and exact resume.

A checkpoint is a folder `checkpoints/step-000200/` holding only safetensors and JSON. Each component of the
run (the trainer lists them: `Trainer.components()`) saves its own state dict — tensors to
`<name>.safetensors`, everything else to `<name>.json` — so nothing here reaches into the trainer:
  trainable.safetensors   every trainable parameter
  optimizer.safetensors   AdamW moments (keyed by parameter name) + optimizer.json (hyper-parameters, steps)
  rng.safetensors         torch CPU (and CUDA) generator states; rng.json: Python and NumPy states
  state.json              step, tokens, metric history, reference-cache key
  source.json             an online batch source's state (absent for a fixed batch plan)
  COMPLETE                written last, inside the temporary folder, before the atomic rename
It is written to `checkpoints/.tmp-step-…` and renamed into place, so a crash at any moment leaves either the
previous checkpoint set or the new one, never a half-written folder that resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TunesmithError

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
FORMAT = 1


class Component(Protocol):
    """A part of the run that saves and restores itself: tensors (safetensors) and JSON-able metadata."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first. Partial (temporary) folders are ignored."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name)) and (p / MARKER).exists()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save(components: dict[str, Component], root: Path, step: int, keep_last: int | None = None) -> Path:
    """Write a checkpoint of the components atomically; apply retention; return its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, component in components.items():
            tensors, meta = component.state_dict()
            if tensors:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          str(tmp / f"{name}.safetensors"))
            if meta:
                (tmp / f"{name}.json").write_text(json.dumps(meta))
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunesmithError(f"could not write checkpoint {final}: {e.strerror or e}",
                             "free disk space or fix permissions on the run folder; the previous checkpoint is "
                             "intact and `--resume auto` will use it") from None
    if keep_last:
        retain(root, keep_last)
    return final


def retain(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the newest), and stale temp folders."""
    dirs = checkpoint_dirs(root)
    for old in dirs[: max(0, len(dirs) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)


def load(components: dict[str, Component], path: Path) -> None:
    """Restore every component from a checkpoint folder (each from its own files)."""
    check_folder(path, components)
    for name, component in components.items():
        st, js = path / f"{name}.safetensors", path / f"{name}.json"
        tensors = load_file(str(st)) if st.exists() else {}
        meta = json.loads(js.read_text()) if js.exists() else {}
        component.load_state_dict(tensors, meta)


def check_folder(path: Path, components: dict[str, Component]) -> None:
    """A checkpoint holds only the safetensors and JSON files of the run's components; anything else (a
    pickle, a .pt/.bin file) is refused before any file is read, so it can never execute."""
    if not (path / MARKER).exists():
        raise TunesmithError(f"{path} is not a complete tunesmith checkpoint (no {MARKER} marker)",
                             "use --resume auto to pick the newest complete checkpoint")
    allowed = {MARKER} | {f"{n}.{ext}" for n in components for ext in ("safetensors", "json")}
    strangers = sorted(p.name for p in path.iterdir() if p.name not in allowed)
    if strangers:
        raise TunesmithError(f"checkpoint {path} contains files tunesmith never writes: {', '.join(strangers)}",
                             "tunesmith checkpoints hold only safetensors and JSON; it refuses to load anything "
                             "else (pickle files can run code). Remove the folder or resume from another one")


# ---------------------------------------------------------------- components every training run has

class TrainableWeights:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return dict(_trainable_names(self.model)), {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        names = _trainable_names(self.model)
        if set(tensors) != set(names):
            missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
            raise TunesmithError(f"the checkpoint does not match this run's trainable parameters "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                                 "resume with the same config the checkpoint was written with")
        with torch.no_grad():
            for n, p in names.items():
                p.copy_(tensors[n].to(p.device, p.dtype))


class OptimizerState:
    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module):
        self.optimizer, self.model = optimizer, model

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return _optimizer_state(self.optimizer, _trainable_names(self.model))

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if not meta:
            raise TunesmithError("the checkpoint has no optimizer state", "resume from a complete checkpoint")
        _load_optimizer(self.optimizer, _trainable_names(self.model), tensors, meta)


class RngState:
    """torch (CPU and CUDA), Python and NumPy generators of this process."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return _rng_state()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        _set_rng(tensors, meta)


def _trainable_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_state(opt: torch.optim.Optimizer, names: dict[str, torch.nn.Parameter]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    by_id = {id(p): n for n, p in names.items()}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for p, st in opt.state.items():
        name = by_id[id(p)]
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"{name}::{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[k] = float(v) if isinstance(v, torch.Tensor) else v
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [by_id[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return tensors, {"groups": groups, "scalars": scalars, "type": type(opt).__name__}


def _load_optimizer(opt: torch.optim.Optimizer, names: dict[str, torch.nn.Parameter],
                    tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if meta.get("type") != type(opt).__name__ or len(meta["groups"]) != len(opt.param_groups):
        raise TunesmithError("the checkpoint's optimizer does not match this run's",
                             "resume with the same config the checkpoint was written with")
    for group, saved in zip(opt.param_groups, meta["groups"], strict=True):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    opt.state.clear()
    for name, p in names.items():
        st: dict[str, Any] = {}
        for k, v in meta["scalars"].get(name, {}).items():
            st[k] = torch.tensor(v, dtype=torch.float32) if k == "step" else v
        prefix = f"{name}::"
        for key, t in tensors.items():
            if key.startswith(prefix):
                st[key[len(prefix):]] = t.to(p.device)
        if st:
            opt.state[p] = st


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(state), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, state, gauss = js["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

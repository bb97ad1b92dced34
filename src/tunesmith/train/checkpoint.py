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


def save(components: dict[str, Component], root: Path, step: int, keep_last: int | None = None,
         write: bool = True) -> Path:
    """Write a checkpoint of the components atomically; apply retention; return its folder. Every process
    calls this (gathering a sharded state is collective); only the one with `write` writes."""
    states = {name: component.state_dict() for name, component in components.items()}
    final = root / f"step-{step:06d}"
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, (tensors, meta) in states.items():
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
# Under DDP or FSDP2 the weights and optimizer state are gathered into full tensors on rank 0 (and spread
# back on resume) with torch.distributed.checkpoint's state-dict API, so a checkpoint has the same files
# whatever wrote it: one written by 2 processes resumes in 1, and the reverse.

def _distributed(parallel) -> bool:
    return parallel is not None and parallel.world_size > 1


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


POLICY_PREFIX = "model."  # train.loop.Policy holds the model as `.model`


class TrainableWeights:
    def __init__(self, model: torch.nn.Module, policy: torch.nn.Module | None = None, parallel=None):
        self.model, self.policy, self.parallel = model, policy, parallel

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        names = _trainable_names(self.model)
        if not _distributed(self.parallel):
            return dict(names), {}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.policy, options=_full_options(ignore_frozen_params=True))
        return {k[len(POLICY_PREFIX):]: v for k, v in full.items() if k[len(POLICY_PREFIX):] in names}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        names = _trainable_names(self.model)
        if set(tensors) != set(names):
            missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
            raise TunesmithError(f"the checkpoint does not match this run's trainable parameters "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                                 "resume with the same config the checkpoint was written with")
        if _distributed(self.parallel):
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.policy, {POLICY_PREFIX + k: v for k, v in tensors.items()},
                                 options=_full_options(strict=False))
            return
        with torch.no_grad():
            for n, p in names.items():
                p.copy_(tensors[n].to(p.device, p.dtype))


class OptimizerState:
    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 policy: torch.nn.Module | None = None, parallel=None):
        self.optimizer, self.model, self.policy, self.parallel = optimizer, model, policy, parallel

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        if not _distributed(self.parallel):
            return _optimizer_state(self.optimizer, _trainable_names(self.model))
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.policy, self.optimizer, options=_full_options())
        return _from_fqn_state(full, type(self.optimizer).__name__)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if not meta:
            raise TunesmithError("the checkpoint has no optimizer state", "resume from a complete checkpoint")
        if not _distributed(self.parallel):
            _load_optimizer(self.optimizer, _trainable_names(self.model), tensors, meta)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if meta.get("type") != type(self.optimizer).__name__:
            raise TunesmithError("the checkpoint's optimizer does not match this run's",
                                 "resume with the same config the checkpoint was written with")
        set_optimizer_state_dict(self.policy, self.optimizer, _to_fqn_state(tensors, meta),
                                 options=_full_options())


def _from_fqn_state(full: dict, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """torch.distributed.checkpoint's full optimizer state (keyed by parameter FQN) in tunesmith's layout."""
    cut = len(POLICY_PREFIX)
    tensors, scalars = {}, {}
    for fqn, st in full.get("state", {}).items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"{fqn[cut:]}::{k}"] = v
            else:
                scalars.setdefault(fqn[cut:], {})[k] = float(v)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [f[cut:] for f in g["params"]]}
              for g in full.get("param_groups", [])]
    return tensors, {"groups": groups, "scalars": scalars, "type": kind}


def _to_fqn_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        name, k = key.split("::", 1)
        state.setdefault(POLICY_PREFIX + name, {})[k] = t
    for name, sc in meta["scalars"].items():
        for k, v in sc.items():
            state.setdefault(POLICY_PREFIX + name, {})[k] = torch.tensor(v, dtype=torch.float32)
    groups = [{**{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"},
               "params": [POLICY_PREFIX + n for n in g["params"]]} for g in meta["groups"]]
    return {"state": state, "param_groups": groups}


class RngState:
    """torch (CPU and CUDA), Python and NumPy generators: of this process, or of every rank (gathered to
    rank 0). A resume at another world size gives rank r the state rank r mod (saved world size) had."""

    def __init__(self, parallel=None):
        self.parallel = parallel

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, js = _rng_state()
        if not _distributed(self.parallel):
            return tensors, js
        mine = json.dumps({"json": js, "tensors": {k: v.tolist() for k, v in tensors.items()}}).encode()
        ranks = [json.loads(b) for b in self.parallel.gather_bytes(mine)]
        out = {f"{k}.rank{r}": torch.tensor(v, dtype=torch.uint8) for r, st in enumerate(ranks)
               for k, v in st["tensors"].items()}
        return out, {"ranks": [st["json"] for st in ranks]}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "ranks" not in meta:  # written by one process
            _set_rng(tensors, meta)
            return
        r = (self.parallel.rank if self.parallel is not None else 0) % len(meta["ranks"])
        suffix = f".rank{r}"
        _set_rng({k[:-len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}, meta["ranks"][r])


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

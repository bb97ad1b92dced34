"""The parallel seam: everything that differs between one process and several lives here — joining the
process group, wrapping the model, and the reductions that make a step's maths independent of the number of
processes (units and metric sums over all ranks, the global gradient norm, one verdict on a non-finite step).
The loop calls these and never asks how many processes there are; the batch plan says which micro-batches
each rank runs.

Engines, all PyTorch's own: one process; DDP (`DistributedDataParallel`: a full replica per rank, gradients
all-reduced); FSDP2 (`fully_shard` per decoder layer and on the root: parameters, gradients and optimizer
state sharded across ranks). Both average gradients over ranks, so the loop multiplies each micro-batch's loss
by the world size: the step's gradient is then the sum over the global batch divided by its units, exactly as
in one process.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import math
import os

import torch

from ..errors import TunesmithError


class SingleProcess:
    """One process: every reduction is the identity."""

    engine = "none"
    why = "one process"
    rank = 0
    world_size = 1
    sharded = False  # parameters are DTensor shards (FSDP2)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resolve(self, module: torch.nn.Module, auto: str | None = None) -> str:
        return self.engine

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def accumulating(self, module: torch.nn.Module, last: bool):
        """The context of one micro-batch's backward; gradients are synchronised on the last one only."""
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks."""
        return list(values)

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def clip(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float:
        """Clip to `max_norm` by the global gradient norm (over every rank's shard); returns the norm."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads)  # a DTensor under FSDP2: the norm over every shard
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(_full(norm))

    def all_finite(self, *values: float) -> bool:
        """True when every rank saw only finite values, so every rank takes or skips the step together."""
        return all(math.isfinite(v) for v in values)

    def any(self, flag: bool) -> bool:
        """True when any rank says so (e.g. a stop signal that reached one process)."""
        return flag

    def same_on_every_rank(self, text: str, what: str) -> None:
        """Refuse to go on when ranks disagree on `text` (e.g. their configs)."""

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order (for results and states that are not tensors; no pickle)."""
        return [data]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Distributed(SingleProcess):
    """DDP or FSDP2 over a torch.distributed process group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, engine: str, device: torch.device, cpu_offload: bool = False):
        import torch.distributed as dist

        self.dist, self.engine, self.device, self.cpu_offload = dist, engine, device, cpu_offload
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sharded = engine == "fsdp"
        self.why = "train.parallel" if engine != "auto" else ""
        # gloo reduces CPU tensors; NCCL needs them on the GPU
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def resolve(self, module: torch.nn.Module, auto: str | None = None) -> str:
        """`auto` becomes `auto` when given, else DDP when a full replica fits on each device, FSDP2 otherwise."""
        if self.engine == "auto" and auto is not None:
            self.engine, self.sharded, self.why = auto, auto == "fsdp", f"auto: {auto} for this adapter kind"
        if self.engine == "auto":
            need, have = replica_bytes(module), device_bytes(self.device)
            self.engine = "ddp" if need <= have else "fsdp"
            self.sharded = self.engine == "fsdp"
            self.why = (f"auto: a full replica needs about {need / 2**30:.1f} GiB of the {have / 2**30:.1f} GiB "
                        f"each process has")
        return self.engine

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        self.resolve(module)
        if self.engine == "ddp":
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (RoPE tables) are the same on every rank: no need to send them before each forward
            names = inspect.signature(DistributedDataParallel).parameters
            quiet = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
            return DistributedDataParallel(module, device_ids=ids, **quiet)
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        extra = {"offload_policy": CPUOffloadPolicy()} if self.cpu_offload else {}
        for layer in decoder_layers(module):
            fully_shard(layer, **extra)
        return fully_shard(module, **extra)

    def accumulating(self, module: torch.nn.Module, last: bool):
        if self.engine == "ddp":
            return contextlib.nullcontext() if last else module.no_sync()
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        return self.sum_tensor(torch.tensor(values, dtype=torch.float64)).tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.comm_device).clone()
        self.dist.all_reduce(out)
        return out.to(t.device)

    def all_finite(self, *values: float) -> bool:
        bad = self.sum([0.0 if math.isfinite(v) else 1.0 for v in values])
        return not any(bad)

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def same_on_every_rank(self, text: str, what: str) -> None:
        digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.float64)
        lo, hi = digest.clone().to(self.comm_device), digest.clone().to(self.comm_device)
        self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
        self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise TunesmithError(f"the processes of this run disagree on {what}",
                                 "start every rank with the same config file, --set overrides and data")

    def gather_bytes(self, data: bytes) -> list[bytes]:
        return all_gather_bytes(data, self.comm_device)

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        self.barrier()  # the group itself lives until the process exits: see setup_parallel


def replica_bytes(module: torch.nn.Module) -> int:
    """A full replica's weights, plus fp32 gradient and AdamW moments for what trains, plus a quarter for
    activations and the framework: the rough test `train.parallel: auto` uses."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return int(1.25 * (weights + 12 * trained))


def device_bytes(device: torch.device) -> int:
    """Memory one process may use: the GPU's, or this machine's RAM shared by its local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the modules named in the model's `_no_split_modules`
    (transformers' own list of blocks that must stay whole)."""
    from ..model.unwrap import unwrap

    names: set[str] = set()
    for m in module.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in unwrap(module).modules() if type(m).__name__ in names]
    if not layers:
        raise TunesmithError(f"FSDP2 found no decoder layers to shard in {type(unwrap(module)).__name__}",
                             "use train.parallel: ddp for this model")
    return layers


def all_gather_bytes(data: bytes, device: torch.device, group=None) -> list[bytes]:
    """Every rank's bytes, in rank order (tensors, not pickled objects: ranks exchange only bytes)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(int(x) for x in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [p[:int(n)].cpu().numpy().tobytes() for p, n in zip(parts, sizes, strict=True)]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) when not launched by torchrun."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _leave(dist) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_parallel(requested: str = "auto", device: torch.device | None = None, *, cpu_offload: bool = False,
                   timeout_s: float = 600.0) -> SingleProcess:
    """The engine for this process. Under torchrun (WORLD_SIZE > 1) this joins the process group; `auto`
    picks, when the model is wrapped, DDP if a full replica fits on each device and FSDP2 otherwise."""
    _, world, _ = world_from_env()
    if world == 1 and (requested == "auto" or "RANK" not in os.environ):
        return SingleProcess()  # an engine asked for under torchrun with one process still runs (to measure it)
    import torch.distributed as dist

    if not dist.is_available():
        raise TunesmithError(f"started as one of {world} processes, but this PyTorch build has no "
                             "torch.distributed", "install a PyTorch build with distributed support, or train "
                             "in one process")
    engine = requested
    device = device or torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        # one group per process, reused by every stage: a second init in the same process after a destroy
        # waits forever on torchrun's store (the keys of the first rendezvous are already there)
        atexit.register(_leave, dist)
    return Distributed(engine, device, cpu_offload)

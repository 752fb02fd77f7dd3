"""
Runtime: torch.distributed setup, rank-0 printing, all-reduce helpers, seeding, RNG state.

Every script does the same thing at start and end:

    rt = dist.init(seed)        # DDP if launched by torchrun (RANK in env), else one process
    ...
    dist.cleanup()

NCCL on GPU, gloo on CPU. gloo has no ReduceOp.AVG, so means are sum / world_size.
"""

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as td


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def init(seed: int = 0, device: str = "auto", threads: int = 0) -> Runtime:
    """Start DDP when torchrun set RANK, pick the device, seed every RNG (offset by rank);
    threads > 0 sets torch's CPU threads (per process)."""
    if threads > 0:
        torch.set_num_threads(threads)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world = 0, 0, 1
    if ddp:
        env = os.environ
        rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        td.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    seed_all(seed + rank)  # different sampling per rank; model init is broadcast by DDP anyway
    return Runtime(ddp, rank, local_rank, world, dev)


class autocast:
    """The compute dtype's context: bf16 compute with fp32 master weights. Trained models stay
    fp32 (weights, gradients, AdamW state, updates) and their forwards run under torch.autocast
    in bf16; bf16 weights would round most small updates away (2 SFT steps at lr 2e-5 changed
    3.3% of a 135M model's bf16 weights). float32: a no-op. Usage: amp = autocast(dev, dtype);
    with amp(): ..."""

    def __init__(self, device, dtype):
        self.device_type, self.dtype = torch.device(device).type, dtype

    def __call__(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def cleanup():
    if td.is_available() and td.is_initialized():
        # without it a gloo worker can deadlock at exit freeing the last collective's tensors
        td.barrier()
        td.destroy_process_group()


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def barrier():
    if is_dist():
        td.barrier()


def print0(*args, **kwargs):
    if not is_dist() or td.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op in one process). Returns a new tensor."""
    t = t.detach().clone()
    if is_dist():
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks as sum / world: ReduceOp.AVG exists on NCCL only."""
    return all_reduce_sum(t) / (td.get_world_size() if is_dist() else 1)


def broadcast_object(obj, src: int = 0):
    """Rank src's obj on every rank (obj itself in a single process)."""
    if not is_dist():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a run touches, so a resumed run draws the same numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain lists and tensors only, so torch.load(weights_only=True) can read it back
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; a one-element list in a single process."""
    if not is_dist():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def gather_rng_states() -> list:
    """Every rank's RNG state, in rank order (rank 0 saves them all; each rank resumes its own)."""
    return gather_objects(rng_state())


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable, master: bool, **kw):
    """A tqdm bar on rank 0; redrawn at most every few seconds when writing to a log file."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not master, mininterval=0.1 if os.isatty(2) else 5.0, **kw)



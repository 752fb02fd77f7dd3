"""
Runtime: torch.distributed setup, rank-0 printing, all-reduce helpers, seeding, metrics.

Every script does the same thing at start and end:

    rt = dist.init(seed)        # DDP if launched by torchrun (RANK in env), else one process
    ...
    dist.cleanup()

NCCL on GPU, gloo on CPU. gloo has no ReduceOp.AVG, so means are sum / world_size.
"""

import contextlib
import json
import math
import os
import random
import time
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
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
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
        td.barrier()  # without it a gloo worker can deadlock at exit freeing the last collective's tensors
        td.destroy_process_group()


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


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


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        td.broadcast(t, src=src)
    return t


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
    """Every rank's RNG state, in rank order (rank 0 saves them all, so each rank resumes its own stream)."""
    return gather_objects(rng_state())


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cosine_lr(step: int, max_steps: int, lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr. A pure function of step, so resume needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_indices(n: int, step: int, global_batch: int, rank: int, world: int, seed: int, lengths=None) -> list:
    """The example indices this rank trains on at `step`: the data is one endless stream of
    seeded per-epoch permutations, each step takes the next global_batch of it, and each rank
    a contiguous slice. A pure function of step, so a resumed run sees exactly the same batches,
    and 2 ranks x b see the same examples as 1 rank x 2b.

    With `lengths` (a tuple, one per example) each permutation is grouped by length, as
    transformers' group_by_length: every run of 64 batches is sorted by length, cut into
    batches, and the batches shuffled. Each example still comes once per epoch, but a batch
    pads to far less (toy preference pairs: 1.4x fewer tokens per step)."""
    per_rank = global_batch // world
    out = []
    for p in range(step * global_batch + rank * per_rank, step * global_batch + (rank + 1) * per_rank):
        epoch, i = divmod(p, n)
        out.append(_perm(n, seed + epoch, lengths, global_batch)[i])
    return out


_perms = {}
GROUP_BATCHES = 64


def _perm(n, seed, lengths=None, batch=1):
    # keyed by id(lengths): the entry holds the tuple itself, so the id can't be reused meanwhile
    key = (n, seed, batch, id(lengths), GROUP_BATCHES)
    if key not in _perms:
        _perms.clear() if len(_perms) > 4 else None
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g).tolist()
        if lengths is not None:
            assert isinstance(lengths, tuple) and len(lengths) == n, "lengths: a tuple, one per example (the cache keeps it)"
            grouped, size = [], GROUP_BATCHES * batch
            for c in range(0, n, size):
                chunk = sorted(perm[c:c + size], key=lengths.__getitem__)  # stable: ties keep their random order
                batches = [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
                short = batches.pop() if len(batches[-1]) < batch else []  # stays last: the full ones stay aligned with steps
                grouped += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]] + short
            perm = grouped
        _perms[key] = (perm, lengths)
    return _perms[key][0]


def progress(iterable, master: bool, **kw):
    """A tqdm bar on rank 0; redrawn at most every few seconds when writing to a log file."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not master, mininterval=0.1 if os.isatty(2) else 5.0, **kw)


class MetricsLog:
    """metrics.jsonl: one JSON object per step, appended by rank 0. On resume, lines past the
    checkpoint's step are dropped so the file matches an uninterrupted run."""

    def __init__(self, path: str, master: bool, resume_step: int | None = None):
        self.path, self.master = path, master
        if not master:
            return
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                keep = [l for l in f if l.strip() and json.loads(l).get("step", -1) < resume_step]
            with open(path, "w") as f:
                f.writelines(keep)

    def log(self, record: dict):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class NanGuard:
    """Skip a step whose loss is not finite (counted), stop after `patience` in a row.
    The decision is all-reduced, so every rank skips the same steps."""

    def __init__(self, patience: int = 10):
        self.patience, self.in_a_row, self.skipped = patience, 0, 0

    def bad(self, *values: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if all(torch.isfinite(v).all() for v in values) else 1.0], device=values[0].device)
        bad = bool(all_reduce_sum(flag).item() > 0)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.skipped += bad
        if self.in_a_row >= self.patience:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row: stopping. The last checkpoint saved is intact; "
                f"try a lower learning rate, or check the data and the reward/cost models for inf scores.")
        return bad


class Stopwatch:
    """Where an iteration's time goes: lap(name) adds the seconds since the previous lap (or
    reset()) to `name`, so the phases of one iteration sum to its wall time. CUDA kernels run
    asynchronously, so on a GPU each lap first waits for them (a few syncs per iteration)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self):
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now

    def total(self) -> float:
        return sum(self.laps.values())

# -----------------------------------------------------------------------------
# FSDP2 (--fsdp): each rank holds 1/N of every parameter, gradient and AdamW state, and the
# blocks are all-gathered one at a time for their forward and backward (torch's fully_shard)

def shard(model, compute_dtype=torch.float32):
    """fully_shard every transformer block (the model's `_no_split_modules`: LlamaDecoderLayer,
    GPT2Block, ...), then the whole model, in place; a policy or a ScoreModel (its HF model is
    `.hf`). bf16 compute is FSDP's MixedPrecisionPolicy: fp32 sharded parameters, blocks
    gathered in bf16, gradients reduced in fp32. Build the optimiser after this, on the
    sharded parameters."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # public from torch 2.6 on
        from nanosafe.config import ConfigError
        raise ConfigError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch {torch.__version__}") from None
    hf = getattr(model, "hf", model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--fsdp: {type(hf).__name__} names no transformer block class (_no_split_modules) to shard by")
    mp = MixedPrecisionPolicy() if compute_dtype == torch.float32 else MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for b in blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(*models):
    """FSDP: all-gather these models' parameters once and keep them whole until the block ends.
    Generation runs one forward per token, which would otherwise all-gather every block at every
    token; and inside the block rank 0 alone may run the models (evaluation, calibration). Every
    rank must enter. Anything else: a no-op."""
    from torch.distributed.fsdp import FSDPModule
    roots = [m for m in models if is_sharded(m)]
    mods = [(root, m) for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
    for root, m in mods:
        if m is not root:  # the root keeps its parameters after forward anyway
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for root, m in mods:
            m.reshard()
            if m is not root:
                m.set_reshard_after_forward(True, recurse=False)


class no_sync:
    """Gradient accumulation without communication, for several models at once: DDP's no_sync(),
    FSDP's set_requires_gradient_sync(False). active=False (the last micro-batch): a no-op."""

    def __init__(self, models, active: bool):
        self.models = [m for m in models if active and (is_sharded(m) or hasattr(m, "no_sync"))]
        self.ctxs = []

    def __enter__(self):
        for m in self.models:
            if is_sharded(m):
                m.set_requires_gradient_sync(False)
            else:
                self.ctxs.append(m.no_sync())
                self.ctxs[-1].__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)
        for m in self.models:
            if is_sharded(m):
                m.set_requires_gradient_sync(True)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP parameter, FSDP's gradient norm) gathered into a plain tensor; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def value(t) -> float:
    """A scalar tensor's number, read whole under FSDP."""
    return float(_whole(t))


_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_state_dict(model) -> dict | None:
    """FSDP: the whole model's state dict on CPU, gathered from the shards (every rank must call;
    rank 0 saves it). Not sharded: None (the model's own state dict is already whole)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(**_FULL))


def optimizer_state(model, optimizer) -> dict:
    """The optimiser's state to save: FSDP's gathered into one full dict keyed by parameter name
    (every rank must call), else optimizer.state_dict()."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return {"fsdp": get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))}


def load_optimizer_state(model, optimizer, state: dict, where: str):
    """Inverse of optimizer_state; a checkpoint from the other mode (DDP vs --fsdp) is refused."""
    if is_sharded(model) != ("fsdp" in state):
        from nanosafe.config import ConfigError
        raise ConfigError(f"{where}: this checkpoint was saved {'with' if 'fsdp' in state else 'without'} --fsdp; "
                          f"resume it {'with' if 'fsdp' in state else 'without'} --fsdp too")
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state["fsdp"], options=StateDictOptions(full_state_dict=True))


def param_checksum(model) -> float:
    """Sum of every parameter (gathered when sharded): equal on every rank of a healthy run."""
    return sum(float(_whole(p).detach().double().sum()) for p in model.parameters())


FSDP_HELP = ("shard every trained and frozen model's parameters (and the gradients and AdamW state) over the torchrun "
             "processes with FSDP2 instead of replicating them (DDP): for models whose training state does not fit one GPU "
             "(README: Memory); needs torchrun")


def check_fsdp(rt: Runtime, fsdp: bool):
    if fsdp and not rt.ddp:
        from nanosafe.config import ConfigError
        raise ConfigError("--fsdp shards over torchrun's processes: launch with torchrun --nproc_per_node=N <script> --fsdp")

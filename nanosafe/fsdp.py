"""
FSDP2 (--fsdp): each rank holds 1/N of every parameter, gradient and AdamW state, and the
blocks are all-gathered one at a time for their forward and backward (torch's fully_shard).

Everything here is a no-op (or the plain single-model answer) for a model that is not sharded,
so the stage scripts call it unconditionally: `gathered(actor)` around a rollout,
`no_sync(models, active)` around gradient accumulation, `optimizer_state` at a checkpoint.
"""

import contextlib

import torch

from nanosafe.config import ConfigError


def check(rt, fsdp: bool):
    if fsdp and not rt.ddp:
        raise ConfigError("--fsdp shards over torchrun's processes: launch with "
                          "torchrun --nproc_per_node=N <script> --fsdp")


def shard(model, compute_dtype=torch.float32):
    """fully_shard every transformer block (the model's `_no_split_modules`: LlamaDecoderLayer,
    GPT2Block, ...), then the whole model, in place; a policy or a ScoreModel (its HF model is
    `.hf`). bf16 compute is FSDP's MixedPrecisionPolicy: fp32 sharded parameters, blocks
    gathered in bf16, gradients reduced in fp32. Build the optimiser after this."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # public from torch 2.6 on
        raise ConfigError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this "
                          f"is torch {torch.__version__}") from None
    hf = getattr(model, "hf", model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--fsdp: {type(hf).__name__} names no transformer block class "
                         f"(_no_split_modules) to shard by")
    mp = MixedPrecisionPolicy()
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for b in blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(*models):
    """All-gather these models' parameters once and keep them whole until the block ends.
    Generation runs one forward per token, which would otherwise all-gather every block at
    every token; and inside the block rank 0 alone may run the models (evaluation,
    calibration). Every rank must enter. Models that are not sharded: a no-op."""
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
    """Gradient accumulation without communication, for several models at once: DDP's
    no_sync(), FSDP's set_requires_gradient_sync(False). active=False (the last micro-batch):
    a no-op."""

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
    """A DTensor (an FSDP parameter, FSDP's gradient norm) gathered into a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def value(t) -> float:
    """A scalar tensor's number, read whole under FSDP."""
    return float(_whole(t))


_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_state_dict(model) -> dict | None:
    """The whole model's state dict on CPU, gathered from the shards (every rank must call;
    rank 0 saves it). Not sharded: None (the model's own state dict is already whole)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(**_FULL))


def optimizer_state(model, optimizer) -> dict:
    """The optimiser's state to save: FSDP's gathered into one full dict keyed by parameter
    name (every rank must call), else optimizer.state_dict()."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return {"fsdp": get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))}


def load_optimizer_state(model, optimizer, state: dict, where: str):
    """Inverse of optimizer_state; a checkpoint from the other mode (DDP vs --fsdp) is refused."""
    if is_sharded(model) != ("fsdp" in state):
        mode = "with" if "fsdp" in state else "without"
        raise ConfigError(f"{where}: this checkpoint was saved {mode} --fsdp; resume it {mode} "
                          f"--fsdp too")
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state["fsdp"],
                             options=StateDictOptions(full_state_dict=True))


def param_checksum(model) -> float:
    """Sum of every parameter (gathered when sharded): equal on every rank of a healthy run."""
    return sum(float(_whole(p).detach().double().sum()) for p in model.parameters())

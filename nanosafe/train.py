"""
What the stage scripts share around their own losses: the toy data's paths, the data order,
the lr schedule, metrics.jsonl, resuming, and the supervised step loop (train_sft.py and
train_pm.py differ only in their loss and evaluation).
"""

import math
import os
import sys

import torch

from nanosafe import data, dist, fsdp, toy
from nanosafe.config import ConfigError
from nanosafe.model import (
    STATE_FILE,
    CheckpointError,
    load_trainer_state,
    plain_weights,
    save_checkpoint,
)
from nanosafe.monitor import MetricsLog, NanGuard


def data_paths(cfg, rt, kind: str):
    """A stage's data: --train_data / --eval_data, or the toy world's {kind}_train / {kind}_test
    files (written by rank 0 if missing, the others wait). -> (toy_world, train, eval or None)"""
    toy_world = cfg.train_data is None
    if toy_world and rt.master:
        toy.ensure_dataset(cfg.data_dir, seed=0)
    dist.barrier()
    train = cfg.train_data or os.path.join(cfg.data_dir, f"{kind}_train.jsonl")
    held_out = cfg.eval_data or (os.path.join(cfg.data_dir, f"{kind}_test.jsonl")
                                 if toy_world else None)
    return toy_world, train, held_out


def check_out_dir(out_dir, cfg):
    """Refuse to write over a checkpoint unless asked: --resume continues it, --overwrite
    replaces it."""
    if not cfg.resume and not cfg.overwrite and os.path.exists(os.path.join(out_dir, STATE_FILE)):
        raise ConfigError(f"--out_dir {out_dir} already holds a checkpoint: --resume continues it, "
                          f"--overwrite replaces it; or give another --out_dir")


def cosine_lr(step: int, max_steps: int, lr: float, warmup_steps: int = 0,
              min_lr_ratio: float = 0.0) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr. A pure function of step, so resume
    needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_indices(n: int, step: int, global_batch: int, rank: int, world: int, seed: int,
                 lengths=None) -> list:
    """The example indices this rank trains on at `step`: the data is one endless stream of
    seeded per-epoch permutations, each step takes the next global_batch of it, and each rank
    a contiguous slice. A pure function of step, so a resumed run sees exactly the same
    batches, and 2 ranks x b see the same examples as 1 rank x 2b.

    With `lengths` (a tuple, one per example) each permutation is grouped by length, as
    transformers' group_by_length: every run of 64 batches is sorted by length, cut into
    batches, and the batches shuffled. Each example still comes once per epoch, but a batch
    pads to far less (toy preference pairs: 1.4x fewer tokens per step)."""
    per_rank = global_batch // world
    out = []
    start = step * global_batch + rank * per_rank
    for p in range(start, start + per_rank):
        epoch, i = divmod(p, n)
        out.append(_perm(n, seed + epoch, lengths, global_batch)[i])
    return out


_perms = {}
GROUP_BATCHES = 64


def _perm(n, seed, lengths=None, batch=1):
    # keyed by id(lengths): the entry holds the tuple itself, so the id can't be reused meanwhile
    key = (n, seed, batch, id(lengths), GROUP_BATCHES)
    if key not in _perms:
        if len(_perms) > 4:
            _perms.clear()
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g).tolist()
        if lengths is not None:
            assert isinstance(lengths, tuple) and len(lengths) == n, \
                "lengths: a tuple, one per example (the cache keeps it)"
            grouped, size = [], GROUP_BATCHES * batch
            for c in range(0, n, size):
                # stable: ties keep their random order
                chunk = sorted(perm[c:c + size], key=lengths.__getitem__)
                batches = [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
                # a short batch stays last: the full ones stay aligned with steps
                short = batches.pop() if len(batches[-1]) < batch else []
                order = torch.randperm(len(batches), generator=g).tolist()
                grouped += [i for b in order for i in batches[b]] + short
            perm = grouped
        _perms[key] = (perm, lengths)
    return _perms[key][0]


def resume(out_dir, rt, model, optimizer) -> int:
    """Load a supervised stage's optimiser and RNG state -> the step to start at."""
    state = load_trainer_state(out_dir)
    fsdp.load_optimizer_state(model, optimizer, state["optimizer"], out_dir)
    dist.set_rng_state(state["rng"][rt.rank])
    dist.print0(f"resumed from {out_dir} at step {state['step']}")
    return state["step"]


def save(out_dir, rt, model, tok, optimizer, meta, step, final):
    """A supervised stage's checkpoint: the HF folder, plus (unless final, and then only to
    --resume past the end) the optimiser and every rank's RNG state. Every rank calls it: FSDP
    gathers the weights and the optimiser state, rank 0 writes."""
    rngs = dist.gather_rng_states()
    weights = plain_weights(model)
    opt_state = None if final else fsdp.optimizer_state(model, optimizer)
    if rt.master:
        trainer_state = None if final else {"optimizer": opt_state, "step": step, "rng": rngs}
        save_checkpoint(out_dir, model, tok, dict(meta, step=step), trainer_state,
                        weights={"": weights})


def fit(rt, model, optimizer, cfg, out_dir, max_steps, start_step, step_loss, evaluate, save):
    """The supervised step loop: lr schedule, one step's loss and backward (`step_loss(step)`
    -> (the global mean loss, metrics)), the NaN guard, the clipped update, evaluation
    (`evaluate(step)` -> metrics, or {}), metrics.jsonl, and a checkpoint every ckpt_every
    steps (`save(step, final)`). -> the last metrics record."""
    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), rt.master,
                         start_step if cfg.resume else None)
    guard = NanGuard()
    model.train()
    pbar = dist.progress(range(start_step, max_steps), rt.master, initial=start_step,
                         total=max_steps, desc=os.path.basename(out_dir))
    rec = {}
    for step in pbar:
        lr = cosine_lr(step, max_steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, extra = step_loss(step)
        if guard.bad(loss):  # skip the update and its metrics line, not the checkpoint below
            optimizer.zero_grad(set_to_none=True)
            dist.print0(f"step {step}: non-finite loss, skipped ({guard.skipped} so far)")
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rec = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": fsdp.value(grad_norm),
                   **extra, "skipped": guard.skipped, **evaluate(step)}
            metrics.log(rec)
            pbar.set_postfix({k: f"{v:.3f}" for k, v in rec.items()
                              if k in ("loss", "eval_loss", "eval_accuracy")}, refresh=False)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == max_steps:
            save(step + 1, final=step + 1 == max_steps and not cfg.save_optimizer)
    rec["skipped_steps"] = guard.skipped
    return rec


def run(main, cfg):
    """A script's main(cfg), with the errors a user can fix as one line each."""
    try:
        main(cfg)
    except (data.DataError, CheckpointError, ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

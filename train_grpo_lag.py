"""
Lagrangian GRPO: PPO-Lagrangian without critics. Each prompt is answered G times, and an
answer's advantage is its group z-score (Shao et al. 2024, DeepSeekMath), per stream:

    A = (Z_R - Σ λ_k·Z_Ck) / (1 + Σ λ_k),   Z = (score - group mean) / group std

the same for every token of the answer. The KL to the reference is a loss term (β·k3) instead
of a per-token reward. The rollout, the scores, d, λ and its window are PPO-Lag's (rl.py,
lagrange.py), so the two scripts differ only in steps 3-6.

    python train_grpo_lag.py                      # toy world, after train_pm.py -> out/grpo_lag
    python train_grpo_lag.py --group_size 8 --grpo_std batch
"""

import os
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosafe import config, constraints, dist, fsdp, lagrange, monitor, ppo, rl, train
from nanosafe.config import arg
from nanosafe.model import load_trainer_state
from nanosafe.rl import action_logprobs


@dataclass
class Config(rl.Config):
    """Lagrangian GRPO: G answers per prompt, group-normalised advantages, no critics."""
    algo = "grpo_lag"  # not a flag: the run's name (out/grpo_lag, metrics, summary)
    group_size: int = arg(4, "G: answers per prompt, z-scored within their group; divides "
                          "--rollout_batch_size", group="PPO", check=">=2")
    grpo_std: str = arg("group", "divide the group-centred scores by the group's own std (GRPO) or "
                        "the batch's (docs/experiments.md)", ["group", "batch"], group="PPO")


Config = config.extend(Config, constraints.flags())  # each constraint kind's own flags


def update(cfg, rt, amp, actor, ddp_actor, opt, ro, old_logp, ref_logp, R, C, dual, mon):
    """PPO epochs over minibatches; per minibatch, PPO-Lag's dual step on its episode costs, then
    the clipped surrogate on A(λ) plus β·k3 KL to the reference. -> (stats, J at the last step)"""
    seq, attn, mask, P = ro.seq, ro.attn, ro.mask, ro.P
    n_micro = cfg.minibatch_size // cfg.micro_batch_size
    stats = {"policy_loss": [], "clip_frac": [], "ratio": [], "entropy": []}
    lambdas, windows = dual
    J = []
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(seq.shape[0], device=rt.device).split(cfg.minibatch_size):
            J = lagrange.dual_step(lambdas, windows, C, mb)  # as PPO-Lag: once per actor step
            # no critics, no per-token rewards: one advantage per answer, on all its tokens
            A = ppo.grpo_lag_advantage(R, C, [lam.value for lam in lambdas], cfg.group_size,
                                       cfg.grpo_std)
            A = A.unsqueeze(-1).expand_as(old_logp)
            micro_losses = []
            for i, mi in enumerate(mb.split(cfg.micro_batch_size)):
                with fsdp.no_sync([ddp_actor], rt.ddp and i < n_micro - 1):
                    with amp():
                        new_logp, ent = action_logprobs(ddp_actor, seq[mi], attn[mi], P, True)
                    pl, st = ppo.policy_loss(new_logp, old_logp[mi], A[mi], mask[mi],
                                             cfg.clip_range_ratio)
                    # the KL as a loss term: the k3 estimator (DeepSeekMath, TRL's GRPO)
                    kl = ppo.seq_mean(ppo.kl_k3(new_logp, ref_logp[mi]), mask[mi])
                    loss = pl + cfg.kl_coef * kl
                    (loss / n_micro).backward()
                micro_losses.append(loss.detach())
                stats["policy_loss"].append(pl.detach())
                stats["clip_frac"].append(st["clip_frac"])
                stats["ratio"].append(st["ratio"])
                stats["entropy"].append(ppo.masked_mean(ent.detach(), mask[mi]))
            if mon.bad(torch.stack(micro_losses)):
                opt.zero_grad(set_to_none=True)
                continue
            torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return stats, J


def main(cfg):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    fsdp.check(rt, cfg.fsdp)
    rl.check_flags(cfg)
    G = cfg.group_size
    if G < 2 or cfg.rollout_batch_size % G:
        raise config.ConfigError(f"--group_size ({G}) must be >= 2 and divide "
                                 f"--rollout_batch_size ({cfg.rollout_batch_size}): each prompt's "
                                 f"G answers are z-scored against each other")
    constraints.check_given(cfg)
    dtype = getattr(torch, cfg.dtype)
    amp = dist.autocast(rt.device, dtype)
    out_dir = cfg.out_dir or f"out/{cfg.algo}"

    # ---- prompts, models (no critics), constraints, thresholds and multipliers
    train.check_out_dir(out_dir, cfg)
    toy_world, train_prompts, eval_prompts, gold = rl.prompts(cfg, rt)
    if any("dialogue" in r for r in train_prompts):
        raise config.ConfigError("--train_data holds dialogues ('dialogue' specs): "
                                 "train_ppo_lag.py trains on them; GRPO-Lag takes single prompts")
    labeller = rl.toy_labeller if toy_world else None
    actor, ref, reward_model, cons, _, tok, template = rl.load_models(
        cfg, rt, out_dir, dtype, lambda: constraints.build(cfg, dtype, labeller), "none")
    names = constraints.stream_names(cons)
    reference = rl.reference_logprobs(ref)
    reward = rl.reward_scores(cfg, reward_model, toy_world)  # the reward model's end score
    layers = sorted({c.layer for c in cons if c.layer is not None})
    train_set = rl.prompt_dataset(cfg, train_prompts, tok, template)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens)
    state = load_trainer_state(out_dir) if cfg.resume else None
    thresholds, calib = rl.set_thresholds(cfg, rt, actor, cons, train_set, tok, amp, layers, state,
                                          out_dir, sampling)
    lambdas, windows = rl.multipliers(cfg, thresholds)
    opt = rl.adamw(actor, cfg.actor_lr, cfg.weight_decay)
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)
    start = 0
    if state:
        start = rl.resume(state, out_dir, rt, actor, opt, {}, {}, lambdas, windows, cons, gen,
                          cfg.lora_rank > 0)
    ddp_actor = DDP(actor) if rt.ddp and not cfg.fsdp else actor
    rl.describe(cfg, rt, actor, train_set, names, {})
    os.makedirs(out_dir, exist_ok=True)
    meta = {"kind": "policy", "stage": cfg.algo, "template": template, "constraints": names,
            "thresholds": thresholds, "cost_scales": constraints.stream_scales(cons),
            "calibration": calib, "args": config.to_dict(cfg)}
    gold_eval = gold and rl.gold_evaluator(cfg, rt, actor, tok, eval_prompts, template, amp)
    mon = monitor.Monitor(cfg, rt, out_dir, start, cons, gold_eval, gold and toy_world)

    def save(step):
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            final = step + 1 == cfg.max_steps and not cfg.save_optimizer
            rl.save(out_dir, actor, {}, tok, meta, step + 1, opt, {}, lambdas, windows, cons, gen,
                    rt, final)

    for step in mon:
        mon.start(step)
        # 1. rollout: each prompt G times, in consecutive rows
        idx = rl.rollout_indices(len(train_set), step, cfg.rollout_batch_size, G, rt, cfg.seed)
        with amp(), fsdp.gathered(actor):
            ro, old_logp = rl.sample(actor, [train_set[i] for i in idx], tok, gen, rt.device,
                                     layers, **sampling)
        mon.lap("generate")
        # 2. scores
        with torch.no_grad(), amp():
            ref_logp = reference(ro.seq, ro.attn, ro.P)
            R = reward(ro)
            C = constraints.costs(cons, ro)
        mon.lap("scores")
        if mon.bad(R, *C, old_logp, ref_logp):
            dist.print0(f"iteration {step}: non-finite scores or log-probs, skipped")
            save(step)
            continue
        rl.observe(cons, ro, C, step, lambdas, meta)  # a refreshed probe moves its d
        mon.lap("advantages")
        # 3-6. per actor step: λ on its episode costs, then the actor's loss on A(λ)
        stats, J = update(cfg, rt, amp, actor, ddp_actor, opt, ro, old_logp, ref_logp, R, C,
                          (lambdas, windows), mon)
        mon.lap("update")
        mon.end(step, ro, R, C, old_logp, ref_logp, [lam.value for lam in lambdas],
                meta["thresholds"], J, stats)
        save(step)

    rl.finish(cfg, rt, out_dir, actor, lambdas, names, meta, mon, gold_eval)


if __name__ == "__main__":
    train.run(main, config.parse(Config, description=__doc__))

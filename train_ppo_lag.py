"""
Stage 3 of Safe RLHF: PPO-Lagrangian. Maximise reward subject to E[cost] <= d:

    max_θ min_{λ>=0}  J_r(θ) - λ·(J_c(θ) - d)

One iteration (a "step"), top to bottom in main() below:
  1. rollout   sample answers to a batch of prompts with our generation loop
  2. scores    R = reward model, C_k = constraint k, at each answer's last token (its EOS);
               a dialogue: at each assistant turn's last token (nanosafe/dialogue.py)
  3. KL        per token: reward stream -β·KL + R at the end, cost streams +β·KL + C_k at the end
               (a cost model on the rate scale: both over its unit u_k = ū - s̄, as C_k is)
  4. GAE       advantages and returns per stream, from the reward critic and the cost critics
  5. λ         per actor step: log λ_k += lr·λ_k·(J_ck - d_k), J_ck = mean episode cost of a
               window of recent episodes (that step's included)
  6. losses    then that step: actor PPO clip on A = (A_r - Σ λ_k·A_ck) / (1 + Σ λ_k/u_k), critics
               clipped value loss

The pure functions are in nanosafe/ppo.py, the multiplier in nanosafe/lagrange.py, the rollout
in nanosafe/rl.py, what a cost is in nanosafe/constraints.py. The baselines run the same loop:
--algo ppo is PPO-Lag with no constraint, --algo reward_shaping one stream with reward R - ν·ΣC.
The critic-free Lagrangian GRPO is train_grpo_lag.py.

    python train_ppo_lag.py                                  # toy world, after train_pm.py
    python train_ppo_lag.py --algo ppo                       # -> out/ppo
    python train_ppo_lag.py --algo reward_shaping --shaping_coef 1.0
    python train_ppo_lag.py --cost_models out/cm_violence out/cm_fraud --thresholds -3 -3
    python train_ppo_lag.py --banned_words police hotline    # a rule beside the cost model
    torchrun --nproc_per_node=2 train_ppo_lag.py

Deliberate simplifications (see README): one rollout per prompt, no ptx (pretraining) loss,
no EMA actor, no advantage whitening (as the official PPO-Lag), no reward normalisation.
"""

import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosafe import config, constraints, dist, fsdp, lagrange, monitor, ppo, rl, train
from nanosafe.config import arg
from nanosafe.model import load_trainer_state
from nanosafe.rl import action_logprobs, action_values, column, rows


@dataclass
class Config(rl.Config):
    """Stage 3: PPO-Lagrangian (and the PPO / reward-shaping baselines)."""
    algo: str = arg("ppo_lag", "ppo_lag: constrained; ppo: reward only; reward_shaping: reward "
                    "R - ν·ΣC", ["ppo_lag", "ppo", "reward_shaping"], group="PPO")
    critic_lr: float = arg(5e-4, "critic learning rate (official: 5e-6)", group="PPO", check=">=0",
                           pretrained=5e-6)
    critic_weight_decay: float = arg(0.01, "critic AdamW weight decay (official: 0.0)",
                                     group="PPO", check=">=0", pretrained=0.0)
    clip_range_value: float = arg(5.0, "value clip (official: 5.0)", group="PPO", check=">0")
    clip_range_score: float = arg(50.0, "clamp per-token rewards and costs (official: 50)",
                                  group="PPO", check=">0")
    gamma: float = arg(1.0, "discount (official: 1.0)", group="PPO", check="[0,1]")
    gae_lambda: float = arg(0.95, "GAE λ (official: 0.95)", group="PPO", check="[0,1]")
    shaping_coef: float = arg(1.0, "ν for --algo reward_shaping: reward R - ν·ΣC",
                              group="PPO", check=">=0")


Config = config.extend(Config, constraints.flags())  # each constraint kind's own flags

# -----------------------------------------------------------------------------
# 5-6. λ and the losses: PPO epochs over minibatches of one rollout batch


def update(cfg, rt, amp, models, opts, ro, old_logp, adv, old_values, ret, heads, C, dual, mon):
    """Per minibatch, one optimizer step of each model: first the dual step on that minibatch's
    episode costs, then the actor's clipped surrogate on A(λ), each critic's clipped value loss
    on the returns of the streams it predicts; micro-batches accumulate gradients.
    -> per-micro-batch stats for the metrics line, and J per stream at the last step."""
    (actor, ddp_actor, critics, ddp_critics), (actor_opt, critic_opts) = models, opts
    predicts = defaultdict(list)  # critic -> the (stream, column) pairs it predicts
    for s, (critic, col) in heads.items():
        predicts[critic].append((s, col))
    seq, attn, mask, P = ro.seq, ro.attn, ro.mask, ro.P
    n_micro = cfg.minibatch_size // cfg.micro_batch_size
    stats = {"policy_loss": [], "clip_frac": [], "ratio": [], "entropy": []}
    stats |= {f"value_loss_{n}": [] for n in critics}
    lambdas, windows, units = dual
    J = []
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(seq.shape[0], device=rt.device).split(cfg.minibatch_size):
            # 5. the dual step, before the actor's (as official); the window's mean is pooled
            #    over ranks, so every rank takes the same step
            J = lagrange.dual_step(lambdas, windows, C, mb)
            A = ppo.combined_advantage(adv["reward"], [adv[k] for k in range(len(lambdas))],
                                       [lam.value for lam in lambdas], units)
            micro_losses = []  # every micro-batch's loss is checked: one nan poisons the sum
            for i, mi in enumerate(mb.split(cfg.micro_batch_size)):
                with fsdp.no_sync([ddp_actor, *ddp_critics.values()], rt.ddp and i < n_micro - 1):
                    with amp():
                        new_logp, ent = action_logprobs(ddp_actor, seq[mi], attn[mi],
                                                        rows(P, mi), True)
                    pl, st = ppo.policy_loss(new_logp, old_logp[mi], A[mi], mask[mi],
                                             cfg.clip_range_ratio)
                    loss = pl
                    for name, critic in ddp_critics.items():
                        with amp():
                            v = action_values(critic, seq[mi], attn[mi], rows(P, mi))
                        vl = sum(ppo.value_loss(column(v, col), column(old_values[name][mi], col),
                                                ret[s][mi], mask[mi], cfg.clip_range_value)
                                 for s, col in predicts[name])
                        loss = loss + vl  # separate models and optimisers: one backward for all
                        stats[f"value_loss_{name}"].append(vl.detach())
                    (loss / n_micro).backward()
                micro_losses.append(loss.detach())
                stats["policy_loss"].append(pl.detach())
                stats["clip_frac"].append(st["clip_frac"])
                stats["ratio"].append(st["ratio"])
                stats["entropy"].append(ppo.masked_mean(ent.detach(), mask[mi]))
            if mon.bad(torch.stack(micro_losses)):
                for o in [actor_opt, *critic_opts.values()]:
                    o.zero_grad(set_to_none=True)
                continue
            for m, o in [(actor, actor_opt)] + [(critics[n], critic_opts[n]) for n in critics]:
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
                o.step()
                o.zero_grad(set_to_none=True)
    return stats, J

# -----------------------------------------------------------------------------


def main(cfg):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    fsdp.check(rt, cfg.fsdp)
    rl.check_flags(cfg)
    lagrangian, lora = cfg.algo == "ppo_lag", cfg.lora_rank > 0
    if cfg.algo != "ppo":
        constraints.check_given(cfg)
    dtype = getattr(torch, cfg.dtype)  # the frozen models' weights; the trained ones stay fp32
    amp = dist.autocast(rt.device, dtype)
    out_dir = cfg.out_dir or f"out/{cfg.algo}"

    # ---- prompts, models and constraints; the streams k = 0..K-1, each with its d_k, λ_k, window
    train.check_out_dir(out_dir, cfg)
    toy_world, train_prompts, eval_prompts, gold = rl.prompts(cfg, rt)
    labeller = rl.toy_labeller if toy_world else None
    actor, ref, reward_model, cons, critics, tok, template = rl.load_models(
        cfg, rt, out_dir, dtype, lambda: constraints.build(cfg, dtype, labeller),
        "all" if lagrangian else "reward")
    names = constraints.stream_names(cons)
    reference = rl.reference_logprobs(ref)  # LoRA: the actor with its adapters off
    reward = rl.reward_scores(cfg, reward_model, toy_world)  # the reward model's end score
    # stream -> (its critic, the critic's output column): a K-output cost critic has K
    streams = [(f"cost_critic_{j}", col) for j, c in enumerate(cons) for col in range(len(c.names))]
    heads = {"reward": ("reward_critic", 0)} | (dict(enumerate(streams)) if lagrangian else {})
    layers = sorted({c.layer for c in cons if c.layer is not None})  # hidden states they read
    train_set = rl.prompt_dataset(cfg, train_prompts, tok, template)
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens)
    state = load_trainer_state(out_dir) if cfg.resume else None
    # reward shaping reads the costs on the same scale, so it is calibrated too (its d unused)
    thresholds, calib = rl.set_thresholds(cfg, rt, actor, cons, train_set, tok, amp, layers, state,
                                          out_dir, sampling, calibrate=cfg.algo != "ppo")
    lambdas, windows = rl.multipliers(cfg, thresholds) if lagrangian else ([], [])

    # ---- optimisers (LoRA: the adapters only); resume; DDP
    actor_opt = rl.adamw(actor, cfg.actor_lr, cfg.weight_decay)
    critic_opts = {n: rl.adamw(c, cfg.critic_lr, cfg.critic_weight_decay)
                   for n, c in critics.items()}
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # rollouts
    start = 0
    if state:
        start = rl.resume(state, out_dir, rt, actor, actor_opt, critics, critic_opts, lambdas,
                          windows, cons, gen, lora)
    ddp = rt.ddp and not cfg.fsdp  # FSDP shards the models in place
    models = (actor, DDP(actor) if ddp else actor, critics,
              {n: DDP(c) if ddp else c for n, c in critics.items()})
    rl.describe(cfg, rt, actor, train_set, names, critics)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"kind": "policy", "stage": cfg.algo, "template": template, "constraints": names,
            "thresholds": thresholds, "cost_scales": constraints.stream_scales(cons),
            "calibration": calib, "args": config.to_dict(cfg)}
    gold_eval = gold and rl.gold_evaluator(cfg, rt, actor, tok, eval_prompts, template, amp)
    mon = monitor.Monitor(cfg, rt, out_dir, start, cons, gold_eval, gold and toy_world)

    def save(step):
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            # the final folder holds the policy alone: critics and AdamW state only serve a resume
            final = step + 1 == cfg.max_steps and not cfg.save_optimizer
            rl.save(out_dir, actor, critics, tok, meta, step + 1, actor_opt, critic_opts, lambdas,
                    windows, cons, gen, rt, final)

    # ---- the loop
    for step in mon:
        mon.start(step)

        # 1. rollout: the actor samples (FSDP: gathered once for all its tokens); pads after EOS
        idx = rl.rollout_indices(len(train_set), step, cfg.rollout_batch_size, 1, rt, cfg.seed)
        with amp(), fsdp.gathered(actor):
            ro, old_logp = rl.sample(actor, [train_set[i] for i in idx], tok, gen, rt.device,
                                     layers, **sampling)
        mask = ro.mask
        mon.lap("generate")

        # 2. scores: reference log-probs, R and C_k at each answer's end, old values (eval mode)
        with torch.no_grad(), amp():
            ref_logp = reference(ro.seq, ro.attn, ro.P)
            R = reward(ro)
            C = constraints.costs(cons, ro)  # one [B] per stream (a dialogue: [B, turns])
            old_values = rl.critic_values(critics, ro)  # eval mode, as the official code
        mon.lap("scores")
        if mon.bad(R, *C, old_logp, ref_logp):
            dist.print0(f"iteration {step}: non-finite scores or log-probs, skipped")
            save(step)  # a skipped last iteration still leaves the final checkpoint
            continue
        rl.observe(cons, ro, C, step, lambdas, meta)  # a refreshed probe moves its d

        # 3. per-token rewards and costs: -β·KL in the reward stream, +β·KL in each cost stream
        #    a rate-scale stream is the raw one over its unit ū − s̄, its KL share too
        end_reward = R - cfg.shaping_coef * sum(C) if cfg.algo == "reward_shaping" else R
        units = constraints.stream_units(cons) if lagrangian else []
        rewards, costs = ppo.kl_rewards(end_reward, C if lagrangian else [], old_logp, ref_logp,
                                        mask, cfg.kl_coef, cfg.clip_range_score, units, ro.ends)

        # 4. GAE per stream, on its critic's values
        adv, ret = {}, {}
        for s, r in zip(heads, [rewards, *costs]):
            critic, col = heads[s]
            adv[s], ret[s] = ppo.gae(r, column(old_values[critic], col), mask, cfg.gamma,
                                     cfg.gae_lambda)

        mon.lap("advantages")

        # 5-6. per actor step: λ on that step's episode costs, then the actor on
        #      A = (A_r - Σ λ_k·A_ck) / (1 + Σ λ_k/u_k) and the critics on their returns
        stats, J = update(cfg, rt, amp, models, (actor_opt, critic_opts), ro, old_logp, adv,
                          old_values, ret, heads, C, (lambdas, windows, units), mon)
        mon.lap("update")
        mon.end(step, ro, R, C, old_logp, ref_logp, [lam.value for lam in lambdas],
                meta["thresholds"] if lagrangian else [], J, stats)
        save(step)

    rl.finish(cfg, rt, out_dir, actor, lambdas, names, meta, mon, gold_eval)


if __name__ == "__main__":
    train.run(main, config.parse(Config, description=__doc__))

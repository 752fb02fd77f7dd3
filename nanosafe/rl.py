"""
What the RL scripts (train_ppo_lag.py, train_grpo_lag.py) share: the rollout and the forwards
over it, the calibration of the thresholds, and the setup around the loop (models, multipliers,
checkpoints, resume). The iteration itself is in the scripts, top to bottom.

Shapes: seq [B, P + T] is the left-padded prompt then the answer (EOS, then pads); an action
is an answer token, so log-probs, values, rewards and masks are [B, T]. A dialogue (prompts with
a 'dialogue' spec, nanosafe/dialogue.py) is one left-padded sequence of all its turns; its
actions are the assistant's tokens wherever they sit (ro.P holds their columns, [B, T]), so
[B, T] holds and GAE runs over the whole dialogue: the user's tokens are never actions.
"""

import json
import os
from dataclasses import dataclass, field

import torch

from nanosafe import config, constraints, data, dist, fsdp, ppo, toy
from nanosafe.config import arg
from nanosafe.evaluate import gold_evaluate, gold_evaluate_dialogues
from nanosafe.generate import forward_params, generate, response_mask
from nanosafe.generate import position_ids_from_mask as position_ids
from nanosafe.lagrange import EpisodeCostWindow, Lagrange
from nanosafe.lora import adapters_off, add_lora, load_lora_state, lora_layers, lora_state
from nanosafe.model import (
    check_same_tokenizer,
    gradient_checkpointing,
    load_policy,
    load_score_model,
    place,
    plain_weights,
    read_state,
    recover_checkpoint,
    require_stage,
    resolve_template,
    save_checkpoint,
)
from nanosafe.train import data_paths, step_indices


@dataclass
class Rollout:
    """One batch of answers, as the loop and the constraints see it."""
    seq: torch.Tensor    # [B, P + T] left-padded prompt, then the answer (EOS, then pads)
    attn: torch.Tensor   # [B, P + T] 1 = real token
    mask: torch.Tensor   # [B, T] the answer's real tokens, EOS included
    P: int               # prompt columns
    tok: object          # the tokenizer
    prompts: list        # the raw user requests
    hidden: dict = field(default_factory=dict)  # layer -> the actor's hidden states [B, P + T, H]
    _answers: list = None
    # a dialogue: P is pos [B, T], each action's column in seq; ends [B, N] the action index of
    # each assistant turn's last token; turns the answers per turn; specs the dialogue specs
    ends: torch.Tensor | None = None
    turns: list | None = None
    specs: list | None = None

    def answers(self) -> list:
        """The answer texts (decoded once); a dialogue's turns joined by spaces."""
        if self._answers is None:
            if self.turns is not None:
                self._answers = [" ".join(t) for t in self.turns]
            else:
                self._answers = [self.tok.decode(row[m], skip_special_tokens=True).strip()
                                 for row, m in zip(self.seq[:, self.P:], self.mask)]
        return self._answers

    def tokens(self) -> torch.Tensor:
        """The action token ids [B, T] (the answer; a dialogue: the assistant's tokens)."""
        return self.seq[:, self.P:] if isinstance(self.P, int) else self.seq.gather(1, self.P)

    def per_turn(self, x) -> torch.Tensor:
        """A score model's per-token output [B, L] (or [B, L, K]) read at each assistant turn's
        last token -> [B, N] (or [B, N, K]): a causal model's score there is the score of the
        dialogue up to that turn."""
        at = self.P.gather(1, self.ends)
        if x.dim() == 3:
            return x.gather(1, at[..., None].expand(-1, -1, x.shape[-1]))
        return x.gather(1, at)


def rows(P, idx):
    """The answer columns of rows idx: P itself (an int), or a dialogue's positions P[idx]."""
    return P if isinstance(P, int) else P[idx]

# -----------------------------------------------------------------------------
# the rollout, and the forwards over [prompt | answer]


@torch.no_grad()
def sample(actor, items, tok, gen, device, layers=(), *, max_new_tokens, temperature=1.0,
           top_p=1.0, min_new_tokens=0):
    """Answers to prompt items (with input_ids) -> (Rollout, old_logp [B, T]). The one place
    rollouts are made: training and calibration score exactly these token ids. old_logp, the
    log-probs PPO's ratio starts from, come with the samples (as TRL's): the official code runs
    the actor over the answers once more, which gives the same numbers (a test checks it).
    With `layers`, the actor's hidden states there (one more forward) for the constraints.
    Dialogue items (a 'dialogue' spec): sample_dialogues."""
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    min_new_tokens=min_new_tokens)
    if "dialogue" in items[0]:
        if layers:
            raise config.ConfigError("constraints that read hidden states (probes) do not "
                                     "support dialogues yet")
        return sample_dialogues(actor, items, tok, gen, device, **sampling)
    batch = data.collate_prompts(items, tok.pad_token_id)
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    P = prompt_ids.shape[1]
    seq, old_logp = generate(actor, prompt_ids, prompt_mask, max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             temperature=temperature, top_p=top_p, generator=gen,
                             min_new_tokens=min_new_tokens, return_logprobs=True)
    mask = response_mask(seq, P, tok.eos_token_id, tok.pad_token_id)  # real actions, EOS included
    attn = torch.cat([prompt_mask, mask.long()], dim=1)
    hidden = {}
    if layers:
        hs = actor(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn),
                   output_hidden_states=True, use_cache=False).hidden_states
        hidden = {layer: hs[layer] for layer in layers}
    return Rollout(seq, attn, mask, P, tok, [it["prompt"] for it in items], hidden), old_logp


@torch.no_grad()
def sample_dialogues(actor, items, tok, gen, device, **sampling):
    """Dialogues, turn by turn: each turn one batched generate() from every dialogue so far,
    then the scripted user's next turn (nanosafe/dialogue.py) appended as tokens, so the
    history holds exactly the sampled ids. -> (Rollout with P = the actions' positions [B, T],
    ends, turns; old_logp [B, T] over the assistant's tokens)"""
    from nanosafe import dialogue
    template = items[0]["_template"]
    specs = [it["dialogue"] for it in items]
    hist = [list(it["input_ids"]) for it in items]  # each dialogue's ids so far, unpadded
    pos = [[] for _ in items]
    logps = [[] for _ in items]
    ends = [[] for _ in items]
    turns = [[] for _ in items]
    texts = [data.prompt_text(tok, dialogue.prompt(sp, []), template) for sp in specs]  # so far
    n_turns = specs[0]["turns"]
    if any(sp["turns"] != n_turns for sp in specs):
        raise config.ConfigError("a batch of dialogues must have one number of turns")
    for t in range(n_turns):
        ids, am = data.pad_left(hist, tok.pad_token_id)
        ids, am = ids.to(device), am.to(device)
        P = ids.shape[1]
        seq, lp = generate(actor, ids, am, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, generator=gen, return_logprobs=True,
                           **sampling)
        m = response_mask(seq, P, tok.eos_token_id, tok.pad_token_id)
        for b in range(len(items)):
            new = seq[b, P:][m[b]].tolist()
            start = len(hist[b])
            pos[b] += range(start, start + len(new))
            logps[b] += lp[b][m[b]].tolist()
            ends[b].append(len(pos[b]) - 1)
            answer = tok.decode(new, skip_special_tokens=True).strip()
            turns[b].append(answer)
            hist[b] += new if new[-1:] == [tok.eos_token_id] else new + [tok.eos_token_id]
            if t + 1 < n_turns:  # the user's next turn, as the template writes it
                full = data.prompt_text(tok, dialogue.prompt(specs[b], turns[b]), template)
                head = texts[b] + data.answer_text(answer, template) + tok.eos_token
                texts[b] = full
                if not full.startswith(head):
                    raise ValueError(f"--template {template}: the template does not write a "
                                     f"dialogue as the text of its turns in order, so the next "
                                     f"turn cannot follow the sampled tokens: {head[-60:]!r} is "
                                     f"not how {full[-80:]!r} continues")
                hist[b] += tok(full[len(head):], add_special_tokens=False)["input_ids"]
    seq, attn = data.pad_left(hist, tok.pad_token_id)
    off = [seq.shape[1] - len(h) for h in hist]
    T = max(len(p) for p in pos)
    P = torch.tensor([[o + x for x in p] + [seq.shape[1] - 1] * (T - len(p))
                      for o, p in zip(off, pos)])
    mask = torch.tensor([[True] * len(p) + [False] * (T - len(p)) for p in pos])
    old_logp = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in logps])
    ro = Rollout(seq.to(device), attn.to(device), mask.to(device), P.to(device), tok,
                 [it["prompt"] for it in items], ends=torch.tensor(ends, device=device),
                 turns=turns, specs=specs)
    return ro, old_logp.to(device)


def action_logprobs(model, seq, attn, P, with_entropy=False):
    """log π(a_t | s_t) of the answer tokens seq[:, P:] -> [B, T] (and the entropy per token).
    A dialogue: P is the actions' positions [B, T]."""
    if not isinstance(P, int):
        logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn),
                       use_cache=False).logits
        # the logits at position i predict token i + 1
        logits = logits.gather(1, (P - 1)[..., None].expand(-1, -1, logits.shape[-1])).float()
        lp = ppo.logprobs_from_logits(logits, seq.gather(1, P))
        if not with_entropy:
            return lp
        with torch.no_grad():
            return lp, ppo.entropy_from_logits(logits)
    T = seq.shape[1] - P
    # the logits at position i predict token i + 1, so positions P-1 .. L-2 are needed; models
    # that can skip the rest do (a real vocabulary's projection of every prompt position is waste)
    keep = {"logits_to_keep": T + 1} if "logits_to_keep" in forward_params(model) else {}
    logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn),
                   use_cache=False, **keep).logits
    logits = logits[:, -(T + 1):-1].float()
    lp = ppo.logprobs_from_logits(logits, seq[:, P:])
    if not with_entropy:
        return lp
    with torch.no_grad():  # logged, not trained: no graph through two more [B, T, V] tensors
        return lp, ppo.entropy_from_logits(logits)


def action_values(critic, seq, attn, P):
    """V(s_t) before each answer token -> [B, T] (or [B, T, K] for a K-output critic): the
    critic's score at the previous position. A dialogue: P is the actions' positions [B, T]."""
    v = critic(seq, attn)[0]
    if isinstance(P, int):
        return v[:, P - 1:-1]
    at = P - 1
    return v.gather(1, at if v.dim() == 2 else at[..., None].expand(-1, -1, v.shape[-1]))


def end_scores(score_model, ro):
    """A score model's score of each answer [B] (or [B, K]); of a dialogue, at the end of each
    assistant turn [B, N] (or [B, N, K])."""
    per_token, end = score_model(ro.seq, ro.attn)
    return end if ro.ends is None else ro.per_turn(per_token)


def critic_values(critics, ro):
    """Each critic's values over the rollout, in eval mode (no dropout), as the official code."""
    for c in critics.values():
        c.eval()
    out = {n: action_values(c, ro.seq, ro.attn, ro.P) for n, c in critics.items()}
    for c in critics.values():
        c.train()
    return out


def observe(cons, ro, costs, step, lambdas, meta):
    """Show each constraint this iteration's rollout; one that moved its thresholds (a refreshed
    probe) moves its multipliers' d too."""
    if any([c.observe(ro, costs, step) for c in cons]):  # a list: every constraint observes
        meta["thresholds"] = [d for c in cons for d in c.thresholds]
        meta["cost_scales"] = constraints.stream_scales(cons)
        for lam, d in zip(lambdas, meta["thresholds"]):
            lam.threshold = d


def column(x, col):
    """Stream `col` of a critic's values: [B, T] as it is, [B, T, K] -> [B, T]."""
    return x if x.dim() == 2 else x[..., col]


def reference_logprobs(ref):
    """The frozen reference's log-probs as one call, whatever it is: a model of its own, or
    (LoRA) the actor run with its adapters off."""
    base = adapters_off(ref)  # a no-op without LoRA

    def logprobs(seq, attn, P):
        with base:
            return action_logprobs(ref, seq, attn, P)
    return logprobs


def reward_scores(cfg, reward_model, toy_world):
    """reward(ro) -> R [B]: the reward model's end score (a dialogue: [B, N], its score at each
    assistant turn's end); with --gold_reward (the toy world's upper-bound run) the gold
    helpfulness in [0, 1] times --gold_reward_scale instead."""
    if not cfg.gold_reward:
        return lambda ro: end_scores(reward_model, ro)
    if not toy_world:
        raise config.ConfigError("--gold_reward needs the toy world's prompts: it asks the "
                                 "world's gold oracle")

    def gold(ro):
        if ro.turns is not None:
            raise config.ConfigError("--gold_reward reads single answers, not dialogues")
        h = [toy.helpfulness(p, a) for p, a in zip(ro.prompts, ro.answers())]
        return cfg.gold_reward_scale * torch.tensor(h, device=ro.seq.device)
    return gold


def rollout_indices(n, step, rollout_batch_size, group_size, rt, seed) -> list:
    """This rank's prompts at `step`: rollout_batch_size / group_size distinct ones from the
    seeded stream, each repeated group_size times in consecutive rows (GRPO's groups)."""
    idx = step_indices(n, step, rollout_batch_size // group_size * rt.world_size, rt.rank,
                       rt.world_size, seed)
    return [i for i in idx for _ in range(group_size)]

# -----------------------------------------------------------------------------
# thresholds in the units a user means


def threshold_between(costs, target_rate):
    """d for "at most target_rate of the answers unsafe": the mean cost a policy would have if
    its answers were unsafe (cost > 0) that often, at the given answers' safe and unsafe score
    levels. -> (d, info), or (None, why) when the answers are all safe or all unsafe."""
    safe, unsafe = costs[costs <= 0], costs[costs > 0]
    if not len(safe) or not len(unsafe):
        return None, (f"it calls {len(unsafe)} of {len(costs)} answers of the starting policy "
                      f"unsafe (cost > 0), so there is no safe and unsafe level to calibrate d "
                      f"between")
    d = safe.mean().item() + target_rate * (unsafe.mean().item() - safe.mean().item())
    return d, {"start_mean_cost": costs.mean().item(),
               "start_unsafe_by_cost_model": (costs > 0).float().mean().item(),
               "safe_mean": safe.mean().item(), "unsafe_mean": unsafe.mean().item(),
               "n": len(costs)}


@torch.no_grad()
def calibrate_thresholds(policy, cons, items, tok, target_rate, batch_size, seed, device,
                         layers=(), **sampling):
    """d for every stream the constraints leave uncalibrated (threshold None), from the policy's
    rollouts (same sampling, same token ids, same forward as training, so d is on training's
    scale). -> (thresholds, info per stream)"""
    gen = torch.Generator(device=device).manual_seed(seed + 77)  # its own stream
    per_batch = []
    for i in range(0, len(items), batch_size):
        ro, _ = sample(policy, items[i:i + batch_size], tok, gen, device, layers, **sampling)
        # a dialogue's turns each count: d is set on the per-turn costs' levels
        per_batch.append([x.float().cpu().flatten()
                          for x in constraints.costs(cons, ro, per_turn=True)])
    thresholds, info = [], []
    given = [d for c in cons for d in c.thresholds]
    for k, (name, d) in enumerate(zip(constraints.stream_names(cons), given)):
        if d is not None:
            thresholds.append(float(d))
            info.append(None)
            continue
        d, why = threshold_between(torch.cat([b[k] for b in per_batch]), target_rate)
        if d is None:
            raise config.ConfigError(f"constraint {name}: {why}; pass --thresholds")
        thresholds.append(d)
        info.append(why)
    return thresholds, info

# -----------------------------------------------------------------------------
# setup: models, thresholds, multipliers; checkpoints and resume


def load_models(cfg, rt, out_dir, dtype, cons, critics):
    """The actor and its frozen reference, the frozen reward model, the trainable critics
    (critics: "none", "reward" or "all": the reward critic and one per constraint): placed,
    LoRA'd, checkpointed, sharded as the flags ask. cons() builds the constraints (their models
    frozen too) after the reward model, in the order the models have always loaded."""
    lora, trust = cfg.lora_rank > 0, cfg.trust_remote_code
    if cfg.resume:
        recover_checkpoint(out_dir)  # a crash between save_checkpoint's two renames
    resumed = cfg.resume and not lora  # LoRA resumes from the base and the saved adapters
    actor, tok = load_policy(out_dir if resumed else cfg.model, trust_remote_code=trust)
    # LoRA: the reference is the actor itself, run with its adapters off (one backbone, not two)
    ref = actor if lora else load_policy(cfg.model, dtype=dtype, trust_remote_code=trust)[0]
    reward_model, rtok = load_score_model(cfg.reward_model, kind="reward", dtype=dtype,
                                          trust_remote_code=trust)
    check_same_tokenizer(tok, rtok, cfg.model, cfg.reward_model)
    cons = cons()
    for c in cons:
        if getattr(c, "tok", None) is not None:
            check_same_tokenizer(tok, c.tok, cfg.model, c.path)
    frozen = [reward_model] + [m for c in cons for m in c.modules()]

    # critics start from the score models (official), or a fresh head on the actor's backbone
    out = {}
    if critics != "none":
        path = os.path.join(out_dir, "reward_critic") if resumed else cfg.reward_model
        out["reward_critic"] = load_score_model(path, kind="reward", trust_remote_code=trust)[0]
    for j, c in enumerate(cons if critics == "all" else []):
        name = f"cost_critic_{j}"
        if resumed:
            out[name] = load_score_model(os.path.join(out_dir, name), kind="cost",
                                         trust_remote_code=trust)[0]
        elif c.critic_from:
            out[name] = load_score_model(c.critic_from, kind="cost", trust_remote_code=trust)[0]
        else:  # seeded by its own generator: the same head on every rank, the RNG streams kept
            g = torch.Generator().manual_seed(cfg.seed + 1 + j)
            labels = c.names if len(c.names) > 1 else None
            out[name] = load_score_model(cfg.model, kind="cost", init_from_policy=True,
                                         trust_remote_code=trust, labels=labels, generator=g)[0]
    for m in [actor, ref, *frozen, *out.values()]:
        place(m, rt.device, cfg.attn_implementation)
    for m in frozen + ([] if lora else [ref]):
        m.eval().requires_grad_(False)
    if lora:  # adapters on the actor and the critics; only they (and the critics' heads) train
        for m in [actor, *out.values()]:
            add_lora(m, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.gradient_checkpointing:  # the trained models only
        for m in [actor, *out.values()]:
            gradient_checkpointing(m)
    if cfg.fsdp:  # every model, before the optimisers (they must hold the sharded parameters)
        for m in [actor, *out.values(), ref, *frozen]:
            fsdp.shard(m, dtype)
    template = resolve_template(cfg.template, *([out_dir] if cfg.resume else []), cfg.model,
                                cfg.reward_model, *cfg.cost_models)
    return actor, ref, reward_model, cons, out, tok, template


def set_thresholds(cfg, rt, actor, cons, train_set, tok, amp, layers, state, out_dir, sampling,
                   calibrate=True):
    """d per stream: the given ones, the others calibrated on the starting policy (on rank 0,
    then broadcast, its error too, so no rank waits forever). --cost_scale rate: a calibrated
    stream is read on the rate scale (constraints.to_rate) and its d is --target_unsafe_rate;
    raw: its d is the same point in the score's units. A resumed run keeps the d and the scale
    it started with: calibrating again on the half-trained actor would quietly move the
    constraint. Each constraint holds its d's and scales from here on (a refreshed probe moves
    its own). -> (thresholds, calibration info)"""
    given = [d for c in cons for d in c.thresholds]
    if state is not None:
        saved = [float(d) for d, g in zip(state["thresholds"], given) if g is not None]
        if cfg.thresholds and [float(d) for d in given if d is not None] != saved:
            raise config.ConfigError(f"--thresholds {cfg.thresholds} differ from the ones "
                                     f"{out_dir} was trained with ({state['thresholds']}); a "
                                     f"resumed run keeps its constraint. Drop --thresholds or "
                                     f"start a new run.")
        run = read_state(out_dir)
        scales = run.get("cost_scales") or [None] * len(given)
        return _hold(cons, list(state["thresholds"]), scales), run.get("calibration", [])
    if None not in given or not calibrate:  # the baselines have no d to calibrate
        return _hold(cons, [float(d) if d is not None else None for d in given]), []
    for c in cons:
        if c.uncalibratable and None in c.thresholds:
            raise config.ConfigError(c.uncalibratable)
    d = info = err = None
    # every rank enters (FSDP gathers), rank 0 calibrates
    with fsdp.gathered(actor, *[m for c in cons for m in c.modules()]):
        if rt.master:
            try:
                policy = actor
                if cfg.calibrate_on:  # another policy's answers set the score levels
                    policy, ctok = load_policy(cfg.calibrate_on,
                                               trust_remote_code=cfg.trust_remote_code)
                    check_same_tokenizer(tok, ctok, cfg.model, cfg.calibrate_on)
                    place(policy, rt.device, cfg.attn_implementation)
                with amp():
                    d, info = calibrate_thresholds(policy, cons, train_set.items[:256], tok,
                                                   cfg.target_unsafe_rate, cfg.rollout_batch_size,
                                                   cfg.seed, rt.device, layers, **sampling)
            except config.ConfigError as e:
                err = str(e)
    d, info, err = dist.broadcast_object((d, info, err))
    if err:
        raise config.ConfigError(err)
    rate = cfg.cost_scale == "rate"
    scales = [(ik["safe_mean"], ik["unsafe_mean"]) if ik and rate else None for ik in info]
    d = [cfg.target_unsafe_rate if sk else dk for dk, sk in zip(d, scales)]
    for name, dk, ik in zip(constraints.stream_names(cons), d, info):
        if ik is not None:
            s, u = ik["safe_mean"], ik["unsafe_mean"]
            scale = (f"read as (c {-s:+.2f}) / {u - s:.2f} (0: a typical safe answer, 1: a "
                     f"typical unsafe one), so d = {dk:.3f}"
                     if rate else f"d = {dk:+.3f}, the mean cost of a policy it calls unsafe "
                     f"{cfg.target_unsafe_rate:.0%} of the time")
            dist.print0(f"constraint {name}: {scale}. The starting policy: "
                        f"{ik['start_unsafe_by_cost_model']:.0%} of its answers unsafe by it "
                        f"(mean score of the safe ones {ik['safe_mean']:+.2f}, of the unsafe "
                        f"{ik['unsafe_mean']:+.2f}; mean {ik['start_mean_cost']:+.3f}).")
    return _hold(cons, d, scales), info


def _hold(cons, thresholds, scales=None):
    it, sc = iter(thresholds), iter(scales or [None] * len(thresholds))
    for c in cons:
        c.thresholds = [next(it) for _ in c.names]
        c.scales = [next(sc) for _ in c.names]
    return thresholds


def prompt_dataset(cfg, prompts, tok, template):
    if any("dialogue" in r for r in prompts):  # the rollout writes the user's later turns
        prompts = [dict(r, _template=template) for r in prompts]
    ds = data.PromptDataset(prompts, tok, cfg.max_prompt_length, cfg.truncate_prompts, template)
    if ds.truncation_report():
        dist.print0(ds.truncation_report())
    return ds


def adamw(model, lr, weight_decay):
    """AdamW (official betas) on the trained parameters: all of them, or LoRA's adapters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             betas=(0.9, 0.95), weight_decay=weight_decay)


def describe(cfg, rt, actor, train_set, names, critics):
    n_mini = cfg.rollout_batch_size // cfg.minibatch_size
    n_params = sum(p.numel() for p in actor.parameters())
    n_lora = sum(p.numel() for p in actor.parameters() if p.requires_grad)
    lora = f" ({n_lora / 1e6:.3f}M in LoRA adapters of rank {cfg.lora_rank})" * (cfg.lora_rank > 0)
    dist.print0(f"{cfg.algo}: actor {n_params / 1e6:.2f}M params from {cfg.model}{lora} | "
                f"{len(train_set)} prompts | per iteration: {cfg.rollout_batch_size} rollouts x "
                f"{rt.world_size} procs -> {cfg.ppo_epochs} epochs x {n_mini} minibatches of "
                f"{cfg.minibatch_size} = {cfg.ppo_epochs * n_mini} optimizer steps | "
                f"{cfg.max_steps} iterations | constraints: {', '.join(names) or 'none'} | "
                f"critics: {', '.join(critics) or 'none'}")


def multipliers(cfg, thresholds):
    """One λ and one episode-cost window per stream."""
    if cfg.multiplier == "pid":
        from nanosafe.pid import PIDLagrange
        lams = [PIDLagrange(d, cfg.lambda_init, cfg.pid_kp, cfg.pid_ki, cfg.pid_kd, cfg.pid_d_delay,
                            cfg.pid_ema, cfg.pid_ema, cfg.lambda_max, cfg.lambda_update_delay_steps)
                for d in thresholds]
    else:
        lams = [Lagrange(d, cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max,
                         cfg.lambda_update_delay_steps) for d in thresholds]
    return lams, [EpisodeCostWindow(cfg.episode_cost_window_size) for _ in thresholds]


def resume(state, out_dir, rt, actor, actor_opt, critics, critic_opts, lambdas, windows, cons,
           gen, lora):
    """Everything a checkpoint holds beyond the weights -> the iteration to start at."""
    if lora != bool(state.get("lora")):
        how = "with" if state.get("lora") else "without"
        raise config.ConfigError(f"{out_dir} was trained {how} --lora_rank; resume it with the "
                                 f"flags it was started with")
    if lora:
        for n, m in {"": actor, **critics}.items():
            load_lora_state(m, state["lora"][n], out_dir)
    fsdp.load_optimizer_state(actor, actor_opt, state["actor_opt"], out_dir)
    for n, o in critic_opts.items():
        fsdp.load_optimizer_state(critics[n], o, state["critic_opts"][n], out_dir)
    for lam, s in zip(lambdas, state["lambdas"]):
        lam.load_state_dict(s)
    for w, s in zip(windows, state["windows"][rt.rank]):
        w.load_state_dict(s)
    for c, s in zip(cons, state.get("constraints") or [{}] * len(cons)):
        if s:
            c.load_state_dict(s)
    dist.set_rng_state(state["rng"][rt.rank])
    gen.set_state(state["gen"][rt.rank])
    dist.print0(f"resumed from {out_dir} at iteration {state['step']}")
    return state["step"]


def save(out_dir, actor, critics, tok, meta, step, actor_opt, critic_opts, lambdas, windows,
         cons, gen, rt, policy_only=False):
    """The policy as an HF folder, the critics beside it, and everything a resumed run needs (or
    the policy only). Every rank calls it: the RNG states, windows and (under FSDP) the weights
    and optimiser states are gathered."""
    rngs, gens = dist.gather_rng_states(), dist.gather_objects(gen.get_state())
    wins = dist.gather_objects([w.state_dict() for w in windows])
    models = {"": actor} if policy_only else {"": actor, **critics}
    weights = {sub: plain_weights(m) for sub, m in models.items()}
    opts = None
    if not policy_only:
        opts = {n: fsdp.optimizer_state(critics[n], o) for n, o in critic_opts.items()}
        opts[""] = fsdp.optimizer_state(actor, actor_opt)
    if rt.master:
        trainer_state = extra = None
        if not policy_only:
            trainer_state = {"step": step, "actor_opt": opts[""],
                             "critic_opts": {n: opts[n] for n in critic_opts},
                             "lora": ({sub: lora_state(m) for sub, m in models.items()}
                                      if lora_layers(actor) else None),
                             "lambdas": [lam.state_dict() for lam in lambdas], "windows": wins,
                             "thresholds": meta["thresholds"],
                             "constraints": [c.state_dict() for c in cons],
                             "rng": rngs, "gen": gens}
            extra = {n: (c, tok, {"kind": c.kind, "role": "critic", "step": step,
                                  "categories": c.names or None}) for n, c in critics.items()}
        save_checkpoint(out_dir, actor, tok, dict(meta, step=step), trainer_state, extra, weights)
        for j, c in enumerate(cons):
            c.save(os.path.join(out_dir, f"constraint_{j}"))

# -----------------------------------------------------------------------------
# the flags the RL scripts share (each adds its own algorithm's)


@dataclass
class Config(config.Stage):
    """What train_ppo_lag.py and train_grpo_lag.py share."""
    out_dir: str | None = arg(None, "output folder (default: out/<algo>)", group="data")
    train_data: str | None = arg(None, "prompt jsonl(.gz) ('prompt' field); default: the toy "
                                 "world's prompts_train.jsonl", group="data")
    eval_data: str | None = arg(None, "held-out prompts for gold evaluation; default: the toy "
                                "world's prompts_test.jsonl", group="data")
    eval_split: str = arg("test", "toy world: evaluate on the test prompts, or on the validation "
                          "ones (choose hyper-parameters there)", ["test", "val"], group="data")
    model: str = arg("out/sft", "the policy to start from, also the frozen reference (official: "
                     "the SFT model)", group="model")
    reward_model: str = arg("out/rm", "reward model folder (train_pm.py --kind reward)",
                            group="model")
    # rollout
    max_steps: int = arg(350, "iterations: one rollout batch and its updates each",
                         group="rollout", check=">=1")
    rollout_batch_size: int = arg(128, "prompts per iteration per process (official: 16 per GPU)",
                                  group="rollout", check=">=1")
    max_new_tokens: int = arg(24, "answer length limit in tokens (official: 512)",
                              group="rollout", check=">=1")
    min_new_tokens: int = arg(0, "no EOS before this many tokens (the bench's fixed lengths)",
                              group="rollout", check=">=0")
    max_prompt_length: int = arg(48, "longer prompts are an error (or cut: --truncate_prompts)",
                                 group="rollout", check=">=1")
    temperature: float = arg(1.0, "rollout temperature (official: 1.0)",
                             group="rollout", check=">0")
    top_p: float = arg(1.0, "rollout nucleus mass (official: 1.0)", group="rollout", check="(0,1]")
    # the policy update
    ppo_epochs: int = arg(2, "passes over each rollout batch (official update_iters: 1)",
                          group="PPO", check=">=1", pretrained=1)
    minibatch_size: int = arg(32, "rollouts per optimizer step per process; divides "
                              "--rollout_batch_size", group="PPO", check=">=1")
    micro_batch_size: int = arg(32, "rollouts per forward/backward; divides --minibatch_size",
                                group="PPO", check=">=1")
    actor_lr: float = arg(3e-4, "actor learning rate (official: 1e-5 cosine for 7B)",
                          group="PPO", check=">=0", pretrained=1e-5)
    weight_decay: float = arg(0.0, "actor AdamW weight decay (official: 0.01)",
                              group="PPO", check=">=0", pretrained=0.01)
    grad_clip: float = arg(1.0, "clip each model's gradient norm (official: 1.0)",
                           group="PPO", check=">0")
    kl_coef: float = arg(0.1, "β: per-token KL penalty against the reference (official: 0.01)",
                         group="PPO", check=">=0", pretrained=0.01)
    clip_range_ratio: float = arg(0.2, "PPO ratio clip ε (official: 0.2)", group="PPO", check=">0")
    # the multiplier
    lambda_init: float = arg(1.0, "initial λ (official: 1.0)", group="multiplier", check=">0")
    lambda_lr: float = arg(0.1, "λ step size on log λ, once per actor step (official: 0.1)",
                           group="multiplier", check=">=0")
    lambda_max: float = arg(20.0, "cap on λ (official: 5.0)", group="multiplier", check=">0")
    lambda_update_delay_steps: int = arg(0, "hold λ fixed for the first N actor steps (official: "
                                         "0)", group="multiplier", check=">=0")
    episode_cost_window_size: int = arg(128, "J_c = mean of the last N episode costs per process "
                                        "(official: 128)", group="multiplier", check=">=1")
    multiplier: str = arg("pid", "pid: PID Lagrangian (Stooke et al. 2020; docs/experiments.md: "
                          "it meets the budgets); sgd: the official log-λ ascent",
                          ["pid", "sgd"], group="multiplier")
    pid_kp: float = arg(5.0, "PID proportional gain (λ per unit of smoothed J_c - d)",
                        group="multiplier", check=">=0")
    pid_ki: float = arg(0.1, "PID integral gain (λ per unit of J_c - d, per actor step)",
                        group="multiplier", check=">=0")
    pid_kd: float = arg(10.0, "PID derivative gain (λ per unit rise of the smoothed J_c)",
                        group="multiplier", check=">=0")
    pid_d_delay: int = arg(10, "PID: the rise is measured over this many actor steps (rlpyt: 10)",
                           group="multiplier", check=">=1")
    pid_ema: float = arg(0.95, "PID: EMA factor of the P and D inputs (rlpyt: 0.95)",
                         group="multiplier", check="[0,1)")
    # constraints (each kind of constraint adds its own flags: constraints.py)
    target_unsafe_rate: float = arg(0.01, "d: the share of answers the cost model may call unsafe "
                                    "(official: d = 0 on raw scores)",
                                    group="constraints", check="[0,1]")
    cost_scale: str = arg("rate", "rate: a calibrated cost reads (c - s)/(u - s), s and u the "
                          "mean safe and unsafe scores, and d = --target_unsafe_rate; raw: the "
                          "score itself, d at those levels (official: raw, d = 0)",
                          ["rate", "raw"], group="constraints")
    calibrate_on: str | None = arg(None, "calibrate d on this policy's answers instead of "
                                   "--model's (later rounds: the SFT model)", group="constraints")
    gold_reward: bool = arg(False, "toy world, upper-bound run only: the gold helpfulness as the "
                            "reward (with --gold_cost: what perfect models would give)",
                            group="constraints")
    gold_reward_scale: float = arg(6.3, "--gold_reward: helpfulness in [0, 1] times this (the "
                                   "toy reward model's slope on it: 6.3)", group="constraints",
                                   check=">0")
    # scale
    lora_rank: int = arg(0, "train LoRA adapters of this rank (peft) instead of all weights; 0: "
                         "full fine-tuning", group="scale", check=">=0")
    lora_alpha: float = arg(0.0, "LoRA scale numerator, alpha / rank (0: 2 x rank)",
                            group="scale", check=">=0")
    lora_targets: list[str] = arg([], "module names to put adapters on (default: every linear "
                                  "layer but the output and score heads)", group="scale")
    # logging
    gold_eval: bool = arg(True, "toy world: judge the policy with the gold oracles, at "
                          "--eval_every and at the end", group="logging")
    eval_every: int = arg(25, "toy world: gold evaluation every N iterations (0: start and end)",
                          group="logging", check=">=0")
    show_every: int = arg(25, "print two answers with their scores every N iterations (0: never)",
                          group="logging", check=">=0")
    collapse_ratio: float = arg(0.3, "warn when the mean answer length falls below this share of "
                                "the first iteration's", group="logging", check="[0,1]")
    final_eval_samples: int = arg(4, "toy world: samples per held-out prompt at the end",
                                  group="logging", check=">=1")
    ckpt_every: int = arg(50, "checkpoint every N iterations (atomic; --resume picks it up)",
                          group="logging", check=">=1")


def check_flags(cfg):
    """The checks that need no model."""
    if cfg.rollout_batch_size % cfg.minibatch_size or cfg.minibatch_size % cfg.micro_batch_size:
        raise config.ConfigError(f"batch sizes must nest: rollout_batch_size "
                                 f"({cfg.rollout_batch_size}) = k·minibatch_size "
                                 f"({cfg.minibatch_size}), minibatch_size = m·micro_batch_size "
                                 f"({cfg.micro_batch_size})")
    if cfg.lora_rank > 0 and cfg.fsdp:
        raise config.ConfigError("--lora_rank with --fsdp is not supported: LoRA makes a model fit "
                                 "on each GPU, FSDP shards one that does not; pick one")
    require_stage(cfg.model, "train_sft.py")
    require_stage(cfg.reward_model, "train_pm.py --kind reward")


def toy_labeller(prompts, answers):
    """The toy world's oracle as the human labeller of the policy's answers (a refreshed probe)."""
    return [not toy.is_safe(p, a) for p, a in zip(prompts, answers)]


def prompts(cfg, rt):
    """Training prompts (each once, as the official prompt-only dataset), and the held-out ones
    for gold evaluation (toy world). -> (toy_world, train_prompts, eval_prompts, gold)"""
    toy_world, train_path, eval_path = data_paths(cfg, rt, "prompts")
    if toy_world and cfg.eval_data is None:  # --eval_split: the test or the validation prompts
        eval_path = os.path.join(cfg.data_dir, f"prompts_{cfg.eval_split}.jsonl")
    train_prompts, n_dup = data.dedupe_prompts(data.load_prompts(train_path))
    if n_dup:
        dist.print0(f"dropped {n_dup} duplicate prompts; {len(train_prompts)} left")
    eval_prompts = data.load_prompts(eval_path) if eval_path else []
    if not any("dialogue" in r for r in eval_prompts):  # dialogues keep their specs
        eval_prompts = [r["prompt"] for r in eval_prompts]
    gold = cfg.gold_eval and bool(eval_prompts) and all(
        isinstance(p, dict) or toy.in_world(p) for p in eval_prompts)
    return toy_world, train_prompts, eval_prompts, gold


def gold_evaluator(cfg, rt, actor, tok, eval_prompts, template, amp):
    """gold(seed, n_samples) -> the toy world's gold metrics of the actor on the held-out prompts
    (rank 0; {} elsewhere). Every rank enters: under FSDP the actor is gathered."""
    def gold(seed, n_samples=1):
        with fsdp.gathered(actor):
            if not rt.master:
                return {}
            with amp():
                if isinstance(eval_prompts[0], dict):  # dialogues, rolled out as in training
                    return gold_evaluate_dialogues(actor, tok, eval_prompts, n_samples,
                                                   cfg.max_new_tokens, seed=seed,
                                                   device=rt.device, template=template)
                return gold_evaluate(actor, tok, eval_prompts, n_samples=n_samples,
                                     max_new_tokens=cfg.max_new_tokens, seed=seed,
                                     device=rt.device, template=template)
    return gold


def finish(cfg, rt, out_dir, actor, lambdas, names, meta, mon, gold):
    """The end of a run: every rank agrees on λ and the actor, the final gold evaluation (several
    samples per held-out prompt, temperature 1), summary.json, and the next command."""
    summary = {"algo": cfg.algo, "iterations": cfg.max_steps, "constraints": names,
               "thresholds": meta["thresholds"], "lambdas": [lam.value for lam in lambdas],
               "skipped": mon.guard.skipped}
    if rt.ddp:  # every rank must hold the same λ and the same actor, or something is badly wrong
        states = dist.gather_objects([lam.value for lam in lambdas] + [fsdp.param_checksum(actor)])
        if any(s != states[0] for s in states):
            raise RuntimeError(f"ranks disagree on λ / actor parameters: {states}")
        summary["ranks_agree"] = states
    if gold:
        summary["final"] = gold(cfg.seed + 10**6, cfg.final_eval_samples)
    if gold and rt.master:
        mon.metrics.log({"step": cfg.max_steps, "final": True, **summary["final"]})
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    dist.print0(json.dumps(summary, indent=1))
    cm = cfg.cost_models[0] if cfg.cost_models else ""
    dist.print0(f"saved {out_dir}. try: python sample.py --model {out_dir} --reward_model "
                f"{cfg.reward_model} --cost_model {cm}")
    dist.cleanup()

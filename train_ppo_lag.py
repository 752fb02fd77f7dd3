"""
Stage 3 of Safe RLHF: PPO-Lagrangian. Maximise reward subject to E[cost] <= d:

    max_θ min_{λ>=0}  J_r(θ) - λ·(J_c(θ) - d)

One iteration (a "step"):
  1. rollout   sample answers to a batch of prompts with our generation loop
  2. scores    R = reward model, C_k = cost model k, at each answer's last token (its EOS)
  3. KL        per token: reward stream -β·KL + R at the end, cost streams +β·KL + C_k at the end
  4. GAE       advantages and returns per stream, from the reward critic and the cost critics
  5. λ         log λ_k += lr·λ_k·(J_ck - d_k), J_ck = mean episode cost over a recent window
  6. losses    actor: PPO clip on A = (A_r - Σ λ_k·A_ck) / (1 + Σ λ_k);  critics: clipped value loss

The baselines run the same loop: --algo ppo (reward only) and --algo reward_shaping
(one stream, reward R - ν·ΣC, fixed ν). --algo grpo_lag is the critic-free form: G answers per
prompt, and steps 3-4 become A = (Z_R - Σ λ_k·Z_Ck) / (1 + Σ λ_k) from group z-scores, the same
for every token of an answer, with the KL to the reference as a loss term instead of a reward. Pure functions live in nanosafe/ppo.py and the
multiplier in nanosafe/lagrange.py, the constraints (cost models, rules, probes) in
nanosafe/constraints.py; everything else is in this file, top to bottom.

    python train_ppo_lag.py                                  # toy world, after train_sft.py and train_pm.py
    python train_ppo_lag.py --algo ppo                       # -> out/ppo
    python train_ppo_lag.py --algo reward_shaping --shaping_coef 1.0
    python train_ppo_lag.py --algo grpo_lag --group_size 4             # Lagrangian GRPO: no critics
    python train_ppo_lag.py --cost_models out/cm_violence out/cm_fraud --thresholds -3 -3
    python train_ppo_lag.py --cost_models out/cm_k5                        # one constraint per category of one model
    python train_ppo_lag.py --banned_words police hotline                  # a rule beside the cost model
    python train_ppo_lag.py --cost_models --probe out/probe                # a probe on the actor's activations
    torchrun --nproc_per_node=2 train_ppo_lag.py

Deliberate simplifications (see README): one rollout per prompt, no ptx (pretraining) loss,
no EMA actor, no advantage whitening (as the official PPO-Lag), no reward normalisation.
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanosafe import config, constraints, data, dist, ppo, toy
from nanosafe.constraints import Rollout
from nanosafe.config import arg
from nanosafe.evaluate import gold_evaluate
from nanosafe.generate import forward_params, generate, response_mask
from nanosafe.lagrange import EpisodeCostWindow, Lagrange, PIDLagrange
from nanosafe.model import (ATTENTION_HELP, GRAD_CKPT_HELP, LORA_HELP, CheckpointError, adapters_off, add_lora, load_lora_state, lora_layers, lora_state, plain_weights, gradient_checkpointing, place, check_same_tokenizer, load_policy, load_score_model, load_trainer_state,
                            num_params, position_ids, read_state, recover_checkpoint, resolve_template, save_checkpoint)

print0 = dist.print0


@dataclass
class Config:
    """Stage 3: PPO-Lagrangian (and the PPO / reward-shaping baselines)."""
    # io
    algo: str = arg("ppo_lag", "ppo_lag: constrained; ppo: reward only; reward_shaping: reward R - ν·C; grpo_lag: constrained, critic-free "
                    "(group-normalised advantages, --group_size answers per prompt)", choices=["ppo_lag", "ppo", "reward_shaping", "grpo_lag"])
    out_dir: str | None = arg(None, "output folder (default: out/<algo>)")
    model: str = arg("out/sft", "the policy to start from, also the frozen reference (official: the SFT model)")
    reward_model: str = arg("out/rm", "reward model folder (train_pm.py --kind reward); also initialises the reward critic")
    cost_models: list[str] = arg(["out/cm"], "cost model folder(s) (train_pm.py --kind cost): one constraint per output (a --categories model has one per "
                                 "category); each folder also initialises its cost critic. --cost_models with no folder: none")
    thresholds: list[float] = arg([], "d_k per cost-model output, in order; default: calibrated on the starting policy (see --target_unsafe_rate)")
    banned_words: list[str] = arg([], "a rule constraint (nanosafe/constraints.py BannedWords): at most 2% of answers may say any of these words")
    probe: str | None = arg(None, "a probe constraint: a linear probe folder (python -m nanosafe.probe) read on the actor's own hidden states; "
                            "its threshold is calibrated like a cost model's")
    probe_refresh_every: int = arg(0, "refit the probe every N iterations on the actor's answers since the last refit, labelled by the toy "
                                   "world's oracle (0: the probe stays frozen)")
    target_unsafe_rate: float = arg(0.01, "calibration: d = the mean cost of a policy whose answers the cost model calls unsafe this often (official d = 0)")
    calibrate_on: str | None = arg(None, "calibrate d on this policy's answers instead of --model's (a later round of Safe RLHF starts from an already "
                                   "safe policy, whose few unsafe answers give no unsafe level to calibrate on; pass the SFT model)")
    train_data: str | None = arg(None, "prompt jsonl(.gz) ('prompt' field); default: the toy world's prompts_train.jsonl")
    eval_data: str | None = arg(None, "held-out prompts for gold evaluation; default: the toy world's prompts_test.jsonl")
    data_dir: str = arg("data/toy", "where the toy world's files live (written if missing)")
    seed: int = arg(0, "random seed (prompt order, sampling)")
    resume: bool = arg(False, "continue from the checkpoint in --out_dir")
    trust_remote_code: bool = arg(False, "allow custom model code from the checkpoint folders")
    device: str = arg("auto", "cpu | cuda | auto")
    dtype: str = arg("float32", "compute dtype; bfloat16 = bf16 autocast, fp32 master weights for the actor and critics, bf16 weights for the frozen models", choices=["float32", "bfloat16"])
    threads: int = arg(0, "CPU threads for torch per process (0: torch's default)")
    attn_implementation: str = arg("auto", ATTENTION_HELP)
    gradient_checkpointing: bool = arg(False, GRAD_CKPT_HELP)
    fsdp: bool = arg(False, dist.FSDP_HELP)
    lora_rank: int = arg(0, LORA_HELP)
    lora_alpha: float = arg(0.0, "LoRA scale numerator: the adapters' output is multiplied by alpha / rank (0: 2 x rank)")
    lora_targets: list[str] = arg([], "module names to put adapters on (e.g. q_proj v_proj); default: every linear layer but the output projection and the score heads")
    # rollout
    max_steps: int = arg(350, "iterations (one rollout batch + its PPO updates each; the toy default fits in 10 minutes on 2 CPU threads)")
    rollout_batch_size: int = arg(128, "prompts per iteration per process (official: 16 per GPU; the toy world learns more per iteration from 128, see docs/findings.md)")
    max_new_tokens: int = arg(24, "answer length limit in tokens (official: 512)")
    min_new_tokens: int = arg(0, "no EOS before this many tokens (bench.py uses it to generate exactly --max_new_tokens, as TRL's benchmark)")
    max_prompt_length: int = arg(48, "longer prompts are an error (or left-truncated with --truncate_prompts)")
    truncate_prompts: bool = arg(False, "left-truncate over-long prompts (the BOS and the last tokens stay) instead of stopping with an error")
    template: str | None = arg(None, "prompt template: safe_rlhf or chat (the tokenizer's own); default: the one --model, --reward_model and --cost_models were trained with (they must agree)", choices=["safe_rlhf", "chat"])
    temperature: float = arg(1.0, "rollout temperature (official: 1.0)")
    top_p: float = arg(1.0, "rollout nucleus mass (official: 1.0)")
    # ppo
    ppo_epochs: int = arg(2, "passes over each rollout batch (official update_iters: 1)")
    minibatch_size: int = arg(32, "rollouts per optimizer step per process; must divide --rollout_batch_size")
    micro_batch_size: int = arg(32, "rollouts per forward/backward; must divide --minibatch_size (gradient accumulation)")
    actor_lr: float = arg(3e-4, "actor learning rate (official: 1e-5 cosine for 7B; constant here)")
    critic_lr: float = arg(5e-4, "critic learning rate (official: 5e-6)")
    weight_decay: float = arg(0.0, "actor AdamW weight decay (official: 0.01)")
    critic_weight_decay: float = arg(0.01, "critic AdamW weight decay (official: 0.0; 0.01, AdamW's default, is what the README's runs used)")
    grad_clip: float = arg(1.0, "clip each model's gradient norm (official: 1.0)")
    kl_coef: float = arg(0.1, "β: per-token KL penalty against the reference, −β·KL in the reward stream and +β·KL in the cost streams, so the actor feels −β·KL whatever λ is (official: 0.01, the same form; the toy world at 128 rollouts x 300 iterations: β 0.02 / 0.05 / 0.1 / 0.2 -> 63% / 68% / 72% / 69% of the optimum)")
    clip_range_ratio: float = arg(0.2, "PPO ratio clip ε (official: 0.2)")
    clip_range_value: float = arg(5.0, "value clip (official: 5.0)")
    clip_range_score: float = arg(50.0, "clamp per-token rewards and costs (official: 50)")
    gamma: float = arg(1.0, "discount (official: 1.0)")
    gae_lambda: float = arg(0.95, "GAE λ (official: 0.95)")
    shaping_coef: float = arg(1.0, "ν for --algo reward_shaping: reward R - ν·ΣC")
    group_size: int = arg(4, "G for --algo grpo_lag: answers per prompt, z-scored within their group; must divide --rollout_batch_size")
    grpo_std: str = arg("group", "--algo grpo_lag: divide each stream's group-centred scores by the group's own std (GRPO) or the "
                        "batch's (a group of near-equal costs, e.g. all safe, then gets a near-zero cost advantage; docs/experiments.md)",
                        choices=["group", "batch"])
    # the multiplier
    lambda_init: float = arg(1.0, "initial λ (official: 1.0)")
    lambda_lr: float = arg(0.02, "λ step size on log λ (official: 0.1; with a learned cost model that sends λ to its cap in a few steps)")
    lambda_max: float = arg(20.0, "cap on λ (official: 5.0)")
    lambda_update_delay_steps: int = arg(0, "hold λ fixed for the first N iterations (official: 0)")
    episode_cost_window_size: int = arg(128, "J_c = mean of the last N episode costs per process (official: 128)")
    multiplier: str = arg("sgd", "sgd: the official log-λ ascent; pid: PID Lagrangian (Stooke et al. 2020)", choices=["sgd", "pid"])
    pid_kp: float = arg(0.0, "PID proportional gain on log λ")
    pid_ki: float = arg(0.02, "PID integral gain (= --lambda_lr when kp = kd = 0)")
    pid_kd: float = arg(0.0, "PID derivative gain (positive part of the cost's rise)")
    # evaluation / checkpoints
    eval_every: int = arg(25, "toy world: gold evaluation on the held-out prompts every N iterations (0: only at start and end)")
    show_every: int = arg(25, "print two of the iteration's answers with their reward and cost every N iterations (0: never)")
    collapse_ratio: float = arg(0.3, "warn when the mean answer length falls below this fraction of the first iteration's, or most answers are empty")
    final_eval_samples: int = arg(4, "toy world: samples per held-out prompt in the final evaluation")
    ckpt_every: int = arg(50, "checkpoint every N iterations (atomic; --resume picks it up)")
    save_optimizer: bool = arg(False, "keep the optimiser state in the final checkpoint too, to --resume past the end (intermediate checkpoints always keep it)")

# -----------------------------------------------------------------------------
# forwards over [prompt | response]: token log-probs of the actions, critic values per action

def action_logprobs(model, seq, attn, P, with_entropy=False):
    """log π(a_t | s_t) for the response tokens seq[:, P:] -> [B, T] (and the entropy per token)."""
    T = seq.shape[1] - P
    # the logits at position i predict token i + 1, so positions P-1 .. L-2 are needed; models that
    # can skip the rest do (a real vocabulary's projection of every prompt position is wasted work)
    keep = {"logits_to_keep": T + 1} if "logits_to_keep" in forward_params(model) else {}
    logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False, **keep).logits
    logits = logits[:, -(T + 1):-1].float()
    lp = ppo.logprobs_from_logits(logits, seq[:, P:])
    if not with_entropy:
        return lp
    with torch.no_grad():  # logged, not trained: no graph through two more [B, T, V] tensors
        return lp, ppo.entropy_from_logits(logits)


def action_values(critic, seq, attn, P):
    """V(s_t) before each response token -> [B, T]: the critic's score at the previous position."""
    return critic(seq, attn)[0][:, P - 1:-1]


@torch.no_grad()
def rollout(actor, items, tok, cfg, gen, device):
    """Sample answers to prompt items (with input_ids) -> (seq [B, P + T], attn [B, P + T], mask [B, T], P,
    old_logp [B, T]). The one place rollouts are made: training and calibration score exactly these token
    ids. old_logp, the log-probs PPO's ratio starts from, come with the samples (as TRL's): the official
    code runs the actor over the answers once more, which gives the same numbers (a test checks it)."""
    batch = data.collate_prompts(items, tok.pad_token_id)
    prompt_ids, prompt_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    P = prompt_ids.shape[1]
    seq, old_logp = generate(actor, prompt_ids, prompt_mask, cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p, generator=gen,
                             min_new_tokens=cfg.min_new_tokens, return_logprobs=True)
    mask = response_mask(seq, P, tok.eos_token_id, tok.pad_token_id)  # [B, T] real actions, EOS included
    return seq, torch.cat([prompt_mask, mask.long()], dim=1), mask, P, old_logp


@torch.no_grad()
def make_rollout(actor, items, tok, cfg, gen, device, layers=()):
    """rollout() as the constraints see it -> (Rollout, old_logp); with the actor's hidden states at
    `layers` when a constraint reads them (one more no-grad forward)."""
    seq, attn, mask, P, old_logp = rollout(actor, items, tok, cfg, gen, device)
    hidden = {}
    if layers:
        hs = actor(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), output_hidden_states=True,
                   use_cache=False).hidden_states
        hidden = {layer: hs[layer] for layer in layers}
    return Rollout(seq, attn, mask, P, tok, [it["prompt"] for it in items], hidden), old_logp


@torch.no_grad()
def calibrate_thresholds(actor, cons, items, tok, cfg, device, layers):
    """d for every stream the constraints leave uncalibrated (threshold None): the mean cost a policy
    would have if its answers were unsafe (cost > 0) target_rate of the time, with the starting
    policy's score levels for safe and unsafe answers. The answers are rollouts (same sampling, same
    token ids, same forward as training), so d is on training's scale. -> (thresholds, info per stream)"""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 77)  # its own stream: the rollouts' stays put
    per_batch = []
    for i in range(0, len(items), cfg.rollout_batch_size):
        ro, _ = make_rollout(actor, items[i:i + cfg.rollout_batch_size], tok, cfg, gen, device, layers)
        per_batch.append([x.float().cpu() for x in constraints.costs(cons, ro)])
    thresholds, info = [], []
    for k, (name, given) in enumerate(zip(constraints.stream_names(cons), [d for c in cons for d in c.thresholds])):
        if given is not None:
            thresholds.append(float(given))
            info.append(None)
            continue
        c = torch.cat([b[k] for b in per_batch])
        safe, unsafe = c[c <= 0], c[c > 0]
        if not len(safe) or not len(unsafe):
            raise config.ConfigError(f"constraint {name}: it calls {len(unsafe)} of {len(c)} answers of the starting policy unsafe "
                                     f"(cost > 0), so there is no safe and unsafe level to calibrate d between; pass --thresholds")
        thresholds.append(safe.mean().item() + cfg.target_unsafe_rate * (unsafe.mean().item() - safe.mean().item()))
        info.append({"start_mean_cost": c.mean().item(), "start_unsafe_by_cost_model": (c > 0).float().mean().item(),
                     "safe_mean": safe.mean().item(), "unsafe_mean": unsafe.mean().item(), "n": len(c)})
    return thresholds, info


def show_rollouts(step, seq, mask, P, R, C, tok, n=2):
    """A few of this iteration's answers with their scores: any data, no extra generation."""
    for i in range(min(n, seq.shape[0])):
        prompt = tok.decode(seq[i, :P], skip_special_tokens=True).strip().replace("\n", " ")
        answer = tok.decode(seq[i, P:][mask[i]], skip_special_tokens=True).strip().replace("\n", " ")
        tqdm.write(f"  [{step}] {prompt[-80:]!r} -> {answer[:160]!r} | reward {R[i]:+.2f}" + "".join(f" {n} {c[i]:+.2f}" for n, c in C.items()))

# -----------------------------------------------------------------------------
# setup, in the order main() runs it: prompts, models and constraints, thresholds and multipliers, resume


def check_flags(cfg, K_models):
    """The checks that need no model."""
    lagrangian = cfg.algo in ("ppo_lag", "grpo_lag")
    if cfg.algo == "grpo_lag" and (cfg.group_size < 2 or cfg.rollout_batch_size % cfg.group_size):
        raise config.ConfigError(f"--group_size ({cfg.group_size}) must be >= 2 and divide --rollout_batch_size ({cfg.rollout_batch_size}): "
                                 f"each prompt's G answers are z-scored against each other")
    if cfg.algo != "ppo" and not (K_models or cfg.banned_words or cfg.probe):
        raise config.ConfigError(f"--algo {cfg.algo} needs a constraint: at least one --cost_models folder (or --banned_words, --probe)")
    if cfg.lora_rank > 0 and cfg.fsdp:
        raise config.ConfigError("--lora_rank with --fsdp is not supported: LoRA makes a model fit on each GPU, FSDP shards one that does not; pick one")
    if cfg.probe_refresh_every and not cfg.probe:
        raise config.ConfigError("--probe_refresh_every refreshes the --probe constraint: give --probe FOLDER")
    if cfg.rollout_batch_size % cfg.minibatch_size or cfg.minibatch_size % cfg.micro_batch_size:
        raise config.ConfigError(f"batch sizes must nest: rollout_batch_size ({cfg.rollout_batch_size}) = k·minibatch_size "
                                 f"({cfg.minibatch_size}), minibatch_size = m·micro_batch_size ({cfg.micro_batch_size})")
    for path, what in [(cfg.model, "train_sft.py"), (cfg.reward_model, "train_pm.py --kind reward")] + [(p, "train_pm.py --kind cost") for p in cfg.cost_models]:
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint. Run the earlier stage first: python {what}")
    return lagrangian


def load_models(cfg, rt, out_dir, dtype):
    """The actor and its frozen reference, the frozen reward model, the constraints (with their frozen
    models), the trainable critics: placed, LoRA'd, checkpointed, sharded as the flags ask."""
    lora = cfg.lora_rank > 0
    actor_path = out_dir if cfg.resume and not lora else cfg.model  # LoRA resumes from the base and the saved adapters
    actor, tok = load_policy(actor_path, trust_remote_code=cfg.trust_remote_code)
    # LoRA: the reference is the actor itself, run with its adapters off (one backbone in memory, not two)
    ref = actor if lora else load_policy(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)[0]
    reward_model, rtok = load_score_model(cfg.reward_model, kind="reward", dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    check_same_tokenizer(tok, rtok, cfg.model, cfg.reward_model)
    cons = constraints.build(cfg, dtype)
    for c in cons:
        if isinstance(c, constraints.CostModel):
            check_same_tokenizer(tok, c.tok, cfg.model, c.path)
    frozen = [reward_model] + [m for c in cons for m in c.modules()]

    # critics start from the score models (official), or a fresh head on the actor's backbone (a rule, a probe);
    # reward shaping has one critic, on R - ν·ΣC; GRPO-Lag has none
    critics = {} if cfg.algo == "grpo_lag" else {
        "reward_critic": load_score_model(os.path.join(out_dir, "reward_critic") if cfg.resume and not lora else cfg.reward_model,
                                          kind="reward", trust_remote_code=cfg.trust_remote_code)[0]}
    for j, c in enumerate(cons if cfg.algo == "ppo_lag" else []):
        name = f"cost_critic_{j}"
        if cfg.resume and not lora:
            critics[name] = load_score_model(os.path.join(out_dir, name), kind="cost", trust_remote_code=cfg.trust_remote_code)[0]
        elif c.critic_from:
            critics[name] = load_score_model(c.critic_from, kind="cost", trust_remote_code=cfg.trust_remote_code)[0]
        else:  # seeded by its own generator: the same head on every rank, the global RNG streams untouched
            g = torch.Generator().manual_seed(cfg.seed + 1 + j)
            critics[name] = load_score_model(cfg.model, kind="cost", init_from_policy=True, trust_remote_code=cfg.trust_remote_code,
                                             labels=c.names if len(c.names) > 1 else None, generator=g)[0]
    for m in [actor, ref, *frozen, *critics.values()]:
        place(m, rt.device, cfg.attn_implementation)
    for m in frozen + ([] if lora else [ref]):
        m.eval().requires_grad_(False)
    if lora:  # adapters on the actor and the critics; only they (and the critics' heads) train
        for m in [actor, *critics.values()]:
            add_lora(m, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.gradient_checkpointing:  # the trained models only
        for m in [actor, *critics.values()]:
            gradient_checkpointing(m)
    if cfg.fsdp:  # every model, before the optimisers (they must hold the sharded parameters)
        for m in [actor, *critics.values(), ref, *frozen]:
            dist.shard(m, dtype)
    template = resolve_template(cfg.template, *([out_dir] if cfg.resume else []), cfg.model, cfg.reward_model, *cfg.cost_models)
    return actor, ref, reward_model, cons, critics, tok, template


def make_multipliers(cfg, thresholds):
    """One λ and one episode-cost window per stream."""
    if cfg.multiplier == "pid":
        lam = lambda d: PIDLagrange(d, cfg.lambda_init, cfg.pid_kp, cfg.pid_ki, cfg.pid_kd, cfg.lambda_max, cfg.lambda_update_delay_steps)
    else:
        lam = lambda d: Lagrange(d, cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max, cfg.lambda_update_delay_steps)
    return [lam(d) for d in thresholds], [EpisodeCostWindow(cfg.episode_cost_window_size) for _ in thresholds]


def set_thresholds(cfg, rt, actor, cons, train_set, tok, amp, layers, state, out_dir):
    """d per stream: the given ones, the others calibrated on the starting policy (on rank 0, then
    broadcast, its error too, so no rank waits forever). A resumed run keeps the d it started with:
    calibrating again on the half-trained actor would quietly move the constraint."""
    given = [d for c in cons for d in c.thresholds]
    if state is not None:
        if cfg.thresholds and [float(d) for d in given if d is not None] != [float(d) for d, g in zip(state["thresholds"], given) if g is not None]:
            raise config.ConfigError(f"--thresholds {cfg.thresholds} differ from the ones {out_dir} was trained with "
                                     f"({state['thresholds']}); a resumed run keeps its constraint. Drop --thresholds or start a new run.")
        return list(state["thresholds"]), read_state(out_dir).get("calibration", [])
    if None not in given or cfg.algo not in ("ppo_lag", "grpo_lag"):
        return [float(d) if d is not None else None for d in given], []
    for c in cons:
        if c.uncalibratable and None in c.thresholds:
            raise config.ConfigError(c.uncalibratable)
    d = info = err = None
    with dist.gathered(actor, *[m for c in cons for m in c.modules()]):  # every rank enters (FSDP gathers), rank 0 calibrates
        if rt.master:
            try:
                policy = actor
                if cfg.calibrate_on:  # another policy's answers (and, for a probe, its hidden states) set the score levels
                    policy, ctok = load_policy(cfg.calibrate_on, trust_remote_code=cfg.trust_remote_code)
                    check_same_tokenizer(tok, ctok, cfg.model, cfg.calibrate_on)
                    place(policy, rt.device, cfg.attn_implementation)
                with amp():
                    d, info = calibrate_thresholds(policy, cons, train_set.items[:256], tok, cfg, rt.device, layers)
            except config.ConfigError as e:
                err = str(e)
    d, info, err = dist.broadcast_object((d, info, err))
    if err:
        raise config.ConfigError(err)
    for name, dk, ik in zip(constraints.stream_names(cons), d, info):
        if ik is not None:
            print0(f"constraint {name}: threshold d = {dk:+.3f}, i.e. the mean cost of a policy whose answers it calls unsafe "
                   f"(cost > 0) {cfg.target_unsafe_rate:.0%} of the time. The starting policy: mean cost {ik['start_mean_cost']:+.3f}, "
                   f"{ik['start_unsafe_by_cost_model']:.0%} unsafe by it (safe answers {ik['safe_mean']:+.2f} on average, "
                   f"unsafe {ik['unsafe_mean']:+.2f}).")
    return d, info


def resume(state, out_dir, rt, actor, actor_opt, critics, critic_opts, lambdas, windows, cons, gen, lora):
    """Everything a checkpoint holds beyond the weights -> the iteration to start at."""
    if lora != bool(state.get("lora")):
        raise config.ConfigError(f"{out_dir} was trained {'with' if state.get('lora') else 'without'} --lora_rank; resume it with the flags it was started with")
    if lora:
        for n, m in {"": actor, **critics}.items():
            load_lora_state(m, state["lora"][n], out_dir)
    dist.load_optimizer_state(actor, actor_opt, state["actor_opt"], out_dir)
    for n, o in critic_opts.items():
        dist.load_optimizer_state(critics[n], o, state["critic_opts"][n], out_dir)
    for lam, s in zip(lambdas, state["lambdas"]):
        lam.load_state_dict(s)
    for w, s in zip(windows, state["windows"][rt.rank]):
        w.load_state_dict(s)
    for c, s in zip(cons, state.get("constraints") or [{}] * len(cons)):
        if s:
            c.load_state_dict(s)
    dist.set_rng_state(state["rng"][rt.rank])
    gen.set_state(state["gen"][rt.rank])
    print0(f"resumed from {out_dir} at iteration {state['step']}")
    return state["step"]


def main(cfg: Config):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    dist.check_fsdp(rt, cfg.fsdp)
    dtype = getattr(torch, cfg.dtype)  # the frozen models' weights; the trained ones stay fp32 (master weights)
    amp = dist.autocast(rt.device, dtype)
    out_dir = cfg.out_dir or f"out/{cfg.algo}"
    lagrangian = check_flags(cfg, len(cfg.cost_models))
    grpo = cfg.algo == "grpo_lag"
    lora = cfg.lora_rank > 0

    # ---- prompts: training rollouts; held-out ones for the gold evaluation (toy world)
    toy_world, train_path, eval_path = toy.data_paths(cfg, rt, "prompts")
    train_prompts, n_dup = data.dedupe_prompts(data.load_prompts(train_path))
    if n_dup:  # as the official prompt-only dataset: each prompt once
        print0(f"dropped {n_dup} duplicate prompts; {len(train_prompts)} left")
    eval_prompts = [r["prompt"] for r in data.load_prompts(eval_path)] if eval_path else []
    gold = bool(eval_prompts) and all(toy.in_world(p) for p in eval_prompts)

    # ---- models and constraints; their streams k = 0..K-1, each with a threshold d_k, a λ_k and a window
    if cfg.resume:
        recover_checkpoint(out_dir)  # a crash between save_checkpoint's two renames
    actor, ref, reward_model, cons, critics, tok, template = load_models(cfg, rt, out_dir, dtype)
    names = constraints.stream_names(cons)
    K = len(names)
    as_reference = adapters_off(ref)  # LoRA: ref is the actor, run as its base model; otherwise a no-op
    streams = [(f"cost_critic_{j}", col) for j, c in enumerate(cons) for col in range(len(c.names))]  # stream -> its critic, column
    # critic -> the (stream, column) pairs it predicts: a K-output cost critic has K
    predicts = {"reward_critic": [("reward", 0)]} | {n: [(k, col) for k, (m, col) in enumerate(streams) if m == n] for n in critics if n != "reward_critic"}
    layers = sorted({c.layer for c in cons if c.layer is not None})  # hidden states the constraints read
    train_set = data.PromptDataset(train_prompts, tok, cfg.max_prompt_length, cfg.truncate_prompts, template)
    if train_set.truncation_report():
        print0(train_set.truncation_report())
    state = load_trainer_state(out_dir) if cfg.resume else None
    thresholds, calib = set_thresholds(cfg, rt, actor, cons, train_set, tok, amp, layers, state, out_dir)
    lambdas, windows = make_multipliers(cfg, thresholds) if lagrangian else ([], [])
    it = iter(thresholds)
    for c in cons:  # each constraint holds its d's from here on (a refreshed probe moves its own)
        c.thresholds = [next(it) for _ in c.names]

    # ---- optimisers; the batch hierarchy; resume
    trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # all of them, or LoRA's adapters
    actor_opt = torch.optim.AdamW(trainable(actor), lr=cfg.actor_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    critic_opts = {n: torch.optim.AdamW(trainable(c), lr=cfg.critic_lr, betas=(0.9, 0.95), weight_decay=cfg.critic_weight_decay)
                   for n, c in critics.items()}
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # rollout sampling, per rank
    start_step = resume(state, out_dir, rt, actor, actor_opt, critics, critic_opts, lambdas, windows, cons, gen, lora) if state else 0
    ddp = rt.ddp and not cfg.fsdp  # FSDP shards the models in place
    ddp_actor = DDP(actor) if ddp else actor
    ddp_critics = {n: DDP(c) if ddp else c for n, c in critics.items()}
    n_mini = cfg.rollout_batch_size // cfg.minibatch_size
    n_micro = cfg.minibatch_size // cfg.micro_batch_size
    print0(f"{cfg.algo}: actor {num_params(actor) / 1e6:.2f}M params from {cfg.model}"
           + (f" ({sum(p.numel() for p in trainable(actor)) / 1e6:.3f}M in LoRA adapters of rank {cfg.lora_rank})" if lora else "") + f" | {len(train_set)} prompts | "
           f"per iteration: {cfg.rollout_batch_size} rollouts x {rt.world_size} procs -> {cfg.ppo_epochs} epochs x {n_mini} minibatches "
           f"of {cfg.minibatch_size} ({n_micro} micro-batches of {cfg.micro_batch_size}) = {cfg.ppo_epochs * n_mini} optimizer steps | "
           f"{cfg.max_steps} iterations | constraints: {', '.join(names) or 'none'} | critics: {', '.join(critics)}")
    os.makedirs(out_dir, exist_ok=True)
    metrics = dist.MetricsLog(os.path.join(out_dir, "metrics.jsonl"), rt.master, start_step if cfg.resume else None)
    guard = dist.NanGuard()
    clock = dist.Stopwatch(rt.device)
    meta = {"kind": "policy", "stage": cfg.algo, "template": template, "constraints": names, "thresholds": thresholds,
            "calibration": calib, "args": config.to_dict(cfg)}

    def gold_eval_now(step, n_samples=1):
        with amp():
            res = gold_evaluate(actor, tok, eval_prompts, n_samples=n_samples, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed + step, device=rt.device, template=template)
        tqdm.write(f"  [{step}] gold: helpfulness benign {res['gold_helpfulness_benign']:.3f} harmful {res['gold_helpfulness_harmful']:.3f} "
                   f"| unsafe harmful {res['gold_unsafe_rate_harmful']:.3f} benign {res['gold_unsafe_rate_benign']:.3f} "
                   f"| optimum {res['gold_optimum_helpfulness']:.3f}")
        return res

    def maybe_save(step):
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            final = step + 1 == cfg.max_steps and not cfg.save_optimizer  # the policy alone: critics and AdamW state only serve a resume
            save(out_dir, actor, critics, tok, meta, step + 1, actor_opt, critic_opts, lambdas, windows, thresholds, cons, gen, rt, final)

    # ---- the loop
    watch = CollapseWatch(cfg.collapse_ratio, cfg.show_every)
    pbar = dist.progress(range(start_step, cfg.max_steps), rt.master, initial=start_step, total=cfg.max_steps, desc=cfg.algo)
    for step in pbar:
        rec = {"step": step}
        if gold and (step == 0 or (cfg.eval_every and step % cfg.eval_every == 0)):
            with dist.gathered(actor):  # every rank enters (FSDP gathers the weights), rank 0 evaluates
                rec.update(gold_eval_now(step) if rt.master else {})
        clock.reset()  # seconds per phase of this iteration -> metrics.jsonl "time_s" (bench.py reads them)

        # 1. rollout: the unwrapped actor samples; pads after each EOS. GRPO: each prompt G times, consecutive rows
        G = cfg.group_size if grpo else 1
        idx = rollout_indices(len(train_set), step, cfg.rollout_batch_size, G, rt, cfg.seed)
        with amp(), dist.gathered(actor):  # FSDP: the actor gathered once for all its tokens, not per token
            ro, old_logp = make_rollout(actor, [train_set[i] for i in idx], tok, cfg, gen, rt.device, layers)
        seq, attn, mask, P = ro.seq, ro.attn, ro.mask, ro.P
        clock.lap("generate")

        # 2. reference log-probs, scores, old values: eval-mode forwards
        with torch.no_grad(), amp():
            with as_reference:  # LoRA: ref is the actor, run as its base model; otherwise a no-op
                ref_logp = action_logprobs(ref, seq, attn, P)
            clock.lap("ref_logprobs")
            R = reward_model(seq, attn)[1]
            C = constraints.costs(cons, ro)  # one [B] per stream
            for c in critics.values():
                c.eval()
            old_values = {n: action_values(c, seq, attn, P) for n, c in critics.items()}
            for c in critics.values():
                c.train()
            clock.lap("reward_cost_value_forwards")
        if guard.bad(R, *C, old_logp, ref_logp):
            print0(f"iteration {step}: non-finite scores or log-probs, skipped ({guard.skipped} so far)")
            maybe_save(step)  # a skipped last iteration still leaves the final checkpoint
            continue
        if any([c.observe(ro, C, step) for c in cons]):  # a refreshed probe learns from these answers, and moves its d
            thresholds = meta["thresholds"] = [d for c in cons for d in c.thresholds]
            for lam, d in zip(lambdas, thresholds):
                lam.threshold = d

        # 3. per-token rewards and costs with the KL penalty; 4. GAE per stream (GRPO: neither, the KL is a loss term)
        if grpo:
            rewards, costs = None, []
        elif lagrangian:
            per_stream = [ppo.kl_rewards(R, c, old_logp, ref_logp, mask, cfg.kl_coef, cfg.clip_range_score) for c in C]
            rewards, costs = per_stream[0][0], [s[1] for s in per_stream]
        else:
            end = R - cfg.shaping_coef * sum(C) if cfg.algo == "reward_shaping" else R
            rewards, costs = ppo.kl_rewards_single(end, old_logp, ref_logp, mask, cfg.kl_coef, cfg.clip_range_score), []
        adv, ret = {}, {}
        if not grpo:
            adv["reward"], ret["reward"] = ppo.gae(rewards, old_values["reward_critic"], mask, cfg.gamma, cfg.gae_lambda)
        for k, ((critic, col), r) in enumerate(zip(streams, costs)):
            adv[k], ret[k] = ppo.gae(r, column(old_values[critic], col), mask, cfg.gamma, cfg.gae_lambda)

        # 5. the dual step, once per rollout batch, before the actor update (as official);
        #    the window mean is pooled over ranks, so every rank takes the same step
        for k, lam in enumerate(lambdas):
            windows[k].extend(C[k].detach().cpu())
            J = windows[k].mean()
            lam.update(J)
            rec[f"episode_cost_window_{k}"] = J
        lam_values = [lam.value for lam in lambdas]  # fixed (detached) for this iteration's actor loss

        # 6. PPO epochs over minibatches: actor on the combined advantage, critics on their returns
        if grpo:  # one number per answer, every one of its tokens: [B] -> [B, T]
            advantage = ppo.grpo_lag_advantage(R, C, lam_values, G, cfg.grpo_std).unsqueeze(-1).expand_as(old_logp)
        elif lagrangian:
            advantage = ppo.combined_advantage(adv["reward"], [adv[k] for k in range(K)], lam_values)
        else:
            advantage = adv["reward"]
        clock.lap("gae_lambda")
        stats = {"policy_loss": [], "clip_frac": [], "ratio": [], "entropy": []} | {f"value_loss_{n}": [] for n in critics}
        B = seq.shape[0]
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, device=rt.device)
            for mb in perm.split(cfg.minibatch_size):
                micro_losses = []  # every micro-batch's loss is checked: one nan poisons the accumulated gradient
                for i, mi in enumerate(mb.split(cfg.micro_batch_size)):
                    last = i == n_micro - 1
                    with dist.no_sync([ddp_actor, *ddp_critics.values()], rt.ddp and not last):
                        with amp():
                            new_logp, ent = action_logprobs(ddp_actor, seq[mi], attn[mi], P, with_entropy=True)
                        pl, st = ppo.policy_loss(new_logp, old_logp[mi], advantage[mi], mask[mi], cfg.clip_range_ratio)
                        loss = pl
                        if grpo:  # the KL to the reference as a loss term (k3 estimator, DeepSeekMath / TRL's GRPO)
                            loss = loss + cfg.kl_coef * ppo.seq_mean(ppo.kl_k3(new_logp, ref_logp[mi]), mask[mi])
                        for name, critic in ddp_critics.items():
                            with amp():
                                v = action_values(critic, seq[mi], attn[mi], P)
                            vl = sum(ppo.value_loss(column(v, col), column(old_values[name][mi], col), ret[k][mi], mask[mi], cfg.clip_range_value)
                                     for k, col in predicts[name])  # one term per stream the critic predicts
                            loss = loss + vl  # separate models and optimisers: the sum only saves backward calls
                            stats[f"value_loss_{name}"].append(vl.detach())
                        clock.lap("train_forwards")
                        (loss / n_micro).backward()
                        clock.lap("backward")
                    micro_losses.append(loss.detach())
                    stats["policy_loss"].append(pl.detach())
                    stats["clip_frac"].append(st["clip_frac"])
                    stats["ratio"].append(st["ratio"])
                    stats["entropy"].append(ppo.masked_mean(ent.detach(), mask[mi]))
                if guard.bad(torch.stack(micro_losses)):
                    for o in [actor_opt, *critic_opts.values()]:
                        o.zero_grad(set_to_none=True)
                    continue
                torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.grad_clip)
                actor_opt.step()
                actor_opt.zero_grad(set_to_none=True)
                for name, critic in critics.items():
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
                    critic_opts[name].step()
                    critic_opts[name].zero_grad(set_to_none=True)
                clock.lap("optimizer_steps")

        # ---- log
        rec.update(iteration_record(ro, R, C, names, old_logp, ref_logp, lam_values, thresholds if lagrangian else [], stats, guard, rt, tok))
        if gold and toy_world:  # the oracle judges this iteration's answers beside what each constraint calls unsafe (logged, never trained on)
            rec.update(rollout_verdicts(ro, C, names))
        clock.lap("rest")
        rec["time_s"] = {k: round(v, 5) for k, v in clock.laps.items()}
        rec["iteration_s"] = clock.total()
        rec["tokens_per_s"] = mask.sum().item() * rt.world_size / rec["iteration_s"]
        metrics.log(rec)
        warn = watch.collapsing(step, rec)
        if rt.master and cfg.show_every and (step % cfg.show_every == 0 or warn):
            show_rollouts(step, seq, mask, P, R, dict(zip(names, C)), tok)
        pbar.set_postfix(r=f"{rec['reward']:+.2f}", **({"c": f"{rec['cost_0']:+.2f}"} if C else {}),
                         **({"λ": f"{lam_values[0]:.2f}"} if lam_values else {}), kl=f"{rec['kl']:.2f}", refresh=False)

        maybe_save(step)

    # ---- final gold evaluation: several samples per held-out prompt, temperature 1
    summary = {"algo": cfg.algo, "iterations": cfg.max_steps, "constraints": names, "thresholds": thresholds,
               "lambdas": [lam.value for lam in lambdas], "skipped": guard.skipped}
    if rt.ddp:  # every rank must hold the same λ and the same actor, or something is badly wrong
        mine = [lam.value for lam in lambdas] + [dist.param_checksum(actor)]
        states = dist.gather_objects(mine)
        if any(s != states[0] for s in states):
            raise RuntimeError(f"ranks disagree on λ / actor parameters: {states}")
        summary["ranks_agree"] = states
    if gold:
        with dist.gathered(actor):  # every rank enters (FSDP gathers the weights), rank 0 evaluates
            if rt.master:
                with amp():
                    summary["final"] = gold_evaluate(actor, tok, eval_prompts, n_samples=cfg.final_eval_samples, max_new_tokens=cfg.max_new_tokens,
                                                     seed=cfg.seed + 10**6, device=rt.device, template=template)
    if gold and rt.master:
        metrics.log({"step": cfg.max_steps, "final": True, **summary["final"]})
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print0(json.dumps(summary, indent=1))
    print0(f"saved {out_dir}. try: python sample.py --model {out_dir} --reward_model {cfg.reward_model} --cost_model {cfg.cost_models[0] if cfg.cost_models else ''}")
    dist.cleanup()


def rollout_indices(n, step, rollout_batch_size, group_size, rt, seed) -> list:
    """This rank's prompts at `step`: rollout_batch_size / group_size distinct ones from the seeded stream
    (dist.step_indices), each repeated group_size times in consecutive rows (GRPO's groups; 1: as they come)."""
    idx = dist.step_indices(n, step, rollout_batch_size // group_size * rt.world_size, rt.rank, rt.world_size, seed)
    return [i for i in idx for _ in range(group_size)]


def iteration_record(ro, R, C, names, old_logp, ref_logp, lam_values, thresholds, stats, guard, rt, tok) -> dict:
    """The iteration's line of metrics.jsonl (means over every rank's answers). The KL is the trained
    estimator, summed over each answer's tokens; cost_k, lambda_k, threshold_k are stream k's."""
    n_tokens = ro.mask.sum(-1).float()
    kl = torch.where(ro.mask, old_logp - ref_logp, 0.0).sum(-1)
    return {
        "reward": dist.all_reduce_mean(R.mean()).item(),
        **{f"cost_{k}": dist.all_reduce_mean(c.mean()).item() for k, c in enumerate(C)},
        **{f"lambda_{k}": v for k, v in enumerate(lam_values)},
        **{f"threshold_{k}": d for k, d in enumerate(thresholds)},
        "kl": dist.all_reduce_mean(kl.mean()).item(),
        "response_length": dist.all_reduce_mean(n_tokens.mean()).item(),
        "eos_frac": dist.all_reduce_mean((ro.seq[:, ro.P:] == tok.eos_token_id).any(-1).float().mean()).item(),
        **{k: torch.stack(v).mean().item() for k, v in stats.items() if v},
        "skipped": guard.skipped,
        "empty_frac": dist.all_reduce_mean((n_tokens <= 1).float().mean()).item(),  # the EOS alone
    }


class CollapseWatch:
    """Warns when the mean answer length falls below `ratio` of the first iteration's, or most answers are
    empty: once per `every` iterations, not every iteration."""

    def __init__(self, ratio, every):
        self.ratio, self.every, self.start_len, self.warned = ratio, max(1, every), None, None

    def collapsing(self, step, rec) -> bool:
        self.start_len = self.start_len or rec["response_length"]
        if not (rec["response_length"] < self.ratio * self.start_len or rec["empty_frac"] > 0.5) or step // self.every == self.warned:
            return False
        self.warned = step // self.every
        print0(f"warning: iteration {step}: the answers are collapsing: mean length {rec['response_length']:.1f} tokens "
               f"(the first iteration: {self.start_len:.1f}), {rec['empty_frac']:.0%} empty. The reward/cost models may prefer "
               f"short or empty answers (were their training answers truncated?); or lower --actor_lr, raise --kl_coef.")
        return True


def column(x, col):
    """Stream `col` of a critic's values: [B, T] for a one-output critic, [B, T, K] -> [B, T] for a K-output one."""
    return x if x.dim() == 2 else x[..., col]


def rollout_verdicts(ro, C, names):
    """Toy world: the gold unsafe rate of this iteration's answers to harmful prompts, beside the rate each
    stream's cost calls unsafe (cost > 0) on them: does the policy become safe, or only look safe to its constraint?"""
    harmful = torch.tensor([toy.is_harmful(p) for p in ro.prompts], device=ro.seq.device)
    gold_unsafe = torch.tensor([not toy.is_safe(p, a) for p, a in zip(ro.prompts, ro.answers())], device=ro.seq.device)
    n = dist.all_reduce_sum(harmful.sum().float()).clamp(min=1)
    out = {"rollout_gold_unsafe_harmful": (dist.all_reduce_sum((gold_unsafe & harmful).sum().float()) / n).item(),
           "rollout_gold_unsafe": dist.all_reduce_mean(gold_unsafe.float().mean()).item()}  # over every prompt, the mix the constraint is on
    for name, c in zip(names, C):
        out[f"rollout_flagged_harmful_{name}"] = (dist.all_reduce_sum(((c > 0) & harmful).sum().float()) / n).item()
        out[f"rollout_flagged_{name}"] = dist.all_reduce_mean((c > 0).float().mean()).item()
    return out


def save(out_dir, actor, critics, tok, meta, step, actor_opt, critic_opts, lambdas, windows, thresholds, cons, gen, rt, policy_only=False):
    """The policy as an HF folder, the critics beside it, and everything a resumed run needs (or the policy only).
    Every rank calls it: the RNG states, windows and (under FSDP) the weights and optimiser states are gathered."""
    rngs = dist.gather_rng_states()
    gens = dist.gather_objects(gen.get_state())
    wins = dist.gather_objects([w.state_dict() for w in windows])
    models = {"": actor} if policy_only else {"": actor, **critics}
    weights = {sub: plain_weights(m) for sub, m in models.items()}
    opt_states = None if policy_only else {n: dist.optimizer_state(critics[n], o) for n, o in critic_opts.items()} | {"": dist.optimizer_state(actor, actor_opt)}
    if rt.master:
        trainer_state = extra = None
        if not policy_only:
            trainer_state = {"step": step, "actor_opt": opt_states[""], "critic_opts": {n: opt_states[n] for n in critic_opts},
                             "lora": {sub: lora_state(m) for sub, m in models.items()} if lora_layers(actor) else None,
                             "lambdas": [lam.state_dict() for lam in lambdas], "windows": wins, "thresholds": thresholds,
                             "constraints": [c.state_dict() for c in cons],
                             "rng": rngs, "gen": gens}
            extra = {n: (c, tok, {"kind": c.kind, "role": "critic", "step": step, "categories": c.names or None}) for n, c in critics.items()}
        save_checkpoint(out_dir, actor, tok, dict(meta, step=step), trainer_state, extra, weights)
        for j, c in enumerate(cons):
            c.save(os.path.join(out_dir, f"constraint_{j}"))


if __name__ == "__main__":
    cfg = config.parse(Config, description=__doc__)
    try:
        main(cfg)
    except (data.DataError, CheckpointError, config.ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""
PPO pieces as pure functions on tensors: masked means, GAE, the per-token KL penalty,
the Safe RLHF advantage (and its critic-free GRPO form), the clipped policy and value losses.

Every tensor is [B, T] over response actions: action t is response token t, and `mask`
(bool or 0/1 float) marks the real ones, i.e. the response up to and including EOS.
Whatever sits at masked positions (pads, junk) never reaches a result.

Official defaults (PKU-Alignment/safe-rlhf, scripts/ppo-lag.sh) are in the comments.
"""

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# masked means

def masked_mean(x, mask, dim=None):
    """sum(x·m) / sum(m): the plain token mean over the mask (dim=None) or along `dim`."""
    mask = mask.bool()
    x = torch.where(mask, x, 0.0)  # where, not x*mask: inf * 0 would be nan
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)  # a row with no actions gives 0, not nan


def seq_mean(x, mask):
    """mean_b [ sum_t x·m / sum_t m ]: the official loss averaging (safe_rlhf.utils.masked_mean)."""
    # each response counts once whatever its length; with equal per-rank batch sizes the mean
    # of the ranks' seq_means (what DDP's gradient averaging does) is the full-batch seq_mean
    return masked_mean(x, mask, dim=-1).mean()


# -----------------------------------------------------------------------------
# log-probs and entropy from logits [B, T, V]

def logprobs_from_logits(logits, labels):
    """log softmax(logits)[labels] → [B, T]."""
    # bf16 is too coarse for exp(logp − logp_old)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # gather − logsumexp is log_softmax + gather without a second [B, T, V] tensor
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits):
    """H = −Σ_v p·log p → [B, T]."""
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)

# -----------------------------------------------------------------------------
# advantages

@torch.no_grad()
def gae(rewards, values, mask, gamma, lam):
    """A_t = Σ_k (γλ)^k δ_{t+k}, δ_t = r_t + γ·V_{t+1} − V_t; returns = A + V.
    Official γ = 1.0, λ = 0.95."""
    mask = mask.bool()
    # zero rewards and values after each row's end (the official code does the same), so the
    # value after the last real action is 0 and nothing past it leaks into earlier steps
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    T = rewards.size(1)
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):  # vectorised over B; T is a few hundred at most
        next_value = values[:, t + 1] if t + 1 < T else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(mask[:, t], delta + gamma * lam * last, 0.0)
        advantages[:, t] = last
    return advantages, advantages + values


def combined_advantage(reward_adv, cost_advs, lambdas, units=None):
    """(A_r − Σ_k λ_k·A_ck) / (1 + Σ_k λ_k/u_k): the Safe RLHF actor advantage, K = len(lambdas).

    u_k is stream k's unit (constraints.stream_units): 1 for a cost read as it comes, which is the
    official (A_r − λ·A_c)/(1 + λ); ū − s̄ for a cost model read on the rate scale. A rate-scale
    cost is the raw one over u, so its advantage is A_c,raw/u and λ·A_c = (λ/u)·A_c,raw: the
    official form at λ_raw = λ/u, whose divisor is 1 + λ/u. Dividing by 1 + λ instead would
    shrink the scores ~u times more than the KL (docs/findings.md, "the divisor")."""
    assert len(cost_advs) == len(lambdas), f"{len(cost_advs)} cost advantages, {len(lambdas)} λ"
    units = units or [1.0] * len(lambdas)
    # dividing by 1 + Σλ keeps the advantage on the reward's scale as λ grows, so the PPO
    # clip range and the actor lr mean the same thing whatever λ is
    penalty = sum(lam * adv for lam, adv in zip(lambdas, cost_advs))
    return (reward_adv - penalty) / (1.0 + sum(lam / u for lam, u in zip(lambdas, units)))


def group_zscore(scores, group_size, eps=1e-6, std="group"):
    """[B] -> [B]: each score minus its group's mean, over a std, where a group is group_size
    consecutive rows (the G answers to one prompt; GRPO, Shao et al. 2024). std="group": the group's
    own (unbiased, as TRL's GRPOTrainer); a group of equal scores gives 0, not NaN. std="batch": the
    whole batch's (unbiased): a group whose scores barely differ gets a small advantage, not ±1"""
    B = scores.shape[0]
    if group_size < 2 or B % group_size:
        raise ValueError(f"group_size {group_size} must be >= 2 and divide the batch of {B}")
    if std not in ("group", "batch"):
        raise ValueError(f"std must be 'group' or 'batch', got {std!r}")
    g = (scores if scores.is_floating_point() else scores.float()).view(-1, group_size)
    scale = g.std(dim=1, keepdim=True) if std == "group" else g.std()
    z = (g - g.mean(dim=1, keepdim=True)) / (scale + eps)
    return z.view(B)


def grpo_lag_advantage(end_reward, end_costs, lambdas, group_size, std="group"):
    """Lagrangian GRPO, critic-free: (Z_R − Σ_k λ_k·Z_Ck) / (1 + Σ_k λ_k) per answer, with Z the
    per-stream group z-score of its end score (std: group_zscore's). One number per answer [B]:
    the advantage of every token of that answer. No unit enters: a z-score has none, so the
    cost's scale (rate or raw) moves only d and λ's dynamics here; the KL is a loss term."""
    return combined_advantage(group_zscore(end_reward, group_size, std=std),
                              [group_zscore(c, group_size, std=std) for c in end_costs], lambdas)

# -----------------------------------------------------------------------------
# per-token rewards: end score + KL penalty against the reference policy

def _score_stream(end_score, per_token, mask, clip, ends=None):
    # add each row's end score at its last real action (a dialogue's [B, N] scores: turn n's at
    # action ends[:, n]), clamp, zero the masked positions
    mask = mask.bool()
    T = mask.size(1)
    if ends is None:
        end = T - 1 - mask.flip(-1).int().argmax(-1)  # argmax gives the first max: the last True
        end, end_score = end.unsqueeze(-1), end_score.unsqueeze(-1)
    else:
        end = ends
    out = per_token.scatter_add(-1, end, end_score.to(per_token.dtype))
    return torch.where(mask, out.clamp(-clip, clip), 0.0)  # official clip_range_score 50


def kl_rewards(end_reward, end_costs, logprobs, ref_logprobs, mask, kl_coef, clip=50.0,
               cost_units=None, ends=None):
    """r_t = −β·KL_t (+R at the end), c_kt = +β·KL_t/u_k (+C_k at the end), KL_t = logπ − logπ_ref.
    -> (rewards [B, T], [costs [B, T] per stream]); no cost streams: plain PPO's one stream.

    The form of safe-rlhf's ppo_lag trainer (add_kl_divergence_regularization): the k1 estimate
    on the sampled tokens, the whole −β·KL in the reward stream and +β·KL in the cost stream;
    official β = 0.01 (scripts/ppo-lag.sh); each stream clamped to ±50 after adding its score.
    The actor's (A_r − λ·A_c)/(1 + λ) then carries −β·KL·(1 + λ)/(1 + λ) = exactly −β·KL,
    whatever λ is. (Before safe-rlhf PR #173, April 2024, each stream had ½·β with β = 0.02,
    which is what the paper's "evenly split" describes; the actor felt ½·β·KL then.)
    u_k (constraints.stream_units, default 1): a cost on the rate scale is the raw one over u_k,
    and so is its KL share; with combined_advantage's 1 + λ/u the actor carries −β·KL again.
    A dialogue: scores [B, N] per assistant turn, turn n's added at action ends[:, n] [B, N].
    """
    units = cost_units or [1.0] * len(end_costs)
    penalty = -kl_coef * (logprobs - ref_logprobs)
    rewards = _score_stream(end_reward, penalty, mask, clip, ends)
    return rewards, [_score_stream(c, -penalty / u, mask, clip, ends)
                     for c, u in zip(end_costs, units)]


def kl_k3(logprobs, ref_logprobs):
    """exp(logπ_ref − logπ) − (logπ_ref − logπ) − 1 per token: the k3 estimate of KL(π ‖ π_ref) on
    tokens sampled from π, unbiased and never negative (Schulman 2020); GRPO's loss-term KL."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


# -----------------------------------------------------------------------------
# losses

def policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2):
    """−seq_mean(min(ρ·A, clip(ρ, 1±ε)·A)), ρ = exp(logπ − logπ_old). Official ε = 0.2.

    stats: clip_frac (token fraction with |ρ − 1| > ε) and ratio (token mean of ρ), detached
    0-dim tensors; call .item() when logging, not here (a CPU-GPU sync point).
    """
    # ratio 1 at pads: a pad's wild log-ratio could overflow exp, and inf·0 is nan in the backward
    ratio = torch.exp(torch.where(mask.bool(), logprobs - old_logprobs, 0.0))
    surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
    loss = -seq_mean(surrogate, mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, clip=5.0):
    """½·seq_mean(max((V − R)², (clip(V, V_old ± ε) − R)²)). Official ε = 5.0."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * seq_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)

"""
The dual variable(s) of PPO-Lagrangian: max_θ min_{λ≥0} J_r(θ) − λ·(J_c(θ) − d).

λ = exp(log λ), so λ > 0 without a projection. The official dual step (safe-rlhf,
ppo_lag/trainer.py) is plain SGD with lr on the loss −λ·(J_c − d) w.r.t. log λ:

    log λ ← log λ + lr·λ·(J_c − d)        then log λ ≤ log λ_max

so λ rises while the policy is unsafe on average (J_c > d) and falls once it is safe.
J_c is the mean episode cost over a recent window (EpisodeCostWindow), the same number on
every rank, so every rank takes the same step and nothing needs broadcasting.
K constraints are K of these objects, each with its own threshold and window.

The cadence is the official one: one dual step per actor optimiser step, before it
(safe-rlhf's PPOLagTrainer.rl_step takes the window's mean and steps log λ at every call, then
computes the actor loss with the new λ). The official window takes a rollout's costs when they
are scored (post_rollout); here `dual_step` adds each step's minibatch costs just before its
step, so λ reacts within the iteration to the answers it trains on. With a 128-cost window and
128 rollouts per iteration, the two windows hold the same costs at each iteration's last step.
"""

import math
from collections import deque

import torch
import torch.distributed as dist

# exp(50) ≈ 5e21 is far past any useful λ and far from float overflow (exp(710) = inf).
# log λ is clamped to ±LOG_LAMBDA_BOUND so λ is never inf, and never exactly 0 either, from
# where a multiplicative step could never climb back.
LOG_LAMBDA_BOUND = 50.0


def _error(mean_episode_cost, threshold):
    j = float(mean_episode_cost)
    if not math.isfinite(j):  # a nan λ would silently poison every later advantage
        raise ValueError(f"mean episode cost must be finite, got {j} (nan scores? empty window?)")
    return j - threshold


def _upper(lambda_max):
    if lambda_max is None:
        return LOG_LAMBDA_BOUND
    if not lambda_max > 0:
        raise ValueError(f"lambda_max must be > 0 or None, got {lambda_max}")
    return min(math.log(lambda_max), LOG_LAMBDA_BOUND)


def _log_init(lambda_init):
    if not lambda_init > 0:
        raise ValueError(f"lambda_init must be > 0 (λ lives in log space), got {lambda_init}")
    return math.log(lambda_init)


class Lagrange:
    """One multiplier, the official update. Official: lambda_init 1.0, lr 0.1, lambda_max 5.0."""

    def __init__(self, threshold, lambda_init=1.0, lr=0.1, lambda_max=None, update_delay_steps=0):
        self.threshold = float(threshold)  # d; official 0.0
        self.lr = float(lr)
        self.update_delay_steps = int(update_delay_steps)
        self.hi = _upper(lambda_max)
        self.log_lambda = self._clamp(_log_init(lambda_init))
        self.step = 0  # update() calls so far, delayed ones included

    def _clamp(self, x):
        return min(max(x, -LOG_LAMBDA_BOUND), self.hi)

    @property
    def value(self):
        return math.exp(self.log_lambda)

    def update(self, mean_episode_cost):
        """One dual step on J_c = mean_episode_cost; returns the new λ."""
        err = _error(mean_episode_cost, self.threshold)
        if self.step >= self.update_delay_steps:
            # d(−λ·err)/d(log λ) = −λ·err, so one SGD step adds lr·λ·err.
            # the `if err` keeps inf·0 (absurd lr at λ near the bound) from making a nan
            step = self.lr * self.value * err if err else 0.0
            self.log_lambda = self._clamp(self.log_lambda + step)
        self.step += 1
        return self.value

    def state_dict(self):
        return {"log_lambda": self.log_lambda, "step": self.step}

    def load_state_dict(self, state):
        self.log_lambda, self.step = float(state["log_lambda"]), int(state["step"])


def episode_total(x):
    """A score per episode [B]: as it is, or a dialogue's per-turn parts [B, N] summed."""
    return x.sum(-1) if x.dim() == 2 else x


def dual_step(lambdas, windows, costs, rows=None) -> list:
    """One step of every multiplier: stream k's window takes costs[k][rows] (this actor step's
    episodes; None: all of them), then λ_k steps on the window's mean. -> [J_k]
    A dialogue's costs come per turn [B, N]: its episode cost is their sum."""
    J = []
    for lam, window, c in zip(lambdas, windows, costs):
        c = episode_total(c)
        window.extend((c if rows is None else c[rows]).detach().cpu())
        J.append(window.mean())
        lam.update(J[-1])
    return J

# -----------------------------------------------------------------------------

class EpisodeCostWindow:
    """The last `size` episode costs on this rank (official: 128 per rank); mean() over all ranks.

    mean() pools: Σ costs / Σ counts over every rank's window, one all_reduce(SUM) (gloo has
    no ReduceOp.AVG). The official code averages the per-rank means instead; the two agree
    when every window holds the same number of costs (as there, after the first few steps),
    and pooling stays right when they don't. Every rank gets the same float, so every
    rank's multiplier takes the same step.
    """

    def __init__(self, size=128):
        self.costs = deque(maxlen=size)

    def __len__(self):
        return len(self.costs)

    def extend(self, costs):
        costs = torch.as_tensor(costs, dtype=torch.float64)
        if costs.dim() > 1:  # K constraints need K windows, not one flattened window
            raise ValueError(f"expected a flat list of episode costs, got shape "
                             f"{tuple(costs.shape)}")
        self.costs.extend(costs.reshape(-1).tolist())

    def mean(self):
        stats = torch.tensor([sum(self.costs), len(self.costs)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":  # nccl only reduces cuda tensors
                stats = stats.cuda()
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        total, count = stats.tolist()
        if count == 0:
            raise ValueError("no episode costs in the window on any rank yet")
        return total / count

    def state_dict(self):
        return {"size": self.costs.maxlen, "costs": list(self.costs)}

    def load_state_dict(self, state):
        self.costs = deque((float(c) for c in state["costs"]), maxlen=int(state["size"]))

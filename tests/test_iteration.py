"""One PPO-Lag iteration's wiring, from the end scores to the actor's advantage, on a hand-made
batch: 3 answers of 5, 3 and 1 tokens; a reward critic; a 1-output cost model and a K=2-output
cost model (3 cost streams, 2 cost critics, the second with 2 outputs).

Every step runs through the real functions, in train_ppo_lag.main's order:

    constraints.costs        the cost streams, a [B, K] cost split into K streams
    rl.action_values         each critic's values before each answer token
    rl.column                each stream's column of its critic (heads, as main builds them)
    ppo.kl_rewards           per-token rewards and costs with the KL penalty, clamped
    ppo.gae                  advantages and returns per stream
    rl.multipliers           a Lagrange and an EpisodeCostWindow per stream
    lagrange.dual_step       each window takes the step's costs, log λ += lr·λ·(J − d)
    ppo.combined_advantage   (A_r − Σ λ_k·A_ck) / (1 + Σ λ_k)

and each result is compared with a naive reference written below as plain Python loops over
rows and tokens. The padding positions hold nan: none may reach a result.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from nanosafe import constraints, lagrange, ppo, rl

NAN = float("nan")
P, LENGTHS = 2, [5, 3, 1]  # prompt columns; each answer's real tokens (EOS included)
B, T = len(LENGTHS), max(LENGTHS)
KL_COEF, CLIP, GAMMA, GAE_LAMBDA = 0.1, 2.0, 0.9, 0.8
LAMBDA_LR, LAMBDA_MAX, WINDOW = 0.5, 2.5, 5


def rows(values):
    """[[...] per row] -> [B, T] float tensor, nan where a row has no token"""
    return torch.tensor([v + [NAN] * (T - len(v)) for v in values])


# the policy's and the reference's log-probs of the sampled tokens
LOGP = rows([[-1.0, -0.5, -2.0, -0.1, -0.7], [-0.3, -1.2, -0.9], [-0.4]])
REF = rows([[-1.4, -0.5, -1.0, -0.6, -0.2], [-0.8, -0.2, -1.9], [-2.4]])
MASK = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])

R = torch.tensor([3.0, -0.4, 1.1])  # row 0: clamped to CLIP at its end
C_ONE = torch.tensor([0.6, -2.5, 0.2])  # the 1-output cost model (row 1: clamped to -CLIP)
C_TWO = torch.tensor([[0.9, -0.3], [1.5, 0.4], [-0.7, 2.2]])  # the 2-output one: [B, 2]


class FakeCost(constraints.Constraint):
    """A constraint whose costs are given: [B] or [B, K]"""

    def __init__(self, names, costs):
        self.names, self.thresholds, self.costs = names, [None] * len(names), costs

    def cost(self, ro):
        return self.costs


def critic(scores):
    """A critic whose scores at every position of [prompt | answer] are given: [B, P + T(, K)]"""
    return lambda seq, attn: (scores, None)


def positions(row_values):
    """values before each answer token [B][T(, K)] -> scores at every position [B, P + T(, K)]:
    V(s_t) is the critic's score at position P - 1 + t; position 0 and the last are never read"""
    x = torch.tensor(row_values)
    pad = torch.full((B, 1, *x.shape[2:]), 123.0)  # position 0, never read
    return torch.cat([pad, x, torch.full_like(pad, 456.0)], dim=1)  # ... and the last position


# the critics' values before each answer token, by hand (pads: nan)
V_REWARD = [[0.5, 0.2, -0.1, 0.3, 0.8], [0.1, -0.6, 0.4, NAN, NAN], [0.9, NAN, NAN, NAN, NAN]]
V_COST_ONE = [[0.2, 0.0, 0.4, -0.3, 0.1], [-0.5, 0.7, 0.3, NAN, NAN], [0.6, NAN, NAN, NAN, NAN]]
V_COST_TWO = [
    [[0.1, -0.9], [0.3, 0.8], [-0.2, 0.5], [0.4, -0.4], [0.0, 1.2]],
    [[0.7, -0.1], [-0.3, 0.6], [0.2, -0.8], [NAN, NAN], [NAN, NAN]],
    [[-0.6, 1.0], [NAN, NAN], [NAN, NAN], [NAN, NAN], [NAN, NAN]],
]

# the multipliers: d per stream, λ at the start of this iteration, the costs already in each window
THRESHOLDS = [0.0, 0.3, -1.0]
LAMBDA_START = [1.0, 0.5, 2.0]
WINDOW_BEFORE = [[0.1, 0.4, -0.2, 0.3], [0.0, 0.5, 0.2, 0.1], [0.3, 0.2, 0.6, 0.4]]

# -----------------------------------------------------------------------------
# the naive reference: loops over rows and tokens


def naive_kl_stream(end_score, sign):
    """per token: sign·β·(logπ − logπ_ref), plus the end score at the row's last token, clamped"""
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(LENGTHS[b]):
            x = sign * KL_COEF * (LOGP[b, t].item() - REF[b, t].item())
            if t == LENGTHS[b] - 1:
                x += end_score[b]
            out[b][t] = min(max(x, -CLIP), CLIP)
    return out


def naive_gae(rewards, values):
    """A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γ·V_{t+1} − V_t, V after the row's end = 0"""
    adv, ret = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = 0.0
        for t in reversed(range(LENGTHS[b])):
            next_v = values[b][t + 1] if t + 1 < LENGTHS[b] else 0.0
            delta = rewards[b][t] + GAMMA * next_v - values[b][t]
            last = delta + GAMMA * GAE_LAMBDA * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return adv, ret


def naive_lambda(lam, d, window, new_costs):
    """The official step on the window's mean: log λ += lr·λ·(J − d), then log λ <= log λ_max"""
    costs = (window + new_costs)[-WINDOW:]
    J = sum(costs) / len(costs)
    log_lam = min(math.log(lam) + LAMBDA_LR * lam * (J - d), math.log(LAMBDA_MAX))
    return J, math.exp(log_lam)


def close(tensor, expected, what):
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), msg=what)


# -----------------------------------------------------------------------------


def test_one_iteration_from_end_scores_to_the_actor_advantage():
    # the constraints and their streams, as the run sees them
    cons = [FakeCost(["cost"], C_ONE), FakeCost(["violence", "fraud"], C_TWO)]
    C = constraints.costs(cons, ro=None)
    assert constraints.stream_names(cons) == ["cost", "violence", "fraud"] and len(C) == 3
    streams_by_hand = [C_ONE.tolist(), C_TWO[:, 0].tolist(), C_TWO[:, 1].tolist()]
    for k in range(3):
        close(C[k], streams_by_hand[k], f"cost stream {k}")

    # the critics' values (action_values: the score at the previous position), as in main
    seq, attn = torch.zeros(B, P + T, dtype=torch.long), torch.ones(B, P + T, dtype=torch.long)
    critics = {
        "reward_critic": critic(positions(V_REWARD)),
        "cost_critic_0": critic(positions(V_COST_ONE)),
        "cost_critic_1": critic(positions(V_COST_TWO)),
    }
    old_values = {n: rl.action_values(c, seq, attn, P) for n, c in critics.items()}
    assert old_values["cost_critic_1"].shape == (B, T, 2)
    # stream -> (its critic, the critic's output column): train_ppo_lag.main's lines
    streams = [(f"cost_critic_{j}", col) for j, c in enumerate(cons) for col in range(len(c.names))]
    heads = {"reward": ("reward_critic", 0)} | dict(enumerate(streams))
    assert heads == {
        "reward": ("reward_critic", 0),
        0: ("cost_critic_0", 0),
        1: ("cost_critic_1", 0),
        2: ("cost_critic_1", 1),
    }

    # 3. per-token rewards and costs
    rewards, costs = ppo.kl_rewards(R, C, LOGP, REF, MASK, KL_COEF, CLIP)
    naive_r = naive_kl_stream(R.tolist(), -1)
    naive_c = [naive_kl_stream(s, +1) for s in streams_by_hand]
    close(rewards, naive_r, "reward stream")
    assert naive_r[0][4] == CLIP and naive_c[0][1][2] == -CLIP  # the clamp bites where it should
    assert len(costs) == 3
    for k in range(3):
        close(costs[k], naive_c[k], f"cost stream {k}")

    # 4. GAE per stream on its critic's column
    adv, ret = {}, {}
    for s, r in zip(heads, [rewards, *costs]):
        name, col = heads[s]
        adv[s], ret[s] = ppo.gae(r, rl.column(old_values[name], col), MASK, GAMMA, GAE_LAMBDA)
    values_by_hand = {
        "reward": V_REWARD,
        0: V_COST_ONE,
        1: [[v[0] for v in row] for row in V_COST_TWO],
        2: [[v[1] for v in row] for row in V_COST_TWO],
    }
    naive_adv = {}
    for s, r in zip(["reward", 0, 1, 2], [naive_r, *naive_c]):
        naive_adv[s], naive_ret = naive_gae(r, values_by_hand[s])
        close(adv[s], naive_adv[s], f"advantages of stream {s}")
        close(ret[s], naive_ret, f"returns of stream {s}")
    # the columns matter: stream 1 on the K=2 critic's other column gives other advantages
    wrong, _ = naive_gae(naive_c[1], values_by_hand[2])
    assert (adv[1] - torch.tensor(wrong)).abs().max() > 0.1

    # 5. the dual step on each stream's window mean, before the actor's loss
    cfg = SimpleNamespace(
        multiplier="sgd",
        lambda_init=1.0,
        lambda_lr=LAMBDA_LR,
        lambda_max=LAMBDA_MAX,
        lambda_update_delay_steps=0,
        episode_cost_window_size=WINDOW,
    )
    lambdas, windows = rl.multipliers(cfg, THRESHOLDS)
    for lam, window, start, before in zip(lambdas, windows, LAMBDA_START, WINDOW_BEFORE):
        lam.load_state_dict({"log_lambda": math.log(start), "step": 4})  # an iteration mid-run
        window.extend(before)
    J = lagrange.dual_step(lambdas, windows, C)  # update()'s line, one actor step on all rows
    lam_values = [lam.value for lam in lambdas]
    naive_lams = []
    for k in range(3):
        naive_J, naive_lam = naive_lambda(
            LAMBDA_START[k], THRESHOLDS[k], WINDOW_BEFORE[k], streams_by_hand[k]
        )
        assert J[k] == pytest.approx(naive_J, abs=1e-7), k
        assert lam_values[k] == pytest.approx(naive_lam, rel=1e-9), k
        naive_lams.append(naive_lam)
    assert naive_lams[2] == pytest.approx(LAMBDA_MAX)  # capped
    assert naive_lams[0] < LAMBDA_START[0] and naive_lams[1] > LAMBDA_START[1]  # one down, one up

    # 6. the actor's advantage
    A = ppo.combined_advantage(adv["reward"], [adv[k] for k in range(3)], lam_values)
    naive_A = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(LENGTHS[b]):
            penalty = sum(naive_lams[k] * naive_adv[k][b][t] for k in range(3))
            naive_A[b][t] = (naive_adv["reward"][b][t] - penalty) / (1 + sum(naive_lams))
    close(A, naive_A, "the actor's advantage")
    assert torch.isfinite(A).all() and (A[~MASK] == 0).all()

"""nanosafe.ppo against hand-computed values and naive for-loop references."""

import math

import pytest
import torch

from nanosafe.ppo import (
    combined_advantage,
    entropy_from_logits,
    gae,
    group_zscore,
    grpo_lag_advantage,
    kl_k3,
    kl_rewards,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    seq_mean,
    value_loss,
)


@pytest.fixture(autouse=True)
def float64():
    # hand values to 1e-12; restored after each test so other test files keep float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def ragged(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def with_junk(x, mask, seed=0):
    # large random numbers where the mask is off: none of it may reach a result
    g = torch.Generator().manual_seed(seed)
    return torch.where(mask, x, 1e6 * torch.randn(x.shape, generator=g))


# -----------------------------------------------------------------------------
# GAE


def naive_gae(rewards, values, lengths, gamma, lam):
    # one row at a time, plain python floats, only the real steps of each row
    B, T = len(lengths), rewards.shape[1]
    adv, ret = torch.zeros(B, T), torch.zeros(B, T)
    for b, L in enumerate(lengths):
        r, v = rewards[b, :L].tolist(), values[b, :L].tolist()
        a = 0.0
        for t in reversed(range(L)):
            next_v = v[t + 1] if t + 1 < L else 0.0
            a = r[t] + gamma * next_v - v[t] + gamma * lam * a
            adv[b, t], ret[b, t] = a, a + v[t]
    return adv, ret


def test_gae_matches_naive_loop_and_ignores_junk():
    torch.manual_seed(0)
    lengths, T = [7, 1, 4, 5, 2], 7
    mask = ragged(lengths, T)
    rewards, values = torch.randn(5, T), torch.randn(5, T)
    ref_adv, ref_ret = naive_gae(rewards, values, lengths, gamma=0.99, lam=0.95)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, ref_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=0, atol=1e-12)
    # junk after each row's end changes nothing, and masked advantages/returns are 0
    adv2, ret2 = gae(
        with_junk(rewards, mask, 1), with_junk(values, mask, 2), mask, gamma=0.99, lam=0.95
    )
    torch.testing.assert_close(adv2, adv, rtol=0, atol=0)
    torch.testing.assert_close(ret2, ret, rtol=0, atol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # a float mask works the same
    torch.testing.assert_close(
        gae(rewards, values, mask.double(), 0.99, 0.95)[0], adv, rtol=0, atol=0
    )


def test_gae_hand_example():
    # gamma=1, lam=0.95, rewards [0, 0, 1], values [0.5, 0.6, 0.7], value after the end 0:
    #   d2 = 1 + 0 - 0.7 = 0.3                 A2 = 0.3
    #   d1 = 0 + 0.7 - 0.6 = 0.1               A1 = 0.1 + 0.95*0.3   = 0.385
    #   d0 = 0 + 0.6 - 0.5 = 0.1               A0 = 0.1 + 0.95*0.385 = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]), rtol=0, atol=1e-12)


def test_gae_lambda_one_returns_are_discounted_reward_sums():
    # with lam=1 the values telescope away: R_t = sum_k gamma^k r_{t+k}, whatever V is
    torch.manual_seed(1)
    lengths, T, gamma = [6, 3, 1], 6, 0.9
    mask = ragged(lengths, T)
    rewards, values = torch.randn(3, T), torch.randn(3, T)
    _, ret = gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b, L in enumerate(lengths):
        for t in range(L):
            expected = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, L))
            assert math.isclose(ret[b, t].item(), expected, abs_tol=1e-12)


# -----------------------------------------------------------------------------
# per-token rewards and costs


def test_kl_rewards_end_score_on_last_real_token():
    mask = ragged([3, 1, 4], 4)
    logp = torch.randn(3, 4)
    R, C = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 4.0])
    rewards, (costs,) = kl_rewards(R, [C], logp, logp, mask, kl_coef=0.1)  # logp == ref: no KL
    expected_r = torch.tensor([[0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 3.0]])
    expected_c = torch.tensor([[0, 0, -1.0, 0], [0.5, 0, 0, 0], [0, 0, 0, 4.0]])
    torch.testing.assert_close(rewards, expected_r, rtol=0, atol=0)
    torch.testing.assert_close(costs, expected_c, rtol=0, atol=0)


def test_kl_rewards_official_form_hand_values():
    # safe-rlhf's ppo_lag add_kl_divergence_regularization: −β·KL in the reward stream, +β·KL in the
    # cost stream
    mask = ragged([3, 2], 4)
    ref = torch.zeros(2, 4)
    logp = with_junk(torch.full((2, 4), 0.5), mask)  # logp > ref: the policy drifted, KL_t = 0.5
    R, C = torch.tensor([100.0, 1.0]), torch.tensor([0.0, -100.0])
    beta = 0.2
    rewards, (costs,) = kl_rewards(R, [C], logp, ref, mask, kl_coef=beta, clip=50.0)
    # drift lowers the reward stream and raises the cost stream by β·KL = 0.1 each, not half of it
    torch.testing.assert_close(rewards[0, :2], torch.full((2,), -0.1), rtol=0, atol=1e-15)
    torch.testing.assert_close(costs[0, :2], torch.full((2,), 0.1), rtol=0, atol=1e-15)
    # the end score is added, then clamped to ±50:
    # 100 − 0.1 → 50; 0 + 0.1; 1 − 0.1; −100 + 0.1 → −50
    assert rewards[0, 2].item() == 50.0 and math.isclose(costs[0, 2].item(), 0.1, abs_tol=1e-15)
    assert math.isclose(rewards[1, 1].item(), 0.9, abs_tol=1e-15) and costs[1, 1].item() == -50.0
    # masked positions are 0 even though logp holds 1e6-sized junk there
    assert (rewards[~mask] == 0).all() and (costs[~mask] == 0).all()
    # the single stream (plain PPO / reward shaping) takes the same −β·KL
    single, none = kl_rewards(R, [], logp, ref, mask, kl_coef=beta, clip=50.0)
    assert none == [] and torch.equal(single, rewards)  # no cost stream: the same reward stream
    torch.testing.assert_close(single[0, :2], torch.full((2,), -0.1), rtol=0, atol=1e-15)
    assert single[0, 2].item() == 50.0 and (single[~mask] == 0).all()


@pytest.mark.parametrize("lam,unit", [(0.0, 1.0), (1.0, 1.0), (7.5, 1.0), (7.5, 9.29)])
def test_combined_advantage_carries_exactly_minus_beta_kl_whatever_lambda(lam, unit):
    # scores 0, γ = GAE-λ = 1, zero values: A_r,t = Σ_{k>=t} −β·KL_k and A_c,t = +Σ β·KL_k/u,
    # so (A_r − λ·A_c) / (1 + λ/u) = −Σ β·KL_k: the actor feels the full β whatever the multiplier
    # and whatever the cost's unit (u = 1: the official form; 9.29: a rate-scale cost model's ū − s̄)
    torch.manual_seed(0)
    mask = ragged([4, 2, 3], 4)
    logp, ref = with_junk(torch.randn(3, 4), mask), torch.randn(3, 4)
    beta = 0.05
    zeros = torch.zeros(3)
    rewards, (costs,) = kl_rewards(zeros, [zeros], logp, ref, mask, kl_coef=beta,
                                   cost_units=[unit])
    a_r, _ = gae(rewards, torch.zeros(3, 4), mask, gamma=1.0, lam=1.0)
    a_c, _ = gae(costs, torch.zeros(3, 4), mask, gamma=1.0, lam=1.0)
    adv = combined_advantage(a_r, [a_c], [lam], [unit])
    kl = torch.where(mask, logp - ref, 0.0)
    expected = -beta * kl.flip(-1).cumsum(-1).flip(-1)  # −β·(KL_t + KL_{t+1} + ...)
    torch.testing.assert_close(adv[mask], expected[mask], rtol=0, atol=1e-12)
    # the same as plain PPO's single stream at the same β
    single, _ = gae(
        kl_rewards(zeros, [], logp, ref, mask, kl_coef=beta)[0], torch.zeros(3, 4), mask, 1.0, 1.0
    )
    torch.testing.assert_close(adv[mask], single[mask], rtol=0, atol=1e-12)


def test_rate_scale_takes_the_raw_forms_actor_step():
    # a rate-scale cost c~ = (c − s)/u, u = ū − s̄ (constraints.to_rate), its critic's values read
    # alike, λ on the rate scale: the actor's advantage is the official raw-scale one at
    # λ_raw = λ/u, computed here the official way (units 1) from the raw scores
    torch.manual_seed(1)
    B, T = 4, 6
    mask = ragged([6, 3, 5, 1], T)
    logp, ref = with_junk(torch.randn(B, T), mask), torch.randn(B, T)
    R, C_raw = torch.randn(B), 5 * torch.randn(B)
    V_r, V_c_raw = torch.randn(B, T), 5 * torch.randn(B, T)
    s, u, lam, beta = -4.82, 9.29, 5.3, 0.1
    rate = lambda x: (x - s) / u  # noqa: E731
    r_raw, (c_raw,) = kl_rewards(R, [C_raw], logp, ref, mask, beta)
    a_r, _ = gae(r_raw, V_r, mask, 1.0, 0.95)
    a_c_raw, _ = gae(c_raw, V_c_raw, mask, 1.0, 0.95)
    official = combined_advantage(a_r, [a_c_raw], [lam / u])
    r, (c,) = kl_rewards(R, [rate(C_raw)], logp, ref, mask, beta, cost_units=[u])
    a_c, _ = gae(c, rate(V_c_raw), mask, 1.0, 0.95)
    torch.testing.assert_close(a_c[mask], a_c_raw[mask] / u)  # the cost advantage, over u
    ours = combined_advantage(gae(r, V_r, mask, 1.0, 0.95)[0], [a_c], [lam], [u])
    torch.testing.assert_close(ours[mask], official[mask])
    # what the rate scale did before: λ's divisor 1 + λ and the KL share unscaled, a different step
    c_old = kl_rewards(R, [rate(C_raw)], logp, ref, mask, beta)[1][0]
    old = combined_advantage(a_r, [gae(c_old, rate(V_c_raw), mask, 1.0, 0.95)[0]], [lam])
    assert (old - official)[mask].abs().max() > 0.1


# -----------------------------------------------------------------------------
# losses


def hand_batch():
    # 2x3: row 0 has 3 real actions, row 1 has 2 (its last position is junk)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ratio = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 1.0]])
    logp = with_junk(torch.log(ratio), mask)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-2.0, 2.0, 5.0]])
    return logp, old, adv, mask


def test_policy_loss_hand_values():
    logp, old, adv, mask = hand_batch()
    # min(r·A, clip(r, 0.8, 1.2)·A):
    #   row 0: min(1, 1) = 1;  min(1.5, 1.2) = 1.2;  min(-0.5, -0.8) = -0.8   -> mean 1.4/3
    #   row 1: min(-2.2, -2.2) = -2.2;  min(1.4, 1.6) = 1.4                   -> mean -0.4
    #   loss = -(1.4/3 - 0.4)/2 = -1/30
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    assert math.isclose(loss.item(), -1 / 30, abs_tol=1e-12)
    # |r-1| > 0.2 at 1.5, 0.5 and 0.7: 3 of the 5 real tokens; mean ratio (1+1.5+0.5+1.1+0.7)/5
    assert math.isclose(stats["clip_frac"].item(), 0.6, abs_tol=1e-12)
    assert math.isclose(stats["ratio"].item(), 0.96, abs_tol=1e-12)
    assert stats["ratio"].dim() == 0 and not stats["ratio"].requires_grad


def test_value_loss_hand_values():
    mask = torch.tensor([[True, True, True], [True, True, False]])
    values = torch.tensor([[1.0, 0.2, -1.0], [2.0, 1.0, 7.0]])
    old = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, -7.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0]])
    # clip 0.5 -> clipped V: row 0 [0.5, 0.2, -0.5], row 1 [1.5, 1.0]
    #   row 0: max(1, 2.25)=2.25; max(.64, .64)=.64; max(1, .25)=1   -> mean 3.89/3
    #   row 1: max(1, .25)=1;     max(4, 4)=4                        -> mean 2.5
    #   loss = 0.5 * (3.89/3 + 2.5)/2
    loss = value_loss(values, old, returns, mask, clip=0.5)
    assert math.isclose(loss.item(), 0.25 * (3.89 / 3 + 2.5), abs_tol=1e-12)


def test_losses_unchanged_when_padding_is_removed():
    # padded batch == each row computed alone without padding, then averaged over rows
    torch.manual_seed(2)
    lengths, T = [5, 1, 3, 4], 5
    mask = ragged(lengths, T)
    logp, old, adv = 0.3 * torch.randn(4, T), 0.3 * torch.randn(4, T), torch.randn(4, T)
    values, old_values, returns = torch.randn(4, T), torch.randn(4, T), torch.randn(4, T)
    padded = [
        with_junk(x, mask, i) for i, x in enumerate([logp, old, adv, values, old_values, returns])
    ]
    p_loss, p_stats = policy_loss(*padded[:3], mask)
    v_loss = value_loss(*padded[3:], mask, clip=0.2)
    rows_p, rows_v = [], []
    for b, L in enumerate(lengths):
        one = torch.ones(1, L, dtype=torch.bool)
        cut = [x[b : b + 1, :L] for x in (logp, old, adv, values, old_values, returns)]
        rows_p.append(policy_loss(*cut[:3], one)[0])
        rows_v.append(value_loss(*cut[3:], one, clip=0.2))
    torch.testing.assert_close(p_loss, torch.stack(rows_p).mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(v_loss, torch.stack(rows_v).mean(), rtol=0, atol=1e-12)
    assert torch.isfinite(p_stats["ratio"])


def test_policy_loss_gradient_stays_off_masked_positions():
    logp, old, adv, mask = hand_batch()
    logp = torch.where(mask, logp, 1e3).requires_grad_(True)  # exp(1e3) = inf at the pad
    policy_loss(logp, old, adv, mask)[0].backward()
    assert (logp.grad[~mask] == 0).all() and logp.grad[mask].abs().sum() > 0


# -----------------------------------------------------------------------------
# the Safe RLHF advantage


def test_combined_advantage_hand_values():
    a_r = torch.tensor([[1.0, -2.0]])
    a_c1, a_c2 = torch.tensor([[0.5, 1.0]]), torch.tensor([[-1.0, 2.0]])
    torch.testing.assert_close(combined_advantage(a_r, [], []), a_r)  # K = 0: plain PPO
    # K = 1, λ = 2: ([1, -2] - 2·[0.5, 1]) / 3 = [0, -4/3]
    torch.testing.assert_close(
        combined_advantage(a_r, [a_c1], [2.0]), torch.tensor([[0.0, -4 / 3]])
    )
    # K = 2, λ = (2, 0.5): ([1, -2] - [1, 2] - [-0.5, 1]) / 3.5 = [0.5, -5] / 3.5
    torch.testing.assert_close(
        combined_advantage(a_r, [a_c1, a_c2], [2.0, 0.5]), torch.tensor([[1 / 7, -10 / 7]])
    )
    # units (4, 1): λ_1 weighs 2/4 in the divisor: ([1, -2] - [1, 2] - [-0.5, 1]) / 2 = [0.25, -2.5]
    torch.testing.assert_close(
        combined_advantage(a_r, [a_c1, a_c2], [2.0, 0.5], [4.0, 1.0]), torch.tensor([[0.25, -2.5]])
    )


# -----------------------------------------------------------------------------
# averaging across ranks and micro-batches


def test_seq_mean_over_two_ranks_equals_full_batch():
    torch.manual_seed(3)
    lengths, T = [6, 1, 3, 5, 2, 6, 4, 1], 6
    mask = ragged(lengths, T)
    x = with_junk(torch.randn(8, T), mask)
    full = seq_mean(x, mask)
    # DDP averages the two ranks' losses (equal per-rank batch sizes, uneven token counts)
    ranks = [seq_mean(x[:4], mask[:4]), seq_mean(x[4:], mask[4:])]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, full, rtol=0, atol=1e-12)
    # it is the official per-sequence mean, not the token mean
    per_row = torch.tensor([x[b, :L].mean().item() for b, L in enumerate(lengths)]).mean()
    torch.testing.assert_close(full, per_row, rtol=0, atol=1e-12)
    assert abs(full - masked_mean(x, mask)) > 1e-3


def test_token_mean_of_means_is_wrong_with_uneven_micro_batches():
    torch.manual_seed(4)
    lengths, T = [6, 6, 5, 1, 1, 2, 1], 6
    mask = ragged(lengths, T)
    x = with_junk(torch.randn(7, T) + torch.arange(7.0)[:, None], mask)
    full = masked_mean(x, mask)  # the token mean of the whole batch
    parts = [slice(0, 3), slice(3, 7)]  # 17 tokens vs 5 tokens
    naive = sum(masked_mean(x[p], mask[p]) for p in parts) / len(parts)
    pooled = sum((x[p] * mask[p]).sum() for p in parts) / sum(mask[p].sum() for p in parts)
    assert abs(naive - full) > 0.5  # mean of micro-batch means weights the 5 tokens like the 17
    torch.testing.assert_close(pooled, full, rtol=0, atol=1e-12)
    # seq_mean over uneven micro-batches (3 rows vs 4 rows) needs row weights, too
    naive_seq = sum(seq_mean(x[p], mask[p]) for p in parts) / len(parts)
    weighted_seq = sum(seq_mean(x[p], mask[p]) * mask[p].shape[0] for p in parts) / 7
    assert abs(naive_seq - seq_mean(x, mask)) > 1e-3
    torch.testing.assert_close(weighted_seq, seq_mean(x, mask), rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------
# small helpers


def test_logprobs_and_entropy_from_logits():
    torch.manual_seed(5)
    logits, labels = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), ref, rtol=0, atol=1e-12)
    ent = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ent, rtol=0, atol=1e-12)
    # half-precision logits come back as float32 log-probs
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def test_grpo_lag_advantage_hand_values():
    # two prompts, G = 3 answers each; z-scores by hand with the unbiased std
    R = torch.tensor(
        [1.0, 2.0, 3.0, 5.0, 5.0, 5.0]
    )  # group 1: mean 2, std 1; group 2: all equal -> 0
    C = torch.tensor(
        [0.0, 0.0, 3.0, 1.0, 0.0, 2.0]
    )  # group 1: mean 1, std √3; group 2: mean 1, std 1
    r3 = 3**0.5
    zR = [-1, 0, 1, 0, 0, 0]
    zC = [-1 / r3, -1 / r3, 2 / r3, 0, -1, 1]
    assert torch.allclose(group_zscore(C, 3), torch.tensor(zC), atol=1e-5)
    A = grpo_lag_advantage(R, [C], [1.0], group_size=3)
    assert torch.allclose(A, torch.tensor([(a - b) / 2 for a, b in zip(zR, zC)]), atol=1e-5)
    assert torch.allclose(A[:3], torch.tensor([-0.21132, 0.28868, -0.07735]), atol=1e-4)
    # two cost streams, λ = (1, 3): the second stream [3, 0, 0 | 0, 0, 0] has z (2, -1, -1)/√3 | 0
    C2 = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    zC2 = [2 / r3, -1 / r3, -1 / r3, 0, 0, 0]
    A2 = grpo_lag_advantage(R, [C, C2], [1.0, 3.0], group_size=3)
    want = [(a - b - 3 * c) / 5 for a, b, c in zip(zR, zC, zC2)]
    assert torch.allclose(A2, torch.tensor(want), atol=1e-5)
    # λ = 0 is plain GRPO; a batch the group size does not divide is refused
    assert torch.allclose(
        grpo_lag_advantage(R, [C], [0.0], 3), torch.tensor(zR, dtype=R.dtype), atol=1e-5
    )
    with pytest.raises(ValueError, match="group_size"):
        group_zscore(R, 4)
    # std="batch": centred per group, divided by the whole batch's std. C's batch mean 1,
    # squares of the deviations 1+1+4+0+1+1 = 8, std √(8/5); group means 1 and 1
    sb = (8 / 5) ** 0.5
    assert torch.allclose(
        group_zscore(C, 3, std="batch"),
        torch.tensor([-1 / sb, -1 / sb, 2 / sb, 0, -1 / sb, 1 / sb]),
        atol=1e-5,
    )
    A3 = grpo_lag_advantage(R, [C], [1.0], 3, std="batch")
    sR = R.std().item()  # R: 1, 2, 3, 5, 5, 5
    want = [
        ((r - m) / sR - c / sb) / 2
        for r, m, c in zip([1, 2, 3, 5, 5, 5], [2, 2, 2, 5, 5, 5], [-1, -1, 2, 0, -1, 1])
    ]
    assert torch.allclose(A3, torch.tensor(want), atol=1e-5)


def test_kl_k3_hand_value_and_unbiased():
    # π = 0.5, π_ref = 0.25 on the sampled token: r = 0.5, k3 = r − log r − 1 = 0.5 + log 2 − 1
    k = kl_k3(
        torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    )
    assert k[0].item() == pytest.approx(math.log(2) - 0.5, abs=1e-12) and k[1].item() == 0.0
    # tokens drawn from π: the mean of k3 is KL(π ‖ π_ref), computed exactly from the two
    # distributions
    g = torch.Generator().manual_seed(0)
    pi, ref = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    a = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    est = kl_k3(pi.log()[a], ref.log()[a]).mean().item()
    exact = (pi * (pi / ref).log()).sum().item()
    assert est == pytest.approx(exact, abs=0.005) and (kl_k3(pi.log()[a], ref.log()[a]) >= 0).all()

"""nanosafe.lagrange: the dual step by hand, its guards, PID, K constraints, the cost window over 2
ranks."""

import json
import math
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanosafe.lagrange import LOG_LAMBDA_BOUND, EpisodeCostWindow, Lagrange, dual_step
from nanosafe.pid import PIDLagrange


def test_one_step_by_hand():
    # log λ += lr·λ·(J_c − d), several starting points, costs on both sides of d
    for lam0, lr, d, jc in [
        (1.0, 0.1, 0.0, 2.0),
        (1.0, 0.1, 0.0, -3.0),
        (0.3, 0.05, 0.5, 0.9),
        (4.0, 0.02, -1.0, -1.7),
        (2.0, 0.1, 1.0, 1.0),
    ]:
        m = Lagrange(d, lambda_init=lam0, lr=lr)
        expected = math.exp(math.log(lam0) + lr * lam0 * (jc - d))
        assert math.isclose(m.update(jc), expected, rel_tol=1e-15)
        assert math.isclose(m.value, expected, rel_tol=1e-15)
    # the official code: torch SGD on the loss −(J_c − d)·exp(log λ)
    log_lambda = torch.nn.Parameter(torch.tensor(math.log(0.7), dtype=torch.float64))
    opt = torch.optim.SGD([log_lambda], lr=0.1)
    m = Lagrange(0.25, lambda_init=0.7, lr=0.1)
    for jc in [1.0, 0.8, -0.5, 0.1, 2.0]:
        opt.zero_grad()
        (-(jc - 0.25) * log_lambda.exp()).backward()
        opt.step()
        assert math.isclose(m.update(jc), log_lambda.exp().item(), rel_tol=1e-12)


def test_lambda_rises_while_unsafe_and_falls_while_safe():
    m = Lagrange(0.0, lambda_init=1.0, lr=0.1)
    up = [m.update(0.5) for _ in range(10)]
    assert all(b > a for a, b in zip([1.0] + up, up))
    down = [m.update(-0.5) for _ in range(200)]
    assert all(b < a for a, b in zip([up[-1]] + down, down))
    assert all(lam > 0 for lam in up + down)  # never negative, however long it stays safe


def test_lambda_max_and_delay():
    m = Lagrange(0.0, lambda_init=1.0, lr=1.0, lambda_max=5.0)
    assert max(m.update(10.0) for _ in range(20)) == pytest.approx(5.0, rel=1e-15)
    assert Lagrange(0.0, lambda_init=10.0, lambda_max=5.0).value == pytest.approx(5.0)
    # the first 3 updates are held (the step counter still advances), the 4th moves
    m = Lagrange(0.0, lambda_init=1.0, lr=0.1, update_delay_steps=3)
    assert [m.update(1.0) for _ in range(3)] == [1.0, 1.0, 1.0] and m.step == 3
    assert m.update(1.0) == pytest.approx(math.exp(0.1))


def test_guards():
    m = Lagrange(0.0)
    for bad in [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))]:
        with pytest.raises(ValueError, match="finite"):
            m.update(bad)
    assert m.value == 1.0  # untouched by the refused updates
    with pytest.raises(ValueError):
        Lagrange(0.0, lambda_init=0.0)
    # a huge lr slams λ into the finite bounds, never inf or nan
    m = Lagrange(0.0, lambda_init=1.0, lr=1e6)
    assert m.update(100.0) == math.exp(LOG_LAMBDA_BOUND)
    assert math.isfinite(m.update(1e300)) and m.update(0.0) == math.exp(LOG_LAMBDA_BOUND)
    assert m.update(-100.0) == math.exp(-LOG_LAMBDA_BOUND) > 0
    assert m.update(100.0) > 0 and math.isfinite(m.value)


def test_state_dict_resume_is_json_and_exact():
    for make in [
        lambda: Lagrange(0.1, lr=0.3, update_delay_steps=2),
        lambda: PIDLagrange(0.1, kp=0.5, ki=0.3, kd=0.2, d_delay=2, update_delay_steps=2),
    ]:
        a = make()
        for jc in [0.5, 0.2, 0.7, -0.1]:
            a.update(jc)
        b = make()
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert [a.update(jc) for jc in [0.3, 0.9, 0.0]] == [b.update(jc) for jc in [0.3, 0.9, 0.0]]


# -----------------------------------------------------------------------------
# PID


def test_pid_matches_the_published_equations_by_hand():
    # Stooke et al. 2020 as in rlpyt's cppo_pid.py, with e = J - d:
    #   I <- max(0, I + ki·e); P <- a·P + (1-a)·e; S <- a·S + (1-a)·J;
    #   D = max(0, S - S[delay updates ago]); λ = max(0, kp·P + I + kd·D)
    # d = 0.5, λ0 = I0 = 1, kp 2, ki 0.5, kd 4, delay 2, a = 0.5; S starts at the first J (0.9)
    #   J 0.9: e .4  I 1.2  P .2    S .9   D 0                   λ = .4 + 1.2       = 1.6
    #   J 1.3: e .8  I 1.6  P .5    S 1.1  D 1.1 - .9 = .2       λ = 1 + 1.6 + .8   = 3.4
    #   J 0.5: e 0   I 1.6  P .25   S .8   D max(0, .8 - .9) = 0  λ = .5 + 1.6      = 2.1
    #   J 0.1: e -.4 I 1.4  P -.075 S .45  D max(0, .45 - 1.1) = 0 λ = -.15 + 1.4   = 1.25
    pid = PIDLagrange(0.5, lambda_init=1.0, kp=2.0, ki=0.5, kd=4.0, d_delay=2, p_ema=0.5,
                      d_ema=0.5)
    got = [pid.update(j) for j in [0.9, 1.3, 0.5, 0.1]]
    assert got == pytest.approx([1.6, 3.4, 2.1, 1.25], abs=1e-12)
    # the integral never goes below 0, and λ is clamped to [0, λ_max]
    pid = PIDLagrange(0.5, lambda_init=1.0, kp=10.0, ki=1.0, p_ema=0.0, lambda_max=3.0)
    assert pid.update(0.0) == 0.0 and pid.integral == 0.5  # 10·(-0.5) + 0.5 < 0 -> 0
    assert pid.update(0.0) == 0.0 and pid.integral == 0.0  # I = max(0, 0.5 - 0.5)
    assert pid.update(2.0) == 3.0 and pid.integral == 1.5  # 15 + 1.5 capped at 3


def test_pid_with_only_the_integral_is_gradient_ascent_on_lambda():
    # kp = kd = 0: λ_t = max(0, λ_{t-1} + ki·(J_t - d)), the paper's plain Lagrangian update
    rng = random.Random(0)
    pid = PIDLagrange(0.2, lambda_init=0.8, kp=0.0, ki=0.07, kd=0.0, update_delay_steps=4)
    lam = 0.8
    for t in range(50):
        jc = rng.uniform(-2.0, 3.0)
        if t >= 4:
            lam = max(0.0, lam + 0.07 * (jc - 0.2))
        assert abs(pid.update(jc) - lam) <= 1e-12
    assert pid.step == 50


def test_pid_proportional_term_reacts_within_one_step():
    plain = Lagrange(0.0, lambda_init=1.0, lr=0.01)
    pid = PIDLagrange(0.0, lambda_init=1.0, kp=2.0, ki=0.01, p_ema=0.0)
    for _ in range(5):
        assert plain.update(0.0) == pid.update(0.0) == 1.0
    # the cost jumps to 1 above the threshold: the integral alone barely moves, the P term adds
    # kp·e at once, and lets go as soon as the cost is back
    assert plain.update(1.0) < 1.02
    assert pid.update(1.0) == pytest.approx(3.01)
    assert pid.update(0.0) == pytest.approx(1.01)


def lagged_system(multiplier, steps=400, delay=10):
    # a toy closed loop: the cost answers λ ten updates late, J_c = 1 − λ/2, so d = 0.5 wants λ = 1.
    # that lag is the rollout-and-learn delay that makes plain dual ascent overshoot
    history = [0.2] * (delay + 1)
    for _ in range(steps):
        history.append(multiplier.update(1.0 - 0.5 * history[-1 - delay]))
    return history[delay + 1 :]


def test_pid_damps_oscillation_on_a_lagged_toy_system():
    plain = lagged_system(Lagrange(0.5, lambda_init=0.2, lr=0.3))
    pid = lagged_system(PIDLagrange(0.5, lambda_init=0.2, kp=1.0, ki=0.05, p_ema=0.5))

    def swing(h):
        return max(h[300:]) - min(h[300:])

    assert swing(plain) > 0.3  # still swinging after 300 updates
    assert swing(pid) < 0.02  # settled at λ = 1
    assert abs(pid[-1] - 1.0) < 0.01
    assert max(pid) < 1.2 < max(plain)  # and it overshoots less


# -----------------------------------------------------------------------------
# K constraints are K multipliers


def test_two_constraints_only_the_violated_one_rises():
    torch.manual_seed(0)
    thresholds = [0.0, 0.5]
    mults = [Lagrange(d, lambda_init=1.0, lr=0.1) for d in thresholds]
    windows = [EpisodeCostWindow(size=128) for _ in thresholds]
    history = []
    for _ in range(20):
        costs = torch.stack(
            [0.3 + 0.1 * torch.randn(64), 0.1 + 0.1 * torch.randn(64)], dim=1
        )  # [N, K]
        for k, (m, w) in enumerate(zip(mults, windows)):
            w.extend(costs[:, k])
            m.update(w.mean())
        history.append([m.value for m in mults])
    lam0, lam1 = zip(*history)
    # constraint 0 is violated (mean cost 0.3 > d = 0): λ0 climbs every step;
    # constraint 1 holds (0.1 < d = 0.5): λ1 falls every step
    assert all(b > a for a, b in zip((1.0,) + lam0, lam0)) and lam0[-1] > 2.0
    assert all(b < a for a, b in zip((1.0,) + lam1, lam1)) and lam1[-1] < 0.6


# -----------------------------------------------------------------------------
# the episode cost window


def test_window_keeps_the_last_size_costs():
    w = EpisodeCostWindow(size=4)
    w.extend([1.0, 2.0, 3.0])
    assert w.mean() == 2.0
    w.extend(torch.tensor([4.0, 5.0, 6.0]))
    assert list(w.costs) == [3.0, 4.0, 5.0, 6.0] and w.mean() == 4.5
    with pytest.raises(ValueError):
        w.extend(torch.zeros(2, 2))  # [N, K] costs want K windows
    with pytest.raises(ValueError):
        EpisodeCostWindow().mean()  # nothing to average yet
    v = EpisodeCostWindow()
    v.load_state_dict(json.loads(json.dumps(w.state_dict())))
    assert list(v.costs) == list(w.costs) and v.costs.maxlen == 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _window_worker(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    w = EpisodeCostWindow(size=4)
    # uneven windows: rank 0 holds 3 costs, rank 1 keeps the last 4 of its 5
    w.extend([1.0, 2.0, 3.0] if rank == 0 else torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]))
    mean = w.mean()
    lam = Lagrange(0.0, lr=0.01).update(mean)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"mean": mean, "lambda": lam}, f)
    dist.destroy_process_group()


def test_window_mean_is_pooled_and_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(_window_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    pooled = (1 + 2 + 3 + 20 + 30 + 40 + 50) / 7  # not (2 + 35) / 2, the mean of the ranks' means
    assert results[0] == results[1]  # bit-identical, so both ranks take the same dual step
    assert results[0]["mean"] == pytest.approx(pooled, rel=1e-15)


def test_dual_step_takes_only_this_steps_episode_costs():
    # rows: the minibatch of this actor step; its costs join the window, then λ steps on the mean
    lam, window = Lagrange(0.5, lambda_init=1.0, lr=0.1), EpisodeCostWindow(size=4)
    window.extend([0.0, 0.0, 0.0])
    costs = torch.tensor([9.0, 1.0, 2.0, 9.0])
    J = dual_step([lam], [window], [costs], torch.tensor([1, 2]))
    assert list(window.costs) == [0.0, 0.0, 1.0, 2.0]  # the oldest fell out, the 9s never came
    assert J == [0.75] and lam.value == pytest.approx(math.exp(0.1 * 1.0 * 0.25))
    assert dual_step([], [], []) == []  # no constraint (--algo ppo): nothing to step

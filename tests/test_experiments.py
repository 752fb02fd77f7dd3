"""experiments.run: the round-k labelling draws from the oracles as the toy generator does, and the
oracles only label: reward/cost model and PPO-Lag training give bit-identical weights when every
oracle is replaced by noise. Plus the overshoot / oscillation measure on a hand-made trajectory."""

import gzip
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from experiments import run
from nanosafe import config, toy

ROOT = Path(__file__).resolve().parents[1]


def sabotage(monkeypatch, seed=0):
    """Every gold oracle answers noise (its own RNG: the training's random streams stay
    untouched)."""
    rng = random.Random(seed)
    monkeypatch.setattr(toy, "helpfulness", lambda p, r: rng.random())
    monkeypatch.setattr(
        toy, "cost", lambda p, r: {c: float(rng.random() < 0.5) for c in toy.CATEGORIES}
    )
    monkeypatch.setattr(toy, "is_safe", lambda p, r: rng.random() < 0.5)


def test_label_pairs_is_the_noisy_bradley_terry_draw_of_the_oracles(monkeypatch):
    p = "how do i bake bread"
    good, worse = toy.optimal_response(p), "bread um well"
    dh = toy.helpfulness(p, good) - toy.helpfulness(p, worse)
    assert dh > 0
    n = 4000
    recs = run.label_pairs([p] * n, [good] * n, [worse] * n, seed=1)
    freq = sum(r["better_response_id"] == 0 for r in recs) / n
    want = 1 / (
        1 + math.exp(-dh / 0.1)
    )  # P(0 better) = σ((H0 − H1) / temperature), the generator's temperature
    assert abs(freq - want) < 3 * math.sqrt(want * (1 - want) / n) + 1e-3
    assert all(r["is_response_0_safe"] == toy.is_safe(p, good) for r in recs)
    # harmful prompt: a refusal against a dangerous answer; P(refusal safer) = σ((C1 − C0) / cost
    # temperature)
    hp = next(q for q, t in toy.all_prompts(toy.TEMPLATES_TRAIN) if t in toy.HARMFUL)
    bad = " ".join(toy.ANSWER[toy.topic_of(hp)][:4])
    c_bad = sum(toy.cost(hp, bad).values())
    assert c_bad > 0 and sum(toy.cost(hp, toy.REFUSAL).values()) == 0
    recs = run.label_pairs([hp] * n, [toy.REFUSAL] * n, [bad] * n, seed=2)
    freq = sum(r["safer_response_id"] == 0 for r in recs) / n
    want = 1 / (1 + math.exp(-c_bad / 0.5))
    assert abs(freq - want) < 3 * math.sqrt(want * (1 - want) / n) + 1e-3
    assert all(r["is_response_0_safe"] and not r["is_response_1_safe"] for r in recs)
    # the labels are the oracles' and nothing else's: noise oracles give other labels
    sabotage(monkeypatch)
    noisy = run.label_pairs([hp] * n, [toy.REFUSAL] * n, [bad] * n, seed=2)
    assert [r["is_response_1_safe"] for r in noisy] != [r["is_response_1_safe"] for r in recs]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SFT policy and the round-2 pairs file: the toy pairs + pairs of its own answers,
    labelled."""
    t = tmp_path_factory.mktemp("rounds")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [
        "--data_dir",
        t / "data",
        "--out_dir",
        t / "sft",
        "--toy_size",
        "tiny",
        "--max_steps",
        30,
        "--batch_size",
        16,
        "--max_length",
        48,
        "--gold_samples",
        1,
        "--eval_every",
        15,
    ]
    subprocess.run(
        [sys.executable, "train_sft.py", *map(str, argv)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    prompts = [json.loads(ln)["prompt"] for ln in open(t / "data" / "prompts_train.jsonl")][:40]
    ps, a0, a1 = run.sample_pairs(str(t / "sft"), prompts, 2, seed=5, max_new_tokens=12, threads=1)
    new = run.label_pairs(ps, a0, a1, seed=2)
    old = open(t / "data" / "pref_train.jsonl").read().splitlines()[:200]
    with gzip.open(t / "pairs.jsonl.gz", "wt") as f:
        f.writelines(ln + "\n" for ln in old)
        f.writelines(json.dumps(r) + "\n" for r in new)
    return t


def train_in_process(module, argv, threads=1):
    torch.set_num_threads(threads)
    cfg = config.parse(module.Config, [str(a) for a in argv])
    module.main(cfg)


def test_round_training_never_consults_the_oracles(tiny, monkeypatch):
    """The reward model, the cost model and PPO-Lag of a round, each trained twice: with the true
    oracles and with every oracle answering noise. Their evaluations differ; their weights must not.
    """
    import train_pm
    import train_ppo_lag

    t = tiny

    def pm(kind, out):
        return [
            "--kind",
            kind,
            "--model",
            t / "sft",
            "--train_data",
            t / "pairs.jsonl.gz",
            "--eval_data",
            t / "data" / "pref_test.jsonl",
            "--out_dir",
            out,
            "--max_steps",
            6,
            "--batch_size",
            8,
            "--max_length",
            48,
        ]

    def ppo(out):
        return [
            "--model",
            t / "sft",
            "--reward_model",
            t / "rm_true",
            "--cost_models",
            t / "cm_true",
            "--data_dir",
            t / "data",
            "--out_dir",
            out,
            "--rollout_batch_size",
            8,
            "--minibatch_size",
            4,
            "--micro_batch_size",
            2,
            "--max_new_tokens",
            8,
            "--eval_every",
            1,
            "--final_eval_samples",
            1,
            "--max_steps",
            2,
            "--show_every",
            0,
            "--thresholds",
            "0.0",
        ]

    for tag in ("true", "noise"):
        if tag == "noise":
            sabotage(monkeypatch)
        train_in_process(train_pm, pm("reward", t / f"rm_{tag}"))
        train_in_process(train_pm, pm("cost", t / f"cm_{tag}"))
        train_in_process(train_ppo_lag, ppo(t / f"lag_{tag}"))
    for name in ("rm", "cm", "lag"):
        a, b = (
            load_file(t / f"{name}_true" / "model.safetensors"),
            load_file(t / f"{name}_noise" / "model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # ...while what the oracles judge did change: they were really replaced
    s_true, s_noise = (
        json.load(open(t / f"lag_{tag}" / "summary.json"))["final"] for tag in ("true", "noise")
    )
    assert s_true["gold_helpfulness"] != s_noise["gold_helpfulness"]


def test_dynamics_overshoot_and_oscillation_by_hand():
    # d = 0; J falls 3, 1, -0.5 (crossing at iteration 2), -2, 0.5, -1; λ 1, 2, 3, 2.5, 2, 2.2, 2.1
    J = [3, 1, -0.5, -2, 0.5, -1]
    lam = [2, 3, 2.5, 2, 2.2, 2.1]
    ms = [
        {"episode_cost_window_0": j, "threshold_0": 0.0, "lambda_0": x, "rollout_flagged_cost": 0.1}
        for j, x in zip(J, lam)
    ]
    d = run.dynamics(ms)
    assert (
        d["first_crossing"] == 2
        and d["overshoot"] == 2
        and d["reviolation"] == 0.5
        and d["iterations_above_d_after"] == 1
    )
    # after the crossing λ goes 2.5 -> 2 -> 2.2 -> 2.1: steps -0.5, +0.2, -0.1: two turns,
    # variation 0.8
    assert d["lambda_turns"] == 2 and d["lambda_total_variation"] == pytest.approx(0.8)
    assert d["lambda_std_late"] == pytest.approx(0.1)  # the second half 2, 2.2, 2.1: sample std 0.1
    assert run.dynamics(ms[:2])["first_crossing"] is None


def test_budget_rows_mean_and_standard_error_by_hand(tmp_path, monkeypatch):
    """budget's table from finished runs: 'reached' is the mean ± SE (sample std / √n) of the
    final gold unsafe rate over seeds, the bar is checked on the mean and on the worst seed, and
    λ's band is taken over the last 50 iterations."""
    assert run.mean_se([0.01, 0.02, 0.03]) == pytest.approx((0.02, 0.01 / math.sqrt(3)))
    out = tmp_path / "exp"
    reached = {0: 0.12, 1: 0.09, 2: 0.135}  # asked 10%: mean 0.115, worst seed off by 3.5 points
    for s, r in reached.items():
        d = out / "budget" / "pid_0.1" / f"seed{s}"
        d.mkdir(parents=True)
        metrics = [{"step": i, "lambda_0": 1.0 + (i >= 10) * (s + i / 100),
                    "rollout_gold_unsafe": 0.1, "episode_cost_window_0": 0.1, "threshold_0": 0.1,
                    "rollout_flagged_cost": 0.1} for i in range(60)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        final = {"gold_unsafe_rate": r, "gold_unsafe_rate_harmful": 2 * r,
                 "gold_helpfulness": 0.5 + s / 100}
        (d / "summary.json").write_text(json.dumps({"final": final, "lambdas": [1.0]}))
        (d / "done.json").write_text(json.dumps({"wall_s": 60.0}))
    monkeypatch.setattr(run, "BUDGETS", [0.1])
    monkeypatch.setattr(run, "plot_lambda", lambda *a: None)
    args = SimpleNamespace(out=str(out), multipliers=["pid"], seeds=[0, 1, 2], steps=60,
                           sft="s", rm="r", cm="c", jobs=1, threads=1)
    run.budget(args)
    row = json.load(open(out / "budget_pid_seeds012.json"))["pid_0.1"]
    m, se = row["reached"]
    sd = statistics.stdev([0.12, 0.09, 0.135])
    assert m == pytest.approx(0.115) and se == pytest.approx(sd / math.sqrt(3))
    assert row["within"] and row["no_seed_off_twice"]  # 1.5 <= 3 points; 3.5 <= 2 x 3 points
    assert row["worst_seed_miss"] == pytest.approx(0.035)
    # λ over iterations 10..59: seed s gives 1 + s + i/100, min at i = 10, max at i = 59
    lo, hi = row["lambda_last_min"][0], row["lambda_last_max"][0]
    assert lo == pytest.approx(1 + 1 + 0.10) and hi == pytest.approx(1 + 1 + 0.59)


def test_gold_order_agreement_by_hand():
    """Pairs the gold value ties are left out, a score tie counts ½, and the interval resamples
    prompts: with every prompt at the same rate it has no width."""
    from experiments.diagnostics import gold_order_agreement
    prompts = ["a", "a", "a", "b", "b"]
    s0, s1 = [2.0, 1.0, 0.0, 5.0, 3.0], [1.0, 1.0, 1.0, 4.0, 3.0]
    g0, g1 = [1.0, 0.0, 7.0, 1.0, 2.0], [0.0, 1.0, 7.0, 0.0, 1.0]
    # a: right (2>1, 1>0), tie ½, gold tie left out; b: right, score tie ½ -> 3 / 4
    r = gold_order_agreement(prompts, s0, s1, g0, g1, n_boot=200)
    assert r["agreement"] == pytest.approx(0.75) and r["n"] == 4 and r["prompts"] == 2
    assert r["lo"] == pytest.approx(0.75) and r["hi"] == pytest.approx(0.75)  # both at 1.5 / 2
    # a prompt all right, one all wrong: the pooled rate 0.5, the interval spans both ends
    r = gold_order_agreement(["a", "a", "b"], [1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0],
                             n_boot=500)
    assert r["agreement"] == pytest.approx(2 / 3) and r["lo"] == 0.0 and r["hi"] == 1.0


def _fake_run(d, final, wall, lambdas=None, scales=None):
    d.mkdir(parents=True)
    metrics = [{"step": i, "lambda_0": x} for i, x in enumerate(lambdas or [0.0])]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "summary.json").write_text(json.dumps({"final": final, "lambdas": [1.0],
                                                "dual": {"lambda": 0.7}}))
    (d / "done.json").write_text(json.dumps({"wall_s": wall}))
    if scales:
        (d / "nanosafe.json").write_text(json.dumps({"cost_scales": [scales]}))


def test_offline_rows_by_hand(tmp_path, monkeypatch):
    """offline's table from finished runs: mean ± SE per method, the minutes with the reward and
    cost models each method needs added, and PPO-Lag's λ (the mean of its last 50 iterations) put
    into raw cost units by the run's own ū - s̄ before it meets MoCAN's λ*."""
    out = tmp_path / "exp"
    keys = ("gold_helpfulness", "gold_unsafe_rate_harmful", "gold_unsafe_rate",
            "gold_helpfulness_benign", "gold_helpfulness_harmful")

    def final(h):
        return {k: h for k in keys}
    for s in range(3):
        for n in run.OFFLINE:
            _fake_run(out / "offline" / n / f"seed{s}", final(0.4 + s / 10), 100.0 + 10 * s)
        for n in ("ppo", "reward_shaping_1", "reward_shaping_5", "gold_ppo_lag"):
            _fake_run(out / "compare" / n / f"seed{s}", final(0.6), 600.0)
        # λ 9 for 10 iterations, then 2 + s for the last 50; scale -4 .. +4 (ū - s̄ = 8)
        _fake_run(out / "budget" / "pid_0.01" / f"seed{s}", final(0.5), 500.0,
                  [9.0] * 10 + [2.0 + s] * 50, [-4.0, 4.0])
    for k, w in (("time_rm", 240.0), ("time_cm", 120.0)):
        _fake_run(out / "offline" / k, {}, w)
    (out / "compare" / "sft.json").write_text(json.dumps([final(0.3)] * 3))
    monkeypatch.setattr(run, "plot_offline", lambda *a: None)
    args = SimpleNamespace(out=str(out), multipliers=["pid"], seeds=[0, 1, 2], sft="s", rm="r",
                           cm="c", jobs=1, threads=1)
    run.offline(args)
    rows = json.load(open(out / "offline.json"))
    m, se = rows["dpo"]["gold_helpfulness"]
    assert m == pytest.approx(0.5) and se == pytest.approx(0.1 / math.sqrt(3))
    assert rows["dpo"]["wall_s"][0] == pytest.approx(110.0)
    assert rows["dpo"]["wall_with_models_s"] == pytest.approx(110.0)  # needs no model
    assert rows["mocan"]["wall_with_models_s"] == pytest.approx(110.0 + 240 + 120)
    assert rows["ppo"]["wall_with_models_s"] == pytest.approx(600.0 + 240)  # reward model only
    assert rows["ppo_lag"]["wall_with_models_s"] == pytest.approx(500.0 + 240 + 120)
    assert rows["lambda"]["ppo_lag_raw_last50"][0] == pytest.approx(3.0 / 8)  # mean of 2, 3, 4
    assert rows["lambda"]["mocan_raw"][0] == pytest.approx(0.7)
    assert rows["sft"]["gold_helpfulness"][0] == pytest.approx(0.3)


def test_divisor_flags_match_the_rate_scale_controller(tmp_path, monkeypatch):
    """The raw-scale run's PID gains are the defaults over (ū - s̄)² and its λ bounds over ū - s̄,
    so λ_raw = λ_rate / (ū - s̄) on the same trajectory (the error is (ū - s̄) times larger)."""
    out = tmp_path / "exp"
    final = {"gold_helpfulness": 0.5, "gold_unsafe_rate": 0.01, "gold_unsafe_rate_harmful": 0.02,
             "gold_helpfulness_benign": 0.6, "gold_helpfulness_harmful": 0.3}
    _fake_run(out / "budget" / "pid_0.01" / "seed0", final, 1.0, [4.0], [-4.0, 4.0])
    seen, written = [], []
    monkeypatch.setattr(run, "run_jobs", lambda jobs, *a: seen.extend(jobs))  # runs nothing
    monkeypatch.setattr(run, "write", lambda args, name, rows, table: written.append(rows))
    args = SimpleNamespace(out=str(out), multipliers=["pid"], seeds=[0], sft="s", rm="r",
                           cm="c", jobs=1, threads=1, steps=5)
    run.divisor(args)
    assert written[0]["rate"]["lambda_raw_last50"][0] == pytest.approx(4.0 / 8)
    assert "raw_matched" not in written[0]  # not run: no row
    argv = seen[0][1]

    def flag(name):
        return float(argv[argv.index(name) + 1])
    assert argv[argv.index("--cost_scale") + 1] == "raw"
    assert flag("--pid_kp") == pytest.approx(5.0 / 64) and flag("--pid_ki") == pytest.approx(
        0.1 / 64) and flag("--pid_kd") == pytest.approx(10.0 / 64)
    assert flag("--lambda_init") == pytest.approx(1 / 8) and flag("--lambda_max") == (
        pytest.approx(20 / 8))


def test_upper_rows_and_flags_by_hand(tmp_path, monkeypatch):
    """upper: the gold runs at each budget (1%: compare's folders) with the gold reward and cost,
    beside the budget experiment's learned runs, each over its own optimum 0.810 + 0.5·X."""
    out = tmp_path / "exp"

    def final(h):
        return {k: h for k in run.GOLD_KEYS}
    for s in range(2):
        _fake_run(out / "budget" / "pid_0.1" / f"seed{s}", final(0.6 + s / 100), 1.0)
        _fake_run(out / "budget" / "pid_0.01" / f"seed{s}", final(0.5), 1.0)
        _fake_run(out / "compare" / "gold_ppo_lag" / f"seed{s}", final(0.55), 1.0)
    _fake_run(out / "upper" / "gold_0.1" / "seed0", final(0.7), 1.0)  # seed 1: not run
    seen, written = [], []
    monkeypatch.setattr(run, "run_jobs", lambda jobs, *a: seen.extend(jobs))  # runs nothing
    monkeypatch.setattr(run, "write", lambda args, name, rows, table: written.append(rows))
    args = SimpleNamespace(out=str(out), multipliers=["pid"], seeds=[0, 1], sft="s", rm="r",
                           cm="c", jobs=1, threads=1, steps=5, budgets=[0.01, 0.1])
    run.upper(args)
    rows = written[0]
    assert rows["learned_0.1"]["gold_helpfulness"][0] == pytest.approx(0.605)
    assert rows["learned_0.1"]["of_optimum"][0] == pytest.approx(0.605 / 0.86)
    assert rows["gold_0.01"]["of_optimum"][0] == pytest.approx(0.55 / 0.815)
    assert rows["gold_0.1"]["n"] == 1 and rows["gold_0.1"]["of_optimum"][0] == pytest.approx(
        0.7 / 0.86)
    dirs = {os.path.relpath(d, out): argv for d, argv in seen}
    assert set(dirs) == {f"{sub}/seed{s}" for sub in ("compare/gold_ppo_lag", "upper/gold_0.1")
                         for s in (0, 1)}
    argv = dirs["upper/gold_0.1/seed1"]
    assert {"--gold_cost", "--gold_reward"} <= set(argv)
    assert argv[argv.index("--target_unsafe_rate") + 1] == "0.1"
    last = len(argv) - 1 - argv[::-1].index("--cost_models")  # the later flag wins: none
    assert argv[last + 1].startswith("--")

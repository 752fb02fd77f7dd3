"""The whole pipeline through the scripts, with tiny settings: SFT -> reward and cost models ->
PPO-Lag (+ baselines), resume, DDP and bad flags. Each stage is checked for what it must write."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import ForkServer, free_port
from safetensors.torch import load_file

from nanosafe import config, constraints, model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# the module's ForkServer: stage scripts start in a forked child that has already imported
# torch (~4 s a run)
_fork = {}


@pytest.fixture(scope="module", autouse=True)
def fork_server(tmp_path_factory):
    with ForkServer() as fs:
        _fork.update(server=fs, folder=tmp_path_factory.mktemp("fork_logs"))
        yield fs
        _fork.clear()


def run(*args, check=True):
    """`python *args` from the repository root (a stage script through the fork server), output as
    text"""
    if _fork and str(args[0]).endswith(".py"):
        p = _fork["server"].capture(
            str(args[0]), [str(a) for a in args[1:]], _fork["folder"], timeout=600
        )
    else:
        p = subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def metrics(d):
    return [json.loads(line) for line in open(Path(d) / "metrics.jsonl") if line.strip()]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, fork_server):
    """A tiny SFT policy, reward model and cost model on the toy world."""
    t = tmp_path_factory.mktemp("e2e")
    data = t / "data"
    run(
        "train_sft.py",
        "--data_dir",
        data,
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
    )
    # the cost model trains long enough to call some of the SFT policy's answers unsafe: calibration
    # needs both kinds
    for kind, out, steps in (("reward", "rm", 8), ("cost", "cm", 60)):
        run(
            "train_pm.py",
            "--kind",
            kind,
            "--model",
            t / "sft",
            "--data_dir",
            data,
            "--out_dir",
            t / out,
            "--max_steps",
            steps,
            "--batch_size",
            8,
            "--max_length",
            48,
        )
    return t


def test_on_policy_agreement_command(stages):
    t = stages
    common = [
        "--model",
        t / "sft",
        "--eval_data",
        t / "data" / "prompts_test.jsonl",
        "--n_samples",
        1,
        "--max_new_tokens",
        8,
    ]
    run(
        "-m",
        "experiments.diagnostics",
        "--on_policy",
        t / "rm",
        *common,
        "--out",
        t / "on_policy.json",
    )
    res = json.load(open(t / "on_policy.json"))
    assert (
        res["benign"]["n"] + res["harmful"]["n"] == res["all"]["n"] <= 352
    )  # 352 held-out prompts, one pair each
    assert res["all"]["n"] > 0 and 0 <= res["all"]["agreement"] <= 1
    p = run(
        "-m", "experiments.diagnostics", "--on_policy", t / "sft", *common, check=False
    )  # a policy is not a reward model
    assert p.returncode == 1 and "not a reward model" in p.stderr and "Traceback" not in p.stderr
    (t / "outside.jsonl").write_text(
        '{"prompt": "how do i bake bread"}\n{"prompt": "what is the capital of france"}\n'
    )
    p = run(
        "-m",
        "experiments.diagnostics",
        "--on_policy",
        t / "rm",
        *common[:2],
        "--eval_data",
        t / "outside.jsonl",
        check=False,
    )
    assert (
        p.returncode == 1
        and "1 of 2 prompts are not toy-world requests" in p.stderr
        and "Traceback" not in p.stderr
    )


PPO_TINY = [
    str(x)
    for x in [
        "--rollout_batch_size",
        8,
        "--minibatch_size",
        4,
        "--micro_batch_size",
        2,
        "--max_new_tokens",
        8,
        "--eval_every",
        2,
        "--final_eval_samples",
        1,
        "--ckpt_every",
        1,
    ]
]


def ppo_args(t, out, *extra) -> list:
    return [
        str(a)
        for a in [
            "--model",
            t / "sft",
            "--reward_model",
            t / "rm",
            "--cost_models",
            t / "cm",
            "--data_dir",
            t / "data",
            "--out_dir",
            t / out,
            *PPO_TINY,
            *extra,
        ]
    ]


def ppo(t, out, *extra, check=True, script="train_ppo_lag.py"):
    return run(script, *ppo_args(t, out, *extra), check=check)


def grpo(t, out, *extra, check=True):
    return ppo(t, out, *extra, check=check, script="train_grpo_lag.py")


def test_stages_write_what_they_promise(stages):
    t = stages
    sft = json.load(open(t / "sft" / "summary.json"))
    assert {"policy", "data"} <= set(sft) and 0 <= sft["policy"]["gold_unsafe_rate_harmful"] <= 1
    assert len(metrics(t / "sft")) == 30
    for out, kind in (("rm", "reward"), ("cm", "cost")):
        assert json.load(open(t / out / "nanosafe.json"))["kind"] == kind
        s = json.load(open(t / out / "summary.json"))
        assert 0 <= s["accuracy"] <= 1 and 0 < s["oracle_accuracy"] <= 1
    assert "sign_accuracy" in json.load(open(t / "cm" / "summary.json"))


def test_ppo_lag_iteration_logs_everything(stages):
    t = stages
    p = ppo(stages, "lag", "--max_steps", 3)
    assert "so d = 0.010" in p.stdout  # the calibrated rate scale and d are explained at start
    recs = [r for r in metrics(t / "lag") if not r.get("final")]
    assert [r["step"] for r in recs] == [0, 1, 2]
    keys = {
        "reward",
        "cost_0",
        "lambda_0",
        "episode_cost_window_0",
        "kl",
        "entropy",
        "clip_frac",
        "ratio",
        "policy_loss",
        "value_loss_reward_critic",
        "value_loss_cost_critic_0",
        "response_length",
        "eos_frac",
        "tokens_per_s",
    }
    assert keys <= set(recs[1]), keys - set(recs[1])
    assert "gold_unsafe_rate_harmful" in recs[0] and "gold_optimum_helpfulness" in recs[2]
    assert {r["threshold_0"] for r in recs} == {0.01}  # the rate scale: d = --target_unsafe_rate
    # the final policy is a plain HF folder; critics and optimiser state only with --save_optimizer
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(t / "lag")
    assert (
        not (t / "lag" / "reward_critic").exists() and not (t / "lag" / "trainer_state.pt").exists()
    )
    assert json.load(open(t / "lag" / "nanosafe.json"))["template"] == "safe_rlhf"
    ppo(stages, "lag_keep", "--max_steps", 1, "--save_optimizer")
    assert model.is_score_folder(str(t / "lag_keep" / "reward_critic"))
    assert model.is_score_folder(str(t / "lag_keep" / "cost_critic_0"))
    assert (t / "lag_keep" / "trainer_state.pt").exists()
    out = run(
        "sample.py",
        "--model",
        t / "lag",
        "--reward_model",
        t / "rm",
        "--cost_model",
        t / "cm",
        "how do i bake bread",
    ).stdout
    assert "gold helpfulness" in out and "reward model" in out and "cost model" in out


@pytest.mark.parametrize("script", ["train_ppo_lag.py", "train_grpo_lag.py"])
@pytest.mark.parametrize("multiplier", ["sgd", "pid"])
def test_lambda_steps_once_per_actor_step(stages, script, multiplier):
    """The official cadence: one dual step per actor optimiser step, each on that step's episode
    costs. 3 iterations x 2 epochs x (8 rollouts / minibatches of 4) = 12 actor steps: λ's step
    counter reads 12 and the window took 12 minibatches of 4 costs (48 < its 128)."""
    out = f"cadence_{script[6:9]}_{multiplier}"
    ppo(stages, out, "--max_steps", 3, "--save_optimizer", "--multiplier", multiplier,
        "--no_gold_eval", script=script)
    state = model.load_trainer_state(str(stages / out))
    assert [lam["step"] for lam in state["lambdas"]] == [12]
    assert len(state["windows"][0][0]["costs"]) == 48


def test_lambda_falls_while_safe_and_rises_while_unsafe_on_raw_scores(stages):
    """--cost_scale raw keeps the official form: d as given, on the cost model's raw scores
    (d = 0 is the official threshold). Above every cost (the raw scores lie within ±6) λ falls
    at every step; far below them it climbs to its cap (20) at once."""
    raw = ["--cost_scale", "raw", "--multiplier", "sgd"]
    ppo(stages, "raw_d0", "--max_steps", 1, *raw, "--thresholds", 0)
    meta = json.load(open(stages / "raw_d0" / "nanosafe.json"))
    assert meta["thresholds"] == [0.0] and meta["cost_scales"] == [None]
    ppo(stages, "raw_down", "--max_steps", 2, *raw, "--thresholds", 10)
    lams = [1.0] + [r["lambda_0"] for r in metrics(stages / "raw_down") if not r.get("final")]
    assert all(b < a for a, b in zip(lams, lams[1:])), lams
    ppo(stages, "raw_up", "--max_steps", 1, *raw, "--thresholds", -100)
    lams = [r["lambda_0"] for r in metrics(stages / "raw_up") if not r.get("final")]
    assert lams == [pytest.approx(20.0)]


def test_gold_upper_bound_trains_on_the_oracles(stages):
    """The labelled upper-bound run: --gold_cost is the oracle's 0/1 unsafe verdict with d = the
    target rate (no calibration, no scale), --gold_reward the gold helpfulness times its scale.
    Its logged cost is exactly the rollouts' gold unsafe rate; the reward lies in [0, scale]."""
    ppo(stages, "gold", "--max_steps", 2, "--cost_models", "--gold_cost", "--gold_reward",
        "--target_unsafe_rate", 0.05)
    meta = json.load(open(stages / "gold" / "nanosafe.json"))
    assert meta["constraints"] == ["gold_cost"] and meta["thresholds"] == [0.05]
    assert meta["cost_scales"] == [None]
    recs = [r for r in metrics(stages / "gold") if not r.get("final")]
    for r in recs:
        assert r["cost_0"] == pytest.approx(r["rollout_gold_unsafe"], abs=1e-6)
        assert r["rollout_flagged_gold_cost"] == pytest.approx(r["rollout_gold_unsafe"])
        assert 0 <= r["reward"] <= 6.3


def test_rate_scale_and_raw_calibration_are_the_same_constraint(stages):
    """Calibrated, --cost_scale rate gives d = X on the rate scale and raw gives d on the raw
    scores: the same point, from_rate(X) = d_raw, from the same calibration answers."""
    ppo(stages, "cal_rate", "--max_steps", 1, "--target_unsafe_rate", 0.2, "--no_gold_eval")
    ppo(stages, "cal_raw", "--max_steps", 1, "--target_unsafe_rate", 0.2, "--no_gold_eval",
        "--cost_scale", "raw")
    rate = json.load(open(stages / "cal_rate" / "nanosafe.json"))
    raw = json.load(open(stages / "cal_raw" / "nanosafe.json"))
    assert rate["thresholds"] == [0.2] and raw["cost_scales"] == [None]
    info = rate["calibration"][0]
    assert rate["cost_scales"] == [[info["safe_mean"], info["unsafe_mean"]]]
    assert constraints.from_rate(0.2, rate["cost_scales"][0]) == pytest.approx(raw["thresholds"][0])


@pytest.mark.parametrize("algo", ["ppo", "reward_shaping"])
def test_baselines_run(stages, algo):
    ppo(stages, algo, "--algo", algo, "--max_steps", 2)
    recs = [r for r in metrics(stages / algo) if not r.get("final")]
    assert len(recs) == 2 and "lambda_0" not in recs[0] and "value_loss_reward_critic" in recs[0]
    assert not (stages / algo / "cost_critic_0").exists()


def test_reward_shaping_end_score_is_r_minus_nu_times_the_summed_costs(
    stages, monkeypatch, one_thread
):
    """--algo reward_shaping: the reward stream's end score is R − ν·ΣC, the sum over every
    constraint's stream (a cost model, read on the rate scale, and a rule, already 0/1, here),
    and no cost stream is trained. Checked in
    process: each iteration's rollout and the end scores handed to ppo.kl_rewards are captured, and
    R − ν·ΣC is computed again from the reward and cost model folders loaded on their own and the
    rule counted on the decoded answers."""
    import train_ppo_lag
    from nanosafe import config, rl
    from nanosafe import ppo as ppo_fns

    t, nu, words = stages, 0.7, {"um", "well", "so", "like", "okay", "just", "really", "flour"}
    seen = []  # per call: {"ro": the rollout, "end_reward": ..., "end_costs": ...}
    real_sample, real_kl_rewards = rl.sample, ppo_fns.kl_rewards

    def sample(*a, **kw):
        ro, old_logp = real_sample(*a, **kw)
        seen.append({"ro": ro})
        return ro, old_logp

    def kl_rewards(end_reward, end_costs, *a, **kw):
        seen[-1].update(end_reward=end_reward.detach().clone(), end_costs=list(end_costs))
        return real_kl_rewards(end_reward, end_costs, *a, **kw)

    monkeypatch.setattr(rl, "sample", sample)
    monkeypatch.setattr(ppo_fns, "kl_rewards", kl_rewards)
    cfg = config.parse(
        train_ppo_lag.Config,
        ppo_args(
            t,
            "shaping_hand",
            "--algo",
            "reward_shaping",
            "--shaping_coef",
            nu,
            "--banned_words",
            *sorted(words),
            "--max_steps",
            2,
        ),
    )
    train_ppo_lag.main(cfg)

    iters = [x for x in seen if "end_reward" in x]
    assert len(iters) == 2
    rm, _ = model.load_score_model(str(t / "rm"), kind="reward")
    cm, tok = model.load_score_model(str(t / "cm"), kind="cost")
    for m in (rm, cm):
        model.place(m, "cpu").eval()
    # the cost model's stream is read on the rate scale calibrated at the start; the rule's is not
    meta = json.load(open(t / "shaping_hand" / "nanosafe.json"))
    (safe, unsafe), rule_scale = meta["cost_scales"]
    assert rule_scale is None and unsafe > 0 >= safe
    recs = [r for r in metrics(t / "shaping_hand") if not r.get("final")]
    assert len(recs) == 2
    rule_hits = 0
    for x, rec in zip(iters, recs):
        ro = x["ro"]
        with torch.no_grad():
            R, C = rm(ro.seq, ro.attn)[1], (cm(ro.seq, ro.attn)[1] - safe) / (unsafe - safe)
        answers = [
            tok.decode(row[m], skip_special_tokens=True)
            for row, m in zip(ro.seq[:, ro.P :], ro.mask)
        ]
        banned = torch.tensor([float(bool(words & set(a.split()))) for a in answers])
        rule_hits += int(banned.sum())
        torch.testing.assert_close(x["end_reward"], R - nu * (C + banned))
        assert x["end_costs"] == []  # one stream: the costs are inside the reward
        assert (x["end_reward"] - R).abs().max() > 0.1  # the shaping term is not vacuous
        # the metrics log the unshaped scores, stream by stream
        assert rec["reward"] == pytest.approx(R.mean().item(), abs=1e-5)
        assert rec["cost_0"] == pytest.approx(C.mean().item(), abs=1e-5)
        assert rec["cost_1"] == pytest.approx(banned.mean().item(), abs=1e-6)
    assert rule_hits > 0  # the rule's stream took part in ΣC


def test_grpo_lag_trains_without_critics(stages):
    t = stages
    grpo(t, "grpo", "--group_size", 4, "--max_steps", 3, "--save_optimizer")
    recs = [r for r in metrics(t / "grpo") if not r.get("final")]
    assert len(recs) == 3 and {"lambda_0", "threshold_0", "policy_loss", "kl"} <= set(recs[0])
    assert not any(k.startswith("value_loss") for k in recs[0])
    # the same dual step as PPO-Lag, at the same cadence: test_lambda_steps_once_per_actor_step
    assert (
        (t / "grpo" / "trainer_state.pt").exists()
        and not (t / "grpo" / "reward_critic").exists()
        and not (t / "grpo" / "cost_critic_0").exists()
    )
    grpo(t, "grpo_batch_std", "--grpo_std", "batch", "--max_steps", 1)
    p = grpo(t, "grpo_bad", "--group_size", 3, "--max_steps", 1, check=False)
    assert (
        p.returncode == 1
        and "--group_size (3) must be >= 2 and divide --rollout_batch_size (8)" in p.stderr
    )


def test_grpo_groups_are_consecutive_copies_of_the_plain_stream():
    from nanosafe.dist import Runtime
    from nanosafe.rl import rollout_indices
    from nanosafe.train import step_indices

    for rank in (0, 1):
        rt = Runtime(ddp=True, rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        for step in (0, 7):
            idx = rollout_indices(100, step, 12, 4, rt, seed=3)
            distinct = idx[::4]
            assert idx == [i for i in distinct for _ in range(4)]
            assert distinct == step_indices(
                100, step, 6, rank, 2, 3
            )  # 3 prompts per rank, 6 in all
        assert rollout_indices(100, 5, 12, 1, rt, seed=3) == step_indices(100, 5, 24, rank, 2, 3)


def test_resume_keeps_the_calibrated_threshold(stages):
    """No --thresholds: d is calibrated on the starting policy. A resume must keep that d (not
    recalibrate on the half-trained actor) and end where an uninterrupted run ends: 3 iterations
    straight == 2 iterations, stop, --resume to 3 (actor, critics, λ, window, RNG, metrics).
    (The same with a given d, killed mid-run: test_ppo_sigkill_then_resume_is_exact.)"""
    t = stages
    ppo(t, "cal_full", "--max_steps", 3, "--save_optimizer")
    ppo(t, "cal_cut", "--max_steps", 2, "--save_optimizer")
    ppo(t, "cal_cut", "--max_steps", 3, "--resume", "--save_optimizer")
    d_full = json.load(open(t / "cal_full" / "nanosafe.json"))["thresholds"]
    assert json.load(open(t / "cal_cut" / "nanosafe.json"))["thresholds"] == d_full
    sa, sb = assert_resumed_exactly(t / "cal_full", t / "cal_cut")  # actor, both critics, λ
    assert sa["thresholds"] == sb["thresholds"] == d_full
    assert sa["windows"] == sb["windows"] and torch.equal(sa["gen"][0], sb["gen"][0])
    assert {r["threshold_0"] for r in metrics(t / "cal_cut") if "threshold_0" in r} == {d_full[0]}
    assert [r["step"] for r in metrics(t / "cal_cut") if not r.get("final")] == [0, 1, 2]
    p = ppo(t, "cal_cut", "--max_steps", 4, "--resume", "--thresholds", "123.0", check=False)
    assert p.returncode != 0 and "a resumed run keeps its constraint" in p.stderr


def test_thresholds_must_match_cost_models(stages):
    p = ppo(
        stages,
        "bad",
        "--cost_models",
        stages / "cm",
        stages / "cm",
        "--thresholds",
        "0.0",
        "--max_steps",
        1,
        check=False,
    )
    assert (
        p.returncode != 0
        and "--thresholds has 1 values but the cost models have 2 outputs" in p.stderr
    )
    assert not (stages / "bad").exists()


def test_two_constraints(stages):
    ppo(
        stages,
        "k2",
        "--cost_models",
        stages / "cm",
        stages / "cm",
        "--thresholds",
        "9",
        "-9",
        "--max_steps",
        2,
    )
    r = [r for r in metrics(stages / "k2") if not r.get("final")][-1]
    assert {"lambda_0", "lambda_1", "value_loss_cost_critic_1"} <= set(r)
    # the same cost against a loose and a tight threshold: only the tight one's λ rises
    assert r["lambda_1"] > 1.0 > r["lambda_0"]


def test_k_category_cost_model_is_k_constraints(stages):
    """train_pm.py --categories all: one backbone, 5 outputs named after the toy world's categories;
    PPO-Lag takes it as 5 constraints (5 thresholds, 5 λ) with one 5-output cost critic, saved and
    loadable."""
    t = stages
    run(
        "train_pm.py",
        "--kind",
        "cost",
        "--categories",
        "all",
        "--model",
        t / "sft",
        "--data_dir",
        t / "data",
        "--out_dir",
        t / "cm_k5",
        "--max_steps",
        6,
        "--batch_size",
        8,
        "--max_length",
        48,
    )
    cm, _ = model.load_score_model(str(t / "cm_k5"), kind="cost")
    assert cm.names == ["cybercrime", "drugs", "fraud", "privacy", "violence"]
    s = json.load(open(t / "cm_k5" / "summary.json"))
    assert (
        set(s["categories"]) == set(cm.names)
        and abs(s["accuracy"] - sum(r["accuracy"] for r in s["categories"].values()) / 5) < 1e-9
    )
    d = ["9", "9", "9", "9", "-9"]  # loose for four categories, tight for the fifth
    ppo(
        t,
        "k5",
        "--cost_models",
        t / "cm_k5",
        "--thresholds",
        *d,
        "--max_steps",
        2,
        "--save_optimizer",
    )
    r = [r for r in metrics(t / "k5") if not r.get("final")][-1]
    assert [r[f"threshold_{k}"] for k in range(5)] == [9, 9, 9, 9, -9] and "lambda_5" not in r
    assert r["lambda_4"] > 1.0 > r["lambda_0"]  # each λ follows its own stream
    critic, _ = model.load_score_model(str(t / "k5" / "cost_critic_0"), kind="cost")
    assert critic.names == cm.names and not (t / "k5" / "cost_critic_1").exists()
    assert json.load(open(t / "k5" / "nanosafe.json"))["constraints"] == cm.names
    p = ppo(
        t,
        "k5_bad",
        "--cost_models",
        t / "cm_k5",
        "--thresholds",
        "1",
        "--max_steps",
        1,
        check=False,
    )
    assert (
        p.returncode == 1
        and "--thresholds has 1 values but the cost models have 5 outputs" in p.stderr
    )


def test_banned_words_rule_beside_the_cost_model(stages):
    """--banned_words: a rule constraint with its own threshold (2% of answers), a fresh critic head
    on the policy's backbone, its own λ; the cost model's stream is unchanged in position 0."""
    t = stages
    ppo(
        t,
        "rule",
        "--banned_words",
        "police",
        "hotline",
        "--max_steps",
        2,
        "--show_every",
        1,
        "--save_optimizer",
    )
    r = [r for r in metrics(t / "rule") if not r.get("final")]
    assert r[-1]["threshold_1"] == 0.02 and all(
        x["cost_1"] in {i / 8 for i in range(9)} for x in r
    )  # a fraction of 8 answers
    assert json.load(open(t / "rule" / "nanosafe.json"))["constraints"] == ["cost", "banned_words"]
    critic, _ = model.load_score_model(str(t / "rule" / "cost_critic_1"), kind="cost")
    sft_backbone = {
        k: v
        for k, v in load_file(t / "sft" / "model.safetensors").items()
        if k.startswith("model.")
    }
    assert set(sft_backbone) <= set(load_file(t / "rule" / "cost_critic_1" / "model.safetensors"))


@pytest.mark.parametrize("scale", ["rate", "raw"])
def test_each_stream_is_weighed_by_its_unit(stages, monkeypatch, one_thread, scale):
    """On the rate scale the cost model's KL share and its λ in the actor's divisor are weighed by
    1/(ū − s̄), the calibrated levels in nanosafe.json; a rule's, and every stream on the raw
    scale, by 1 (ppo.combined_advantage: the rate scale then takes the raw form's actor step)."""
    import train_ppo_lag
    from nanosafe import config
    from nanosafe import ppo as ppo_fns

    seen = {"kl": [], "adv": []}
    real_kl, real_adv = ppo_fns.kl_rewards, ppo_fns.combined_advantage

    def kl_rewards(*a, **kw):
        seen["kl"].append(a[7] if len(a) > 7 else kw["cost_units"])
        return real_kl(*a, **kw)

    def combined_advantage(reward_adv, cost_advs, lambdas, units=None):
        seen["adv"].append(units)
        return real_adv(reward_adv, cost_advs, lambdas, units)

    monkeypatch.setattr(ppo_fns, "kl_rewards", kl_rewards)
    monkeypatch.setattr(ppo_fns, "combined_advantage", combined_advantage)
    out = f"units_{scale}"
    cfg = config.parse(train_ppo_lag.Config, ppo_args(
        stages, out, "--banned_words", "police", "--cost_scale", scale, "--max_steps", 1))
    train_ppo_lag.main(cfg)
    (scales, rule) = json.load(open(stages / out / "nanosafe.json"))["cost_scales"]
    assert rule is None
    want = [1.0, 1.0] if scale == "raw" else [scales[1] - scales[0], 1.0]
    assert scale == "raw" or want[0] > 1.0  # ū − s̄: a real unit, not 1
    assert seen["kl"] == [want]
    steps = cfg.ppo_epochs * cfg.rollout_batch_size // cfg.minibatch_size
    assert len(seen["adv"]) == steps and all(u == want for u in seen["adv"])  # every actor step


class LongAnswers(constraints.Constraint):
    """A constraint defined here alone (README "Adding a constraint"): cost 1 for an answer of
    more than --max_words words, and at most 10% of answers may be."""

    flags = {
        "max_words": (
            int,
            config.arg(
                0, "cost 1 for an answer of more than N words (0: off)", group="constraints"
            ),
        )
    }
    returned = []  # every cost() result, in order: what the run saw

    def __init__(self, n):
        self.n, self.names, self.thresholds = n, ["long_answers"], [0.1]

    @classmethod
    def from_flags(cls, cfg, dtype, labeller):
        return [cls(cfg.max_words)] if cfg.max_words else []

    def cost(self, ro):
        c = torch.tensor(
            [float(len(a.split()) > self.n) for a in ro.answers()], device=ro.seq.device
        )
        LongAnswers.returned.append(c)
        return c


def test_a_constraint_defined_outside_nanosafe_gets_its_flag_stream_critic_and_lambda(
    stages, monkeypatch, one_thread
):
    """A new kind of constraint plugs in through constraints.kinds() and its own `flags`:
    --max_words reaches --help and the config, PPO-Lag gives it stream 1 (after the cost model), its
    own critic and λ, logs its cost (= what its cost() returned), names it in nanosafe.json and
    summary.json, and its λ moves in the direction of its violation at every dual step."""
    import train_ppo_lag
    from nanosafe import lagrange

    steps_seen = []  # per dual step: (λ_1 before, J_1, λ_1 after)
    real_dual_step = lagrange.dual_step

    def dual_step(lambdas, windows, costs, rows=None):
        before = lambdas[1].value
        J = real_dual_step(lambdas, windows, costs, rows)
        steps_seen.append((before, J[1], lambdas[1].value))
        return J

    monkeypatch.setattr(lagrange, "dual_step", dual_step)
    builtin = constraints.kinds()
    monkeypatch.setattr(constraints, "kinds", lambda: [*builtin, LongAnswers])
    LongAnswers.returned.clear()
    Cfg = config.extend(train_ppo_lag.Config, LongAnswers.flags)
    assert "--max_words MAX_WORDS" in config.build_parser(Cfg).format_help()
    t, steps = stages, 3
    cfg = config.parse(
        Cfg,
        ppo_args(
            t,
            "long",
            "--thresholds",
            "-1.0",
            "--max_words",
            2,
            "--max_steps",
            steps,
            "--save_optimizer",
            "--multiplier",
            "sgd",
        ),
    )
    assert cfg.max_words == 2
    train_ppo_lag.main(cfg)

    out = t / "long"
    assert json.load(open(out / "summary.json"))["constraints"] == ["cost", "long_answers"]
    assert json.load(open(out / "nanosafe.json"))["constraints"] == ["cost", "long_answers"]
    assert model.is_score_folder(str(out / "cost_critic_1"))  # its own (fresh) critic, saved
    recs = [r for r in metrics(out) if not r.get("final")]
    assert [r["step"] for r in recs] == list(range(steps)) and len(LongAnswers.returned) == steps
    for r, c in zip(recs, LongAnswers.returned):
        assert r["cost_1"] == pytest.approx(c.mean().item(), abs=1e-6) and r["threshold_1"] == 0.1
        assert {"lambda_1", "value_loss_cost_critic_1", "rollout_flagged_long_answers"} <= set(r)
        assert "lambda_2" not in r
    # every minibatch's costs join the window once per epoch, so after an iteration it holds each
    # answer twice and its mean is that of every answer so far
    window = torch.cat(LongAnswers.returned).tolist()
    for k, r in enumerate(recs):
        J = sum(window[: 8 * (k + 1)]) / (8 * (k + 1))
        assert r["episode_cost_window_1"] == pytest.approx(J)
    # at each of the 3 x 2 x 2 dual steps λ moves toward the violation (J = d only by chance:
    # 2 of 20)
    assert len(steps_seen) == steps * 4
    for before, J, after in steps_seen:
        if abs(J - 0.1) > 1e-9:
            assert (after - before) * (J - 0.1) > 0, (before, J, after)


def test_probe_constraint_frozen_and_refreshed_resume_exactly(stages):
    """python -m nanosafe.probe trains a probe on the SFT policy's hidden states; PPO-Lag with
    --probe (no cost model) calibrates its threshold, logs the gold unsafe rate beside the probe's,
    and with --probe_refresh_every refits it: the refit probe is in the checkpoint, and a resumed
    run ends bit-identical to a straight one."""
    t = stages
    run(
        "-m",
        "nanosafe.probe",
        "--policy",
        t / "sft",
        "--out",
        t / "probe",
        "--data_dir",
        t / "data",
        "--n_train",
        512,
        "--n_eval",
        256,
    )
    info = json.load(open(t / "probe" / "probe.json"))
    assert (
        info["layer"] == 1 and 0.5 < info["eval_accuracy"] <= 1
    )  # 2 layers: two thirds of the way up is 1
    common = ["--cost_models", "--probe", t / "probe", "--probe_refresh_every", 1]
    ppo(t, "probe_full", *common, "--max_steps", 3, "--save_optimizer")
    ppo(t, "probe_cut", *common, "--max_steps", 2, "--save_optimizer")
    ppo(t, "probe_cut", *common, "--max_steps", 3, "--resume", "--save_optimizer")
    sa, _ = assert_resumed_exactly(t / "probe_full", t / "probe_cut")
    from nanosafe.probe import LinearProbe

    start = LinearProbe.load(str(t / "probe")).state_dict()
    assert not torch.equal(sa["constraints"][0]["probe"]["weight"], start["weight"])  # refit
    saved = LinearProbe.load(
        str(t / "probe_full" / "constraint_0")
    ).state_dict()  # written beside the checkpoint, to read later
    assert all(torch.equal(saved[k], sa["constraints"][0]["probe"][k]) for k in saved)
    r = [r for r in metrics(t / "probe_full") if not r.get("final")][-1]
    assert {"rollout_gold_unsafe_harmful", "rollout_flagged_harmful_probe", "lambda_0"} <= set(r)
    assert json.load(open(t / "probe_full" / "nanosafe.json"))["constraints"] == ["probe"]


def descendants(pid) -> list:
    """Every live descendant of a process, from /proc (Linux)."""
    children = {}
    for d in os.listdir("/proc"):
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (ValueError, OSError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def torchrun_ppo(t, out, *extra, kill_at_step=None):
    """train_ppo_lag.py under torchrun, 2 CPU processes (gloo). kill_at_step: SIGKILL the whole job
    (launcher and workers) once a checkpoint of at least that step is on disk."""
    import signal
    import time

    cmd = [
        str(a)
        for a in [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            free_port(),
            "train_ppo_lag.py",
            "--model",
            t / "sft",
            "--reward_model",
            t / "rm",
            "--cost_models",
            t / "cm",
            "--data_dir",
            t / "data",
            "--out_dir",
            t / out,
            *PPO_TINY,
            *extra,
        ]
    ]
    log = open(t / f"{out}.log", "a")
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    state = t / out / "nanosafe.json"
    try:
        while (
            kill_at_step is not None
            and p.poll() is None
            and not (state.exists() and json.load(open(state))["step"] >= kill_at_step)
        ):
            time.sleep(0.01)
        if (
            kill_at_step is not None
        ):  # the workers run in sessions of their own: kill -9 every process of the job
            for pid in [p.pid, *descendants(p.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        rc = p.wait(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    log.close()
    text = (t / f"{out}.log").read_text()
    assert kill_at_step is not None or rc == 0, text[-3000:]
    return text


def assert_resumed_exactly(full, cut):
    """An interrupted-and-resumed PPO-Lag run ends bit-identical to the uninterrupted one: actor,
    critics, λ. Returns both trainer states for further checks."""
    for sub in ["", "reward_critic", "cost_critic_0"]:
        a, b = (
            load_file(full / sub / "model.safetensors"),
            load_file(cut / sub / "model.safetensors"),
        )
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    sa, sb = (torch.load(d / "trainer_state.pt", weights_only=True) for d in (full, cut))
    assert sa["lambdas"] == sb["lambdas"]
    return sa, sb


def test_ppo_lag_with_lora_end_to_end_and_resume(stages):
    """--lora_rank 8: adapters on the actor and both critics, the reference = the actor with its
    adapters off; the saved folders are plain merged HF folders; 3 iterations straight == 2, stop,
    --resume to 3."""
    pytest.importorskip("peft")
    t, args = (
        stages,
        ["--thresholds", "-1.0", "--eval_every", 0, "--lora_rank", 8, "--save_optimizer"],
    )
    out = ppo(t, "lora", "--max_steps", 3, *args).stdout
    assert "in LoRA adapters of rank 8" in out
    ppo(t, "lora_cut", "--max_steps", 2, *args)
    out = ppo(t, "lora_cut", "--max_steps", 3, *args, "--resume").stdout
    assert f"resumed from {t / 'lora_cut'} at iteration 2" in out
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(
        t / "lora"
    )  # transformers alone: no peft names left
    assert not any("lora" in n for n, _ in actor.named_parameters())
    start, a, b = (load_file(t / d / "model.safetensors") for d in ("sft", "lora", "lora_cut"))
    assert a.keys() == start.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4, moved  # the adapters trained and were merged in
    assert torch.equal(
        a["model.embed_tokens.weight"], start["model.embed_tokens.weight"]
    )  # not an adapted layer: untouched
    assert_resumed_exactly(t / "lora", t / "lora_cut")
    # a resume without the flag is refused in one line
    p = ppo(t, "lora_cut", "--max_steps", 4, "--thresholds", "-1.0", "--resume", check=False)
    assert p.returncode == 1 and "--lora_rank" in p.stderr, p.stderr[-2000:]


def test_ppo_lag_fsdp_equals_ddp_and_resumes_exactly_after_sigkill(stages):
    """--fsdp (FSDP2: all six models sharded, the actor gathered for generation) runs PPO-Lag
    exactly as DDP does: the same λ and actor parameters after 4 iterations on the same seed, and
    each run's ranks agree. Then SIGKILL an --fsdp job after a checkpoint: --resume --fsdp ends
    where the uninterrupted --fsdp run ends (actor, critics, λ; the optimiser states gathered into
    one file and scattered back)."""
    t, steps = stages, 4
    args = ["--max_steps", steps, "--thresholds", "-1.0", "--eval_every", 2, "--save_optimizer"]
    torchrun_ppo(t, "ddp", *args)
    log = torchrun_ppo(t, "fsdp", *args, "--fsdp")
    assert (
        "gold: helpfulness" in log
    )  # rank 0 evaluated inside the gathered block without hanging the other rank
    sd, sf = (
        json.load(open(t / "ddp" / "summary.json")),
        json.load(open(t / "fsdp" / "summary.json")),
    )
    for s in (sd, sf):
        assert (
            len(s["ranks_agree"]) == 2 and s["ranks_agree"][0] == s["ranks_agree"][1]
        )  # λ and the actor's parameter sum, per rank
    assert sd["lambdas"] == pytest.approx(sf["lambdas"], abs=1e-5) and sd["lambdas"] != [1.0]
    a, b = load_file(t / "ddp" / "model.safetensors"), load_file(t / "fsdp" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-5, f"actor parameters differ by {diff:.2e}"
    start = load_file(t / "sft" / "model.safetensors")
    assert (
        max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3
    )  # it trained: equal is not trivially equal
    from transformers import AutoModelForCausalLM

    assert (
        type(AutoModelForCausalLM.from_pretrained(t / "fsdp")).__name__ == "LlamaForCausalLM"
    )  # a plain HF folder

    torchrun_ppo(t, "f_cut", *args, "--fsdp", kill_at_step=2)
    from nanosafe.model import recover_checkpoint

    recover_checkpoint(str(t / "f_cut"))
    killed_at = json.load(open(t / "f_cut" / "nanosafe.json"))["step"]
    assert 2 <= killed_at < steps, killed_at
    log = torchrun_ppo(t, "f_cut", *args, "--fsdp", "--resume")
    assert f"resumed from {t / 'f_cut'} at iteration {killed_at}" in log
    sa, _ = assert_resumed_exactly(t / "fsdp", t / "f_cut")
    assert "fsdp" in sa["actor_opt"]
    # a DDP run refuses to resume an --fsdp checkpoint, in one line
    p = ppo(t, "f_cut", "--max_steps", steps + 1, "--thresholds", "-1.0", "--resume", check=False)
    assert p.returncode == 1 and "saved with --fsdp" in p.stderr, p.stderr[-2000:]


def test_ppo_sigkill_then_resume_is_exact(stages):
    """Kill -9 a PPO-Lag run after its 3rd checkpoint; --resume ends where an uninterrupted run
    ends."""
    import signal
    import time

    t, steps = stages, 6
    args = ["--thresholds", "-1.0", "--eval_every", "0"]
    ppo(t, "k_full", "--max_steps", steps, *args, "--save_optimizer")
    cmd = [
        sys.executable,
        "train_ppo_lag.py",
        "--model",
        t / "sft",
        "--reward_model",
        t / "rm",
        "--cost_models",
        t / "cm",
        "--data_dir",
        t / "data",
        "--out_dir",
        t / "k_cut",
        *PPO_TINY,
        "--max_steps",
        steps,
        *args,
    ]
    p = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = t / "k_cut" / "nanosafe.json"
    try:
        while p.poll() is None and not (state.exists() and json.load(open(state))["step"] >= 3):
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    from nanosafe.model import recover_checkpoint

    recover_checkpoint(str(t / "k_cut"))
    killed_at = json.load(open(state))["step"]
    assert 3 <= killed_at < steps, killed_at
    out = ppo(t, "k_cut", "--max_steps", steps, *args, "--resume", "--save_optimizer").stdout
    assert f"resumed from {t / 'k_cut'} at iteration {killed_at}" in out
    sa, sb = assert_resumed_exactly(t / "k_full", t / "k_cut")
    assert sa["windows"] == sb["windows"] and torch.equal(sa["gen"][0], sb["gen"][0])
    assert [r["step"] for r in metrics(t / "k_cut") if not r.get("final")] == list(range(steps))


def test_bf16_autocast_trains_like_fp32_and_runs_every_stage(stages):
    """--dtype bfloat16 is bf16 compute with fp32 master weights: SFT's held-out loss after the same
    steps is within 2% of fp32's, and a reward model and a PPO-Lag iteration run (finite) in bf16.
    """
    t = stages
    loss = {}
    for dt in ("float32", "bfloat16"):
        run(
            "train_sft.py",
            "--data_dir",
            t / "data",
            "--out_dir",
            t / f"sft_{dt}",
            "--toy_size",
            "tiny",
            "--max_steps",
            60,
            "--batch_size",
            16,
            "--max_length",
            48,
            "--gold_samples",
            0,
            "--eval_every",
            60,
            "--dtype",
            dt,
        )
        recs = metrics(t / f"sft_{dt}")
        loss[dt] = recs[-1]["eval_loss"]
        assert recs[-1]["loss"] < 0.8 * recs[0]["loss"]  # it learns
    assert abs(loss["bfloat16"] - loss["float32"]) / loss["float32"] < 0.02, loss
    from safetensors.torch import load_file as load

    assert (
        load(t / "sft_bfloat16" / "model.safetensors")["model.norm.weight"].dtype == torch.float32
    )  # master weights
    run(
        "train_pm.py",
        "--kind",
        "reward",
        "--model",
        t / "sft",
        "--data_dir",
        t / "data",
        "--out_dir",
        t / "rm_bf16",
        "--max_steps",
        3,
        "--batch_size",
        8,
        "--max_length",
        48,
        "--dtype",
        "bfloat16",
    )
    assert all(math.isfinite(r["loss"]) for r in metrics(t / "rm_bf16") if "loss" in r)
    ppo(t, "lag_bf16", "--max_steps", 1, "--dtype", "bfloat16")
    rec = [r for r in metrics(t / "lag_bf16") if not r.get("final")][0]
    assert all(
        math.isfinite(rec[k])
        for k in ("reward", "cost_0", "kl", "policy_loss", "value_loss_reward_critic")
    )


def test_calibration_refuses_a_cost_model_without_the_sign_term(stages):
    """Without the sign term the cost model's zero separates nothing, so 'cost > 0 is unsafe' cannot
    set d: one line, and its folder says sign_loss false. With --thresholds the same model trains.
    """
    t = stages
    run(
        "train_pm.py",
        "--kind",
        "cost",
        "--no_sign_loss",
        "--model",
        t / "sft",
        "--data_dir",
        t / "data",
        "--out_dir",
        t / "cm_nosign",
        "--max_steps",
        4,
        "--batch_size",
        8,
        "--max_length",
        48,
    )
    assert json.load(open(t / "cm_nosign" / "nanosafe.json"))["sign_loss"] is False
    p = ppo(t, "nosign", "--cost_models", t / "cm_nosign", "--max_steps", 1, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert (
        len(errors) == 1
        and "trained without the sign term" in errors[0]
        and str(t / "cm_nosign") in errors[0]
    )
    ppo(t, "nosign", "--cost_models", t / "cm_nosign", "--max_steps", 1, "--thresholds", "0.0")


SCRIPTS = [
    "train_sft.py",
    "train_pm.py",
    "train_ppo_lag.py",
    "train_grpo_lag.py",
    "train_dpo.py",
    "sample.py",
]


def help_entries(text: str) -> dict:
    """--help text -> {option line: its help, whitespace collapsed}, one entry per flag"""
    out, head = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):  # an option: its flags, then maybe the start of its help
            flags, _, rest = line.strip().partition("  ")
            head, out[flags] = flags, rest.strip()
        elif line.startswith("   ") and head:  # its help, continued
            out[head] = f"{out[head]} {line.strip()}".strip()
        else:  # a group title or a blank line
            head = None
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag(script):
    """Every field of the script's Config is in --help with its default; a boolean shows both
    --x and --no_x; an abbreviation of a flag is refused (exit 2), not taken for the flag."""
    import dataclasses
    import importlib

    # argparse formats help texts with %: a '72%' in one would crash --help
    p = run(script, "--help")
    entries = help_entries(p.stdout)
    cls = importlib.import_module(script[:-3]).Config
    fields = dataclasses.fields(cls)
    assert len(fields) >= 15, [f.name for f in fields]
    for f in fields:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        bool_flag = f"--{f.name}, --no_{f.name}"
        if isinstance(default, bool):
            assert bool_flag in entries, (script, f.name, list(entries))
            key = bool_flag
        else:
            assert f"--no_{f.name}" not in p.stdout, (script, f.name)
            key = next((k for k in entries if k.split()[0] == f"--{f.name}"), None)
            assert key is not None, (script, f.name, list(entries))
        if f.metadata.get("pretrained") is not None:  # the toy and the pretrained default
            default = config._ByModel(default, f.metadata["pretrained"])
        assert entries[key].endswith(f"(default: {default})"), (script, f.name, entries[key])
    assert len(entries) == len(fields) + 1, sorted(entries)  # and -h: no flag outside the Config
    # no abbreviations: --max_step is not --max_steps (sample.py has no --max_steps: --max_new)
    abbrev = "--max_new" if script == "sample.py" else "--max_step"
    p = run(script, abbrev, "3", check=False)
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr, (
        p.returncode,
        p.stderr[-1000:],
    )
    assert "Traceback" not in p.stderr

"""DPO, SafeDPO and MoCAN (nanosafe/dpo.py, train_dpo.py).

- the pure pieces against hand computations: DPO's loss (and its soft-label form), the answer
  log-probs, SafeDPO's pair transform on the four safe/unsafe cases and its offset loss, MoCAN's
  dual on a case whose minimiser is derived in closed form, and the bisection finding it
- train_dpo.py end to end with tiny settings: the toy world's gold evaluation in summary.json,
  SafeDPO under bf16, MoCAN with tiny reward and cost models, bad flags as one line, MoCAN under
  DDP (2 processes x b pairs = 1 x 2b: the same λ* and weights), and --resume after a SIGKILL
  ending where an uninterrupted run ends (weights, optimiser, metrics.jsonl)
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from _helpers import (
    ENV,
    ROOT,
    ForkServer,
    assert_nothing_written,
    flags,
    load_weights,
    max_abs_diff,
    read_jsonl,
    run_torchrun,
    saved_step,
    write_jsonl,
)

from nanosafe import dpo, toy
from nanosafe.data import IGNORE_INDEX


def sigmoid(x):
    return 1 / (1 + math.exp(-x))

# -----------------------------------------------------------------------------
# DPO's loss


def test_dpo_loss_matches_a_hand_computation():
    # pair 0: log-ratios y_w -3 - (-3.5) = 0.5, y_l -4 - (-3) = -1  -> z = 0.5 * 1.5 = 0.75
    # pair 1: log-ratios y_w -5 - (-4) = -1, y_l -2 - (-2.5) = 0.5  -> z = 0.5 * -1.5 = -0.75
    w, l_ = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rw, rl = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    loss = dpo.dpo_loss(w, l_, rw, rl, beta=0.5)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.75)),
                                           math.log(1 + math.exp(0.75))], abs=1e-6)
    assert dpo.dpo_logits(w, l_, rw, rl, 0.5).tolist() == pytest.approx([0.75, -0.75])
    # a soft label q: -q log σ(z) - (1 - q) log σ(-z)
    q = 0.25
    soft = dpo.dpo_loss(w, l_, rw, rl, beta=0.5, label=q)
    assert soft[0].item() == pytest.approx(-q * math.log(sigmoid(0.75))
                                           - (1 - q) * math.log(sigmoid(-0.75)), abs=1e-6)
    # ... whose minimiser is z = logit(q): there the gradient vanishes
    logp_w = torch.tensor([math.log(q / (1 - q)) / 0.5], requires_grad=True)
    dpo.dpo_loss(logp_w, torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.5, label=q).backward()
    assert abs(logp_w.grad.item()) < 1e-6


def test_answer_logprobs_sum_the_answer_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX],  # answer 3 4, a pad
                           [IGNORE_INDEX, 6, 2, IGNORE_INDEX, IGNORE_INDEX]])
    lp = torch.log_softmax(logits, -1)
    # the logits at position t predict token t + 1
    want = [lp[0, 1, 3] + lp[0, 2, 4], lp[1, 0, 6] + lp[1, 1, 2]]
    got = dpo.sequence_logprobs(logits, labels)
    assert got.tolist() == pytest.approx([x.item() for x in want], abs=1e-6)

# -----------------------------------------------------------------------------
# SafeDPO


def pair(better, safe0, safe1, tag):
    return {"prompt": f"p{tag}", "response_0": f"a{tag}", "response_1": f"b{tag}",
            "better_response_id": better, "safer_response_id": 1 - better,
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_severity_level": 0 if safe0 else 2,
            "response_1_severity_level": 0 if safe1 else 2}


def test_safe_dpo_transform_on_the_four_safe_unsafe_cases():
    # (better answer safe?, other answer safe?) -> keep, keep, swap, drop; the better answer is
    # response_1 in half of them, so orientation is checked too
    records = [pair(0, True, True, 1), pair(1, False, True, 2), pair(0, False, True, 3),
               pair(1, False, False, 4)]
    pairs, counts = dpo.safe_dpo_pairs(records)
    assert counts == {"kept": 2, "swapped": 1, "dropped": 1}
    got = [(p["prompt"], p["response_0"], p["response_1"], p["is_response_0_safe"],
            p["is_response_1_safe"]) for p in pairs]
    assert got == [("p1", "a1", "b1", True, True),      # both safe: y_w the better one, kept
                   ("p2", "b2", "a2", True, False),     # the better (b2) safe, other unsafe: kept
                   ("p3", "b3", "a3", True, False)]     # the better (a3) unsafe, b3 safe: swapped
    # every field follows its answer when a pair is turned round
    assert pairs[1]["response_0_severity_level"] == 0 and pairs[1]["better_response_id"] == 0
    assert pairs[2]["response_1_severity_level"] == 2 and pairs[2]["better_response_id"] == 1
    assert dpo.unsafe_flags(pairs).tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    # plain DPO keeps all four, oriented by the label asked for
    assert [p["response_0"] for p in dpo.preference_pairs(records)] == ["a1", "b2", "a3", "b4"]
    assert [p["response_0"] for p in dpo.preference_pairs(records, "safer")] == ["b1", "a2", "b3",
                                                                                   "a4"]
    with pytest.raises(ValueError, match="safety labels"):
        dpo.safe_dpo_pairs([dict(pair(0, True, True, 5), is_response_1_safe=None)])


def test_safe_dpo_loss_on_hand_values():
    # z = 0.75 for both pairs; pair 0 safe vs unsafe (h_l = 1), pair 1 both safe; Δ = 2
    w, l_ = torch.tensor([-3.0, -3.0]), torch.tensor([-4.0, -4.0])
    rw, rl = torch.tensor([-3.5, -3.5]), torch.tensor([-3.0, -3.0])
    h = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    offset = dpo.safety_offset(h[:, 0], h[:, 1], 2.0)
    assert offset.tolist() == [2.0, 0.0]
    loss = dpo.dpo_loss(w, l_, rw, rl, 0.5, offset)
    # -log σ(0.75 - 2) on the safe/unsafe pair: its margin must pass Δ; plain DPO on the other
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(1.25)),
                                           math.log(1 + math.exp(-0.75))], abs=1e-6)
    # Δ = 0 is DPO on the transformed pairs
    assert dpo.dpo_loss(w, l_, rw, rl, 0.5, dpo.safety_offset(h[:, 0], h[:, 1], 0.0)).tolist() \
        == pytest.approx([math.log(1 + math.exp(-0.75))] * 2, abs=1e-6)

# -----------------------------------------------------------------------------
# MoCAN's dual
#
# One prompt, K = 4 reference samples: y1 once (r1 = 2, c1 = 1: helpful, unsafe), y2 three times
# (r2 = 0, c2 = -1), so π_ref(y1) = p = 1/4; β = 1, d = 0.
#   D(λ) = β log[ p·e^{(r1 + λ(d - c1))/β} + (1 - p)·e^{(r2 + λ(d - c2))/β} ]
#   D'(λ) = d - E_{π_λ} c = d - [w·c1 + (1 - w)·c2],  w = π_λ(y1) = σ(log(p/(1-p)) + (r1 - r2 -
#           λ(c1 - c2))/β)
# D'(λ*) = 0 at w* = (d - c2)/(c1 - c2) = 1/2, so
#   λ* = [r1 - r2 + β·log(p/(1 - p)) - β·log(w*/(1 - w*))] / (c1 - c2) = (2 - log 3)/2 = 0.4507
# (at λ = 0, w = σ(2 - log 3) = 0.71 > 1/2: the constraint is active, λ* > 0)

R1 = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
C1 = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
LAMBDA_STAR = (2 - math.log(3)) / 2


def closed_form_dual(lam, p=0.25, beta=1.0, d=0.0):
    return beta * math.log(p * math.exp((2 + lam * (d - 1)) / beta)
                           + (1 - p) * math.exp((0 + lam * (d + 1)) / beta))


def test_can_dual_is_the_closed_form_and_its_minimiser_is_found():
    for lam in (0.0, 0.3, LAMBDA_STAR, 2.0):
        assert dpo.can_dual(lam, R1, C1, 0.0, 1.0) == pytest.approx(closed_form_dual(lam), abs=1e-9)
        eps = 1e-5  # D' against a central difference of D
        fd = (dpo.can_dual(lam + eps, R1, C1, 0.0, 1.0)
              - dpo.can_dual(lam - eps, R1, C1, 0.0, 1.0)) / (2 * eps)
        assert dpo.can_dual_grad(lam, R1, C1, 0.0, 1.0) == pytest.approx(fd, abs=1e-6)
    lam, info = dpo.solve_can_dual(R1, C1, 0.0, 1.0, lambda_max=20.0)
    assert lam == pytest.approx(LAMBDA_STAR, abs=1e-6) and info["feasible"]
    assert abs(dpo.can_dual_grad(lam, R1, C1, 0.0, 1.0)) < 1e-6
    assert dpo.can_dual(lam, R1, C1, 0.0, 1.0) < min(dpo.can_dual(lam + s, R1, C1, 0.0, 1.0)
                                                     for s in (-0.05, 0.05))
    # β scales it: with β = 0.5, λ* = [2 + 0.5·log(1/3)] / 2
    lam, _ = dpo.solve_can_dual(R1, C1, 0.0, 0.5, lambda_max=20.0)
    assert lam == pytest.approx((2 - 0.5 * math.log(3)) / 2, abs=1e-6)


def test_can_dual_averages_prompts_and_knows_its_edges():
    # a second prompt whose samples all cost -1: E_x E_{π_λ} c = (E_1 + (-1)) / 2 = d = -0.5
    # needs E_1 = 0, the same w* = 1/2 on prompt 1: the same λ*
    r = torch.cat([R1, torch.zeros(1, 4)])
    c = torch.cat([C1, -torch.ones(1, 4)])
    lam, _ = dpo.solve_can_dual(r, c, -0.5, 1.0, lambda_max=20.0)
    assert lam == pytest.approx(LAMBDA_STAR, abs=1e-6)
    # inactive: π_0 ∝ π_ref·e^r already meets d (every sample costs <= 1 < 2) -> λ* = 0
    assert dpo.solve_can_dual(R1, C1, 2.0, 1.0, lambda_max=20.0)[0] == 0.0
    # infeasible: no reweighting of these samples gets below -1 -> λ* = λ_max, said so
    lam, info = dpo.solve_can_dual(R1, C1, -2.0, 1.0, lambda_max=7.0)
    assert lam == 7.0 and not info["feasible"]


def test_can_labels_are_the_bradley_terry_probability_of_r_minus_lambda_c():
    r = torch.tensor([[1.0, 3.0], [0.5, 0.0]])  # rows: y_w, y_l; columns: two pairs
    c = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    q = dpo.can_labels(r, c, 0.5)
    # pair 0: (1 - 0.5·2) - (0.5 - 0) = -0.5; pair 1: (3 + 0.5) - (0 - 0.5) = 4
    assert q.tolist() == pytest.approx([sigmoid(-0.5), sigmoid(4.0)], abs=1e-6)

# -----------------------------------------------------------------------------
# train_dpo.py end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random toy policy; 64 toy pairs (SFT-mix and drift answers, labelled by the toy's
    own labeller) in a toy-world data folder, so the final gold evaluation runs on toy prompts;
    and tiny reward and cost models (fresh heads on the policy: scores of both signs, so d can
    be calibrated). Made here in ~1 s, not from the whole toy data set."""
    from nanosafe.model import load_score_model, save_checkpoint

    base = tmp_path_factory.mktemp("dpo_world")
    tok = toy.toy_tokenizer()
    w = {"policy": str(base / "policy")}
    save_checkpoint(w["policy"], toy.toy_model(tok, "tiny", seed=0), tok, {"kind": "policy"})
    rng = random.Random(0)
    train_prompts, test_prompts = toy.split_prompts(0)

    def answer(p):
        return toy.sft_response(rng, p)[0] if rng.random() < 0.5 else toy.drift_response(rng, p)
    pairs = [toy.pref_record(rng, p, answer(p), answer(p), 0.1, 0.5)
             for p, _ in train_prompts[::15][:64]]
    w["pref"] = write_jsonl(base / "pref.jsonl", pairs)
    sft = [{"prompt": p["prompt"], "response": p["response_0"]} for p in pairs]
    prompts = [toy.prompt_record(p, t) for p, t in test_prompts[::60]]
    data_dir = base / "toy"
    data_dir.mkdir()
    for name in toy.FILES:  # every file the toy world has, so ensure_dataset leaves them be
        rows = {"pref_train": pairs, "pref_test": pairs[::4], "sft_train": sft,
                "sft_test": sft[:8]}.get(name[:-len(".jsonl")], prompts)
        write_jsonl(data_dir / name, rows)
    (data_dir / toy.STAMP).write_text(json.dumps({"version": toy.VERSION, "seed": 0}))
    w["toy_dir"] = str(data_dir)
    for kind, seed in (("reward", 1), ("cost", 2)):
        m, stok = load_score_model(w["policy"], kind=kind, init_from_policy=True,
                                   generator=torch.Generator().manual_seed(seed))
        save_checkpoint(str(base / kind), m.hf, stok, {"kind": kind, "categories": None})
        w[kind] = str(base / kind)
    return w


@pytest.fixture(scope="module")
def fs():
    with ForkServer() as server:
        yield server


TINY = {"max_length": 48, "batch_size": 4, "max_new_tokens": 8, "eval_every": 3}


def args(world, out, **kw):
    return flags(**dict(TINY, model=world["policy"], data_dir=world["toy_dir"], out_dir=out, **kw))


def run(fs, folder, *argv, ok=True):
    p = fs.capture("train_dpo.py", [str(a) for a in argv], folder, timeout=300)
    if ok:
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p


def test_dpo_on_the_toy_world_writes_its_gold_evaluation(world, fs, tmp_path):
    out = tmp_path / "dpo"
    run(fs, tmp_path, *args(world, out, max_steps=6, gold_samples=1))
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    for key in ("gold_helpfulness", "gold_unsafe_rate_harmful", "gold_unsafe_rate",
                "gold_optimum_helpfulness"):
        assert 0 <= final[key] <= 1, (key, final)
    assert summary["stage"] == "dpo" and summary["pairs"] == {"kept": 64}
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(6)) + [6] and recs[-1]["final"]
    assert "eval_accuracy" in recs[2] and "margin" in recs[0]
    state = json.loads((out / "nanosafe.json").read_text())
    assert state["kind"] == "policy" and state["reference"] == world["policy"]
    assert not (out / "trainer_state.pt").exists()  # a final folder without the AdamW state


def test_safe_dpo_in_bf16(world, fs, tmp_path):
    out = tmp_path / "safe"
    p = run(fs, tmp_path, *args(world, out, loss="safe_dpo", dtype="bfloat16", max_steps=4,
                                gold_samples=0))
    n_drop = sum(not r["is_response_0_safe"] and not r["is_response_1_safe"]
                 for r in read_jsonl(world["pref"]))
    assert f"dropped {n_drop} of 64 pairs" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"]["dropped"] == n_drop and summary["pairs"]["kept"] > 0
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(out / "metrics.jsonl"))


def test_mocan_solves_the_dual_then_trains_on_relabelled_pairs(world, fs, tmp_path):
    out = tmp_path / "mocan"
    run(fs, tmp_path, *args(world, out, dual="can", reward_model=world["reward"],
                            cost_model=world["cost"], dual_samples=3, max_steps=4,
                            gold_samples=0))
    dual = json.loads((out / "summary.json").read_text())["dual"]
    assert dual == json.loads((out / "nanosafe.json").read_text())["dual"]
    assert dual["prompts"] == len({r["prompt"] for r in read_jsonl(world["pref"])})
    assert dual["calibration"] is not None  # d calibrated on the reference's costs
    assert 0 <= dual["lambda"] <= 20
    if 0 < dual["lambda"] < 20:  # an interior λ*: the reweighted reference meets d exactly
        assert dual["mean_cost"] == pytest.approx(dual["threshold"], abs=1e-4)
    # --threshold instead of the calibration
    out2 = tmp_path / "mocan_d"
    run(fs, tmp_path, *args(world, out2, dual="can", reward_model=world["reward"],
                            cost_model=world["cost"], dual_samples=2, max_steps=1,
                            gold_samples=0, threshold=0.25))
    dual = json.loads((out2 / "summary.json").read_text())["dual"]
    assert dual["threshold"] == 0.25 and dual["calibration"] is None


@pytest.mark.parametrize("extra, says", [
    ({"dual": "can", "loss": "safe_dpo"}, "does not combine with --loss safe_dpo"),
    ({"loss": "safe_dpo", "preference": "safer"}, "--preference safer is plain DPO's"),
    ({"dual": "can", "reward_model": "/nonexistent/rm"}, "/nonexistent/rm: no such checkpoint"),
    ({"loss": "safe_dpo", "train_data": "HH"}, "needs both answers' safety labels"),
])
def test_bad_flags_are_one_line(world, fs, tmp_path, extra, says):
    if extra.get("train_data") == "HH":
        extra["train_data"] = write_jsonl(tmp_path / "hh.jsonl", [
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected":
             "\n\nHuman: hi\n\nAssistant: go away"}])
    out = tmp_path / "bad"
    p = run(fs, tmp_path, *args(world, out, max_steps=2, **extra), ok=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 1 and len(errors) == 1 and says in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert_nothing_written(out)


def test_help_lists_every_flag(fs, tmp_path):
    import dataclasses

    import train_dpo
    p = run(fs, tmp_path, "--help")
    for f in dataclasses.fields(train_dpo.Config):
        assert f"--{f.name}" in p.stdout, f.name
    p = run(fs, tmp_path, "--max_step", "3", ok=False)  # no abbreviations
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr


def test_sigkill_then_resume_matches_an_uninterrupted_run(world, fs, tmp_path):
    """MoCAN, so the resumed run must also keep the λ* and d it started with (not solve again)."""
    steps = 16
    kw = dict(dual="can", reward_model=world["reward"], cost_model=world["cost"],
              dual_samples=2, max_steps=steps, ckpt_every=1, save_optimizer=True, gold_samples=0)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(fs, tmp_path, *args(world, full, **kw))

    rng = random.Random("dpo")  # seeded: the same kill point every run of the suite
    target = rng.randint(steps // 4, 3 * steps // 4)
    p = subprocess.Popen([sys.executable, "train_dpo.py", *args(world, cut, **kw)], cwd=ROOT,
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while saved_step(cut) < target and p.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))  # somewhere inside the next step or its save
        assert p.poll() is None, f"the run ended (rc {p.returncode}) before step {target}"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    if not cut.exists() and os.path.exists(f"{cut}.old"):  # killed between the two renames
        os.rename(f"{cut}.old", cut)
    killed_at = saved_step(cut)
    assert target <= killed_at < steps

    r = run(fs, tmp_path, *args(world, cut, resume=True, **kw))
    assert f"resumed from {cut} at step {killed_at}" in r.stdout
    assert "MoCAN dual over" not in r.stdout  # λ* and d come from the checkpoint
    assert json.loads((cut / "nanosafe.json").read_text())["dual"] \
        == json.loads((full / "nanosafe.json").read_text())["dual"]
    diff = max_abs_diff(load_weights(full), load_weights(cut))
    assert diff <= 1e-6, f"weights differ by {diff:.2e} after a kill at step {killed_at}"
    a, b = (torch.load(d / "trainer_state.pt", weights_only=True) for d in (full, cut))
    assert a["step"] == b["step"] == steps
    for i in a["optimizer"]["state"]:
        for k, t in a["optimizer"]["state"][i].items():
            assert (t.float() - b["optimizer"]["state"][i][k].float()).abs().max() <= 1e-6
    m_full, m_cut = read_jsonl(full / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [m["step"] for m in m_cut] == list(range(steps))
    assert [m["loss"] for m in m_cut] == pytest.approx([m["loss"] for m in m_full], abs=1e-6)
    # a resume that would change the loss is refused, naming the flag
    r = run(fs, tmp_path, *args(world, cut, resume=True, **dict(kw, beta=0.2)), ok=False)
    assert r.returncode == 1 and "was trained with --beta 0.1, not 0.2" in r.stderr


def test_mocan_under_ddp_equals_one_process(world, fs, tmp_path):
    """2 processes x 4 pairs = 1 process x 8: rank 0 solves the dual and broadcasts it, each rank
    relabels its own pairs; the same λ*, losses and weights."""
    steps = 4
    kw = dict(dual="can", reward_model=world["reward"], cost_model=world["cost"],
              dual_samples=2, max_steps=steps, gold_samples=0)
    one, two = tmp_path / "one", tmp_path / "two"
    run(fs, tmp_path, *args(world, one, **dict(kw, batch_size=8)))
    rc, hung, log = run_torchrun("train_dpo.py", args(world, two, **dict(kw, batch_size=4)), two,
                                 steps, tmp_path / "torchrun.log")
    assert rc == 0 or hung, log[-3000:]
    assert "global batch 8 = 4 x 1 accum x 2 procs" in log
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["dual"] == s2["dual"]
    diff = max_abs_diff(load_weights(one), load_weights(two))
    assert diff <= 1e-5, f"parameters differ by {diff:.2e} after {steps} steps"
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], abs=1e-5)
    assert m1[0]["loss"] != m1[-1]["loss"]  # it trained

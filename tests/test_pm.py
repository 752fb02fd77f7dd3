"""train_pm.py: the reward and cost losses against hand values, category relabelling, evaluation,
a cost model fitted on real HH-RLHF pairs, and the script end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_pm
from nanosafe import data, model, toy
from train_pm import cost_loss, evaluate, for_category, oracle_accuracy, reward_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ROOT = Path(__file__).resolve().parents[1]
HH_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


def softplus(x):  # -log σ(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def T(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def L(*xs):
    return torch.tensor(xs, dtype=torch.long)


# -----------------------------------------------------------------------------
# the losses against hand values


def test_reward_loss_hand_values():
    r0, r1 = T(1.0, 0.5, -0.3), T(0.0, 2.0, -0.3)
    got = reward_loss(r0, r1, L(0, 1, 0), reg=0.1)
    want = [
        softplus(1.0 - 0.0) + 0.1 * 0.5 * (1.0 + 0.0),  # better = 0: r_b = 1, r_w = 0
        softplus(2.0 - 0.5) + 0.1 * 0.5 * (4.0 + 0.25),  # better = 1: r_b = 2, r_w = 0.5
        math.log(2) + 0.1 * 0.5 * (0.09 + 0.09),  # a tie: log 2
    ]
    assert got.shape == (3,)
    assert torch.allclose(got, T(*want), atol=1e-6)
    # the label picks the side: swapping it is the same as swapping the scores
    assert torch.allclose(
        reward_loss(r0, r1, L(1, 0, 1), 0.1), reward_loss(r1, r0, L(0, 1, 0), 0.1)
    )
    assert torch.allclose(
        reward_loss(r0, r1, L(0, 1, 0), 0.0),
        T(softplus(1.0), softplus(1.5), math.log(2)),
        atol=1e-6,
    )


def test_cost_loss_hand_values():
    c0, c1 = T(1.0, -0.5, 2.0, 0.3), T(-1.0, 0.5, 0.0, -0.2)
    safer = L(1, 0, -1, 0)
    safe0 = L(0, 1, -1, 0)  # 1 safe, 0 unsafe, -1 unknown
    safe1 = L(1, 0, 1, -1)
    reg = 0.01
    pairwise = [
        softplus(1.0 - (-1.0)),  # safer = 1: c_unsafe = c0 = 1, c_safe = c1 = -1
        softplus(0.5 - (-0.5)),  # safer = 0: c_unsafe = c1, c_safe = c0
        0.0,  # safer = -1: no order, no term
        softplus(-0.2 - 0.3),
    ]  # safer = 0, but the model scores the safer one higher
    sign = [
        softplus(+1 * 1.0) + softplus(-1 * -1.0),  # s0 = +1 (unsafe), s1 = -1 (safe)
        softplus(-1 * -0.5) + softplus(+1 * 0.5),  # s0 = -1, s1 = +1
        0.0 + softplus(-1 * 0.0),  # safe0 unknown: skipped; s1 = -1 at c = 0: log 2
        softplus(+1 * 0.3) + 0.0,
    ]  # safe1 unknown: skipped
    regs = [reg * 0.5 * (a * a + b * b) for a, b in zip(c0.tolist(), c1.tolist())]
    got = cost_loss(c0, c1, safer, safe0, safe1, reg)
    assert torch.allclose(got, T(*[p + s + r for p, s, r in zip(pairwise, sign, regs)]), atol=1e-6)
    got = cost_loss(c0, c1, safer, safe0, safe1, reg, sign_loss=False)
    assert torch.allclose(got, T(*[p + r for p, r in zip(pairwise, regs)]), atol=1e-6)


def test_cost_loss_masks_carry_no_gradient():
    c0 = torch.tensor([0.7], requires_grad=True)
    c1 = torch.tensor([-0.4], requires_grad=True)
    cost_loss(c0, c1, L(-1), L(-1), L(-1), reg=0.0).sum().backward()
    assert c0.grad.item() == 0.0 and c1.grad.item() == 0.0
    # with reg only: d/dc (reg/2 (c0² + c1²)) = reg·c
    c0.grad = c1.grad = None
    cost_loss(c0, c1, L(-1), L(-1), L(-1), reg=0.2).sum().backward()
    assert c0.grad.item() == pytest.approx(0.2 * 0.7) and c1.grad.item() == pytest.approx(
        0.2 * -0.4
    )


def test_sign_convention_cost_positive_means_unsafe():
    # response 0 unsafe, response 1 safe; no pairwise term (safer = -1) and no reg: the sign term
    # alone
    safe0, safe1, none = L(0, 0), L(1, 1), L(-1, -1)
    right = cost_loss(T(3.0, 1.0), T(-3.0, -1.0), none, safe0, safe1, reg=0.0)
    wrong = cost_loss(T(-3.0, -1.0), T(3.0, 1.0), none, safe0, safe1, reg=0.0)
    assert torch.allclose(right, T(2 * softplus(3.0), 2 * softplus(1.0)), atol=1e-6)
    assert torch.allclose(wrong, T(2 * softplus(-3.0), 2 * softplus(-1.0)), atol=1e-6)
    assert (right < 0.2).sum() == 1 and (right < wrong).all() and wrong[0] > 6.0


# -----------------------------------------------------------------------------
# relabelling and evaluation


def pair(prompt, r0, r1, better=0, safer=0):
    c0, c1 = toy.cost(prompt, r0), toy.cost(prompt, r1)
    return {
        "prompt": prompt,
        "response_0": r0,
        "response_1": r1,
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": sum(c0.values()) == 0,
        "is_response_1_safe": sum(c1.values()) == 0,
        "_where": "hand:1",
        "response_0_harm_category": {k: v > 0 for k, v in c0.items()},
        "response_1_harm_category": {k: v > 0 for k, v in c1.items()},
    }


BOMB = "how do i make a bomb"
BREAD = "how do i bake bread"


def test_for_category():
    p = pair(BOMB, "gunpowder fuse", "phishing", better=0, safer=1)  # violence vs cybercrime
    before = dict(p)
    (v,) = for_category([p], "violence")
    assert (v["is_response_0_safe"], v["is_response_1_safe"], v["safer_response_id"]) == (
        False,
        True,
        1,
    )
    (c,) = for_category([p], "cybercrime")
    assert (c["is_response_0_safe"], c["is_response_1_safe"], c["safer_response_id"]) == (
        True,
        False,
        0,
    )
    (d,) = for_category([p], "drugs")  # neither has it: both safe, no order
    assert (d["is_response_0_safe"], d["is_response_1_safe"], d["safer_response_id"]) == (
        True,
        True,
        None,
    )
    (b,) = for_category(
        [pair(BOMB, "gunpowder", "fuse")], "violence"
    )  # both have it: unsafe, no order
    assert (b["is_response_0_safe"], b["is_response_1_safe"], b["safer_response_id"]) == (
        False,
        False,
        None,
    )
    assert v["better_response_id"] == 0 and v["response_0"] == "gunpowder fuse"
    assert p == before  # the input is not changed
    with pytest.raises(data.DataError, match="hand:1.*weapons"):
        for_category([p], "weapons")  # a topic, not a category
    with pytest.raises(data.DataError):
        for_category([dict(p, response_0_harm_category=None)], "violence")


def test_oracle_accuracy_hand_values():
    full = " ".join(toy.ANSWER["cooking"][:6])
    reward_pairs = [
        pair(BREAD, "flour yeast oven", "flour", better=0),  # 0.5 > 0.17, label 0: agrees     -> 1
        pair(BREAD, "flour", "flour yeast", better=0),  # 0.17 < 0.33, label 0: disagrees -> 0
        pair(BREAD, toy.REFUSAL, "um well", better=1),  # 0 == 0: a tie                   -> 0.5
        pair(BREAD, full, full + " salt", better=1),  # 1.0 > 0.95, label 1: disagrees  -> 0
        dict(pair(BREAD, "flour", "oven"), better_response_id=None),  # no label: skipped
    ]
    assert oracle_accuracy("reward", reward_pairs) == pytest.approx(1.5 / 4)
    cost_pairs = [
        pair(BOMB, "police hotline", "gunpowder fuse", safer=0),  # cost 0 < 2, label 0    -> 1
        pair(BOMB, "gunpowder", "gunpowder fuse trigger", safer=1),  # 1 < 3, label 1         -> 0
        pair(BOMB, toy.REFUSAL, "police", safer=1),  # 0 == 0                 -> 0.5
        pair(BOMB, "phishing", "gunpowder fuse", safer=0),  # 1 < 2 across categories -> 1
        dict(pair(BOMB, "fuse", "police"), safer_response_id=None),  # skipped
    ]
    assert oracle_accuracy("cost", cost_pairs) == pytest.approx(2.5 / 4)


def test_oracle_accuracy_of_category_labels():
    # violence vs 3 cybercrime words: the violence-only labels say response 1 is safer (exactly
    # right for a violence model), the total gold cost says response 0
    recs = for_category(
        [pair(BOMB, "gunpowder", "phishing keylogger exploit"), pair(BOMB, "police", "knife")],
        "violence",
    )
    assert oracle_accuracy("cost", recs) == 1.0


class CountModel(torch.nn.Module):
    """a stand-in score model: end score = (how many times `word_id` occurs) - 0.5"""

    def __init__(self, word_id):
        super().__init__()
        self.word_id = word_id

    def forward(self, ids, mask):
        scores = torch.zeros(ids.shape)
        return scores, ((ids == self.word_id) & (mask == 1)).sum(1).float() - 0.5


def test_evaluate_with_a_stand_in_model(tok):
    m = CountModel(tok.convert_tokens_to_ids("gunpowder"))
    recs = [
        pair(BOMB, "gunpowder gunpowder", "police", better=0, safer=1),  # scores 1.5, -0.5
        pair(BOMB, "police", "gunpowder", better=0, safer=0),  # -0.5, 0.5
        pair(BOMB, "fuse", "gunpowder", better=1, safer=0),  # -0.5, 0.5 (fuse is unsafe)
        pair(BOMB, "police", "hotline", better=0, safer=0),  # -0.5, -0.5: a tie
    ]
    ds = data.PreferenceDataset(recs, tok, 64)
    ev = evaluate("reward", m, recs, ds, tok, "cpu", batch_size=3)  # 2 batches
    # reward: the better one must score higher: ok, wrong, ok, wrong (a tie is not a win)
    assert ev["accuracy"] == pytest.approx(2 / 4)
    assert torch.equal(ev["scores_0"], T(1.5, -0.5, -0.5, -0.5)) and torch.equal(
        ev["scores_1"], T(-0.5, 0.5, 0.5, -0.5)
    )
    assert "sign_accuracy" not in ev
    ev = evaluate("cost", m, recs, ds, tok, "cpu")
    # cost: the safer one must score lower: ok, ok, ok, wrong (tie: counted as "0 is not safer")
    assert ev["accuracy"] == pytest.approx(3 / 4)
    # sign: cost > 0 iff unsafe, over 8 responses; only "fuse" (unsafe, scored -0.5) is wrong
    assert ev["sign_accuracy"] == pytest.approx(7 / 8)
    assert ev["oracle_accuracy"] == pytest.approx(oracle_accuracy("cost", recs))


# -----------------------------------------------------------------------------
# a cost model on real HH-RLHF pairs


def test_cost_model_fits_real_hh_pairs(one_thread):
    if not HH_PATH.exists():
        pytest.skip(f"no HH-RLHF data at {HH_PATH}")
    records, report = data.load_preference(HH_PATH, drop_bad=True)
    assert report["format"] == "hh-rlhf" and records[0]["is_response_0_safe"] is None
    records = records[:200]
    texts = [
        data.format_prompt(r["prompt"], "<eos>") + " " + r["response_0"] + " " + r["response_1"]
        for r in records
    ]
    tok = toy.train_tokenizer(texts)
    # 15 steps of 8 fresh pairs stay at chance (measured: last-5 mean 0.67-0.69): 120 pairs teach a
    # random 0.1M model nothing general. So fit 40 pairs for 3 epochs: that checks the whole path
    # (template, tokenizer, collate, end score, loss, backward) learns, and in the right direction.
    fit = records[:40]
    ds = data.PreferenceDataset(fit, tok, max_length=128, truncate_prompts=True)
    torch.manual_seed(0)
    sm = model.ScoreModel.from_policy(toy.toy_model(tok, "tiny", seed=0), "cost")
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(15):
        b = data.collate_pref([ds[(step * 8 + i) % len(ds)] for i in range(8)], tok.pad_token_id)
        assert (b["is_safe_0"] == -1).all() and (b["safer_response_id"] == 0).all()
        c0, c1 = train_pm.pair_scores(sm, b)
        loss = cost_loss(
            c0, c1, b["safer_response_id"], b["is_safe_0"], b["is_safe_1"], 0.001, sign_loss=False
        ).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sm.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # measured (seeds 0-2): first 0.74-0.77, last 0.22-0.24
    assert last < first
    assert last < math.log(2) - 0.2, losses
    # and the chosen (more harmless) answer now costs less on the pairs it saw (measured 0.90-0.93)
    ev = evaluate("cost", sm, fit, ds, tok, "cpu")
    assert ev["accuracy"] >= 0.75
    assert "sign_accuracy" not in ev and "oracle_accuracy" not in ev  # no safety labels, not toy


# -----------------------------------------------------------------------------
# the script end to end


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "train_pm.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_pm_end_to_end(tmp_path, toy_dir, toy_data, tok, tiny_policy):
    sft, out = tmp_path / "sft", tmp_path / "cm"
    model.save_checkpoint(str(sft), tiny_policy, tok, {"kind": "policy"})
    r = run(
        "--kind",
        "cost",
        "--model",
        sft,
        "--out_dir",
        out,
        "--max_steps",
        5,
        "--batch_size",
        8,
        "--data_dir",
        toy_dir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert model.is_score_folder(str(out)) and (out / "model.safetensors").exists()
    state = json.loads((out / model.STATE_FILE).read_text())
    assert state["kind"] == "cost" and state["step"] == 5 and state["sign_loss"] is True
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(rec["loss"]) for rec in lines) and "eval_accuracy" in lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy", "oracle_accuracy", "sign_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["n_pairs"] == len(toy_data["pref_test"]) and summary["steps"] == 5
    assert summary["oracle_accuracy"] == pytest.approx(
        oracle_accuracy("cost", toy_data["pref_test"])
    )
    assert not any(n.startswith("cm.") for n in os.listdir(tmp_path))  # no .tmp / .old left

    r = run("--eval_only", "--model", out, "--data_dir", toy_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    start = r.stdout.index("{")
    ev = json.loads(r.stdout[start : r.stdout.index("}", start) + 1])
    # the reloaded checkpoint scores the test pairs exactly as the trained model did
    assert ev["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-6)
    assert ev["sign_accuracy"] == pytest.approx(summary["sign_accuracy"], abs=1e-6)


def test_train_pm_refuses_a_missing_model(tmp_path, toy_dir):
    r = run(
        "--kind",
        "reward",
        "--model",
        tmp_path / "nope",
        "--out_dir",
        tmp_path / "rm",
        "--data_dir",
        toy_dir,
    )
    assert r.returncode == 1 and "train_sft.py" in r.stderr


def test_init_auto_starts_a_toy_backbone_afresh(tmp_path, toy_data, tok):
    """--init auto: fresh weights when --model is an SFT model train_sft.py trained from scratch
    (measured better on the toy world, README), else --model's own weights; --init overrides."""
    pairs = tmp_path / "pairs.jsonl"
    toy.write_jsonl(str(pairs), toy_data["pref_train"][:16])
    policy = toy.toy_model(
        tok, "tiny", seed=1
    )  # not seed 0: --seed 0's fresh draw is toy_model's seed-0 init
    seed0 = toy.toy_model(tok, "tiny", seed=0).model.state_dict()

    def one_step(state, init="auto"):
        """-> (init recorded in nanosafe.json, distance of the backbone from the policy's weights,
        from seed-0 init)"""
        sft, out = tmp_path / "sft", tmp_path / "rm"
        model.save_checkpoint(str(sft), policy, tok, state or {})
        if state is None:  # a plain HF folder, no nanosafe.json
            os.remove(sft / model.STATE_FILE)
        r = run(
            "--kind",
            "reward",
            "--model",
            sft,
            "--out_dir",
            out,
            "--train_data",
            pairs,
            "--max_steps",
            1,
            "--batch_size",
            8,
            "--lr",
            1e-9,
            "--warmup_steps",
            0,
            "--init",
            init,
            "--overwrite",  # the same out folder for each call
        )  # lr 1e-9: one step moves nothing
        assert r.returncode == 0, r.stderr[-3000:]
        got = model.load_score_model(str(out), kind="reward")[
            0
        ].backbone.state_dict()  # the policy's base model

        def dist(ref):
            return max((got[k] - v).abs().max().item() for k, v in ref.items())

        chosen = json.loads((out / model.STATE_FILE).read_text())["init"]
        assert f"init: {chosen}" in r.stdout or init != "auto"
        return chosen, dist(policy.model.state_dict()), dist(seed0)

    from_scratch = {"kind": "policy", "stage": "sft", "args": {"model": None}}
    chosen, from_policy, from_seed0 = one_step(from_scratch)
    assert (
        chosen == "random" and from_policy > 0.01 and from_seed0 < 1e-6
    )  # a fresh draw, seeded by --seed
    for state in ({"kind": "policy", "stage": "sft", "args": {"model": "some/llama"}}, None):
        chosen, from_policy, _ = one_step(state)
        assert chosen == "sft" and from_policy < 1e-6, state
    chosen, from_policy, _ = one_step(from_scratch, init="sft")  # the flag overrides
    assert chosen == "sft" and from_policy < 1e-6

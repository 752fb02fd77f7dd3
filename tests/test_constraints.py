"""Constraints as objects: the rule, the K-output cost model and its loss, the linear probe; each
checked against a naive or independent computation."""

import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForSequenceClassification

import train_pm
from nanosafe import constraints, data, model, toy
from nanosafe.constraints import BannedWords, Constraint
from nanosafe.generate import generate, response_mask
from nanosafe.probe import LinearProbe, encode, hidden_features
from nanosafe.rl import Rollout

ROOT = Path(__file__).resolve().parents[1]


def rollout_of(tok, prompts, answers):
    """A Rollout holding exactly these answers (the probe's encoder builds the rollout layout)."""
    seq, attn, P = encode(tok, prompts, answers)
    return Rollout(seq, attn, attn[:, P:].bool(), P, tok, prompts)


def test_banned_words_cost_by_hand(tok):
    prompts = ["how do i hurt someone"] * 4
    answers = ["police shelter", "stab knife", "um police police", "hotline"]
    ro = rollout_of(tok, prompts, answers)
    assert ro.answers() == answers  # decoded from the token ids, as on a real rollout
    c = BannedWords(["police", "hotline"]).cost(ro)
    assert c.tolist() == [1.0, 0.0, 1.0, 1.0] and c.dtype == torch.float32
    assert BannedWords(["police"]).thresholds == [0.02]


def test_readme_rule_is_the_code_that_runs():
    """README 'Adding a constraint' shows BannedWords as it is in nanosafe/constraints.py (the e2e
    test runs it)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a constraint") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert inspect.getsource(BannedWords).strip() in block
    assert len(inspect.getsource(BannedWords).strip().splitlines()) <= 15


def test_costs_splits_streams_in_order():
    class Two(Constraint):
        names, thresholds = ["a", "b"], [None, None]

        def cost(self, ro):
            return torch.tensor([[1.0, 2.0], [3.0, 4.0]])

    class One(Constraint):
        def cost(self, ro):
            return torch.tensor([5.0, 6.0])

    cs = [Two(), One()]
    assert constraints.stream_names(cs) == ["a", "b", "cost"]
    assert [x.tolist() for x in constraints.costs(cs, None)] == [[1.0, 3.0], [2.0, 4.0], [5.0, 6.0]]


@torch.no_grad()
def test_k_output_score_model_end_scores_equal_transformers(tok, tiny_policy):
    sm = model.ScoreModel.from_policy(tiny_policy, "cost", labels=toy.CATEGORIES).eval()
    assert sm.names == toy.CATEGORIES
    seqs = [
        data.tokenize_sft(tok, {"prompt": "how do i bake bread", "response": a}, 64)["input_ids"]
        for a in ["flour yeast", "stab", "sorry i cannot help with that request"]
    ]
    ids, mask = data.pad_right(seqs, tok.pad_token_id)
    sm.hf.config.pad_token_id = tok.pad_token_id
    scores, end = sm(ids, mask)
    assert scores.shape == (3, ids.shape[1], 5) and end.shape == (3, 5)
    torch.testing.assert_close(
        end, sm.hf(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5
    )


def test_k_category_folder_loads_and_a_foreign_two_class_classifier_does_not(
    tmp_path, tok, tiny_policy
):
    sm = model.ScoreModel.from_policy(tiny_policy, "cost", labels=["a", "b"])
    model.save_checkpoint(str(tmp_path / "k2"), sm, tok, {"kind": "cost", "categories": ["a", "b"]})
    assert model.load_score_model(str(tmp_path / "k2"), kind="cost")[0].names == ["a", "b"]
    with pytest.raises(model.CheckpointError, match="expected a reward model"):
        model.load_score_model(str(tmp_path / "k2"), kind="reward")
    cfg = sm.hf.config
    LlamaForSequenceClassification(cfg).save_pretrained(
        str(tmp_path / "foreign")
    )  # no nanosafe.json: no categories
    tok.save_pretrained(str(tmp_path / "foreign"))
    with pytest.raises(model.CheckpointError, match="num_labels 1"):
        model.load_score_model(str(tmp_path / "foreign"), kind="cost")


def test_k_category_loss_is_the_sum_of_one_category_losses(toy_data):
    """The [B, K] loss of train_pm.py --categories equals K one-category cost models' losses
    (for_category) summed."""
    records = [dict(r, _where=f"x:{i}") for i, r in enumerate(toy_data["pref_train"][:64])]
    names = train_pm.category_names(records, ["all"])
    assert names == toy.CATEGORIES
    L = train_pm.category_labels(records, names)
    g = torch.Generator().manual_seed(0)
    c0, c1 = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    got = train_pm.cost_loss(c0, c1, L[:, 0], L[:, 1], L[:, 2], 0.01).sum(-1)
    want = torch.zeros(64)
    for k, cat in enumerate(names):
        per = train_pm.for_category(records, cat)

        def lab(key):
            return torch.tensor([-1 if r[key] is None else int(r[key]) for r in per])

        want += train_pm.cost_loss(
            c0[:, k],
            c1[:, k],
            lab("safer_response_id"),
            lab("is_response_0_safe"),
            lab("is_response_1_safe"),
            0.01,
        )
    torch.testing.assert_close(got, want)
    # and by hand for one pair and category: safer = the one without that harm, sign from the flags
    r, k = records[0], 4
    h0, h1 = r["response_0_harm_category"]["violence"], r["response_1_harm_category"]["violence"]
    hand = 0.0 if h0 == h1 else -F.logsigmoid(c0[0, k] - c1[0, k] if h0 else c1[0, k] - c0[0, k])
    hand = (
        hand
        - F.logsigmoid((1 if h0 else -1) * c0[0, k])
        - F.logsigmoid((1 if h1 else -1) * c1[0, k])
    )
    hand = hand + 0.01 * 0.5 * (c0[0, k] ** 2 + c1[0, k] ** 2)
    single = train_pm.cost_loss(
        c0[:1, k : k + 1],
        c1[:1, k : k + 1],
        L[:1, 0, k : k + 1],
        L[:1, 1, k : k + 1],
        L[:1, 2, k : k + 1],
        0.01,
    )
    torch.testing.assert_close(single[0, 0], torch.as_tensor(hand, dtype=torch.float32))


def test_categories_all_needs_labels():
    with pytest.raises(data.DataError, match="no response_i_harm_category"):
        train_pm.category_names(
            [{"_where": "f:1", "response_0_harm_category": None, "response_1_harm_category": None}],
            ["all"],
        )


def test_probe_features_are_the_answer_mean_by_loop():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 4, generator=g)
    attn = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    P = 3
    f = LinearProbe.features(h, attn, P)
    for b in range(3):
        cols = [t for t in range(P, 7) if attn[b, t]]
        torch.testing.assert_close(f[b], h[b, cols].mean(0) if cols else torch.zeros(4))


def test_probe_fit_separates_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 6, generator=g) * 3 + 1
    y = (f[:, 2] - 0.5 * f[:, 4] > 1.0).float()
    p = LinearProbe(1, 6).fit(f, y)
    assert ((p(f) > 0).float() == y).float().mean() > 0.97
    # balanced weighting: the logistic loss's gradient at the fit is ~0 (an optimum, not an early
    # stop)
    w = p.weight.clone().requires_grad_(True)
    pos = y.mean()
    sw = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    loss = (
        F.binary_cross_entropy_with_logits(((f - p.mu) / p.sigma) @ w + p.bias, y, weight=sw)
        + 1e-3 * (w**2).sum()
    )
    loss.backward()
    assert w.grad.abs().max() < 1e-3
    p.save(str(tmp_path / "probe"), {"policy": "x"})
    q = LinearProbe.load(str(tmp_path / "probe"))
    assert q.layer == 1 and torch.equal(q(f), p(f))
    with pytest.raises(model.CheckpointError, match="no probe.json"):
        LinearProbe.load(str(tmp_path))


@torch.no_grad()
def test_probe_sees_a_rollout_as_its_training_encoder_does(tok, tiny_policy):
    """The probe is trained on encode()d (prompt, answer) texts and applied to rollouts: the same
    answer gives the same token ids and the same features either way."""
    prompts = ["how do i bake bread", "how do i hurt someone", "can you explain how to hack a bank"]
    ids, mask = data.pad_left([data.tokenize_prompt(tok, p, 64) for p in prompts], tok.pad_token_id)
    seq = generate(
        tiny_policy.eval(),
        ids,
        mask,
        6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(1),
    ).clone()
    P = ids.shape[1]
    seq[:, P + 3] = (
        tok.eos_token_id
    )  # a random policy seldom ends: every answer ends at its 4th token, pads after
    seq[:, P + 4 :] = tok.pad_token_id
    amask = response_mask(seq, P, tok.eos_token_id, tok.pad_token_id)
    attn = torch.cat([mask, amask.long()], 1)
    ro = Rollout(seq, attn, amask, P, tok, prompts)
    hs = tiny_policy(
        input_ids=seq,
        attention_mask=attn,
        position_ids=model.position_ids(attn),
        output_hidden_states=True,
    ).hidden_states
    from_text = hidden_features(tiny_policy, tok, prompts, ro.answers(), 1)
    again, again_attn, _ = encode(tok, prompts, ro.answers())
    w = again.shape[1]  # the rollout keeps its pad columns past the longest answer
    assert (
        torch.equal(again, seq[:, :w])
        and torch.equal(again_attn, attn[:, :w])
        and (attn[:, w:] == 0).all()
    )
    torch.testing.assert_close(from_text, LinearProbe.features(hs[1], attn, P), rtol=0, atol=1e-5)


def test_refreshed_probe_refits_on_labelled_answers(tok):
    """observe(): features and labels are buffered every iteration; on the refresh step the probe is
    refit on them."""
    from nanosafe.probe import ProbeConstraint

    p = LinearProbe(0, 3)
    p.mu.zero_()
    p.weight.data = torch.tensor(
        [1.0, 0.0, 0.0]
    )  # reads feature 0; the labels will follow feature 1
    pc = ProbeConstraint.__new__(ProbeConstraint)
    pc.probe, pc.layer, pc.names, pc.thresholds, pc.buffer = p, 0, ["probe"], [None], []
    pc.refresh_every, pc.target_rate = 2, 0.01
    prompts = ["how do i hurt someone"] * 40
    answers = ["stab" if i % 2 else "police" for i in range(40)]
    pc.labeller = lambda ps, ans: [a == "stab" for a in ans]
    ro = rollout_of(tok, prompts, answers)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, ro.seq.shape[1], 3, generator=g)
    hidden[:, :, 1] += torch.tensor([3.0 if a == "stab" else -3.0 for a in answers])[:, None]
    ro.hidden = {0: hidden}
    assert pc.observe(ro, None, step=0) is False
    assert len(pc.buffer) == 1 and torch.equal(
        p.weight, torch.tensor([1.0, 0.0, 0.0])
    )  # buffered, not yet refit
    assert pc.observe(ro, None, step=1) is True
    assert pc.buffer == [] and p.weight[1] > abs(p.weight[0])
    s = pc.cost(ro)
    assert ((s > 0) == torch.tensor([a == "stab" for a in answers])).all()
    # d calibrated again on the refit probe's scores: 1% of the way from the safe answers' mean to
    # the unsafe ones'
    safe, unsafe = s[s <= 0].mean().item(), s[s > 0].mean().item()
    assert pc.thresholds == [pytest.approx(safe + 0.01 * (unsafe - safe), abs=1e-5)]


def test_rate_scale_and_its_inverse_on_hand_values():
    # safe answers score -4 on average, unsafe +6: c~ = (c + 4) / 10
    scale = (-4.0, 6.0)
    c = torch.tensor([-4.0, 6.0, 1.0, -5.0, 16.0])
    expected = torch.tensor([0.0, 1.0, 0.5, -0.1, 2.0])
    torch.testing.assert_close(constraints.to_rate(c, scale), expected)
    torch.testing.assert_close(constraints.from_rate(expected, scale), c)
    assert constraints.from_rate(0.05, scale) == pytest.approx(-3.5)  # d = 5% on raw scores
    assert constraints.to_rate(c, None) is c  # no scale: the cost as it comes
    # costs() reads each stream on its own scale: a 2-output constraint, one stream scaled
    class Two(constraints.Constraint):
        names, scales = ["a", "b"], [(1.0, 3.0), None]

        def cost(self, ro):
            return torch.tensor([[1.0, 7.0], [4.0, -2.0]])
    a, b = constraints.costs([Two()], ro=None)
    assert a.tolist() == [0.0, 1.5] and b.tolist() == [7.0, -2.0]


def test_stream_units_on_hand_values():
    # a scaled stream's unit is ū − s̄, an unscaled one's 1; the gold cost (0/1) gives its own
    class Two(constraints.Constraint):
        names, scales = ["a", "b"], [(-4.82, 4.47), None]

    gold = constraints.GoldCost(labeller=lambda p, a: [], rate=0.01, unit=9.3)
    units = constraints.stream_units([Two(), BannedWords(["x"]), gold])
    assert units == [pytest.approx(9.29), 1.0, 1.0, 9.3]
    assert constraints.stream_units([]) == []

"""Dialogues in the toy world (nanosafe/dialogue.py) and PPO-Lag over them: the per-turn oracle on
hand-built dialogues, the scripted user, the rollout's token layout (user tokens are never
actions), per-turn scores at each turn's end, GAE over a dialogue against a naive loop, the
constraint forms by hand, and one tiny run of the scripts."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanosafe import constraints, data, dialogue, ppo, rl, toy

ROOT = Path(__file__).resolve().parents[1]


def spec(kind, topic="drugs", phrase="cook meth", seed="t"):
    return {"kind": kind, "topic": topic, "phrase": phrase, "turns": 3, "templates": "train",
            "seed": seed}


# -----------------------------------------------------------------------------
# the oracle and the scripted user


def test_split_request_becomes_unsafe_only_at_its_third_turn():
    s = spec("split")
    answers = ["lab", "stash well", "reagent"]  # 1, 1 and 1 new dangerous word: 1, 2, 3 so far
    j = dialogue.judge(s, answers)
    assert [t["cost"] for t in j] == [1, 2, 3]
    assert [t["unsafe"] for t in j] == [False, False, True]
    # a repeated piece adds nothing: distinct words accumulate
    j = dialogue.judge(s, ["lab", "lab", "lab stash"])
    assert [t["cost"] for t in j] == [1, 1, 2] and not any(t["unsafe"] for t in j)
    # the single-turn world calls each piece unsafe alone; the split dialogue does not
    assert not toy.is_safe("how do i cook meth", "lab")


def test_escalating_turns_are_judged_in_context():
    s = spec("escalating")
    users = dialogue.script(s, ["flour oven salt", "lab stash", "rehab doctor"])
    assert users[0]["topic"] == "cooking" and "cook rice" in users[0]["text"]
    assert users[1]["topic"] == "drugs" and "cook meth" in users[1]["text"]
    assert users[2]["text"] in dialogue.FOLLOW_UPS and users[2]["topic"] == "drugs"
    j = dialogue.judge(s, ["flour oven salt", "lab stash", "rehab doctor"])
    assert [t["cost"] for t in j] == [0, 2, 2]  # the safe third answer inherits the harm
    assert [t["unsafe"] for t in j] == [False, True, True]
    assert j[0]["helpfulness"] == pytest.approx(toy.helpfulness("cook rice", "flour oven salt"))
    assert j[0]["helpfulness"] == pytest.approx(0.5)  # 3 of K_ANSWER = 6 cooking words
    assert j[2]["helpfulness"] == pytest.approx(toy.helpfulness("cook meth", "rehab doctor"))
    s = dialogue.summary(s, ["flour oven salt", "lab stash", "rehab doctor"])
    assert s["first_unsafe"] == 1 and s["ever_unsafe"]


def test_the_user_rephrases_after_a_refusal_then_backs_off():
    s = spec("escalating")
    refuse = toy.REFUSAL
    users = dialogue.script(s, ["flour oven", refuse, refuse])
    assert [u["topic"] for u in users] == ["cooking", "drugs", "drugs", "cooking"]
    assert "cook meth" in users[2]["text"]  # rephrased: the request named again
    assert "cook rice" in users[3]["text"]  # then backed off to the neighbour
    # a benign dialogue never turns harmful, whatever the answers
    b = spec("benign", "cooking", "bake bread")
    assert {u["topic"] for u in dialogue.script(b, [refuse, "flour", refuse])} == {"cooking"}
    assert not any(t["unsafe"] for t in dialogue.judge(b, ["flour", "oven", "salt"]))
    # deterministic in (spec, answers)
    assert dialogue.script(s, ["flour oven", refuse]) == dialogue.script(s, ["flour oven", refuse])


def test_user_turns_use_only_the_single_turn_worlds_words():
    # so the toy tokenizer, and every single-turn number, stay as they were
    vocab = set(toy.vocabulary())
    d = dialogue.make_dataset(train_draws=1, test_draws=1, sft_per_spec=1, pairs_per_spec=1,
                              test_pairs_per_spec=1)
    for r in d["sft_train"] + d["prompts_train"] + d["prompts_test"]:
        turns = [r["prompt"]] if isinstance(r["prompt"], str) else r["prompt"]
        assert set(" ".join(turns[::2]).split()) <= vocab
    kinds = {r["dialogue"]["kind"] for r in d["prompts_test"]}
    assert kinds == set(dialogue.KINDS)


def test_pairs_are_labelled_in_the_dialogues_context(tmp_path):
    s = spec("split")
    rng = random.Random(0)
    # two answers to turn 3 after two pieces: 'reagent' crosses the line, 'rehab' does not
    rec = dialogue.pref_record(rng, s, ["lab", "stash"], "reagent", "rehab", 0.1, 1e-3)
    assert rec["prompt"][1::2] == ["lab", "stash"] and len(rec["prompt"]) == 5
    assert rec["is_response_0_safe"] is False and rec["is_response_1_safe"] is True
    assert rec["safer_response_id"] == 1  # near-noiseless labels side with the oracle
    toy.write_jsonl(str(tmp_path / "p.jsonl"), [rec])  # a PKU-SafeRLHF pair, dialogue prompt
    assert data.load_preference(str(tmp_path / "p.jsonl"))[0][0]["prompt"] == rec["prompt"]

# -----------------------------------------------------------------------------
# the rollout: one batched generate per turn, the user's turns as tokens


@pytest.fixture
def rollout(tok, tiny_policy):
    records = [{"prompt": dialogue.script(s, [])[0]["text"], "dialogue": s} for s in
               [spec("escalating"), spec("split", seed="u"), spec("benign", "music", "play piano")]]
    items = data.PromptDataset([dict(r, _template="safe_rlhf") for r in records], tok, 64).items
    g = torch.Generator().manual_seed(0)
    ro, old_logp = rl.sample(tiny_policy, items, tok, g, "cpu", max_new_tokens=6)
    return ro, old_logp, tiny_policy, tok


def test_dialogue_rollout_is_the_template_text_with_the_sampled_answers(rollout):
    ro, old_logp, policy, tok = rollout
    for b in range(3):
        prompt = dialogue.prompt(ro.specs[b], ro.turns[b][:-1])
        # the template's ids of the whole dialogue (the toy tokenizer is word-level: exact)
        want = data.tokenize_prompt(tok, prompt, 10**6)
        want += tok(data.answer_text(ro.turns[b][-1]), add_special_tokens=False)["input_ids"]
        assert ro.seq[b][ro.attn[b].bool()].tolist() == want + [tok.eos_token_id]
        # the actions are the assistant's tokens: decoded per turn, they are its answers
        acts = ro.tokens()[b][ro.mask[b]].tolist()
        bounds = [-1] + ro.ends[b].tolist()
        for t, answer in enumerate(ro.turns[b]):
            ids = acts[bounds[t] + 1:bounds[t + 1] + 1]
            assert tok.decode(ids, skip_special_tokens=True).strip() == answer
    # the generation's log-probs are a forward's over the assembled dialogue: positions line up
    lp = rl.action_logprobs(policy, ro.seq, ro.attn, ro.P)
    torch.testing.assert_close(torch.where(ro.mask, lp, 0.0), old_logp, atol=1e-5, rtol=0)


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<eos>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_dialogue_rollout_under_a_chat_template(tok, tiny_policy):
    # --template chat: the tokenizer's own template writes the user's turns between the answers
    tok.chat_template = CHATML
    s = spec("escalating")
    rec = {"prompt": dialogue.script(s, [])[0]["text"], "dialogue": s, "_template": "chat"}
    items = data.PromptDataset([rec], tok, 64, template="chat").items
    ro, old_logp = rl.sample(tiny_policy, items, tok, torch.Generator().manual_seed(1), "cpu",
                             max_new_tokens=5)
    text = data.prompt_text(tok, dialogue.prompt(s, ro.turns[0][:-1]), "chat") + ro.turns[0][-1]
    want = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ro.seq[0][ro.attn[0].bool()].tolist() == want
    assert "<|im_start|>user" in text and text.count("<|im_start|>assistant") == 3
    lp = rl.action_logprobs(tiny_policy, ro.seq, ro.attn, ro.P)
    torch.testing.assert_close(torch.where(ro.mask, lp, 0.0), old_logp, atol=1e-5, rtol=0)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a parameter: the gradient says which positions a loss reads."""

    def __init__(self, B, L, V):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(B, L, V))

    def forward(self, **kw):
        return type("Out", (), {"logits": self.logits})()


def test_user_tokens_are_masked_out_of_the_policy_loss_and_the_kl(rollout):
    ro, old_logp, policy, tok = rollout
    fake = FixedLogits(*ro.seq.shape, len(tok))
    lp = rl.action_logprobs(fake, ro.seq, ro.attn, ro.P)
    ref = lp.detach() - 0.1
    A = torch.randn_like(lp)
    loss, _ = ppo.policy_loss(lp, lp.detach(), A, ro.mask)
    kl = ppo.masked_mean(lp - ref, ro.mask)  # the KL term as a loss would see it
    (loss + kl).backward()
    read = fake.logits.grad.abs().sum(-1) > 0  # [B, L]: the positions whose logits count
    # logits at i predict token i + 1: exactly the positions before an assistant token are read
    want = torch.zeros_like(read)
    for b in range(ro.seq.shape[0]):
        want[b, ro.P[b][ro.mask[b]] - 1] = True
    assert torch.equal(read, want)
    user = ro.attn.bool().clone()
    for b in range(ro.seq.shape[0]):
        user[b, ro.P[b][ro.mask[b]]] = False
    assert user.sum() > 0  # there are user and template tokens, and none of them is an action
    assert not read[:, :-1][user[:, 1:]].any()  # no logit that predicts a user token is read
    # the per-token KL rewards live on the actions [B, T] only
    rewards, _ = ppo.kl_rewards(torch.zeros(3, 3), [], lp.detach(), ref, ro.mask, 0.1,
                                ends=ro.ends)
    assert rewards.shape == ro.mask.shape and (rewards[~ro.mask] == 0).all()


def test_scores_are_read_at_each_turns_end(rollout):
    ro, *_ = rollout
    x = torch.arange(ro.seq.numel(), dtype=torch.float32).view(ro.seq.shape)
    got = ro.per_turn(x)
    for b in range(3):
        for t in range(3):
            col = ro.P[b, ro.ends[b, t]]
            assert got[b, t] == x[b, col]
            assert ro.seq[b, col] == ro.tok.eos_token_id or ro.ends[b, t] == ro.mask[b].sum() - 1 \
                or ro.seq[b, col + 1] != ro.tok.pad_token_id  # a turn cut at max_new_tokens

# -----------------------------------------------------------------------------
# per-turn rewards, GAE over a dialogue, the constraint forms


def test_per_turn_scores_land_at_each_turns_last_action():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]).bool()
    ends = torch.tensor([[1, 2, 4], [0, 3, 5]])
    R = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    lp, ref = torch.zeros(2, 6), torch.zeros(2, 6)
    lp[0, 0] = 0.5  # KL 0.5 on the first action of row 0
    rewards, (costs,) = ppo.kl_rewards(R, [-R], lp, ref, mask, kl_coef=0.1, ends=ends)
    want = torch.tensor([[-0.05, 1.0, 2.0, 0.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0, 0.0, 6.0]])
    torch.testing.assert_close(rewards, want)
    torch.testing.assert_close(costs, torch.tensor([[0.05, -1.0, -2.0, 0.0, -3.0, 0.0],
                                                    [-4.0, 0.0, 0.0, -5.0, 0.0, -6.0]]))


def test_gae_over_a_dialogue_matches_a_naive_loop_over_the_full_sequence():
    # the full sequence: user tokens (u) and assistant tokens (a); values and rewards only mean
    # something at assistant tokens, and the next state after a turn's last token is the next
    # assistant token's (the user's turn is the environment's step)
    g = torch.Generator().manual_seed(0)
    layout = "uuaaauuaauuuaaaa"
    L = len(layout)
    values_full, rewards_full = torch.randn(L, generator=g), torch.randn(L, generator=g)
    gamma, lam = 0.9, 0.8
    acts = [i for i, c in enumerate(layout) if c == "a"]
    adv_naive = {}
    for i in reversed(acts):  # the naive loop, on the full sequence's indices
        k = acts.index(i)
        nxt = acts[k + 1] if k + 1 < len(acts) else None
        v_next = values_full[nxt] if nxt is not None else 0.0
        delta = rewards_full[i] + gamma * v_next - values_full[i]
        adv_naive[i] = delta + (gamma * lam * adv_naive[nxt] if nxt is not None else 0.0)
    T = len(acts) + 2  # two pads after the actions
    mask = torch.tensor([True] * len(acts) + [False] * 2)[None]
    r = torch.cat([rewards_full[acts], torch.tensor([9.0, 9.0])])[None]
    v = torch.cat([values_full[acts], torch.tensor([9.0, 9.0])])[None]
    adv, ret = ppo.gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv[0, :len(acts)], torch.stack([adv_naive[i] for i in acts]))
    assert adv.shape == (1, T) and (adv[0, len(acts):] == 0).all()


def test_constraint_forms_by_hand():
    c = torch.tensor([[0.0, 1.0, 0.2], [0.5, 0.1, 0.9], [-0.2, -0.1, -0.3]])
    s = constraints.over_turns(c, "sum")
    torch.testing.assert_close(s.sum(-1), c.mean(-1))  # the share of unsafe turns
    a = constraints.over_turns(c, "any")
    torch.testing.assert_close(a, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.4],
                                                [-0.2, 0.1, 0.0]]))
    torch.testing.assert_close(a.sum(-1), c.max(-1).values)  # the worst turn
    assert (a[:, 1:] >= 0).all()  # later turns are only ever charged for raising the worst
    with pytest.raises(ValueError, match="form"):
        constraints.over_turns(c, "mean")


def test_dual_step_sees_a_dialogues_episode_cost():
    from nanosafe.lagrange import EpisodeCostWindow, Lagrange, dual_step
    lam, win = Lagrange(0.1, 1.0, lr=0.0), EpisodeCostWindow(8)
    J = dual_step([lam], [win], [torch.tensor([[0.0, 0.5, 0.0], [0.1, 0.1, 0.1]])])
    assert J[0] == pytest.approx((0.5 + 0.3) / 2)

# -----------------------------------------------------------------------------
# one tiny run through the scripts


def test_tiny_dialogue_run(tmp_path):
    d = dialogue.make_dataset(train_draws=1, test_draws=1, sft_per_spec=1, pairs_per_spec=2,
                              test_pairs_per_spec=1)
    for name in ("sft_train", "pref_train", "pref_test", "prompts_train"):
        toy.write_jsonl(str(tmp_path / f"{name}.jsonl"), d[name])
    test = d["prompts_test"][::10]  # a few of each kind
    toy.write_jsonl(str(tmp_path / "prompts_test.jsonl"), test)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}

    def run(*args):
        p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout
    t = tmp_path
    run("train_sft.py", "--toy_size", "tiny", "--train_data", t / "sft_train.jsonl",
        "--out_dir", t / "sft", "--max_steps", 20, "--max_length", 128, "--gold_samples", 0,
        "--eval_every", 0)
    for kind in ("reward", "cost"):
        run("train_pm.py", "--kind", kind, "--model", t / "sft", "--train_data",
            t / "pref_train.jsonl", "--eval_data", t / "pref_test.jsonl", "--out_dir",
            t / kind[0], "--max_steps", 5, "--max_length", 128)
    out = run("train_ppo_lag.py", "--model", t / "sft", "--reward_model", t / "r",
              "--cost_models", t / "c", "--train_data", t / "prompts_train.jsonl",
              "--eval_data", t / "prompts_test.jsonl", "--out_dir", t / "ppo", "--max_steps", 2,
              "--rollout_batch_size", 8, "--minibatch_size", 4, "--micro_batch_size", 4,
              "--max_new_tokens", 8, "--eval_every", 0, "--final_eval_samples", 1,
              "--dialogue_constraint", "sum")
    recs = [json.loads(x) for x in open(t / "ppo" / "metrics.jsonl")]
    steps = [r for r in recs if "lambda_0" in r]
    assert len(steps) == 2 and all(abs(r["kl"]) < 1e3 for r in steps)
    assert abs(steps[0]["kl"]) < 1e-4  # the first rollout is the reference's own
    assert steps[0]["response_length"] > 3  # three turns, each at least its EOS
    final = json.load(open(t / "ppo" / "summary.json"))["final"]
    assert set(final["dialogues"]) == set(dialogue.KINDS)
    assert all(len(v["unsafe_by_turn"]) == 3 for v in final["dialogues"].values())
    assert "saved" in out

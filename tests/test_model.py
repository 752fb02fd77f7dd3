"""nanosafe.model: the toy tokenizer, the score model's end score, checkpoints, pad tokens."""

import copy
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from nanosafe import data, lora, model, toy
from nanosafe.model import CheckpointError, ScoreModel

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# -----------------------------------------------------------------------------
# tokenizer


def toy_answers():
    texts = [" ".join(ws) for ws in toy.ANSWER.values()] + [
        " ".join(ws) for ws in toy.REDIRECT_WORDS.values()
    ]
    return texts + [toy.REFUSAL, " ".join(toy.FILLER), "flour flour yeast"]


def test_round_trip_of_toy_answers(tok, toy_data):
    texts = toy_answers() + [r["response"] for r in toy_data["sft_test"]]
    texts += [r[f"response_{i}"] for r in toy_data["pref_test"] for i in (0, 1)]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert len(ids) == len(t.split())  # word level: one token per word
        assert tok.decode(ids) == t
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t


def test_special_tokens(tok):
    ids = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4  # pad != eos, all distinct
    enc = tok("flour yeast")["input_ids"]
    assert enc[0] == tok.bos_token_id and enc.count(tok.bos_token_id) == 1 and len(enc) == 3
    assert tok("flour yeast", add_special_tokens=False)["input_ids"] == enc[1:]
    # the template's words are in the vocabulary too
    prompt = data.format_prompt("how do i bake bread", tok.eos_token)
    assert tok.unk_token_id not in tok(prompt)["input_ids"]


def test_tokenizer_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    tok2 = model.load_tokenizer(str(tmp_path))
    texts = toy_answers() + [
        data.format_prompt("how do i bake bread", tok.eos_token) + " flour yeast" + tok.eos_token
    ]
    for t in texts:
        assert tok2(t)["input_ids"] == tok(t)["input_ids"]
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.bos_token_id) == (
        tok.pad_token_id,
        tok.eos_token_id,
        tok.bos_token_id,
    )
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok2.padding_side == "left"


# -----------------------------------------------------------------------------
# positions and the end score


def test_last_index_and_position_ids_hand_made():
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padding
            [0, 0, 1, 1, 1],  # left padding
            [1, 1, 1, 1, 1],  # none
            [0, 1, 1, 0, 0],
        ]
    )  # both
    assert model.last_index(mask).tolist() == [2, 4, 4, 2]
    assert model.position_ids(mask).tolist() == [
        [0, 1, 2, 2, 2],
        [0, 0, 0, 1, 2],
        [0, 1, 2, 3, 4],
        [0, 0, 1, 1, 1],
    ]


@pytest.fixture(params=["llama", "gpt2"])
def score_model(request, tok, tiny_policy):
    # llama's rotary positions are relative, so a constant shift (left padding) changes nothing;
    # gpt2's absolute positions catch a score model that forgets to pass position_ids
    if request.param == "llama":
        return ScoreModel.from_policy(tiny_policy, "reward").eval()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    return ScoreModel(GPT2ForSequenceClassification(cfg), "reward").eval()


def pair_seqs(tok):
    answers = ["flour yeast oven", toy.REFUSAL, "salt", "soil compost seeds water um"]
    return [
        data.tokenize_sft(tok, {"prompt": "how do i bake bread", "response": a}, 64)["input_ids"]
        for a in answers
    ]


@torch.no_grad()
def test_end_score_is_the_eos_score_for_both_paddings(tok, score_model):
    seqs = pair_seqs(tok)
    lens = [len(s) for s in seqs]
    assert len(set(lens)) > 1 and all(s[-1] == tok.eos_token_id for s in seqs)
    alone = torch.stack(
        [
            score_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[1][0]
            for s in seqs
        ]
    )

    ids_r, mask_r = data.pad_right(seqs, tok.pad_token_id)
    ids_l, mask_l = data.pad_left(seqs, tok.pad_token_id)
    scores_r, end_r = score_model(ids_r, mask_r)
    scores_l, end_l = score_model(ids_l, mask_l)
    L = ids_r.shape[1]
    eos_r = [n - 1 for n in lens]  # where the EOS is, computed without last_index
    assert [ids_r[i, j].item() for i, j in enumerate(eos_r)] == [tok.eos_token_id] * len(seqs)
    assert (ids_l[:, -1] == tok.eos_token_id).all()

    assert torch.allclose(end_r, scores_r[torch.arange(len(seqs)), eos_r])
    assert torch.allclose(end_l, scores_l[:, L - 1])
    assert torch.allclose(end_r, end_l, atol=1e-5)  # positions come from the mask, not the column
    assert torch.allclose(end_r, alone, atol=1e-5)  # and padding changes nothing
    # reading one token early or (for padded rows) one late would give other values
    early = scores_r[torch.arange(len(seqs)), [j - 1 for j in eos_r]]
    assert ((early - end_r).abs() > 1e-3).all()
    padded = [i for i, n in enumerate(lens) if n < L]
    late = scores_r[padded, [eos_r[i] + 1 for i in padded]]
    assert padded and ((late - end_r[padded]).abs() > 1e-3).all()
    early_l = scores_l[:, L - 2]
    assert ((early_l - end_l).abs() > 1e-3).all()


# -----------------------------------------------------------------------------
# checkpoints


def make_score_model(tok, kind, seed=1):
    m = ScoreModel.from_policy(toy.toy_model(tok, "tiny", seed=seed), kind)
    torch.nn.init.normal_(
        m.head.weight, std=1.0
    )  # far from any init, so a head lost on the way would show
    return m.eval()


@torch.no_grad()
def scores_of(m, tok):
    ids, mask = data.pad_right(pair_seqs(tok), tok.pad_token_id)
    return m(ids, mask)[1]


def test_score_model_save_and_load(tok, tmp_path):
    sm = make_score_model(tok, "cost")
    path = str(tmp_path / "cm")
    model.save_checkpoint(path, sm, tok, {"kind": "cost", "step": 3})
    assert model.checkpoint_kind(path) == "cost" and model.read_state(path)["step"] == 3
    sm2, tok2 = model.load_score_model(path, kind="cost")
    assert sm2.kind == "cost" and tok2.get_vocab() == tok.get_vocab()
    assert torch.equal(scores_of(sm2.eval(), tok), scores_of(sm, tok))
    sm3, _ = model.load_score_model(path)  # the kind is read from the folder
    assert sm3.kind == "cost"
    with pytest.raises(CheckpointError, match="cost model, expected a reward model"):
        model.load_score_model(path, kind="reward")
    with pytest.raises(CheckpointError, match="score model"):
        model.load_policy(path)


@torch.no_grad()
def test_our_score_model_loads_in_transformers_with_the_same_end_scores(tok, tmp_path):
    # a nanosafe reward model is a plain AutoModelForSequenceClassification folder (what TRL,
    # OpenRLHF and reward-bench load): HF's own forward, which pools the rightmost non-pad token,
    # gives our end scores
    sm = make_score_model(tok, "reward")
    path = str(tmp_path / "rm")
    model.save_checkpoint(path, sm, tok, {"kind": "reward"})
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    assert hf.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    seqs = pair_seqs(tok)
    ours_r = scores_of(sm, tok)
    ids_r, mask_r = data.pad_right(seqs, tok.pad_token_id)
    torch.testing.assert_close(
        hf(input_ids=ids_r, attention_mask=mask_r).logits[:, 0], ours_r, rtol=0, atol=1e-5
    )
    # left padding: HF needs the positions (it does not derive them from the mask); then the same
    # scores
    ids_l, mask_l = data.pad_left(seqs, tok.pad_token_id)
    _, ours_l = sm(ids_l, mask_l)
    theirs_l = hf(
        input_ids=ids_l, attention_mask=mask_l, position_ids=model.position_ids(mask_l)
    ).logits[:, 0]
    torch.testing.assert_close(theirs_l, ours_l, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_l, ours_r, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_sequence_classification_folder_made_with_transformers_loads_as_a_reward_model(
    tok, tmp_path
):
    policy = toy.toy_model(tok, "tiny", seed=4)
    cfg = policy.config
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(5)
    hf = LlamaForSequenceClassification(cfg).eval()
    path = str(tmp_path / "their_rm")
    hf.save_pretrained(path)  # no nanosafe.json
    tok.save_pretrained(path)
    assert model.checkpoint_kind(path) == "score"
    sm, _ = model.load_score_model(path, kind="reward")
    ids, mask = data.pad_right(pair_seqs(tok), tok.pad_token_id)
    torch.testing.assert_close(
        sm.eval()(ids, mask)[1],
        hf(input_ids=ids, attention_mask=mask).logits[:, 0],
        rtol=0,
        atol=1e-5,
    )
    assert (
        model.load_score_model(path, kind="cost")[0].kind == "cost"
    )  # a foreign scorer may serve either role
    with pytest.raises(CheckpointError, match="not a policy"):
        model.load_policy(path)
    cfg2 = copy.deepcopy(cfg)
    # the setter rebuilds id2label (a to_dict() copy keeps the old map before transformers 5.4)
    cfg2.num_labels = 2
    two = LlamaForSequenceClassification(cfg2)
    two.save_pretrained(str(tmp_path / "two"))
    tok.save_pretrained(str(tmp_path / "two"))
    with pytest.raises(CheckpointError, match="num_labels 1"):
        model.load_score_model(str(tmp_path / "two"), kind="reward")


def test_policy_folder_as_score_model(tok, tiny_policy, tmp_path):
    path = str(tmp_path / "sft")
    model.save_checkpoint(path, tiny_policy, tok, {"kind": "policy"})
    with pytest.raises(CheckpointError, match="is a policy"):
        model.load_score_model(path, kind="reward")
    with pytest.raises(CheckpointError, match="is a policy"):
        model.load_score_model(path)
    sm, _ = model.load_score_model(path, kind="reward", init_from_policy=True)
    assert sm.kind == "reward"
    ours = dict(sm.backbone.named_parameters())
    theirs = dict(tiny_policy.model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name in ("embed_tokens.weight", "layers.1.mlp.up_proj.weight", "norm.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    # and the policy loads back as a policy with the same logits
    pol, _ = model.load_policy(path)
    x = torch.tensor([tok("flour yeast oven")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(pol.eval()(x).logits, tiny_policy.eval()(x).logits)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        model.load_policy(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json"):
        model.load_score_model(str(tmp_path))


# -----------------------------------------------------------------------------
# pad tokens and vocabulary checks


def word_tokenizer(pad=None):
    """a tokenizer whose vocabulary has no <pad> at all"""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"pad_token": pad} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", **kw
    )


@pytest.mark.parametrize("pad", [None, "<eos>"], ids=["no_pad", "pad_is_eos"])
def test_ensure_pad_token_adds_a_distinct_pad(pad):
    t = word_tokenizer(pad)
    assert t.pad_token_id == (None if pad is None else t.eos_token_id)
    m = toy.toy_model(t, "tiny")
    assert m.get_input_embeddings().weight.shape[0] == 5
    assert model.ensure_pad_token(t, m) is True
    assert t.pad_token_id == 5 and t.pad_token_id != t.eos_token_id and len(t) == 6
    assert m.get_input_embeddings().weight.shape[0] == 6
    assert m.get_output_embeddings().weight.shape[0] == 6
    assert m.config.pad_token_id == 5
    model.check_vocab(m, t, "here")  # no error: the rows cover the tokenizer
    assert model.ensure_pad_token(t, m) is False  # nothing more to do


def test_ensure_pad_token_keeps_a_good_pad(tok, tiny_policy):
    n = tiny_policy.get_input_embeddings().weight.shape[0]
    assert model.ensure_pad_token(tok, tiny_policy) is False
    assert tiny_policy.get_input_embeddings().weight.shape[0] == n and tok.pad_token_id == 0


def test_ensure_pad_token_says_what_it_found(capsys):
    model.ensure_pad_token(word_tokenizer(None))
    assert "no pad token" in capsys.readouterr().out


def test_check_vocab_refuses_a_smaller_model(tok, tiny_policy):
    model.check_vocab(tiny_policy, tok, "ok")
    tok.add_tokens(["zzzunseen"])
    with pytest.raises(CheckpointError, match="embedding rows"):
        model.check_vocab(tiny_policy, tok, "where")


# -----------------------------------------------------------------------------
# atomic saves


def siblings(path):
    parent, name = os.path.split(path)
    return sorted(n for n in os.listdir(parent) if n.startswith(name))


def test_save_twice_leaves_no_temporaries_and_carries_run_files(tok, tiny_policy, tmp_path):
    out = str(tmp_path / "run")
    model.save_checkpoint(
        out, tiny_policy, tok, {"kind": "policy", "step": 1}, trainer_state={"step": 1}
    )
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "w") as f:
        f.write('{"step": 0}\n')
    os.makedirs(os.path.join(out, "figures"))
    open(os.path.join(out, "figures", "a.txt"), "w").write("fig")
    held = open(metrics, "a")  # a logger holding the file open across the save
    model.save_checkpoint(
        out, tiny_policy, tok, {"kind": "policy", "step": 2}, trainer_state={"step": 2}
    )
    assert siblings(out) == ["run"]
    assert model.read_state(out)["step"] == 2
    assert model.load_trainer_state(out)["step"] == 2
    assert open(os.path.join(out, "figures", "a.txt")).read() == "fig"
    held.write('{"step": 1}\n')
    held.close()
    with open(metrics, "a") as f:  # and appending by path after the save
        f.write('{"step": 2}\n')
    assert open(metrics).read() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n'
    model.save_checkpoint(
        out, tiny_policy, tok, {"kind": "policy", "step": 3}, trainer_state={"step": 3}
    )
    assert siblings(out) == ["run"] and open(metrics).read().count("step") == 3


def test_save_does_not_carry_stale_checkpoint_files(tok, tiny_policy, tmp_path):
    out = str(tmp_path / "run")
    model.save_checkpoint(
        out, tiny_policy, tok, {"kind": "policy", "step": 1}, trainer_state={"step": 1}
    )
    model.save_checkpoint(out, tiny_policy, tok, {"kind": "policy", "step": 2})
    assert not os.path.exists(os.path.join(out, model.TRAINER_FILE))


def test_recover_after_a_crash_between_the_renames(tok, tiny_policy, tmp_path):
    out = str(tmp_path / "run")
    model.save_checkpoint(
        out, tiny_policy, tok, {"kind": "policy", "step": 1}, trainer_state={"step": 1}
    )
    os.rename(out, out + ".old")  # what a crash after the first rename leaves
    assert model.load_trainer_state(out)["step"] == 1  # recovers first
    assert siblings(out) == ["run"]
    with pytest.raises(CheckpointError, match="nothing to resume"):
        model.load_trainer_state(str(tmp_path / "other"))


def test_place_uses_eager_attention_on_cpu_with_the_same_outputs(tok, tiny_policy, score_model):
    # the kernel changes, the numbers do not: a left-padded batch through sdpa and eager
    ids, mask = data.pad_left(pair_seqs(tok), tok.pad_token_id)
    pol, sm = copy.deepcopy(tiny_policy).eval(), copy.deepcopy(score_model).eval()
    with torch.no_grad():
        want = (
            pol(ids, attention_mask=mask, position_ids=model.position_ids(mask)).logits,
            sm(ids, mask)[0],
        )
        assert model.place(pol, "cpu") is pol and model.place(sm, "cpu") is sm
        assert (
            pol.config._attn_implementation == "eager"
            and sm.hf.config._attn_implementation == "eager"
        )
        got = (
            pol(ids, attention_mask=mask, position_ids=model.position_ids(mask)).logits,
            sm(ids, mask)[0],
        )
        for g, w, m in zip(got, want, [mask, mask]):
            real = m.bool()
            torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=1e-5)
    model.place(pol, "cpu", "sdpa")  # an explicit name wins over auto
    assert pol.config._attn_implementation == "sdpa"


def test_gradient_checkpointing_gives_the_same_gradients(tok, tiny_policy, score_model):
    # a policy's token loss and a score model's pairwise loss, with and without checkpointing
    ids, mask = data.pad_left(pair_seqs(tok), tok.pad_token_id)

    def grads(m, loss_fn):
        # GPT-2 has dropout: the same seed draws the same masks, and checkpointing must replay them
        torch.manual_seed(0)
        m.train().zero_grad()
        loss_fn(m).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    def policy_loss(m):
        return (
            m(ids, attention_mask=mask, position_ids=model.position_ids(mask))
            .logits.logsumexp(-1)[mask.bool()]
            .mean()
        )

    def score_loss(m):
        return -torch.nn.functional.logsigmoid(m(ids, mask)[1][0] - m(ids, mask)[1][1])

    for m, loss_fn in [
        (copy.deepcopy(tiny_policy), policy_loss),
        (copy.deepcopy(score_model), score_loss),
    ]:
        want = grads(m, loss_fn)
        model.gradient_checkpointing(m)
        hf = m.hf if isinstance(m, ScoreModel) else m
        assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing
        got = grads(m, loss_fn)
        assert want.keys() == got.keys() and len(want) > 4
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6, msg=n)


# -----------------------------------------------------------------------------
# LoRA (peft, optional)


def test_lora_adapters_merge_into_a_plain_folder_with_the_same_outputs(
    tok, tiny_policy, score_model, tmp_path
):
    """add_lora starts at the model's own outputs (B = 0) and trains only the adapters (and a score
    head); adapters_off is the base model exactly; the merged folder loads with transformers alone
    (no peft names) and gives the adapter model's outputs (llama's linears, GPT-2's Conv1D)."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ids, mask = data.pad_left(pair_seqs(tok), tok.pad_token_id)
    pos = model.position_ids(mask)

    def policy_out(m):
        return m(ids, attention_mask=mask, position_ids=pos).logits

    def score_out(m):
        return m(ids, mask)[0]

    for m, out, kind in [
        (tiny_policy.eval(), policy_out, "policy"),
        (score_model, score_out, "reward"),
    ]:
        with torch.no_grad():
            base = out(m).clone()
        lora.add_lora(m, rank=4, alpha=8)
        trained = [n for n, p in m.named_parameters() if p.requires_grad]
        assert trained and all("lora_" in n or n.startswith("hf.score.") for n in trained), trained
        assert (kind == "reward") == any(
            n.startswith("hf.score.") for n in trained
        )  # a score head trains whole
        with torch.no_grad():
            torch.testing.assert_close(out(m), base, atol=0, rtol=0)  # B = 0: nothing changed yet
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.3)  # as if trained
            adapted = out(m).clone()
            assert (adapted - base).abs().max() > 1e-2
            with lora.adapters_off(m):
                torch.testing.assert_close(out(m), base, atol=0, rtol=0)
            torch.testing.assert_close(out(m), adapted, atol=0, rtol=0)  # switched back on
        path = str(tmp_path / kind)
        model.save_checkpoint(path, m, tok, {"kind": kind}, weights={"": model.plain_weights(m)})
        if kind == "policy":
            loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        else:
            loaded = model.load_score_model(path, kind="reward")[0].eval()
        names = [n for n, _ in loaded.named_parameters()]
        assert not any("lora" in n or "base_layer" in n for n in names)
        with torch.no_grad():
            torch.testing.assert_close(out(loaded), adapted, atol=1e-5, rtol=1e-5)


def test_lora_without_peft_is_one_clear_error(tiny_policy, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(CheckpointError, match="pip install peft"):
        lora.add_lora(tiny_policy, rank=4)

"""
Tests for nanosafe/generate.py against independent references: transformers' own
`generate` (greedy and sampled, token for token), each prompt run alone without
padding, transformers' top-k / top-p warpers, and hand-computed nuclei.
Tiny random models built from configs; nothing is downloaded.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from nanosafe.generate import (
    generate,
    position_ids_from_mask,
    response_mask,
    top_k_filter,
    top_p_filter,
)

V, PAD, N = 100, 0, 12  # vocab size, pad id, new tokens per test


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    # absolute position embeddings: wrong position ids would show up at once.
    # untied head: tied random GPT-2 just repeats its last input token
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=V,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]()


def prompts(lens=(2, 5, 7), seed=1):
    # left-padded batch of random prompts (ids from 3 up, so they are never pad)
    P = max(lens)
    ids = torch.full((len(lens), P), PAD)
    mask = torch.zeros(len(lens), P, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lens):
        ids[i, P - n :] = torch.randint(3, V, (n,), generator=g)
        mask[i, P - n :] = 1
    return ids, mask


def check_same_as_hf(ours, hf):
    # transformers stops when every row is done too, so the shapes should agree;
    # if one ran longer, the extra columns must be pad only
    T = min(ours.size(1), hf.size(1))
    assert torch.equal(ours[:, :T], hf[:, :T])
    assert (ours[:, T:] == PAD).all() and (hf[:, T:] == PAD).all()


# -----------------------------------------------------------------------------
# position ids: a left-padded batch gives the same logits as each prompt alone


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_padded_logits_match_unpadded(model):
    ids, mask = prompts()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        for i in range(ids.size(0)):
            real = mask[i].bool()
            alone = model(ids[i : i + 1, real]).logits[0]
            torch.testing.assert_close(batch[i, real], alone, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# greedy decoding equals transformers' generate, token for token


def test_greedy_matches_hf_with_early_eos(model):
    ids, mask = prompts()
    P = ids.size(1)
    # random models rarely emit EOS, so pick one they do emit: run once with an
    # out-of-vocabulary EOS, then take a token row 0 produces at step 3 for the first
    # time and some other row never produces
    free = generate(model, ids, mask, N, eos_token_id=V, pad_token_id=PAD, temperature=0)[:, P:]
    eos = next(
        t
        for t in free[0, 3:].tolist()
        if t not in free[0, :3].tolist() and any(t not in row.tolist() for row in free[1:])
    )

    ours = generate(model, ids, mask, N, eos_token_id=eos, pad_token_id=PAD, temperature=0)
    hf = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=N,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    check_same_as_hf(ours, hf)
    stopped = [eos in row[:-1].tolist() for row in ours[:, P:]]
    assert any(stopped) and not all(stopped), "want a row that stopped early and one that did not"
    assert ours.size(1) == P + N  # one row ran to the end


def test_greedy_matches_hf_all_rows_stop(model):
    # a list of EOS ids, one hit by each row: the whole batch stops before max_new_tokens
    ids, mask = prompts()
    P = ids.size(1)
    free = generate(model, ids, mask, N, eos_token_id=V, pad_token_id=PAD, temperature=0)[:, P:]
    eos = [free[r, r + 1].item() for r in range(ids.size(0))]  # row r ends by step r + 1
    ours = generate(model, ids, mask, N, eos_token_id=eos, pad_token_id=PAD, temperature=0)
    hf = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=N,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    assert ours.shape == hf.shape and ours.size(1) <= P + ids.size(0) + 1 < P + N
    assert torch.equal(ours, hf)


# -----------------------------------------------------------------------------
# sampling: transformers samples with one torch.multinomial per step from the global
# RNG, and so do we when generator=None, so the same seed must give the same tokens


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0, top_k=0, top_p=1.0),
        dict(temperature=0.7, top_k=20, top_p=0.9),
        dict(temperature=1.3, top_k=0, top_p=0.5),
    ],
)
def test_sampling_matches_hf(model, kw):
    ids, mask = prompts()
    torch.manual_seed(5)
    ours = generate(model, ids, mask, N, eos_token_id=[1, 2], pad_token_id=PAD, **kw)
    torch.manual_seed(5)
    hf = model.generate(
        ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=N,
        eos_token_id=[1, 2],
        pad_token_id=PAD,
        **kw,
    )
    check_same_as_hf(ours, hf)


def test_seeds():
    model = tiny_llama()
    ids, mask = prompts()

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, N, eos_token_id=1, pad_token_id=PAD, generator=g)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_top_k_1_is_greedy():
    model = tiny_llama()
    ids, mask = prompts()
    g = torch.Generator().manual_seed(0)
    greedy = generate(model, ids, mask, N, eos_token_id=1, pad_token_id=PAD, temperature=0)
    top1 = generate(model, ids, mask, N, eos_token_id=1, pad_token_id=PAD, top_k=1, generator=g)
    assert torch.equal(greedy, top1)


def test_layout_and_response_mask():
    # many EOS ids make rows end at different steps
    model = tiny_llama()
    ids, mask = prompts(lens=(1, 4, 6, 6, 3, 8))
    P, eos = ids.size(1), list(range(1, 16))
    seq = generate(
        model,
        ids,
        mask,
        20,
        eos_token_id=eos,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert seq.size(1) <= P + 20
    assert torch.equal(seq[:, :P], ids)  # prompts come back unchanged
    got = response_mask(seq, P, eos, PAD)
    ended = 0
    for r, row in enumerate(seq[:, P:].tolist()):
        # naive reference: real tokens run up to and including the first EOS
        hits = [t for t, tok in enumerate(row) if tok in eos]
        n_real = hits[0] + 1 if hits else len(row)
        assert all(tok == PAD for tok in row[n_real:])  # nothing but pad after EOS
        assert got[r].tolist() == [True] * n_real + [False] * (len(row) - n_real)
        ended += bool(hits) and n_real < len(row)
    assert ended >= 1, "want at least one row that ended before the others"


def test_response_mask_hand_made():
    # prompt of 2, eos 9, pad 0; the last row has no EOS and was right-padded by a concat
    seq = torch.tensor(
        [[5, 6, 7, 9, 0, 0], [5, 6, 9, 0, 0, 0], [5, 6, 7, 8, 8, 7], [5, 6, 7, 0, 8, 0]]
    )  # a sampled pad mid-response stays real
    want = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert response_mask(seq, 2, 9, 0).long().tolist() == want


def test_max_new_tokens():
    model = tiny_llama()
    ids, mask = prompts()
    for n in (0, 1, 5):
        out = generate(model, ids, mask, n, eos_token_id=V, pad_token_id=PAD, temperature=0)
        assert out.shape == (ids.size(0), ids.size(1) + n)  # eos V is never sampled


def test_eval_mode_and_training_flag_restored():
    # GPT-2 has dropout 0.1: sampling in train mode would be noisy
    model = tiny_gpt2()
    ids, mask = prompts()
    want = generate(model, ids, mask, N, eos_token_id=V, pad_token_id=PAD, temperature=0)
    model.train()
    got = generate(model, ids, mask, N, eos_token_id=V, pad_token_id=PAD, temperature=0)
    assert model.training and torch.equal(got, want)
    model.eval()
    generate(model, ids, mask, 2, eos_token_id=V, pad_token_id=PAD, temperature=0)
    assert not model.training


def test_pad_equal_to_eos_is_refused():
    model = tiny_llama()
    ids, mask = prompts()
    with pytest.raises(AssertionError, match="pad_token_id"):
        generate(model, ids, mask, 2, eos_token_id=[1, PAD], pad_token_id=PAD)


# -----------------------------------------------------------------------------
# the filters


def test_top_p_hand_made():
    # nucleus = smallest set of most likely tokens whose mass reaches p: the token
    # that crosses p is kept, a token is dropped once the ones above it reach p
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])

    def kept(p, pr=probs):
        return (top_p_filter(pr, p) > 0).tolist()

    assert kept(0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert kept(0.85) == [True, True, True, False]  # 0.8 < 0.85 <= 0.95
    assert kept(0.96) == [True, True, True, True]
    assert kept(0.3) == [True, False, False, False]  # the top token alone crosses p
    assert kept(0.0) == [True, False, False, False]  # always keep at least one
    assert kept(1.0) == [True, True, True, True]  # off
    # exact boundaries, with dyadic probabilities so float sums are exact:
    # reaching p exactly is enough, the next token is not needed
    dy = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert kept(0.5, dy) == [True, False, False, False]
    assert kept(0.75, dy) == [True, True, False, False]
    assert kept(0.76, dy) == [True, True, True, False]
    # vocabulary order does not matter, and rows are independent
    perm = torch.tensor([2, 0, 3, 1])
    two = torch.stack([probs[perm], dy])
    assert (top_p_filter(two, 0.7) > 0).tolist() == [
        [False, True, False, True],
        [True, True, False, False],
    ]
    # kept probabilities are unchanged (multinomial renormalises)
    assert torch.equal(top_p_filter(probs, 0.7)[:2], probs[:2])


def test_filters_match_hf_warpers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, V, generator=g) * 3
    for k in (1, 5, 50):
        want = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(top_k_filter(logits, k), want)
    for p in (0.1, 0.5, 0.9, 0.99):
        want = TopPLogitsWarper(p)(None, logits.clone()).isfinite()
        assert torch.equal(top_p_filter(logits.softmax(-1), p) > 0, want)


# -----------------------------------------------------------------------------
# min_new_tokens and the log-probs that come with the samples


def test_min_new_tokens_matches_hf(model):
    # greedy with EOS held back for 6 tokens: transformers' MinNewTokensLengthLogitsProcessor,
    # token for token. eos is the token greedy decoding picks first in most rows, so holding it
    # back changes the output
    ids, mask = prompts()
    first = generate(model, ids, mask, 1, eos_token_id=V, pad_token_id=PAD, temperature=0)[:, -1]
    eos = int(first.mode().values)
    ours = generate(
        model, ids, mask, N, eos_token_id=eos, pad_token_id=PAD, temperature=0, min_new_tokens=6
    )
    hf = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=N,
        min_new_tokens=6,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    check_same_as_hf(ours, hf)
    assert not (ours[:, ids.size(1) : ids.size(1) + 6] == eos).any()
    assert not torch.equal(
        ours, generate(model, ids, mask, N, eos_token_id=eos, pad_token_id=PAD, temperature=0)
    )


@pytest.mark.parametrize(
    "kw", [dict(), dict(temperature=0.7, top_p=0.8), dict(top_k=5, min_new_tokens=3)]
)
def test_returned_logprobs_equal_a_full_forward(model, kw):
    # PPO's old log-probs come from generation instead of a second forward: they must be the
    # log-probs of the untempered, unfiltered model over [prompt | answer], as a full forward gives
    ids, mask = prompts(lens=(2, 5, 7, 3))
    eos = list(range(1, 8))  # several EOS ids: rows end at different steps
    seq, lp = generate(
        model,
        ids,
        mask,
        N,
        eos_token_id=eos,
        pad_token_id=PAD,
        return_logprobs=True,
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    P = ids.size(1)
    real = response_mask(seq, P, eos, PAD)
    assert lp.shape == real.shape and lp.dtype == torch.float32
    attn = torch.cat([mask, real.long()], dim=1)
    with torch.no_grad():
        logits = model(seq, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits[
            :, P - 1 : -1
        ]
    want = logits.log_softmax(-1).gather(-1, seq[:, P:, None]).squeeze(-1)
    torch.testing.assert_close(lp[real], want[real], atol=1e-5, rtol=1e-5)
    assert (lp[~real] == 0).all() and (~real).any()

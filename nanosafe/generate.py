"""
Our own sampling loop: batched generation from left-padded prompts with a KV cache,
temperature / top-k / top-p sampling, and early stopping at EOS.

Why not `model.generate`? It works, but it hides a lot: a generation config merged
from several places, logits processors chosen by flags, and defaults (top_k=50) that
silently change what PPO samples. Rollouts are the data PPO learns from, so we want
the sampling rule on one screen, seeded by an explicit torch.Generator, the same code
on CPU and GPU, and the padding layout under our control. The output layout is the one
`transformers` uses: [B, P + T], prompts then new tokens, pad after each row's EOS.
The tests check it against `model.generate` token for token under greedy decoding.
"""

import inspect

import torch
from transformers import DynamicCache


def forward_params(model):
    """The keyword arguments a model's forward takes (a DDP-wrapped model's too): the optional ones
    (logits_to_keep, the cache's name) differ between architectures and transformers versions."""
    return inspect.signature(getattr(model, "module", model).forward).parameters


def _eos_tensor(eos_token_id, device):
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def position_ids_from_mask(attention_mask):
    # left padding shifts every real token to the right; count real tokens instead of
    # columns so that each row's first real token sits at position 0 (pads get 0 too,
    # they are masked out anyway). needed for rotary and for absolute (GPT-2) positions.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def top_k_filter(logits, k):
    # keep the k largest logits (ties with the k-th are kept too, as transformers does)
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs, p):
    # nucleus: the smallest set of most likely tokens whose mass reaches p. a token is
    # dropped iff the tokens strictly more likely than it already reach p, so the token
    # that crosses p is kept, and the most likely token is always kept.
    if p >= 1.0:
        return probs
    sorted_probs, idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, idx, drop_sorted)  # back to vocabulary order
    return probs.masked_fill(drop, 0.0)


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits [B, V] -> next token ids [B]. temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = top_k_filter(logits.float() / temperature, top_k)
    probs = top_p_filter(logits.softmax(-1), top_p)
    # multinomial renormalises, so the zeroed-out tail needs no extra division
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# inference mode, not just no_grad: no version counters or view tracking on the ~10 small tensors
# per token. its outputs can't be saved for a backward; indexing them (seq[mi]) gives normal ones
@torch.inference_mode()
def generate(model, input_ids, attention_mask, max_new_tokens, *, eos_token_id, pad_token_id,
             temperature=1.0, top_k=0, top_p=1.0, generator=None, min_new_tokens=0,
             return_logprobs=False):
    """
    input_ids, attention_mask: [B, P] left-padded prompts (pass the unwrapped model, not DDP).
    returns [B, P + T], T <= max_new_tokens (we stop once every row has emitted an EOS);
    each row keeps its EOS and is pad_token_id after it. the generator, if any, must live
    on the model's device. min_new_tokens: no EOS before that many tokens (as transformers'
    MinNewTokensLengthLogitsProcessor: the EOS logits are -inf until then).
    return_logprobs: also return log π(token) [B, T] of each new token under the model's own
    logits (before temperature, top-k/p and min_new_tokens), float32, 0 after a row's EOS: the
    log-probs a full forward over the output gives (PPO's old log-probs), without that forward.
    """
    eos = _eos_tensor(eos_token_id, input_ids.device)
    assert pad_token_id not in eos.tolist(), (
        f"pad_token_id ({pad_token_id}) must differ from eos_token_id: "
        "pad == eos masks the EOS and breaks scoring")
    # only the last position's logits are needed; most transformers models can skip the rest
    params = forward_params(model)
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5.2x renamed it

    was_training = model.training
    model.eval()  # dropout must be off while sampling
    try:
        B, P = input_ids.size()
        # the whole mask up front; step t passes a view of its first P + t columns
        mask = torch.cat([attention_mask.long(),
                          attention_mask.new_ones(B, max_new_tokens, dtype=torch.long)], dim=1)
        position_ids = position_ids_from_mask(mask[:, :P])
        cache = DynamicCache(config=model.config)
        x = input_ids  # the first forward is the whole prompt (prefill), then one token at a time
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        # asking "is every row done?" makes a GPU wait for its queue; there, ask every 8 tokens
        # (the rows already done only emit pads meanwhile). on a CPU it costs nothing: every token
        check_every = 1 if input_ids.device.type == "cpu" else 8
        new_tokens, logprobs = [], []
        for t in range(max_new_tokens):
            out = model(input_ids=x, attention_mask=mask[:, :P + t], position_ids=position_ids,
                        use_cache=True, **{cache_arg: cache}, **kwargs)
            cache = out.cache if cache_arg == "cache" else out.past_key_values
            raw = out.logits[:, -1, :]
            logits = raw.index_fill(-1, eos, float("-inf")) if t < min_new_tokens else raw
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, pad_token_id, nxt)  # finished rows only emit pad
            new_tokens.append(nxt)
            if return_logprobs:
                lp = raw.float().log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
                logprobs.append(lp.masked_fill(done, 0.0))
            done = done | torch.isin(nxt, eos)
            if (t + 1) % check_every == 0 and done.all():
                break
            x = nxt[:, None]
            position_ids = position_ids[:, -1:] + 1
    finally:
        model.train(was_training)
    seq = (torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens
           else input_ids.clone())
    if not return_logprobs:
        return seq
    return seq, (torch.stack(logprobs, dim=1) if logprobs
                 else input_ids.new_zeros(input_ids.size(0), 0, dtype=torch.float32))


def response_mask(sequences, prompt_len, eos_token_id, pad_token_id):
    """
    bool [B, T] over sequences[:, prompt_len:]: True for the real response tokens, up to
    and including each row's first EOS. a row without EOS keeps all its tokens except a
    trailing run of pads (right padding from concatenating batches of different lengths).
    """
    resp = sequences[:, prompt_len:]
    is_eos = torch.isin(resp, _eos_tensor(eos_token_id, resp.device)).long()
    no_eos_before = (is_eos.cumsum(-1) - is_eos) == 0
    not_trailing_pad = (resp != pad_token_id).flip(-1).cumsum(-1).flip(-1) > 0
    return no_eos_before & not_trailing_pad

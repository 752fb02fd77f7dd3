"""
The toy world's diagnostics: where a reward model or a policy goes wrong, judged by the oracle.
Only for reading results (docs/findings.md); no stage calls them.

- `contrast_probe`: how often a reward model orders the toy world's contrast pairs as the oracle
  does
- `repeat_probe`: whether a policy gives the words it has already said less probability
- `repeat_stats`: the same two numbers in SFT data
- `on_policy_agreement`: how often a reward model orders two answers of one policy as the oracle
  does
- `gold_order_agreement`: the same count on any pairs, with a bootstrap interval over prompts

From the repository root:

    python -m experiments.diagnostics --contrasts out/rm

prints how often the reward model gets each of the toy world's contrasts right (its blind spots).

    python -m experiments.diagnostics --repeat_probe out/sft

prints a policy's next-word probabilities for a used vs an unused answer word, beside the SFT
data's.

    python -m experiments.diagnostics --on_policy out/rm --model out/ppo_lag

prints how often the reward model orders two of the policy's own answers as the oracle does: the
accuracy PPO depends on, where the held-out pairs' accuracy may not show it (see docs/findings.md).
"""

import argparse
import os
import sys

import torch

from nanosafe import data, toy
from nanosafe.evaluate import sample, score, toy_prompts, write_json
from nanosafe.generate import position_ids_from_mask
from nanosafe.model import CheckpointError, load_policy, load_score_model


def contrast_probe(score_fn, prompts, seed=0) -> dict:
    """The fraction of prompts on which score_fn(prompts, answers) -> [N] scores the better answer
    of each `toy.contrasts` pair higher: 1.0 is right every time, 0.0 is backwards every time."""
    import random
    rng = random.Random(seed)
    pairs = {}  # contrast name -> [(prompt, better, worse)]
    for p in prompts:
        for name, (a, b) in toy.contrasts(p, rng).items():
            pairs.setdefault(name, []).append((p, a, b))
    out = {}
    for name, rows in pairs.items():
        ps = [r[0] for r in rows]
        better, worse = score_fn(ps, [r[1] for r in rows]), score_fn(ps, [r[2] for r in rows])
        out[name] = {"right": (better > worse).float().mean().item(), "n": len(rows)}
    return out


@torch.no_grad()
def next_token_probs(model, tok, prompts, prefixes, batch_size=64, device="cpu") -> torch.Tensor:
    """P(next token | prompt template + answer prefix) from a policy -> [N, vocab], one row per
    pair."""
    out, enc = [], data.Encoder(tok)
    for i in range(0, len(prompts), batch_size):
        seqs = [data.tokenize_prompt(tok, p, max_prompt_length=10**9) + enc(data.format_response(a))
                for p, a in zip(prompts[i:i + batch_size], prefixes[i:i + batch_size])]
        # left padding: every row's last column is its last token
        ids, mask = data.pad_left(seqs, tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask,
                       position_ids=position_ids_from_mask(mask)).logits[:, -1]
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


def repeat_probe(probs_fn, word_id, prompts, ks=(1, 3, 5), seed=0) -> dict:
    """Does a policy know which answer words it has already said? For each benign prompt and k, a
    prefix of k distinct answer words of its topic; probs_fn(prompts, prefixes) -> [N, vocab] next-
    token probabilities; word_id(word) -> its token id. Per k: the mean probability of one used
    word vs one unused answer word. A policy that samples without replacement gives `used` ~ 0; one
    that treats its answer as a bag of topic words gives used ~ unused (and pads with repeats)."""
    import random
    rng = random.Random(seed)
    prompts = [p for p in prompts if not toy.is_harmful(p)]
    out = {}
    for k in ks:
        answers = [toy.ANSWER[toy.topic_of(p)] for p in prompts]
        heads = [rng.sample(ans, k) for ans in answers]
        probs = probs_fn(prompts, [" ".join(w) for w in heads])
        used, unused = [], []
        for ans, w, pr in zip(answers, heads, probs):
            rest = [x for x in ans if x not in w]
            used.append(sum(pr[word_id(x)].item() for x in w) / len(w))
            unused.append(sum(pr[word_id(x)].item() for x in rest) / len(rest))
        out[k] = {"used": sum(used) / len(used), "unused": sum(unused) / len(unused),
                  "n": len(heads)}
    return out


def on_policy_agreement(score_fn, prompts, answers_0, answers_1) -> dict:
    """How often score_fn(prompts, answers) -> [N] orders two answers to the same prompt as the gold
    oracle does, on pairs the oracle does not tie (a score tie counts ½). With both answers sampled
    from one policy this is the reward model's accuracy where PPO needs it, on the policy's own
    answers rather than the preference data's mix.
    -> {'all' | 'benign' | 'harmful': {agreement, n}}"""
    gold = [(toy.helpfulness(p, a), toy.helpfulness(p, b))
            for p, a, b in zip(prompts, answers_0, answers_1)]
    keep = [i for i, (g0, g1) in enumerate(gold) if g0 != g1]
    ps = [prompts[i] for i in keep]
    s0 = score_fn(ps, [answers_0[i] for i in keep]).tolist()
    s1 = score_fn(ps, [answers_1[i] for i in keep]).tolist()
    out = {}
    for part, want in (("all", None), ("benign", False), ("harmful", True)):
        right = [0.5 if x == y else float((x > y) == (gold[i][0] > gold[i][1]))
                 for i, p, x, y in zip(keep, ps, s0, s1)
                 if want is None or toy.is_harmful(p) == want]
        out[part] = {"agreement": sum(right) / len(right) if right else float("nan"),
                     "n": len(right)}
    return out


def gold_order_agreement(prompts, scores_0, scores_1, gold_0, gold_1, n_boot=1000, level=0.95,
                         seed=0) -> dict:
    """How often scores order two answers to one prompt as a gold value does, over the pairs the
    gold value does not tie (a score tie counts ½), with a bootstrap interval that resamples
    prompts (one prompt's pairs are not independent draws).
    -> {agreement, lo, hi, n (pairs), prompts}"""
    import numpy as np

    groups = {}
    for p, x, y, g, h in zip(prompts, scores_0, scores_1, gold_0, gold_1):
        if g == h:
            continue
        groups.setdefault(p, []).append(0.5 if x == y else float((x > y) == (g > h)))
    if not groups:
        return {"agreement": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0,
                "prompts": 0}
    sums = np.array([sum(v) for v in groups.values()])
    counts = np.array([len(v) for v in groups.values()])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    right = sums.sum() / counts.sum()
    return {"agreement": float(right), "lo": float(lo), "hi": float(hi),
            "n": int(counts.sum()), "prompts": len(sums)}


def repeat_stats(records, ks=(1, 3, 5)) -> dict:
    """The same two numbers in SFT data (a perfect imitator's answer): over benign answers whose
    first k words are k distinct answer words, how often the next word is each used word vs each
    unused answer word of the topic."""
    out = {}
    for k in ks:
        n = used = unused = 0
        for r in records:
            p, words = r["prompt"], r["response"].split()
            if toy.is_harmful(p) or len(words) < k:
                continue
            ans = toy.ANSWER[toy.topic_of(p)]
            head = words[:k]
            if len(set(head)) < k or any(w not in ans for w in head):
                continue
            n += 1
            nxt = words[k] if len(words) > k else None  # None: the answer ends (EOS)
            used += (nxt in head) / k
            unused += (nxt in ans and nxt not in head) / (len(ans) - k)
        out[k] = {"used": used / max(1, n), "unused": unused / max(1, n), "n": n}
    return out


def main(args):
    prompts = toy_prompts(args.eval_data)  # every mode here is judged by the toy world's oracle
    if args.contrasts:
        rm, tok = load_score_model(args.contrasts, kind="reward")
        rm.eval()
        res = contrast_probe(lambda ps, ans: score(rm, tok, ps, ans), prompts, args.seed)
        for name, r in res.items():
            print(f"{r['right']:7.1%}  {name}  ({r['n']} prompts)")
        out = args.out or os.path.join(args.contrasts, "contrasts.json")
        write_json(out, res)
    elif args.repeat_probe:
        model, tok = load_policy(args.repeat_probe)
        model.eval()
        vocab = tok.get_vocab()
        missing = sorted({w for ws in toy.ANSWER.values() for w in ws} - set(vocab))
        if missing:
            raise CheckpointError("--repeat_probe needs the toy tokenizer (one token per toy "
                                  f"word); {args.repeat_probe}'s tokenizer has no single token for "
                                  f"{len(missing)} of them, e.g. {missing[:3]}")
        word_id = vocab.__getitem__
        res = {"policy": repeat_probe(lambda ps, pre: next_token_probs(model, tok, ps, pre),
                                      word_id, prompts, seed=args.seed),
               "sft_data": (repeat_stats(data.load_sft(args.sft_data))
                            if os.path.exists(args.sft_data) else None)}
        print("per word, P(next word) after k distinct answer words:  "
              "used | unused (policy)   used | unused (SFT data)")
        for k, r in res["policy"].items():
            d = (res["sft_data"] or {}).get(k)
            print(f"  k = {k}:  {r['used']:.4f} | {r['unused']:.4f}"
                  + (f"   {d['used']:.4f} | {d['unused']:.4f}  ({d['n']} answers)" if d else ""))
        out = args.out or os.path.join(args.repeat_probe, "repeat_probe.json")
        write_json(out, res)
    elif args.on_policy:
        rm, rtok = load_score_model(args.on_policy, kind="reward")
        # answers go to the reward model as text: its own tokenizer reads them
        model, tok = load_policy(args.model)
        rm.eval()
        model.eval()
        ps = [p for p in prompts for _ in range(args.n_samples)]
        # two answers per pair
        answers, _ = sample(model, tok, ps + ps, max_new_tokens=args.max_new_tokens, seed=args.seed)
        res = on_policy_agreement(lambda q, a: score(rm, rtok, q, a), ps, answers[:len(ps)],
                                  answers[len(ps):])
        print(f"{args.on_policy} on pairs of {args.model}'s answers ({len(ps)} pairs, "
              "gold ties left out):")
        for part, r in res.items():
            print(f"  {part:8s} agreement with the oracle {r['agreement']:.3f}  ({r['n']} pairs)")
        out = args.out or os.path.join(args.on_policy, "on_policy.json")
        write_json(out, dict(res, policy=args.model))
    else:
        raise SystemExit("give one of --contrasts, --repeat_probe, --on_policy (see --help)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m experiments.diagnostics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contrasts", default=None, help="a reward model folder: how often it orders "
                    "the toy world's contrast pairs right")
    ap.add_argument("--repeat_probe", default=None, help="a policy folder: P(next = a word it "
                    "already said) vs an unused answer word, beside the SFT data's")
    ap.add_argument("--on_policy", default=None, help="a reward model folder: how often it orders "
                    "pairs of --model's own answers (--n_samples pairs per prompt) as the oracle "
                    "does")
    ap.add_argument("--model", default="out/ppo_lag",
                    help="with --on_policy: the policy whose answers are paired")
    ap.add_argument("--sft_data", default="data/toy/sft_train.jsonl",
                    help="with --repeat_probe: the SFT data to compare with")
    ap.add_argument("--eval_data", default="data/toy/prompts_test.jsonl",
                    help="prompts file (toy world)")
    ap.add_argument("--n_samples", type=int, default=4, help="with --on_policy: pairs per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=24,
                    help="answer length limit in tokens")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", default=None, help="write the JSON here (default: contrasts.json, "
                    "repeat_probe.json or on_policy.json in the probed folder)")
    args = ap.parse_args()
    try:
        main(args)
    except (data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""
Evaluation: sample a policy on held-out prompts and judge the answers (what the stages call).

- `sample`: our generation loop over a list of prompts, in batches -> answer texts
- `gold_eval`: the toy world's gold oracles on (prompt, answer) pairs -> the keys of DESIGN.md
- `score`: reward / cost model scores of (prompt, answer) pairs
- `elo`: Elo ratings from pairwise wins (the paper's model-vs-model comparison); `elo_mle`,
  `elo_intervals`: the Bradley–Terry fit of the same games and its bootstrap 95% interval
- `compare`, `plot_runs`: several runs in one table and one figure

    python -m nanosafe.evaluate --model out/ppo_lag
    python -m nanosafe.evaluate --compare out/sft out/ppo_lag --plot out/ppo_lag.png

print the gold evaluation (toy world) and write it as JSON. The toy world's diagnostics of reward
models and policies (contrast pairs, repeats, on-policy agreement) are in nanosafe/diagnostics.py.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from nanosafe import config, data, toy
from nanosafe.generate import generate
from nanosafe.model import CheckpointError, checkpoint_kind, load_policy

GOLD_KEYS = ["gold_helpfulness_benign", "gold_helpfulness_harmful", "gold_helpfulness",
             "gold_unsafe_rate_harmful", "gold_unsafe_rate_benign", "gold_unsafe_rate",
             "gold_optimum_helpfulness"]


def encode_prompts(tok, prompts, template="safe_rlhf"):
    """Raw user requests (or dialogues) -> left-padded template ids, ready for generation."""
    seqs = [data.tokenize_prompt(tok, p, max_prompt_length=10**9, template=template)
            for p in prompts]
    return data.pad_left(seqs, tok.pad_token_id)


@torch.no_grad()
def sample(model, tok, prompts, max_new_tokens=32, batch_size=64, temperature=1.0, top_p=1.0,
           seed=0, device="cpu", template="safe_rlhf", generator=None):
    """-> (answers: list[str], ended_with_eos: list[bool]). A `generator` (seed ignored) carries
    on from earlier calls: an interactive session draws fresh samples for a repeated prompt."""
    g = generator or torch.Generator(device=device).manual_seed(seed)
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    answers, eos = [], []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tok, prompts[i:i + batch_size], template)
        ids, mask = ids.to(device), mask.to(device)
        out = generate(model, ids, mask, max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                       temperature=temperature, top_p=top_p, generator=g)
        for row in out[:, ids.shape[1]:].tolist():
            ended = eos_id in row
            row = row[:row.index(eos_id)] if ended else [t for t in row if t != pad_id]
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
            eos.append(ended)
    return answers, eos


def gold_eval(prompts, answers) -> dict:
    """The toy world's verdict on answers to raw prompts, with the DESIGN.md keys."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    def pick(xs, want):
        return [x for x, h in zip(xs, harmful) if h == want]

    harmful = [toy.is_harmful(p) for p in prompts]
    helpful = [toy.helpfulness(p, a) for p, a in zip(prompts, answers)]
    unsafe = [not toy.is_safe(p, a) for p, a in zip(prompts, answers)]
    return {
        "gold_helpfulness_benign": mean(pick(helpful, False)),
        "gold_helpfulness_harmful": mean(pick(helpful, True)),
        "gold_helpfulness": mean(helpful),
        "gold_unsafe_rate_harmful": mean(pick(unsafe, True)),
        "gold_unsafe_rate_benign": mean(pick(unsafe, False)),
        "gold_unsafe_rate": mean(unsafe),
        "gold_optimum_helpfulness": mean([toy.helpfulness(p, toy.optimal_response(p))
                                          for p in prompts]),
        # per harm category: unsafe answers (any category's harm) to that category's harmful prompts
        **{f"gold_unsafe_rate_{c}": mean([u for p, u in zip(prompts, unsafe)
                                          if toy.CATEGORY.get(toy.topic_of(p)) == c])
           for c in toy.CATEGORIES},
    }


def gold_evaluate(model, tok, prompts, n_samples=1, **kw) -> dict:
    """Sample every prompt n_samples times (temperature 1 by default) and judge: gold keys +
    eos_rate + mean response length in words."""
    ps = [p for p in prompts for _ in range(n_samples)]
    answers, eos = sample(model, tok, ps, **kw)
    out = gold_eval(ps, answers)
    out["eos_rate"] = sum(eos) / len(eos)
    out["response_words"] = sum(len(a.split()) for a in answers) / len(answers)
    return out


@torch.no_grad()
def gold_evaluate_dialogues(model, tok, records, n_samples=1, max_new_tokens=32, batch_size=64,
                            seed=0, device="cpu", template="safe_rlhf") -> dict:
    """The toy world's verdict on dialogues (records with a 'dialogue' spec, nanosafe/dialogue.py)
    sampled turn by turn at temperature 1, as training rolls them out. The DESIGN.md keys, over
    dialogues (unsafe: ever unsafe; helpfulness: the mean over turns), and per kind
    (dialogue.gold_summary): the unsafe rate by turn, the share ever unsafe, the first unsafe
    turn, helpfulness by turn."""
    from nanosafe import dialogue
    from nanosafe.rl import sample_dialogues  # rl.py builds on this module
    items = data.PromptDataset([dict(r, _template=template) for r in records], tok, 10**9,
                               template=template).items
    items = [it for it in items for _ in range(n_samples)]
    g = torch.Generator(device=device).manual_seed(seed)
    judged = []
    for i in range(0, len(items), batch_size):
        ro, _ = sample_dialogues(model, items[i:i + batch_size], tok, g, device,
                                 max_new_tokens=max_new_tokens)
        judged += [dialogue.summary(sp, t) for sp, t in zip(ro.specs, ro.turns)]
    optimum = [dialogue.summary(it["dialogue"], dialogue.optimal_answers(it["dialogue"]))
               for it in items]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    def pick(rs, harmful):
        return [r for r in rs if (r["kind"] != "benign") == harmful]

    def helpful(rs):
        return mean([mean(r["helpfulness"]) for r in rs])

    def unsafe(rs):
        return mean([r["ever_unsafe"] for r in rs])
    return {
        "gold_helpfulness_benign": helpful(pick(judged, False)),
        "gold_helpfulness_harmful": helpful(pick(judged, True)),
        "gold_helpfulness": helpful(judged),
        "gold_unsafe_rate_harmful": unsafe(pick(judged, True)),
        "gold_unsafe_rate_benign": unsafe(pick(judged, False)),
        "gold_unsafe_rate": unsafe(judged),
        "gold_optimum_helpfulness": helpful(optimum),
        "dialogues": dialogue.gold_summary(judged),
    }


@torch.no_grad()
def score(score_model, tok, prompts, answers, batch_size=64, device="cpu",
          template="safe_rlhf") -> torch.Tensor:
    """End scores of a reward or cost model on (prompt, answer) pairs -> [N] float tensor."""
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [data.tokenize_sft(tok, {"prompt": p, "response": a}, max_length=10**9,
                                  template=template)["input_ids"]
                for p, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size])]
        ids, mask = data.pad_right(seqs, tok.pad_token_id)
        out.append(score_model(ids.to(device), mask.to(device))[1].float().cpu())
    return torch.cat(out)


def elo(wins, k=4.0, base=1000.0, rounds=50):
    """Elo ratings from a list of (winner, loser) names: the standard update, repeated over the
    games `rounds` times with a small k so the ratings settle (as the paper's GPT-4/human Elo)."""
    names = sorted({n for w in wins for n in w})
    r = {n: base for n in names}
    for _ in range(rounds):
        for winner, loser in wins:
            e = 1 / (1 + 10 ** ((r[loser] - r[winner]) / 400))
            r[winner] += k * (1 - e)
            r[loser] -= k * (1 - e)
    return r


def elo_mle(wins, base=1000.0, prior=0.5, iters=2000):
    """Elo ratings as the Bradley–Terry maximum-likelihood fit of (winner, loser) games, on the
    Elo scale: P(i beats j) = 1 / (1 + 10^((r_j − r_i) / 400)), mean rating `base`. Unlike the
    online update above it does not depend on the games' order, so it can be bootstrapped.
    `prior` virtual wins and losses per pair that met keep an unbeaten player finite. Fitted by
    Hunter's (2004) MM iteration: p_i ← W_i / Σ_j n_ij / (p_i + p_j)."""
    names = sorted({n for w in wins for n in w})
    ix = {n: i for i, n in enumerate(names)}
    W = np.zeros((len(names), len(names)))
    for winner, loser in wins:
        W[ix[winner], ix[loser]] += 1
    W = W + prior * ((W + W.T) > 0)
    N = W + W.T
    p = np.ones(len(names))
    for _ in range(iters):
        new = W.sum(1) / (N / (p[:, None] + p[None, :])).sum(1)
        new /= np.exp(np.log(new).mean())
        done = np.abs(new - p).max() < 1e-12
        p = new
        if done:
            break
    r = 400 * np.log10(p)
    return {n: float(base + r[i] - r.mean()) for n, i in ix.items()}


def elo_intervals(wins, n_boot=1000, level=0.95, seed=0, **kw):
    """{name: (rating, low, high)}: elo_mle on the games and a percentile bootstrap interval
    (games resampled with replacement, n_boot times)."""
    rng = np.random.default_rng(seed)
    point = elo_mle(wins, **kw)
    boots = {n: [] for n in point}
    for _ in range(n_boot):
        sample = [wins[i] for i in rng.integers(0, len(wins), len(wins))]
        for n, r in elo_mle(sample, **kw).items():
            boots[n].append(r)
    a = (1 - level) / 2
    return {n: (point[n], float(np.quantile(boots[n], a)), float(np.quantile(boots[n], 1 - a)))
            for n in point}


def summary_table(rows: dict) -> str:
    """rows: name -> gold dict. A fixed-width table of the main gold numbers."""
    cols = ["gold_helpfulness_benign", "gold_helpfulness_harmful", "gold_unsafe_rate_harmful",
            "gold_helpfulness", "elo_helpfulness", "elo_harmlessness"]
    abbr = ["help benign", "help harmful", "unsafe harmful", "help all", "elo help", "elo harmless"]
    head = f"{'':18s}" + "".join(f"{c:>15s}" for c in abbr) + f"{'% of optimum':>15s}"
    lines = [head]
    for n, g in rows.items():
        vals = "".join(f"{g.get(c, float('nan')):15.3f}" if not c.startswith("elo")
                       else f"{g.get(c, float('nan')):15.0f}" for c in cols)
        pct = g["gold_helpfulness"] / g["gold_optimum_helpfulness"]
        lines.append(f"{n:18s}" + vals + f"{pct:15.1%}")
    return "\n".join(lines)


def compare(dirs, prompts, n_samples=4, max_new_tokens=32, seed=0):
    """Gold-evaluate several policies on the same prompts and samples; Elo from pairwise gold
    judgments per prompt (helpfulness and harmlessness separately, as the paper's figures)."""
    rows, answers = {}, {}
    ps = [p for p in prompts for _ in range(n_samples)]
    for d in dirs:
        model, tok = load_policy(d)
        answers[d], eos = sample(model, tok, ps, max_new_tokens=max_new_tokens, seed=seed)
        rows[d] = gold_eval(ps, answers[d])
        rows[d]["eos_rate"] = sum(eos) / len(eos)
    wins_h, wins_s = [], []
    for i, p in enumerate(ps):
        for a in dirs:
            for b in dirs:
                if a < b:
                    ha, hb = (toy.helpfulness(p, answers[x][i]) for x in (a, b))
                    ca, cb = (sum(toy.cost(p, answers[x][i]).values()) for x in (a, b))
                    if ha != hb:
                        wins_h.append((a, b) if ha > hb else (b, a))
                    if ca != cb:
                        wins_s.append((a, b) if ca < cb else (b, a))
    for name, wins in (("elo_helpfulness", wins_h), ("elo_harmlessness", wins_s)):
        for d, r in elo(wins).items():
            rows[d][name] = r
    return rows


def plot_runs(dirs, path):
    """Training curves from each run's metrics.jsonl: gold unsafe rate and helpfulness at the
    evaluation points, λ against the windowed cost and its threshold, reward and KL."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    ax_l, ax_c = axes[1, 0], None  # λ on the left axis, the cost on one twin made on first use
    thresholds, opt = {}, None  # run -> (d, colour)
    runs = [d for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    for d in runs:
        recs = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))
                if line.strip()]
        train = [r for r in recs if "reward" in r]
        gold = [r for r in recs if "gold_unsafe_rate_harmful" in r and not r.get("final")]
        opt = next((r["gold_optimum_helpfulness"] for r in recs
                    if "gold_optimum_helpfulness" in r), opt)
        if not train:  # e.g. SFT: no PPO curves
            continue
        name = os.path.basename(d.rstrip("/"))
        color = f"C{len(axes[1, 1].lines)}"  # one colour per run, the same in every panel
        gold_steps, train_steps = [r["step"] for r in gold], [r["step"] for r in train]
        axes[0, 0].plot(gold_steps, [r["gold_unsafe_rate_harmful"] for r in gold], "o-",
                        color=color, label=name)
        axes[0, 1].plot(gold_steps, [r["gold_helpfulness"] for r in gold], "o-", color=color,
                        label=name)
        axes[1, 1].plot(train_steps, [r["reward"] for r in train], color=color, lw=0.8,
                        label=f"{name} reward")
        if "lambda_0" in train[0]:
            ax_c = ax_c or ax_l.twinx()  # twinx per run would stack axes and repeat the legend
            ax_l.plot(train_steps, [r["lambda_0"] for r in train], color=color, lw=1.6,
                      label=f"λ {name}")
            ax_c.plot(train_steps, [r["episode_cost_window_0"] for r in train], color=color,
                      lw=0.6, alpha=0.7, label=f"J_c {name}")
            thresholds[name] = (train[0]["threshold_0"], color)
    if len({t for t, _ in thresholds.values()}) == 1:  # one d for all: one gray line
        ax_c.axhline(next(iter(thresholds.values()))[0], color="gray", ls="--", lw=0.8,
                     label="threshold d")
    else:  # calibrated per run (--target_unsafe_rate): each run's d in its colour
        for name, (t, color) in thresholds.items():
            ax_c.axhline(t, color=color, ls="--", lw=0.8, label=f"d {name}")
    if opt is not None:
        axes[0, 1].axhline(opt, color="gray", ls="--", lw=0.8, label="optimum")
    titles = ["gold unsafe rate, harmful prompts", "gold helpfulness, all prompts",
              "λ (thick, left) and windowed cost J_c (thin, right)", "reward-model score"]
    for ax, t in zip(axes.flat, titles):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("iteration")
    for ax in (axes[0, 0], axes[0, 1], axes[1, 1]):
        if ax.lines:
            ax.legend(fontsize=8)
    if ax_c is not None:
        ax_l.set_ylabel("λ")
        ax_c.set_ylabel("cost model score")
        ax_l.legend(loc="upper left", fontsize=8)
        ax_c.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def toy_prompts(path) -> list:
    """A prompts file's prompts: toy-world requests the gold oracle can judge, else one error."""
    prompts = [r["prompt"] for r in data.load_prompts(path)]
    outside = [p for p in prompts if not toy.in_world(p)]
    if outside:
        raise data.DataError(f"{path}: {len(outside)} of {len(prompts)} prompts are not toy-world "
                             f"requests the gold oracle can judge, e.g. {outside[0]!r}")
    return prompts


def check_args(args):
    """Counts no run can mean, refused before anything loads: one line naming the flag."""
    for flag in ("n_samples", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise config.ConfigError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.compare is not None and not args.compare:
        raise config.ConfigError("--compare needs at least one policy folder")


def check_runs(dirs):
    """Every --compare folder a policy checkpoint, before the first one is sampled (minutes):
    a typo'd run is an error, not a row that quietly goes missing from the table."""
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:  # all of them at once: after `make demo` alone, the baselines are all missing
        raise CheckpointError(f"{', '.join(missing)}: no such run folder (--compare)")
    for d in dirs:
        if dirs.count(d) > 1:
            raise CheckpointError(f"{d}: named twice in --compare")
        if not os.path.exists(os.path.join(d, "config.json")):
            raise CheckpointError(f"{d}: not a checkpoint folder, no config.json (--compare)")
        if checkpoint_kind(d) != "policy":
            raise CheckpointError(f"{d}: a {checkpoint_kind(d)} model, not a policy (--compare)")


def main(args):
    check_args(args)
    if args.compare:
        check_runs(args.compare)
    prompts = toy_prompts(args.eval_data)  # every mode here is judged by the toy world's oracle
    if args.compare:
        rows = compare(args.compare, prompts, args.n_samples, args.max_new_tokens, args.seed)
        print(summary_table(rows))
        out = args.out or "results.json"
        write_json(out, rows)
        if args.plot:
            try:
                plot_runs(args.compare, args.plot)
                print(f"wrote {args.plot}")
            except ImportError:
                print("no matplotlib: skipping the plot (pip install matplotlib)")
    else:
        model, tok = load_policy(args.model)
        res = gold_evaluate(model, tok, prompts, n_samples=args.n_samples,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(json.dumps(res, indent=1))
        out = args.out or os.path.join(args.model, "gold_eval.json")
        write_json(out, res)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Gold evaluation of policies on the toy world's "
                                             "held-out prompts.")
    ap.add_argument("--model", default="out/ppo_lag", help="policy folder")
    ap.add_argument("--compare", nargs="*", default=None,
                    help="several policy folders: one table, Elo, and curves")
    ap.add_argument("--plot", default=None,
                    help="with --compare: write the training curves here (needs matplotlib)")
    ap.add_argument("--eval_data", default="data/toy/prompts_test.jsonl",
                    help="prompts file (toy world)")
    ap.add_argument("--n_samples", type=int, default=4, help="samples per prompt (temperature 1)")
    ap.add_argument("--max_new_tokens", type=int, default=24, help="answer length limit in tokens")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", default=None, help="write the JSON here "
                    "(default: MODEL/gold_eval.json; results.json with --compare)")
    args = ap.parse_args()
    try:
        main(args)
    except config.ConfigError as e:  # a bad flag: one line and argparse's exit code
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

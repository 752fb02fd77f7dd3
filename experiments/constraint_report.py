"""
The constraint experiments of docs/constraints.md, read from the runs' folders: the K = 5
per-category run against the single cost model, the banned-word rule, and the probe (frozen,
refreshed) against the cost model. Writes docs/constraints.json and the two figures; the runs are
in experiments/constraints.sh. From the repository root:

    python -m experiments.constraint_report [--out docs]
"""

import argparse
import json
import os

import torch

from nanosafe import data, toy
from nanosafe.evaluate import sample
from nanosafe.model import load_policy, read_state
from nanosafe.probe import LinearProbe, hidden_features

GOLD = ["gold_helpfulness", "gold_helpfulness_benign", "gold_helpfulness_harmful",
        "gold_unsafe_rate_harmful", "gold_unsafe_rate_benign"]


def records(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]
    return ([r for r in rows if not r.get("final") and "reward" in r],
            next(r for r in rows if r.get("final")))


def per_bin(train, key, width=25):
    out = []
    for lo in range(0, len(train), width):
        xs = [r[key] for r in train[lo:lo + width] if key in r]
        out.append(sum(xs) / len(xs))
    return out


def k_report(run, single):
    train, final = records(run)
    names = read_state(run)["constraints"]
    K = len(names)
    rises_when_over = sum((train[i][f"lambda_{k}"] - (train[i - 1][f"lambda_{k}"] if i else 1.0))
                          * (train[i][f"episode_cost_window_{k}"] - train[i][f"threshold_{k}"]) >= 0
                          for i in range(len(train)) for k in range(K))
    out = {"run": run, "final": {k: final[k] for k in GOLD},
           "single": {k: records(single)[1][k] for k in GOLD}, "per_category": {},
           "lambda_step_agrees_with_its_own_cost": f"{rises_when_over} of {len(train) * K}"}
    for k, c in enumerate(names):
        over = [r[f"episode_cost_window_{k}"] > r[f"threshold_{k}"] for r in train]
        lam = [r[f"lambda_{k}"] for r in train]
        out["per_category"][c] = {"gold_unsafe_rate_own_prompts": final[f"gold_unsafe_rate_{c}"],
                                  "threshold": train[0][f"threshold_{k}"],
                                  "iterations_over_d": sum(over), "lambda_max": max(lam),
                                  "lambda_max_at": lam.index(max(lam)), "lambda_end": lam[-1]}
    return out, train, names


def k_figure(train, names, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), sharey=True)
    steps = [r["step"] for r in train]
    for k, (ax, c) in enumerate(zip(axes, names)):
        ax.plot(steps, [r[f"lambda_{k}"] for r in train], "k-", label="λ_k")
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("iteration")
        ax2 = ax.twinx()
        ax2.plot(steps, [r[f"episode_cost_window_{k}"] for r in train], "r-", lw=0.8,
                 label="windowed cost J_k")
        ax2.axhline(train[0][f"threshold_{k}"], color="r", ls="--", lw=0.8, label="d_k")
        ax2.tick_params(labelsize=7)
        if k == 0:
            ax.set_ylabel("λ_k")
            ax.legend(loc="upper left", fontsize=7)
            ax2.legend(loc="lower right", fontsize=7)
    fig.suptitle("K = 5 per-category constraints: each λ_k beside its own category's windowed cost",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def held_out_answers(run, prompts, n_samples=4):
    policy, tok = load_policy(run)
    policy.eval()
    ps = [p for p in prompts for _ in range(n_samples)]
    answers, _ = sample(policy, tok, ps, max_new_tokens=24, seed=10**6)
    return policy, tok, ps, answers


def rule_report(run, prompts, words):
    train, final = records(run)
    names = read_state(run)["constraints"]
    k = names.index("banned_words")
    _, _, ps, answers = held_out_answers(run, prompts)
    said = [bool(set(words) & set(a.split())) for a in answers]
    start = sum(r[f"cost_{k}"] for r in train[:10]) / 10
    return {"run": run, "threshold": train[0][f"threshold_{k}"], "rollout_cost_first_10": start,
            "rollout_cost_last_25": sum(r[f"cost_{k}"] for r in train[-25:]) / 25,
            "window_end": train[-1][f"episode_cost_window_{k}"],
            "held_out_fraction_saying_them": sum(said) / len(said), "n_held_out": len(said),
            "lambda_end": train[-1][f"lambda_{k}"],
            "lambda_max": max(r[f"lambda_{k}"] for r in train),
            "final": {x: final[x] for x in GOLD}}


def probe_report(runs, prompts, probe_dir):
    """Per run: gold unsafe vs flagged (by its own constraint) on training rollouts per 25
    iterations; and on held-out answers of the final policy: gold unsafe, the starting probe's
    verdict, the refreshed probe's."""
    out = {}
    start_probe = LinearProbe.load(probe_dir)
    for label, run in runs.items():
        train, final = records(run)
        flag_key = next(k for k in train[-1] if k.startswith("rollout_flagged_harmful_"))
        policy, tok, ps, answers = held_out_answers(run, prompts)
        harmful = torch.tensor([toy.is_harmful(p) for p in ps])
        gold = torch.tensor([not toy.is_safe(p, a) for p, a in zip(ps, answers)])
        f = hidden_features(policy, tok, ps, answers, start_probe.layer)
        n_gold = max(1, gold[harmful].sum().item())
        row = {"run": run, "flagged_by": flag_key.removeprefix("rollout_flagged_harmful_"),
               "rollout_gold_unsafe_harmful_per_25": per_bin(train, "rollout_gold_unsafe_harmful"),
               "rollout_flagged_harmful_per_25": per_bin(train, flag_key),
               "held_out_gold_unsafe_harmful": gold[harmful].float().mean().item(),
               "held_out_start_probe_flags_harmful":
                   (start_probe(f) > 0)[harmful].float().mean().item(),
               "held_out_start_probe_recall":
                   ((start_probe(f) > 0) & gold)[harmful].sum().item() / n_gold,
               "final": {x: final[x] for x in GOLD}}
        refreshed = os.path.join(run, "constraint_0")
        if os.path.exists(os.path.join(refreshed, "probe.json")):
            q = LinearProbe.load(refreshed)
            flags = q(f) > 0
            row["held_out_refreshed_probe_flags_harmful"] = flags[harmful].float().mean().item()
            row["held_out_refreshed_probe_recall"] = (flags & gold)[harmful].sum().item() / n_gold
        out[label] = row
    return out


def probe_figure(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res), figsize=(4.0 * len(res), 3.0), sharey=True)
    for ax, (label, r) in zip(axes, res.items()):
        x = [25 * i + 12 for i in range(len(r["rollout_gold_unsafe_harmful_per_25"]))]
        ax.plot(x, r["rollout_gold_unsafe_harmful_per_25"], "k-o", ms=3, label="gold unsafe")
        ax.plot(x, r["rollout_flagged_harmful_per_25"], "r--s", ms=3,
                label=f"unsafe by the {r['flagged_by']} constraint")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training answers to harmful prompts")
    fig.suptitle("Does the policy become safe, or only look safe to its constraint?", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(prog="python -m experiments.constraint_report",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs", help="where constraints.json and the figures go")
    ap.add_argument("--runs", default="out", help="the runs' parent folder")
    ap.add_argument("--single", default="out/ppo_lag_t1",
                    help="the single-cost-model run at the same budget and threads")
    ap.add_argument("--banned_words", nargs="*", default=["police", "hotline"],
                    help="the rule run's words")
    a = ap.parse_args()

    def run(name):
        return os.path.join(a.runs, name)

    prompts = [r["prompt"] for r in data.load_prompts("data/toy/prompts_test.jsonl")]
    report = {}
    report["k5"], train, names = k_report(run("k5"), a.single)
    k_figure(train, names, os.path.join(a.out, "constraints_k5.png"))
    if os.path.isdir(run("k5_seed1")) and os.path.isdir(a.single + "_seed1"):
        report["k5_seed1"] = k_report(run("k5_seed1"), a.single + "_seed1")[0]
    report["rule"] = rule_report(run("rule"), prompts, a.banned_words)
    report["probe"] = probe_report({"cost model (the default)": a.single,
                                    "frozen probe": run("probe_frozen"),
                                    "probe refreshed every 25 iterations": run("probe_refresh")},
                                   prompts, run("probe"))
    probe_figure(report["probe"], os.path.join(a.out, "constraints_probe.png"))
    with open(os.path.join(a.out, "constraints.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

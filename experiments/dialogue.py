"""
Safety over a whole dialogue (issue 32): the toy world's scripted dialogues (nanosafe/dialogue.py),
the single-turn PPO-Lag policy on them, and PPO-Lag trained on dialogues under each constraint
form, beside reward-only PPO. From the repository root, after `make demo`:

    python -m experiments.dialogue                 # every stage; results in docs/dialogue/
    python -m experiments.dialogue --stages drift  # one stage again (each skips what is done)

Stages (runs in out/experiments/dialogue/, each resumable):
    data    nanosafe.dialogue's files: SFT turns, pairs labelled in context, dialogue specs
    drift   (a) make demo's single-turn PPO-Lag (out/ppo_lag) on the held-out escalating, split
            and benign dialogues, beside its single-turn unsafe rate on the same harmful topics
    sft     the demo's SFT model (out/sft) fine-tuned on the dialogues' SFT turns
    pm      a reward and a cost model on the dialogue pairs, side by side
    rl      (b) PPO-Lag on dialogues, --dialogue_constraint any and sum at the same budget, and
            (c) reward-only PPO, --seeds each, --jobs side by side
    report  docs/dialogue/results.json, results.md and dialogue.png: the gold unsafe rate by turn,
            the first unsafe turn, the share ever unsafe, helpfulness per turn on benign
            dialogues, λ over training

The gold oracles only judge; training sees the learned reward and cost models. The scripted user
is the environment.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

from experiments.real import done
from experiments.run import ROOT, mean_std, read_run, run_jobs

RUNS = {"ppo_lag_any": ["--dialogue_constraint", "any"],
        "ppo_lag_sum": ["--dialogue_constraint", "sum"],
        "ppo": ["--algo", "ppo"]}
NAMES = {"ppo_lag_any": "PPO-Lag, any turn", "ppo_lag_sum": "PPO-Lag, sum over turns",
         "ppo": "PPO (reward only)", "single_turn": "single-turn PPO-Lag (make demo)",
         "dialogue_sft": "dialogue SFT"}


def script(name, *args, log):
    """A stage script in a subprocess, its output in `log`; a failure stops with the log's tail."""
    cmd = [sys.executable, os.path.join(ROOT, name), *map(str, args)]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        sys.exit(f"error: {name} failed (log {log}):\n{open(log).read()[-2000:]}")


def stage_data(a):
    from nanosafe import dialogue
    if not os.path.exists(os.path.join(a.data, "dialogue_world.json")):
        dialogue.write_dataset(a.data, seed=0)


def on_dialogues(a, folder, samples):
    """A policy folder judged on the held-out dialogues (seed 1, --threads) -> (model, tok, the
    gold_evaluate_dialogues keys, the held-out records)."""
    import torch

    from nanosafe.data import load_prompts
    from nanosafe.evaluate import gold_evaluate_dialogues
    from nanosafe.model import load_policy
    torch.set_num_threads(a.threads)
    specs = load_prompts(os.path.join(a.data, "prompts_test.jsonl"))
    model, tok = load_policy(folder)
    gold = gold_evaluate_dialogues(model, tok, specs, samples, a.max_new_tokens, seed=1)
    return model, tok, gold, specs


def start_eval(a):
    """The dialogue SFT model, where (b) and (c) start, on the held-out dialogues."""
    path = os.path.join(a.out, "start.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(on_dialogues(a, a.sft, a.samples)[2], f, indent=1)
    return json.load(open(path))


def stage_drift(a):
    """(a): the single-turn policy on dialogues; the demo's SFT model too, for reference."""
    from nanosafe import toy
    from nanosafe.evaluate import gold_evaluate
    path = os.path.join(a.out, "drift.json")
    if os.path.exists(path):
        return
    out = {}
    for name, folder in (("single_turn", a.single_turn), ("start_sft", a.start_sft)):
        model, tok, d, specs = on_dialogues(a, folder, a.drift_samples)
        topics = {r["dialogue"]["topic"] for r in specs if r["dialogue"]["kind"] != "benign"}
        single = [p for p, t in toy.split_prompts(0)[1] if t in topics]  # same topics, one turn
        s = gold_evaluate(model, tok, single, n_samples=a.drift_samples,
                          max_new_tokens=a.max_new_tokens, seed=1)
        out[name] = {"folder": folder, "dialogues": d, "single_turn_unsafe_harmful":
                     s["gold_unsafe_rate_harmful"], "single_turn_prompts": len(single),
                     "samples": a.drift_samples}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def stage_sft(a):
    if not done(a.sft):
        script("train_sft.py", "--model", a.start_sft, "--train_data",
               os.path.join(a.data, "sft_train.jsonl"), "--out_dir", a.sft, "--max_steps",
               a.sft_steps, "--max_length", a.max_length, "--eval_every", 0, "--gold_samples", 0,
               "--threads", a.threads * a.jobs, "--seed", 0, "--overwrite",
               log=os.path.join(a.out, "sft.log"))


def stage_pm(a):
    procs = []
    for kind in ("reward", "cost"):
        out = os.path.join(a.out, kind[0] + "m")
        if done(out):
            continue
        cmd = [sys.executable, os.path.join(ROOT, "train_pm.py"), "--kind", kind, "--model", a.sft,
               "--train_data", os.path.join(a.data, "pref_train.jsonl"), "--eval_data",
               os.path.join(a.data, "pref_test.jsonl"), "--out_dir", out, "--max_length",
               str(a.max_length), "--threads", str(a.threads), "--overwrite"]
        log = open(os.path.join(a.out, f"{kind}.log"), "w")
        procs.append((kind, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    for kind, p in procs:
        if p.wait():
            sys.exit(f"error: train_pm.py --kind {kind} failed (log {a.out}/{kind}.log)")


def rl_jobs(a):
    jobs = []
    for seed in a.seeds:
        for name, flags in RUNS.items():
            jobs.append((os.path.join(a.out, f"{name}_s{seed}"),
                         ["train_ppo_lag.py", "--model", a.sft, "--reward_model",
                          os.path.join(a.out, "rm"), "--cost_models", os.path.join(a.out, "cm"),
                          "--train_data", os.path.join(a.data, "prompts_train.jsonl"),
                          "--eval_data", os.path.join(a.data, "prompts_test.jsonl"),
                          "--max_steps", str(a.steps), "--max_new_tokens", str(a.max_new_tokens),
                          "--rollout_batch_size", str(a.rollouts), "--minibatch_size",
                          str(a.rollouts // 2), "--micro_batch_size", str(a.rollouts // 2),
                          "--target_unsafe_rate", str(a.budget), "--max_prompt_length", "64",
                          "--eval_every", str(a.eval_every), "--final_eval_samples",
                          str(a.samples), "--show_every", "0", "--seed", str(seed),
                          "--overwrite", *flags]))
    return jobs


def stage_rl(a):
    run_jobs(rl_jobs(a), a.jobs, a.threads)

# -----------------------------------------------------------------------------
# the report


def kinds_row(d):
    """The per-kind gold numbers of one evaluation (gold_evaluate_dialogues' 'dialogues')."""
    return {k: {"unsafe_by_turn": v["unsafe_by_turn"], "ever_unsafe": v["ever_unsafe"],
                "first_unsafe_turn": v["first_unsafe_turn"],
                "helpfulness_by_turn": v["helpfulness_by_turn"],
                "helpfulness": sum(v["helpfulness_by_turn"]) / len(v["helpfulness_by_turn"])}
            for k, v in d.items()}


def over(rows, f):
    """mean ± std over seeds of f(row), nan-safe."""
    xs = [f(r) for r in rows]
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return mean_std(xs) if xs else (math.nan, 0.0)


def pct(ms):
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}%"


def stage_report(a):
    drift = json.load(open(os.path.join(a.out, "drift.json")))
    result = {"drift": {}, "runs": {}, "settings": {k: v for k, v in vars(a).items()
                                                     if k != "stages"}}
    lines = ["# Safety over a whole dialogue: results", "",
             f"Generated by `python -m experiments.dialogue` ({len(a.seeds)} seeds, {a.steps} "
             f"iterations of {a.rollouts} dialogues, budget X = {a.budget:.0%}, {a.samples} "
             f"samples per held-out dialogue). Gold oracles: nanosafe/dialogue.py.", "",
             "## (a) The drift: single-turn policies on dialogues", "",
             "| policy | single-turn unsafe, same harmful topics | escalating: unsafe by turn | "
             "final turn / single turn | split: unsafe by turn | benign: unsafe ever | "
             "benign: helpfulness by turn |", "|---|---|---|---|---|---|---|"]
    for name, d in drift.items():
        k = kinds_row(d["dialogues"]["dialogues"])
        st = d["single_turn_unsafe_harmful"]
        esc = k["escalating"]["unsafe_by_turn"]
        ratio = esc[-1] / st if st else math.inf
        result["drift"][name] = {"single_turn_unsafe_harmful": st, "kinds": k,
                                 "final_turn_over_single_turn": ratio}
        label = NAMES.get(name, "the SFT model (make demo)")
        lines.append(f"| {label} | {st:.1%} | {' / '.join(f'{x:.1%}' for x in esc)} | "
                     f"{ratio:.2f}x | "
                     f"{' / '.join(f'{x:.1%}' for x in k['split']['unsafe_by_turn'])} | "
                     f"{k['benign']['ever_unsafe']:.1%} | "
                     f"{' / '.join(f'{x:.3f}' for x in k['benign']['helpfulness_by_turn'])} |")
    runs = {}
    for name in RUNS:
        rs = []
        for seed in a.seeds:
            d = os.path.join(a.out, f"{name}_s{seed}")
            if os.path.exists(os.path.join(d, "done.json")):
                rs.append(read_run(d))
        if rs:
            runs[name] = rs
    lines += ["", "## (b, c) Trained on dialogues (mean ± std over seeds)", "",
              "| run | ever unsafe, escalating | ever unsafe, split | ever unsafe, both "
              "(each seed) | unsafe turns, both | first unsafe turn | benign helpfulness | "
              "/ PPO's | λ at the end | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    runs = {"dialogue_sft": [{"final": start_eval(a), "lambdas": [], "wall_s": 0.0,
                              "metrics": []}], **runs}
    ppo_help = None
    if "ppo" in runs:
        ppo_help = over(runs["ppo"], lambda r: kinds_row(r["final"]["dialogues"])["benign"]
                        ["helpfulness"])[0]
    for name, rs in runs.items():
        ks = [kinds_row(r["final"]["dialogues"]) for r in rs]

        def both(k, key):
            return (k["escalating"][key] + k["split"][key]) / 2  # equal counts of each kind

        def turns(k):
            u = k["escalating"]["unsafe_by_turn"] + k["split"]["unsafe_by_turn"]
            return sum(u) / len(u)
        row = {
            "seeds": len(rs),
            "ever_unsafe_escalating": over(ks, lambda k: k["escalating"]["ever_unsafe"]),
            "ever_unsafe_split": over(ks, lambda k: k["split"]["ever_unsafe"]),
            "ever_unsafe_both": over(ks, lambda k: both(k, "ever_unsafe")),
            "ever_unsafe_both_per_seed": [both(k, "ever_unsafe") for k in ks],
            "unsafe_turns_both": over(ks, turns),
            "first_unsafe_turn": over(ks, lambda k: both(k, "first_unsafe_turn")),
            "benign_helpfulness": over(ks, lambda k: k["benign"]["helpfulness"]),
            "benign_helpfulness_by_turn": [over(ks, lambda k, t=t: k["benign"]
                                                ["helpfulness_by_turn"][t]) for t in range(3)],
            "unsafe_by_turn_escalating": [over(ks, lambda k, t=t: k["escalating"]
                                               ["unsafe_by_turn"][t]) for t in range(3)],
            "unsafe_by_turn_split": [over(ks, lambda k, t=t: k["split"]["unsafe_by_turn"][t])
                                     for t in range(3)],
            "lambda_end": over(rs, lambda r: r["lambdas"][0] if r["lambdas"] else math.nan),
            "minutes": over(rs, lambda r: r["wall_s"] / 60),
        }
        result["runs"][name] = row
        rel = (f"{row['benign_helpfulness'][0] / ppo_help:.2f}" if ppo_help else "")
        lam = row["lambda_end"]
        seeds = ", ".join(f"{100 * x:.1f}" for x in row["ever_unsafe_both_per_seed"])
        minutes = f"{row['minutes'][0]:.1f}" if name != "dialogue_sft" else ""
        lines.append(f"| {NAMES[name]} | {pct(row['ever_unsafe_escalating'])} | "
                     f"{pct(row['ever_unsafe_split'])} | {pct(row['ever_unsafe_both'])} "
                     f"({seeds}) | "
                     f"{pct(row['unsafe_turns_both'])} | {row['first_unsafe_turn'][0]:.2f} | "
                     f"{row['benign_helpfulness'][0]:.3f} ± {row['benign_helpfulness'][1]:.3f} | "
                     f"{rel} | {'' if math.isnan(lam[0]) else f'{lam[0]:.2f} ± {lam[1]:.2f}'} | "
                     f"{minutes} |")
    os.makedirs(a.docs, exist_ok=True)
    with open(os.path.join(a.docs, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.docs, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(a, runs, os.path.join(a.docs, "dialogue.png"))


def plot(a, runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no figure")
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    colour = {"ppo_lag_any": "C0", "ppo_lag_sum": "C1", "ppo": "C2"}
    for name, rs in runs.items():
        if name not in RUNS:
            continue
        for i, r in enumerate(rs):
            ev = [m for m in r["metrics"] if "gold_unsafe_rate_harmful" in m]
            ev += [dict(r["final"], step=a.steps)]  # the end: --samples per dialogue
            ax3.plot([m["step"] for m in ev], [m["gold_unsafe_rate_harmful"] for m in ev], "o-",
                     color=colour[name], alpha=0.7, label=NAMES[name] if i == 0 else None)
            steps = [m["step"] for m in r["metrics"] if "lambda_0" in m]
            if name != "ppo":
                lam = [m["lambda_0"] for m in r["metrics"] if "lambda_0" in m]
                ax1.plot(steps, lam, color="C0" if name.endswith("any") else "C1", alpha=0.7,
                         label=NAMES[name] if i == 0 else None)
            cost = [m["episode_cost_window_0"] for m in r["metrics"]
                    if "episode_cost_window_0" in m]
            if cost and name != "ppo":
                ax2.plot(steps[:len(cost)], cost, color="C0" if name.endswith("any") else "C1",
                         alpha=0.7, label=NAMES[name] if i == 0 else None)
    ax2.axhline(a.budget, color="k", ls="--", lw=1, label=f"d = {a.budget:.0%}")
    ax3.axhline(a.budget, color="k", ls="--", lw=1, label=f"X = {a.budget:.0%}")
    ax3.set(xlabel="iteration", ylabel="gold: harmful dialogues ever unsafe", yscale="log",
            title="the oracle, held out (1 sample each; the end: 4)")
    ax1.set(xlabel="iteration", ylabel="λ", title="the multiplier")
    ax2.set(xlabel="iteration", ylabel="windowed episode cost (rate scale)",
            title="what the constraint sees")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


STAGES = ["data", "drift", "sft", "pm", "rl", "report"]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.dialogue", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="which to run")
    ap.add_argument("--out", default="out/experiments/dialogue", help="runs, models and logs")
    ap.add_argument("--docs", default="docs/dialogue", help="results.json / .md, dialogue.png")
    ap.add_argument("--single_turn", default="out/ppo_lag", help="(a): the single-turn PPO-Lag "
                    "policy (make demo)")
    ap.add_argument("--start_sft", default="out/sft", help="the SFT model the dialogue SFT "
                    "starts from (make demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per run")
    ap.add_argument("--steps", type=int, default=150, help="PPO iterations per run")
    ap.add_argument("--rollouts", type=int, default=64, help="dialogues per iteration")
    ap.add_argument("--budget", type=float, default=0.05, help="X: --target_unsafe_rate")
    ap.add_argument("--max_new_tokens", type=int, default=16, help="tokens per assistant turn")
    ap.add_argument("--max_length", type=int, default=160, help="SFT / pair token limit")
    ap.add_argument("--sft_steps", type=int, default=600, help="dialogue SFT steps")
    ap.add_argument("--samples", type=int, default=4, help="samples per held-out dialogue")
    ap.add_argument("--drift_samples", type=int, default=16, help="(a): samples per held-out "
                    "dialogue and per single-turn prompt")
    ap.add_argument("--eval_every", type=int, default=50, help="gold evaluation during training")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    a = ap.parse_args(argv)
    a.data = os.path.join(a.out, "data")
    a.sft = os.path.join(a.out, "sft")
    os.makedirs(a.out, exist_ok=True)
    for path in (a.single_turn, a.start_sft):
        if not os.path.isdir(path):
            sys.exit(f"error: {path}: no such folder; run `make demo` first")
    times_path = os.path.join(a.out, "stage_times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for s in a.stages:
        print(f"{s}: running", flush=True)
        t = time.time()
        globals()[f"stage_{s}"](a)
        times[s] = times.get(s, 0.0) + round(time.time() - t, 1)
        with open(times_path, "w") as f:
            json.dump(times, f, indent=1)
        print(f"{s}: {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""
The paper's experiments on the toy world, each one command; results and times in
docs/experiments.md. From the repository root:

    python -m experiments.run sweep    # PPO-Lag, PPO, reward shaping ν ∈ {0.01 .. 10}, 3 seeds:
                                       #   table + Pareto plot
    python -m experiments.run tune     # the multiplier, β and the actor lr chosen on the validation
                                       #   prompts
    python -m experiments.run budget   # --target_unsafe_rate 1/5/10/20 %, PID and the log-λ step,
                                       #   3 seeds, 350 iterations: asked against reached, λ's band
    python -m experiments.run compare  # the README's table: SFT, PPO, reward shaping, PPO-Lag and
                                       #   PPO-Lag on the gold oracles (upper bound), 3 seeds
    python -m experiments.run upper    # the gold upper bound at 10% too, beside the learned runs
    python -m experiments.run offline  # DPO, SafeDPO, MoCAN beside compare's runs, 3 seeds:
                                       #   table, Pareto figure, minutes, MoCAN's λ*
    python -m experiments.run agreement  # reward and cost models against the gold order: 10x
                                       #   held-out pairs and on-policy, 95% intervals
    python -m experiments.run sign     # the cost model without its sign term, at the official d = 0
    python -m experiments.run divisor  # PPO-Lag at 1% on the raw scale with matched gains: only
                                       #   the actor's 1 + λ divisor differs from the rate scale
    python -m experiments.run grpo     # Lagrangian GRPO against PPO-Lag at the same wall-clock
    python -m experiments.run rounds   # three rounds of Safe RLHF: sample, label with the oracles,
                                       #   retrain, PPO-Lag; Elo

Every run is `train_ppo_lag.py` (or `train_pm.py`) in a subprocess, --jobs at a time with --threads
each, in out/experiments/<experiment>/<run>/ with its log; a run with a summary is not run again, so
an interrupted experiment goes on where it stopped. The runs take out/sft, out/rm, out/cm (make
demo). budget, tune and compare run the demo's 350 iterations; the others a shorter budget (--steps
150) that keeps the sweep's 27 runs within 90 minutes on 2 CPU cores; every run of an experiment has
the same budget. The gold oracles only
judge the results, except in `rounds`, where they are the labellers of the new pairs (as people are
in the paper).
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

from nanosafe import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the stage scripts are here

NUS = [0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0]
BUDGETS = [0.01, 0.05, 0.10, 0.20]
PID_GAINS = ["--multiplier", "pid"]  # at train_ppo_lag.py's gains (chosen by `tune`)
TUNE_PID = [("5", "0.1", "10")]  # (kp, ki, kd) tried on the validation prompts
TUNE_PPO = {"kl_coef": ["0.05", "0.2"], "actor_lr": ["1.5e-4", "6e-4"]}  # ½ and 2x the defaults

# -----------------------------------------------------------------------------
# running: subprocesses, --jobs at a time, skipped when done


def run_jobs(jobs, n_jobs, threads):
    """jobs: [(out_dir, argv)] -> runs those without out_dir/done.json, n_jobs at a time; each one's
    stdout + stderr in out_dir/log.txt, its wall time in out_dir/done.json. A failed run is reported
    (with its log's last line) after the others finish. argv[0] is a stage script of the repository
    root, by name: it runs from there whatever the working folder (the paths stay the caller's)."""
    todo = [(d, a) for d, a in jobs if not os.path.exists(os.path.join(d, "done.json"))]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; running {len(todo)}, "
          f"{n_jobs} at a time, {threads} thread(s) each", flush=True)
    running, failed, t_start = [], [], time.time()
    while todo or running:
        while todo and len(running) < n_jobs:
            d, argv = todo.pop(0)
            os.makedirs(d, exist_ok=True)
            # a killed run goes on
            resume = ["--resume"] if os.path.exists(os.path.join(d, "trainer_state.pt")) else []
            log = open(os.path.join(d, "log.txt"), "a")
            cmd = [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:], "--out_dir", d,
                   "--threads", str(threads), *resume]
            log.write(" ".join(cmd) + "\n")
            log.flush()
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            running.append((p, d, log, time.time()))
        time.sleep(0.5)
        for job in list(running):
            p, d, log, t0 = job
            if p.poll() is None:
                continue
            running.remove(job)
            log.close()
            if p.returncode:
                last = _last_line(os.path.join(d, "log.txt"))
                failed.append(f"{d} (exit {p.returncode}): {last}")
                continue
            with open(os.path.join(d, "done.json"), "w") as f:
                json.dump({"wall_s": time.time() - t0, "parallel_jobs": n_jobs,
                           "threads": threads}, f)
            print(f"  done {d} in {time.time() - t0:.0f} s "
                  f"({(time.time() - t_start) / 60:.1f} min so far)", flush=True)
    if failed:
        sys.exit("failed runs (their logs are in their folders):\n  " + "\n  ".join(failed))


def _last_line(path):
    with open(path) as f:
        lines = [ln.strip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def ppo_argv(args, *flags):
    """train_ppo_lag.py with the experiment's shared budget."""
    return ["train_ppo_lag.py", "--max_steps", str(args.steps), "--show_every", "0",
            "--model", args.sft, "--reward_model", args.rm, "--cost_models", args.cm, *flags]


def read_run(d):
    """A finished run: its summary (final gold numbers, λ), metrics per iteration, wall time."""
    with open(os.path.join(d, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(d, "metrics.jsonl")) as f:
        metrics = [json.loads(ln) for ln in f if ln.strip()]
    with open(os.path.join(d, "done.json")) as f:
        wall = json.load(f)["wall_s"]
    return {"final": summary["final"], "lambdas": summary.get("lambdas", []),
            "metrics": [m for m in metrics if not m.get("final")], "wall_s": wall}


def mean_std(xs):
    """(mean, sample std) over seeds."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def over_seeds(runs, key):
    return mean_std([r["final"][key] for r in runs])


def fmt(ms, pct=False):
    m, s = ms
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if pct else f"{m:.3f} ± {s:.3f}"


def write(args, name, result, table):
    """out/experiments/<name>.json and .md (the table docs/experiments.md quotes)."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {args.out}/{name}.json and .md")

# -----------------------------------------------------------------------------
# the reward-shaping sweep and its Pareto picture


def sweep(args):
    configs = {"ppo_lag": ["--algo", "ppo_lag"], "ppo": ["--algo", "ppo"]}
    configs |= {f"shaping_{nu:g}": ["--algo", "reward_shaping", "--shaping_coef", str(nu)]
                for nu in NUS}
    root = os.path.join(args.out, "sweep")
    jobs = [(os.path.join(root, n, f"seed{s}"), ppo_argv(args, *f, "--seed", str(s)))
            for s in args.seeds for n, f in configs.items()]
    run_jobs(jobs, args.jobs, args.threads)
    rows = {}
    for n in configs:
        runs = [read_run(os.path.join(root, n, f"seed{s}")) for s in args.seeds]
        rows[n] = {k: over_seeds(runs, k) for k in ("gold_helpfulness", "gold_unsafe_rate_harmful",
                                                    "gold_unsafe_rate", "gold_helpfulness_benign")}
        rows[n]["per_seed"] = {k: [r["final"][k] for r in runs]
                               for k in ("gold_helpfulness", "gold_unsafe_rate_harmful")}
        rows[n]["wall_s"] = sum(r["wall_s"] for r in runs) / len(runs)
        rows[n]["optimum"] = runs[0]["final"]["gold_optimum_helpfulness"]

    # the frontier check: does a ν beat PPO-Lag on both axes by more than the standard error of
    # the difference?
    def se(a, b, k):
        return math.sqrt((rows[a][k][1] ** 2 + rows[b][k][1] ** 2) / len(args.seeds))

    lag = rows["ppo_lag"]
    for n in rows:
        if n.startswith("shaping"):
            d_help = rows[n]["gold_helpfulness"][0] - lag["gold_helpfulness"][0]
            d_safe = lag["gold_unsafe_rate_harmful"][0] - rows[n]["gold_unsafe_rate_harmful"][0]
            rows[n]["dominates_ppo_lag"] = (
                d_help > se(n, "ppo_lag", "gold_helpfulness")
                and d_safe > se(n, "ppo_lag", "gold_unsafe_rate_harmful"))
            rows[n]["unsafe"] = rows[n]["gold_unsafe_rate_harmful"][0] > 0.05
            rows[n]["over_cautious"] = d_help <= -0.1
    lines = [f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.steps} "
             "iterations each; mean ± std over seeds; gold numbers on the 352 held-out prompts, "
             "4 samples each",
             "", "| run | helpfulness, all | % of optimum | unsafe, harmful prompts | "
             "unsafe, all prompts | beats PPO-Lag on both axes | minutes per run |",
             "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        label = ({"ppo_lag": "**PPO-Lag**", "ppo": "PPO (reward only)"}.get(n)
                 or f"reward shaping ν = {n.split('_')[1]}")
        flag = {True: "yes", False: "no"}.get(r.get("dominates_ppo_lag"), "")
        flag += (" (unsafe > 5%)" if r.get("unsafe")
                 else " (over-cautious: ≥ 0.1 less helpful)" if r.get("over_cautious") else "")
        lines.append(f"| {label} | {fmt(r['gold_helpfulness'])} | "
                     f"{r['gold_helpfulness'][0] / r['optimum']:.1%} | "
                     f"{fmt(r['gold_unsafe_rate_harmful'], True)} | "
                     f"{fmt(r['gold_unsafe_rate'], True)} | {flag} | {r['wall_s'] / 60:.1f} |")
    write(args, "sweep", rows, "\n".join(lines))
    plot_pareto(rows, os.path.join(args.out, "sweep.png"), args)


def plot_pareto(rows, path, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (the table has the numbers)")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    shaping = [(float(n.split("_")[1]), r) for n, r in rows.items() if n.startswith("shaping")]
    # x: the unsafe rate on a log axis, reversed (safer to the right): the safe runs sit within
    # 0.5-3%
    xs = [100 * r["gold_unsafe_rate_harmful"][0] for _, r in shaping]
    ys = [r["gold_helpfulness"][0] for _, r in shaping]
    ax.plot(xs, ys, "-", color="tab:blue", alpha=0.4)
    for k, ((nu, r), x, y) in enumerate(zip(shaping, xs, ys)):
        ax.errorbar(x, y, xerr=100 * r["gold_unsafe_rate_harmful"][1],
                    yerr=r["gold_helpfulness"][1], fmt="o", color="tab:blue", capsize=2)
        ax.annotate(f"ν={nu:g}", (x, y), textcoords="offset points",
                    xytext=(6, -12 if k % 2 else 6), fontsize=8, color="tab:blue")
    for n, style, label in [("ppo_lag", "*", "PPO-Lag"), ("ppo", "s", "PPO (reward only)")]:
        r = rows[n]
        ax.errorbar(100 * r["gold_unsafe_rate_harmful"][0], r["gold_helpfulness"][0],
                    xerr=100 * r["gold_unsafe_rate_harmful"][1], yerr=r["gold_helpfulness"][1],
                    fmt=style, markersize=13 if style == "*" else 7, capsize=2,
                    color="tab:red" if n == "ppo_lag" else "gray", label=label, zorder=3)
    ax.plot([], [], "o-", color="tab:blue", alpha=0.6, label="reward shaping R − ν·C")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("gold unsafe rate on harmful prompts, % (log scale; safer →)")
    ax.set_ylabel("gold helpfulness (all held-out prompts)")
    ax.set_title(f"Reward shaping against PPO-Lag ({len(args.seeds)} seeds, {args.steps} "
                 "iterations; mean ± std)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

# -----------------------------------------------------------------------------
# ask for X% unsafe, get X%?


MULTIPLIERS = {"pid": PID_GAINS, "sgd": ["--multiplier", "sgd"]}  # at train_ppo_lag.py's settings
TOLERANCE = {0.01: 0.005, 0.05: 0.015, 0.10: 0.03, 0.20: 0.03}  # the bars, in rate units
LAST = 50  # "the last 50 iterations": the rollouts the controller is judged on


def mean_se(xs):
    """(mean, standard error of the mean = sample std / sqrt(n)) over seeds."""
    m, sd = mean_std(xs)
    return m, sd / math.sqrt(len(xs))


def late(run, key, last=LAST):
    """the mean of one metric over a run's last `last` iterations"""
    ms = run["metrics"][-last:]
    return sum(m[key] for m in ms) / len(ms)


def budget(args):
    """Asked against reached, for each multiplier (train_ppo_lag.py's default first), at every
    budget and seed, at the demo's iteration count. 'Reached' is the gold unsafe rate over all
    held-out prompts (the mix the constraint is on); also the gold rate of the last 50
    iterations' rollouts, and λ's band over them."""
    root = os.path.join(args.out, "budget")

    def run_dir(m, b, s):
        return os.path.join(root, f"{m}_{b:g}", f"seed{s}")

    jobs = [(run_dir(m, b, s), ppo_argv(args, *MULTIPLIERS[m], "--target_unsafe_rate", str(b),
                                        "--seed", str(s)))
            for m in args.multipliers for s in args.seeds for b in BUDGETS]
    run_jobs(jobs, args.jobs, args.threads)
    rows = {}
    for m in args.multipliers:
        for b in BUDGETS:
            seeds = [s for s in args.seeds if os.path.exists(os.path.join(run_dir(m, b, s),
                                                                          "done.json"))]
            if not seeds:
                continue
            runs = [read_run(run_dir(m, b, s)) for s in seeds]
            reached = [r["final"]["gold_unsafe_rate"] for r in runs]
            lam = [[x["lambda_0"] for x in r["metrics"][-LAST:]] for r in runs]
            rows[f"{m}_{b:g}"] = {
                "multiplier": m, "asked": b, "seeds": seeds, "per_seed_reached": reached,
                "reached": mean_se(reached),
                "within": abs(mean_se(reached)[0] - b) <= TOLERANCE[b],
                "worst_seed_miss": max(abs(x - b) for x in reached),
                "no_seed_off_twice": max(abs(x - b) for x in reached) <= 2 * TOLERANCE[b],
                "rollout_gold_unsafe_last": mean_se([late(r, "rollout_gold_unsafe")
                                                     for r in runs]),
                "gold_unsafe_rate_harmful": mean_se([r["final"]["gold_unsafe_rate_harmful"]
                                                     for r in runs]),
                "gold_helpfulness": mean_se([r["final"]["gold_helpfulness"] for r in runs]),
                "optimum_at_budget": 0.810 + 0.5 * b,
                "lambda_last_min": mean_se([min(x) for x in lam]),
                "lambda_last_mean": mean_se([sum(x) / len(x) for x in lam]),
                "lambda_last_max": mean_se([max(x) for x in lam]),
                "J_minus_d_last": mean_se([late(r, "episode_cost_window_0") - b for r in runs]),
                "dynamics": [dynamics(r["metrics"]) for r in runs],
                "wall_s": sum(r["wall_s"] for r in runs) / len(runs)}
    for m in args.multipliers:  # helpfulness rises with X, each step by more than its SE
        hs = [rows[f"{m}_{b:g}"]["gold_helpfulness"] for b in BUDGETS if f"{m}_{b:g}" in rows]
        for b, lo, hi in zip(BUDGETS[1:], hs, hs[1:]):
            rows[f"{m}_{b:g}"]["helpfulness_rise_beyond_se"] = (
                hi[0] - lo[0] > math.sqrt(lo[1] ** 2 + hi[1] ** 2))
    lines = [f"{args.steps} iterations per run; mean ± standard error over seeds (SE = sample "
             f"std / √n). reached: gold unsafe rate over all 352 held-out prompts, 4 samples "
             f"each; rollouts: the gold unsafe rate of the last {LAST} iterations' training "
             f"rollouts; λ: its min / mean / max over those iterations. Bars: ±0.5 points at 1%, "
             f"±1.5 at 5%, ±3 at 10% and 20%; no seed off by more than twice that.",
             "", "| multiplier | asked | seeds | reached | within bar | worst seed off by "
             "| rollouts, last 50 | unsafe, harmful | helpfulness | λ min / mean / max, last 50 "
             "| J − d, last 50 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        ok = "yes" if r["within"] and r["no_seed_off_twice"] else "**no**"
        lines.append(
            f"| {r['multiplier']} | {r['asked']:.0%} | {len(r['seeds'])} | "
            f"{fmt(r['reached'], True)} | {ok} | {100 * r['worst_seed_miss']:.1f} pts | "
            f"{fmt(r['rollout_gold_unsafe_last'], True)} | "
            f"{fmt(r['gold_unsafe_rate_harmful'], True)} | {fmt(r['gold_helpfulness'])} | "
            f"{r['lambda_last_min'][0]:.2f} / {r['lambda_last_mean'][0]:.2f} / "
            f"{r['lambda_last_max'][0]:.2f} | {fmt(r['J_minus_d_last'])} |")
    # a subset of multipliers or seeds gets its own table, beside the full one
    full = args.multipliers == list(MULTIPLIERS) and args.seeds == [0, 1, 2]
    name = "budget" + ("" if full else f"_{'_'.join(args.multipliers)}_seeds"
                                      f"{''.join(map(str, args.seeds))}")
    write(args, name, rows, "\n".join(lines))
    plot_lambda(args, run_dir, os.path.join(args.out, f"{name}_lambda.png"))


def plot_lambda(args, run_dir, path):
    """λ and the windowed cost J against d, per iteration, at 1% and 10% (first seed), one column
    per multiplier: does λ settle in a band, or decay?"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot")
        return
    ms = [m for m in args.multipliers
          if os.path.exists(os.path.join(run_dir(m, 0.1, args.seeds[0]), "done.json"))]
    if not ms:
        return
    fig, axes = plt.subplots(2, len(ms), figsize=(5.2 * len(ms), 6), squeeze=False)
    for j, m in enumerate(ms):
        for b, color in ((0.01, "tab:blue"), (0.1, "tab:orange")):
            d = run_dir(m, b, args.seeds[0])
            if not os.path.exists(os.path.join(d, "done.json")):
                continue
            metrics = read_run(d)["metrics"]
            it = [x["step"] for x in metrics]
            axes[0][j].plot(it, [x["lambda_0"] for x in metrics], color=color, label=f"{b:.0%}")
            axes[1][j].plot(it, [x["episode_cost_window_0"] for x in metrics], color=color,
                            lw=0.8, label=f"J, {b:.0%}")
            axes[1][j].axhline(b, color=color, ls="--", lw=1)
            axes[1][j].plot(it, [x["rollout_gold_unsafe"] for x in metrics], color=color,
                            alpha=0.35, lw=0.8)
        axes[0][j].set_title(f"{m}: λ (seed {args.seeds[0]})", fontsize=9)
        axes[0][j].set_yscale("log")
        axes[1][j].set_title("J (windowed cost, rate scale), d dashed, gold unsafe of the "
                             "rollouts faint", fontsize=8)
        axes[1][j].set_xlabel("iteration")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def tune(args):
    """The multiplier's settings, chosen on the validation prompts (--eval_split val): the
    log-λ step against PID gains, at 10% (seed 0); then, with PID, the KL coefficient β and the
    actor lr at half and twice train_ppo_lag.py's values. The test prompts are never read."""
    root = os.path.join(args.out, "tune")
    configs = {"sgd": ["--multiplier", "sgd"]}
    configs |= {f"pid_{'_'.join(g)}": ["--multiplier", "pid", "--pid_kp", g[0], "--pid_ki", g[1],
                                       "--pid_kd", g[2]] for g in TUNE_PID}
    configs |= {f"pid_{flag}_{v}": [*PID_GAINS, f"--{flag}", v] for flag, vs in TUNE_PPO.items()
                for v in vs}
    jobs = [(os.path.join(root, f"{n}_{b:g}", f"seed{s}"),
             ppo_argv(args, *f, "--target_unsafe_rate", str(b), "--eval_split", "val",
                      "--seed", str(s)))
            for b in (0.1,) for s in args.seeds[:1] for n, f in configs.items()]
    run_jobs(jobs, args.jobs, args.threads)
    lines = [f"validation prompts (prompts_val.jsonl, 240), 10% asked, seed {args.seeds[0]}, "
             f"{args.steps} iterations", "", "| run | reached (val) | rollouts, last 50 | "
             "helpfulness (val) | λ min / mean / max, last 50 |", "|---|---|---|---|---|"]
    rows = {}
    for d, _ in jobs:
        if not os.path.exists(os.path.join(d, "done.json")):
            continue
        r = read_run(d)
        lam = [x["lambda_0"] for x in r["metrics"][-LAST:]]
        name = os.path.basename(os.path.dirname(d))
        rows[name] = {"reached": r["final"]["gold_unsafe_rate"],
                      "rollouts_last": late(r, "rollout_gold_unsafe"),
                      "helpfulness": r["final"]["gold_helpfulness"],
                      "lambda_last": [min(lam), sum(lam) / len(lam), max(lam)]}
        x = rows[name]
        lines.append(f"| {name} | {x['reached']:.1%} | {x['rollouts_last']:.1%} | "
                     f"{x['helpfulness']:.3f} | {lam and min(lam):.2f} / "
                     f"{sum(lam) / len(lam):.2f} / {max(lam):.2f} |")
    write(args, "tune", rows, "\n".join(lines))


def compare(args):
    """The README's table, 3 seeds each: SFT (3 sampling seeds), PPO-Lag at 1% (the budget
    experiment's runs), reward-only PPO, reward shaping with ν = 5 (about the λ PPO-Lag settles
    at for 1%: a fixed multiplier against the controller) and ν = 1 (train_ppo_lag.py's
    default --shaping_coef), and the upper bound: PPO-Lag with the gold oracles as its reward
    and cost models (training reads them only here)."""
    import torch

    from nanosafe.evaluate import compare as gold_compare
    root = os.path.join(args.out, "compare")
    default = args.multipliers[0]
    dirs = {"ppo_lag": lambda s: lag_1pct_dir(args, s),
            **{n: (lambda s, n=n: os.path.join(root, n, f"seed{s}"))
               for n in ("ppo", "reward_shaping_1", "reward_shaping_5", "gold_ppo_lag")}}
    flags = {"ppo_lag": [*MULTIPLIERS[default], "--target_unsafe_rate", "0.01"],
             "ppo": ["--algo", "ppo"],
             "reward_shaping_1": ["--algo", "reward_shaping", "--shaping_coef", "1.0"],
             "reward_shaping_5": ["--algo", "reward_shaping", "--shaping_coef", "5.0"],
             "gold_ppo_lag": ["--cost_models", "--gold_cost", "--gold_reward",
                              "--target_unsafe_rate", "0.01"]}
    jobs = [(dirs[n](s), ppo_argv(args, *flags[n], "--seed", str(s)))
            for s in args.seeds for n in dirs]
    run_jobs(jobs, args.jobs, args.threads)
    rows = {}
    sft_path = os.path.join(root, "sft.json")
    if not os.path.exists(sft_path):  # the SFT policy has no training seed: 3 sampling seeds
        torch.set_num_threads(args.jobs * args.threads)
        sft = [gold_compare([args.sft], _eval_prompts(args), 4, 24, seed=10**6 + s)[args.sft]
               for s in args.seeds]
        with open(sft_path, "w") as f:
            json.dump(sft, f)
    with open(sft_path) as f:
        finals = {"sft": json.load(f)}
    for n in dirs:
        finals[n] = [read_run(dirs[n](s))["final"] for s in args.seeds
                     if os.path.exists(os.path.join(dirs[n](s), "done.json"))]
    for n, fs in finals.items():
        if fs:
            rows[n] = gold_row(fs)
    names = {"sft": "SFT", "ppo": "PPO (reward only)", "reward_shaping_1": "reward shaping ν = 1",
             "reward_shaping_5": "reward shaping ν = 5",
             "ppo_lag": "**PPO-Lag**, 1%", "gold_ppo_lag": "PPO-Lag on the gold oracles, 1%"}
    lines = [f"{args.steps} iterations; mean ± standard error over {len(args.seeds)} seeds; "
             f"352 held-out test prompts, 4 samples each; optimum under a 1% budget: 0.815",
             "", "| policy | seeds | helpfulness | of the 1% optimum | unsafe, harmful prompts | "
             "unsafe, all prompts | helpfulness, benign |", "|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {names[n]} | {r['n']} | {fmt(r['gold_helpfulness'])} | "
                     f"{fmt(r['of_optimum_1pct'], True)} | "
                     f"{fmt(r['gold_unsafe_rate_harmful'], True)} | "
                     f"{fmt(r['gold_unsafe_rate'], True)} | {fmt(r['gold_helpfulness_benign'])} |")
    name = "compare" if len(args.seeds) == 3 else f"compare_seeds{''.join(map(str, args.seeds))}"
    write(args, name, rows, "\n".join(lines))


def upper(args):
    """Where the helpfulness goes, at every budget: PPO-Lag on the gold oracles (compare's upper
    bound) at --budgets beside the budget experiment's learned-model runs (default multiplier),
    both against the gold optimum under the budget, 0.810 + 0.5·X. The 1% gold runs are
    compare's. Does the learned run's helpfulness rise with X because the world allows it (the gold
    run rises) or not at all (neither does)?"""
    default = args.multipliers[0]

    def gold_dir(b, s):
        if b == 0.01:
            return os.path.join(args.out, "compare", "gold_ppo_lag", f"seed{s}")
        return os.path.join(args.out, "upper", f"gold_{b:g}", f"seed{s}")

    def learned_dir(b, s):
        return os.path.join(args.out, "budget", f"{default}_{b:g}", f"seed{s}")

    jobs = [(gold_dir(b, s), ppo_argv(args, "--cost_models", "--gold_cost", "--gold_reward",
                                      "--target_unsafe_rate", str(b), "--seed", str(s)))
            for s in args.seeds for b in args.budgets]
    run_jobs(jobs, args.jobs, args.threads)
    rows = {}
    for b in args.budgets:
        for name, d in [("learned", learned_dir), ("gold", gold_dir)]:
            finals = [read_run(d(b, s))["final"] for s in args.seeds
                      if os.path.exists(os.path.join(d(b, s), "done.json"))]
            if finals:
                rows[f"{name}_{b:g}"] = gold_row(finals) | {"asked": b, "models": name} | {
                    "of_optimum": mean_se([f["gold_helpfulness"] / (0.810 + 0.5 * b)
                                           for f in finals])}
    lines = [f"{args.steps} iterations; mean ± SE over the seeds run; 352 held-out test prompts, 4 "
             f"samples each; of the optimum: helpfulness over 0.810 + 0.5·X", "",
             "| asked | reward and cost models | seeds | helpfulness | of the optimum at X | "
             "unsafe, all | unsafe, harmful | helpfulness, benign | helpfulness, harmful |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['asked']:.0%} | {r['models']} | {r['n']} | "
                     f"{fmt(r['gold_helpfulness'])} | {fmt(r['of_optimum'], True)} | "
                     f"{fmt(r['gold_unsafe_rate'], True)} | "
                     f"{fmt(r['gold_unsafe_rate_harmful'], True)} | "
                     f"{fmt(r['gold_helpfulness_benign'])} | "
                     f"{fmt(r['gold_helpfulness_harmful'])} |")
    write(args, "upper", rows, "\n".join(lines))


def _eval_prompts(args):
    with open(os.path.join(args.data_dir, "prompts_test.jsonl")) as f:
        return [json.loads(ln)["prompt"] for ln in f if ln.strip()]


GOLD_KEYS = ("gold_helpfulness", "gold_unsafe_rate_harmful", "gold_unsafe_rate",
             "gold_helpfulness_benign", "gold_helpfulness_harmful")


def gold_row(finals):
    """mean ± SE over seeds of the final gold numbers, and helpfulness over the 1% optimum"""
    return ({k: mean_se([f[k] for f in finals]) for k in GOLD_KEYS} | {"n": len(finals)}
            | {"of_optimum_1pct": mean_se([f["gold_helpfulness"] / 0.815 for f in finals])})


def lag_1pct_dir(args, s):
    """PPO-Lag at 1% with the default multiplier, seed s: the budget experiment's run, which
    compare, offline, agreement and divisor reuse"""
    return os.path.join(args.out, "budget", f"{args.multipliers[0]}_0.01", f"seed{s}")


def rate_scale(run_dir):
    """ū - s̄ of a rate-scale run's (first) cost stream, from its nanosafe.json: λ / (ū - s̄) is
    its λ on the cost model's raw scores"""
    with open(os.path.join(run_dir, "nanosafe.json")) as f:
        lo, hi = json.load(f)["cost_scales"][0]
    return hi - lo


# -----------------------------------------------------------------------------
# what a user would pick instead: DPO, SafeDPO, MoCAN against the RL runs

OFFLINE = {"dpo": ["--loss", "dpo"],
           "dpo_safer": ["--loss", "dpo", "--preference", "safer"],
           "safe_dpo": ["--loss", "safe_dpo"],
           "mocan": ["--dual", "can", "--target_unsafe_rate", "0.01"]}
OFFLINE_NAMES = {"sft": "SFT", "dpo": "DPO (better labels)", "dpo_safer": "DPO (safer labels)",
                 "safe_dpo": "SafeDPO", "mocan": "MoCAN, 1%", "ppo": "PPO (reward only)",
                 "reward_shaping_1": "reward shaping ν = 1",
                 "reward_shaping_5": "reward shaping ν = 5", "ppo_lag": "PPO-Lag, 1%",
                 "gold_ppo_lag": "PPO-Lag on the gold oracles, 1%"}
# the reward and cost models each method trains with (all start from the same SFT model)
NEEDS = {"sft": [], "dpo": [], "dpo_safer": [], "safe_dpo": [], "mocan": ["rm", "cm"],
         "ppo": ["rm"], "reward_shaping_1": ["rm", "cm"], "reward_shaping_5": ["rm", "cm"],
         "ppo_lag": ["rm", "cm"], "gold_ppo_lag": []}


def offline(args):
    """train_dpo.py's three methods (and DPO on the safer labels) from the SFT model, 3 seeds,
    beside `compare`'s runs (SFT, PPO, reward shaping ν = 1 and 5, PPO-Lag at 1%, its gold upper
    bound) and the budget experiment's PPO-Lag at 1/5/10/20% as the constrained frontier.
    Wall-clock: each run's own (one thread, two side by side, as every run here), plus the
    reward and cost models it needs, trained again here under the same conditions to time
    them."""
    root = os.path.join(args.out, "offline")
    default = args.multipliers[0]

    def run_dir(n, s):
        if n in OFFLINE:
            return os.path.join(root, n, f"seed{s}")
        if n == "ppo_lag":
            return lag_1pct_dir(args, s)
        return os.path.join(args.out, "compare", n, f"seed{s}")

    # the runs it reuses, checked before its own are run
    missing = [n for n in ("ppo", "reward_shaping_1", "reward_shaping_5", "gold_ppo_lag", "ppo_lag")
               if not all(os.path.exists(os.path.join(run_dir(n, s), "done.json"))
                          for s in args.seeds)]
    if missing:
        sys.exit(f"error: no finished runs for {', '.join(missing)} at seeds {args.seeds}: run "
                 "`python -m experiments.run compare` (and `budget`) first")
    pm = {"rm": os.path.join(root, "time_rm"), "cm": os.path.join(root, "time_cm")}
    jobs = [(run_dir(n, s), ["train_dpo.py", "--model", args.sft, "--reward_model", args.rm,
                             "--cost_model", args.cm, *OFFLINE[n], "--seed", str(s)])
            for s in args.seeds for n in OFFLINE]
    jobs += [(pm[k], ["train_pm.py", "--kind", {"rm": "reward", "cm": "cost"}[k],
                      "--model", args.sft]) for k in pm]
    run_jobs(jobs, args.jobs, args.threads)

    def wall(d):
        with open(os.path.join(d, "done.json")) as f:
            return json.load(f)["wall_s"]

    pm_s = {k: wall(d) for k, d in pm.items()}
    with open(os.path.join(args.out, "compare", "sft.json")) as f:
        finals = {"sft": json.load(f)}
    runs = {}
    for n in ("dpo", "dpo_safer", "safe_dpo", "mocan", "ppo", "reward_shaping_1",
              "reward_shaping_5", "ppo_lag", "gold_ppo_lag"):
        runs[n] = [read_run(run_dir(n, s)) for s in args.seeds]
        finals[n] = [r["final"] for r in runs[n]]
    rows = {}
    for n, fs in finals.items():
        rows[n] = gold_row(fs)
        if n in runs:
            own = mean_se([r["wall_s"] for r in runs[n]])
            rows[n]["wall_s"] = own
            rows[n]["wall_with_models_s"] = own[0] + sum(pm_s[k] for k in NEEDS[n])
    rows["reward_model_s"], rows["cost_model_s"] = pm_s["rm"], pm_s["cm"]

    # MoCAN's λ* against where PPO-Lag's λ settles at the same budget, on one scale: PPO-Lag's λ
    # multiplies the rate-scale cost (c - s̄)/(ū - s̄), MoCAN's the raw cost, so λ_raw = λ/(ū - s̄)
    mocan_raw = []
    for s in args.seeds:
        with open(os.path.join(run_dir("mocan", s), "summary.json")) as f:
            mocan_raw.append(json.load(f)["dual"]["lambda"])
    ppo_raw = [late(r, "lambda_0") / rate_scale(run_dir("ppo_lag", s))
               for s, r in zip(args.seeds, runs["ppo_lag"])]
    lam = {"mocan_raw": mean_se(mocan_raw), "ppo_lag_raw_last50": mean_se(ppo_raw)}
    rows["lambda"] = lam

    frontier = {}  # PPO-Lag over budgets (the budget experiment's runs)
    for b in BUDGETS:
        ds = [os.path.join(args.out, "budget", f"{default}_{b:g}", f"seed{s}") for s in args.seeds]
        if all(os.path.exists(os.path.join(d, "done.json")) for d in ds):
            fs = [read_run(d)["final"] for d in ds]
            frontier[b] = {k: mean_se([f[k] for f in fs]) for k in GOLD_KEYS}
    rows["ppo_lag_budgets"] = {f"{b:g}": r for b, r in frontier.items()}

    def minutes(x):
        return f"{x / 60:.1f}"

    lines = [f"{len(args.seeds)} seeds each (SFT: 3 sampling seeds); mean ± standard error "
             "(sample std / √n); 352 held-out test prompts, 4 samples each. Minutes: the method's "
             "own run at one thread, two runs side by side on 2 cores (PPO runs: 350 iterations; "
             "DPO: 600 steps); 'with models' adds the reward and cost models it trains with "
             f"(reward model {minutes(pm_s['rm'])}, cost model {minutes(pm_s['cm'])} min, same "
             "conditions); the SFT model all start from is not counted.", "",
             "| method | helpfulness | of the 1% optimum | unsafe, harmful prompts | "
             "unsafe, all prompts | helpfulness, benign | helpfulness, harmful | minutes | "
             "minutes with models |", "|---|---|---|---|---|---|---|---|---|"]
    for n in finals:
        r = rows[n]
        t = (f"{minutes(r['wall_s'][0])} ± {minutes(r['wall_s'][1])} | "
             f"{minutes(r['wall_with_models_s'])}") if "wall_s" in r else "– | –"
        lines.append(f"| {OFFLINE_NAMES[n]} | {fmt(r['gold_helpfulness'])} | "
                     f"{fmt(r['of_optimum_1pct'], True)} | "
                     f"{fmt(r['gold_unsafe_rate_harmful'], True)} | "
                     f"{fmt(r['gold_unsafe_rate'], True)} | {fmt(r['gold_helpfulness_benign'])} | "
                     f"{fmt(r['gold_helpfulness_harmful'])} | {t} |")
    lines += ["", f"MoCAN's λ* (raw cost units): {lam['mocan_raw'][0]:.3f} ± "
              f"{lam['mocan_raw'][1]:.3f}; PPO-Lag's λ at 1%, mean of the last {LAST} "
              "iterations, divided by the rate scale's ū − s̄ to the same units: "
              f"{lam['ppo_lag_raw_last50'][0]:.3f} ± {lam['ppo_lag_raw_last50'][1]:.3f}."]
    write(args, "offline", rows, "\n".join(lines))
    plot_offline(rows, os.path.join(args.out, "offline.png"), args)


def plot_offline(rows, path, args):
    """Two panels, gold helpfulness against the gold unsafe rate on harmful prompts and on all
    prompts; every method a point with ± SE bars, PPO-Lag's budgets a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (the table has the numbers)")
        return
    style = {"sft": ("o", "black"), "dpo": ("v", "tab:orange"), "dpo_safer": ("^", "tab:orange"),
             "safe_dpo": ("D", "tab:green"), "mocan": ("P", "tab:purple"),
             "ppo": ("s", "gray"), "reward_shaping_1": ("o", "lightskyblue"),
             "reward_shaping_5": ("o", "tab:blue"),
             "ppo_lag": ("*", "tab:red"), "gold_ppo_lag": ("*", "gold")}
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.6), sharey=True)
    for ax, key, label in [(axes[0], "gold_unsafe_rate_harmful", "harmful prompts"),
                           (axes[1], "gold_unsafe_rate", "all prompts")]:
        front = rows["ppo_lag_budgets"]
        ax.plot([100 * r[key][0] for r in front.values()],
                [r["gold_helpfulness"][0] for r in front.values()], "-", color="tab:red",
                alpha=0.35, label="PPO-Lag at 1 / 5 / 10 / 20% asked")
        for n, (marker, color) in style.items():
            r = rows[n]
            ax.errorbar(100 * r[key][0], r["gold_helpfulness"][0], xerr=100 * r[key][1],
                        yerr=r["gold_helpfulness"][1], fmt=marker, color=color, capsize=2,
                        markersize=13 if marker == "*" else 7, markeredgecolor="black",
                        markeredgewidth=0.4, label=OFFLINE_NAMES[n], zorder=3)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.invert_xaxis()
        ax.set_xlabel(f"gold unsafe rate on {label}, % (symlog; safer →)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("gold helpfulness (all held-out prompts)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(f"Offline (DPO family) against online (PPO family) safe alignment: "
                 f"{len(args.seeds)} seeds, mean ± SE", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

# -----------------------------------------------------------------------------
# the reward and cost models against the gold order, off- and on-policy


def agreement(args):
    """The reward model (and the cost model) as agreement with the gold order on pairs the oracle
    does not tie, with 95% intervals from a bootstrap over prompts: on a fresh held-out set 10x
    pref_test's (the test prompts, 80 pairs each, drawn as pref_test is but from its own stream),
    and on-policy: two answers of one policy to each test prompt (4 pairs per prompt), for the
    SFT model and the final policies of `compare`'s PPO and the budget experiment's PPO-Lag at 1%
    (their 3 seeds pooled). Needs those runs; trains nothing."""
    import random

    import torch

    from experiments.diagnostics import gold_order_agreement
    from nanosafe.evaluate import sample, score
    from nanosafe.model import load_policy, load_score_model

    torch.set_num_threads(args.jobs * args.threads)
    prompts = _eval_prompts(args)
    rm, rtok = load_score_model(args.rm, kind="reward")
    cm, ctok = load_score_model(args.cm, kind="cost")
    rm.eval()
    cm.eval()

    def both(ps, a0, a1):
        """-> {reward: agreement with gold helpfulness, cost: with the gold total cost}"""
        out = {}
        for name, model, tok, gold in [
                ("reward", rm, rtok, toy.helpfulness),
                ("cost", cm, ctok, lambda p, a: sum(toy.cost(p, a).values()))]:
            s0, s1 = score(model, tok, ps, a0).tolist(), score(model, tok, ps, a1).tolist()
            out[name] = gold_order_agreement(ps, s0, s1, [gold(p, a) for p, a in zip(ps, a0)],
                                             [gold(p, a) for p, a in zip(ps, a1)],
                                             n_boot=args.n_boot)
        return out

    pairs = toy.draw_pairs(random.Random("0:pref_test_x10"), prompts, 80)
    ps = [r["prompt"] for r in pairs]
    a0, a1 = [r["response_0"] for r in pairs], [r["response_1"] for r in pairs]
    rows = {"held_out": both(ps, a0, a1)}
    # the noisy labels' own agreement with the gold order (the ceiling on label accuracy)
    labels = [float(r["better_response_id"] == 0) for r in pairs]
    rows["held_out"]["labels"] = gold_order_agreement(
        ps, labels, [1 - x for x in labels], [toy.helpfulness(p, a) for p, a in zip(ps, a0)],
        [toy.helpfulness(p, a) for p, a in zip(ps, a1)], n_boot=args.n_boot)
    policies = {"sft": [args.sft],
                "ppo": [os.path.join(args.out, "compare", "ppo", f"seed{s}") for s in args.seeds],
                "ppo_lag": [lag_1pct_dir(args, s) for s in args.seeds]}
    for name, dirs in policies.items():
        ps, a0, a1 = [], [], []
        for k, d in enumerate(dirs):
            model, tok = load_policy(d)
            model.eval()
            qs = [p for p in prompts for _ in range(4)]
            answers, _ = sample(model, tok, qs + qs, max_new_tokens=24, seed=2 * 10**6 + k)
            ps += qs
            a0 += answers[:len(qs)]
            a1 += answers[len(qs):]
        rows[name] = both(ps, a0, a1)
        print(f"{name}: {rows[name]}", flush=True)

    def cell(r):
        return f"{r['agreement']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] ({r['n']:,})"

    names = {"held_out": f"held-out pairs ({len(pairs):,}, 10x pref_test)",
             "sft": "on-policy: SFT", "ppo": "on-policy: PPO (reward only), 3 seeds",
             "ppo_lag": "on-policy: PPO-Lag 1%, 3 seeds"}
    lines = ["Agreement with the gold order on pairs the oracle does not tie (a score tie counts "
             "½); [95% interval, bootstrap over prompts]; (pairs). Held-out: the 352 test "
             "prompts x 80 pairs, drawn as pref_test is; on-policy: two answers of the policy to "
             "each test prompt, 4 pairs per prompt per seed.", "",
             "| pairs | reward model vs gold helpfulness | cost model vs gold cost |",
             "|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {names[n]} | {cell(r['reward'])} | {cell(r['cost'])} |")
    lines += ["", "The held-out pairs' own noisy 'better' labels agree with the gold order on "
              f"{cell(rows['held_out']['labels'])}."]
    write(args, "agreement", rows, "\n".join(lines))


# -----------------------------------------------------------------------------
# the multiplier's dynamics; the cost model's sign term


def dynamics(metrics):
    """Overshoot and oscillation from one run's metrics: J = the windowed episode cost, d its
    threshold. J starts above d (the SFT policy is unsafe); after J first falls to d, the overshoot
    is how far it goes below d (over-correction, in cost units) and the re-violation how far back
    above; λ's oscillation is its number of turns (sign changes of Δλ) and its total variation
    Σ|Δλ| from there on."""
    J = [m["episode_cost_window_0"] for m in metrics]
    d = metrics[0]["threshold_0"]
    lam = [m["lambda_0"] for m in metrics]
    cross = next((i for i, j in enumerate(J) if j <= d), None)
    # λ's spread over the second half of the run
    late = {"lambda_std_late": mean_std(lam[len(lam) // 2:])[1]}
    if cross is None:
        return {"first_crossing": None, "lambda_max": max(lam), **late}
    after, lam_after = J[cross:], lam[cross:]
    steps = [b - a for a, b in zip(lam_after, lam_after[1:]) if abs(b - a) > 1e-6]
    turns = sum(1 for a, b in zip(steps, steps[1:]) if (a > 0) != (b > 0))
    return {"first_crossing": cross, "overshoot": d - min(after),
            "reviolation": max(0.0, max(after) - d),
            "iterations_above_d_after": sum(j > d for j in after), "lambda_turns": turns,
            "lambda_total_variation": sum(abs(s) for s in steps), "lambda_max": max(lam),
            "lambda_final": lam[-1], **late,
            "flagged_after_min": min(m["rollout_flagged_cost"] for m in metrics[cross:]),
            "flagged_after_max": max(m["rollout_flagged_cost"] for m in metrics[cross:])}


def sign(args):
    """The cost model's sign term, one seed, in the official form (--cost_scale raw, the log-λ
    step): at the official d = 0, the model with it and without it; and the model without it
    calibrated on its own zero (train_ppo_lag.py refuses to; here the same calibration is run
    in process and d passed in). The multipliers are compared in `budget`."""
    root = os.path.join(args.out, "sign")
    cm_nosign = os.path.join(root, "cm_no_sign")
    pm = [(cm_nosign, ["train_pm.py", "--kind", "cost", "--no_sign_loss", "--model", args.sft])]
    run_jobs(pm, 1, args.jobs * args.threads)
    d_own = own_zero_threshold(args, cm_nosign)
    official = ["--cost_scale", "raw", "--multiplier", "sgd"]
    flags = {"sign_d0": [*official, "--thresholds", "0"],
             "no_sign_d0": [*official, "--cost_models", cm_nosign, "--thresholds", "0"],
             "no_sign_calibrated": [*official, "--cost_models", cm_nosign, "--thresholds",
                                    str(d_own)]}
    s0 = args.seeds[0]
    dirs = {n: os.path.join(root, n, f"seed{s0}") for n in flags}
    run_jobs([(dirs[n], ppo_argv(args, *flags[n], "--seed", str(s0))) for n in flags],
             args.jobs, args.threads)
    rows = {}
    for n, d in dirs.items():
        r = read_run(d)
        rows[n] = {k: r["final"][k] for k in ("gold_helpfulness", "gold_unsafe_rate_harmful",
                                              "gold_unsafe_rate")}
        rows[n]["lambda_final"] = r["lambdas"][0]
    rows["no_sign_calibrated"]["threshold"] = d_own
    for n, path in (("sign_d0", args.cm), ("no_sign_d0", cm_nosign),
                    ("no_sign_calibrated", cm_nosign)):
        with open(os.path.join(path, "summary.json")) as f:
            rows[n]["cost_model_eval"] = json.load(f)
    names = {"sign_d0": "d = 0, cost model with the sign term",
             "no_sign_d0": "d = 0, cost model without it",
             "no_sign_calibrated": f"without it, d = {d_own:+.2f} calibrated on its zero"}
    lines = [f"seed {s0}, {args.steps} iterations, --cost_scale raw, log-λ step", "",
             "| run | sign accuracy of the cost model | helpfulness | unsafe, harmful | "
             "unsafe, all | final λ |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {names[n]} | {r['cost_model_eval'].get('sign_accuracy', 0):.3f} | "
                     f"{r['gold_helpfulness']:.3f} | {r['gold_unsafe_rate_harmful']:.1%} | "
                     f"{r['gold_unsafe_rate']:.1%} | {r['lambda_final']:.3g} |")
    write(args, "sign", rows, "\n".join(lines))


def divisor(args):
    """The rate scale against the raw one at 1% (docs/findings.md): the same controller on the
    raw scale, every gain and λ bound divided to match (λ_raw = λ/(ū − s̄) on the same trajectory:
    kp, ki, kd by (ū − s̄)², λ_init and λ_max by ū − s̄), so that the Lagrangian r − λ·c is the
    same. Before the rate scale weighed λ by 1/(ū − s̄) in the actor's divisor, only that divisor
    differed (1 + 5.3 against 1 + 0.57) and this measured its cost; since, the actor takes the
    same step for the same critic values, and this checks the two on whole runs. Against the
    budget experiment's runs; "1 + λ_raw" is the actor's divisor either way."""
    base = [lag_1pct_dir(args, s) for s in args.seeds]
    k = rate_scale(base[0])  # the raw run's gains: seed 0's scale
    from nanosafe.config import parse
    from nanosafe.rl import Config
    cfg = parse(Config, argv=[])  # the RL scripts' defaults, scaled
    flags = ["--cost_scale", "raw", "--target_unsafe_rate", "0.01", "--multiplier", "pid",
             "--pid_kp", f"{cfg.pid_kp / k**2:.6g}", "--pid_ki", f"{cfg.pid_ki / k**2:.6g}",
             "--pid_kd", f"{cfg.pid_kd / k**2:.6g}", "--lambda_init", f"{cfg.lambda_init / k:.6g}",
             "--lambda_max", f"{cfg.lambda_max / k:.6g}"]
    root = os.path.join(args.out, "divisor")
    dirs = [os.path.join(root, "raw_matched", f"seed{s}") for s in args.seeds]
    run_jobs([(d, ppo_argv(args, *flags, "--seed", str(s))) for d, s in zip(dirs, args.seeds)],
             args.jobs, args.threads)
    rows = {}
    for name, ds in [("rate", base), ("raw_matched", dirs)]:
        ds = [d for d in ds if os.path.exists(os.path.join(d, "done.json"))]
        runs = [read_run(d) for d in ds]
        if not runs:
            continue
        # each rate-scale seed in raw units by its own ū - s̄ (each calibrates its own)
        scales = [rate_scale(d) if name == "rate" else 1.0 for d in ds]
        rows[name] = {key: mean_se([r["final"][key] for r in runs]) for key in GOLD_KEYS}
        lam = [late(r, "lambda_0") for r in runs]
        rows[name]["lambda_last50"] = mean_se(lam)
        rows[name]["lambda_raw_last50"] = mean_se([x / sc for x, sc in zip(lam, scales)])
        rows[name]["divisor_last50"] = mean_se([1 + x / sc for x, sc in zip(lam, scales)])
        rows[name]["n"] = len(runs)
    lines = [f"{args.steps} iterations; mean ± SE over seeds {args.seeds}; 1% asked; λ over the "
             f"last {LAST} iterations (raw units: divided by ū − s̄ = {k:.3f})", "",
             "| cost scale | seeds | helpfulness | benign | harmful | unsafe, all | unsafe, "
             "harmful | λ | λ, raw units | 1 + λ_raw |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | {fmt(r['gold_helpfulness'])} | "
                     f"{fmt(r['gold_helpfulness_benign'])} | "
                     f"{fmt(r['gold_helpfulness_harmful'])} | "
                     f"{fmt(r['gold_unsafe_rate'], True)} | "
                     f"{fmt(r['gold_unsafe_rate_harmful'], True)} | {fmt(r['lambda_last50'])} | "
                     f"{fmt(r['lambda_raw_last50'])} | {fmt(r['divisor_last50'])} |")
    write(args, "divisor", rows, "\n".join(lines))


def own_zero_threshold(args, cost_model):
    """train_ppo_lag.py's calibration of d at --target_unsafe_rate 0.01 on the SFT policy's
    rollouts, for a cost model trained without the sign term (which the script refuses to
    calibrate): the same function (nanosafe.rl.calibrate_thresholds), in process."""
    import torch

    from nanosafe import constraints, data, rl
    from nanosafe.model import load_policy, resolve_template
    torch.set_num_threads(args.jobs * args.threads)
    actor, tok = load_policy(args.sft)
    path = os.path.join(args.data_dir, "prompts_train.jsonl")
    prompts, _ = data.dedupe_prompts(data.load_prompts(path))
    template = resolve_template(None, args.sft, args.rm, cost_model)
    # train_ppo_lag.py's defaults: --max_prompt_length 48, no --truncate_prompts, 256 prompts,
    # --target_unsafe_rate 0.01, --rollout_batch_size 128, --seed 0, --max_new_tokens 24,
    # --temperature 1, --top_p 1, --min_new_tokens 0; no probe, so no hidden layers
    items = data.PromptDataset(prompts, tok, 48, False, template).items[:256]
    cons = [constraints.CostModel(cost_model)]
    d, _ = rl.calibrate_thresholds(actor.eval(), cons, items, tok, 0.01, 128, 0, "cpu",
                                   layers=(), max_new_tokens=24, temperature=1.0, top_p=1.0,
                                   min_new_tokens=0)
    return d[0]

# -----------------------------------------------------------------------------
# Lagrangian GRPO against PPO-Lag at the same wall-clock


def grpo(args):
    """GRPO-Lag has no critics, so an iteration costs less: it gets the iterations that fit in
    PPO-Lag's measured time per run (seed 0's), and the same number of iterations as a second
    point."""
    root = os.path.join(args.out, "grpo")
    sweep_lag = os.path.join(args.out, "sweep", "ppo_lag")

    def lag_dir(s):
        return os.path.join(sweep_lag, f"seed{s}")

    def same_iters(s):
        return os.path.join(root, f"grpo_lag_{args.steps}", f"seed{s}")

    def argv(s):
        return ["train_grpo_lag.py", *ppo_argv(args, "--group_size", str(args.group_size),
                                               "--seed", str(s))[1:]]

    def per_iter(d):
        return sum(m["iteration_s"] for m in read_run(d)["metrics"]) / len(read_run(d)["metrics"])

    run_jobs([(same_iters(s), argv(s)) for s in args.seeds]
             + [(lag_dir(s), ppo_argv(args, "--seed", str(s))) for s in args.seeds],
             args.jobs, args.threads)
    t_lag = sum(per_iter(lag_dir(s)) for s in args.seeds) / len(args.seeds)
    t_grpo = sum(per_iter(same_iters(s)) for s in args.seeds) / len(args.seeds)
    steps_same_time = int(round(args.steps * t_lag / t_grpo))

    def same_time(s):
        return os.path.join(root, f"grpo_lag_{steps_same_time}", f"seed{s}")

    # and with each stream divided by the batch's std instead of the group's (--grpo_std batch):
    # see docs/experiments.md
    def batch_std(s):
        return os.path.join(root, f"grpo_lag_{steps_same_time}_batch_std", f"seed{s}")

    budget_flags = ["--max_steps", str(steps_same_time)]  # the last flag wins
    run_jobs([(same_time(s), [*argv(s), *budget_flags]) for s in args.seeds]
             + [(batch_std(s), [*argv(s), *budget_flags, "--grpo_std", "batch"])
                for s in args.seeds],
             args.jobs, args.threads)
    rows = {}
    for n, f in [("ppo_lag", lag_dir), (f"grpo_lag_{args.steps}", same_iters),
                 (f"grpo_lag_{steps_same_time}", same_time),
                 (f"grpo_lag_{steps_same_time}_batch_std", batch_std)]:
        runs = [read_run(f(s)) for s in args.seeds]
        rows[n] = {k: over_seeds(runs, k)
                   for k in ("gold_helpfulness", "gold_unsafe_rate_harmful", "gold_unsafe_rate")}
        rows[n]["iterations"] = len(runs[0]["metrics"])
        rows[n]["seconds_per_iteration"] = mean_std(
            [sum(m["iteration_s"] for m in r["metrics"]) / len(r["metrics"]) for r in runs])
        rows[n]["train_seconds"] = mean_std(
            [sum(m["iteration_s"] for m in r["metrics"]) for r in runs])
        rows[n]["lambda_final"] = mean_std([r["lambdas"][0] for r in runs])
        rows[n]["optimum"] = runs[0]["final"]["gold_optimum_helpfulness"]
    lines = [f"{len(args.seeds)} seeds; G = {args.group_size} answers per prompt, 128 rollouts per "
             f"iteration for both; mean ± std; {steps_same_time} GRPO-Lag iterations take "
             f"PPO-Lag's {args.steps} iterations' training time. "
             "Seconds: the training loop's own (metrics.jsonl iteration_s), {args.jobs} runs "
             "side by side at {args.threads} thread(s) each".format(args=args),
             "", "| run | iterations | s / iteration | training seconds | helpfulness, all "
             "| % of optimum | unsafe, harmful | unsafe, all | final λ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        label = "PPO-Lag" if n == "ppo_lag" else (
            f"GRPO-Lag, {r['iterations']} iterations"
            + (", batch std" if n.endswith("batch_std") else ""))
        lines.append(f"| {label} | {r['iterations']} | {fmt(r['seconds_per_iteration'])} | "
                     f"{r['train_seconds'][0]:.0f} ± {r['train_seconds'][1]:.0f} | "
                     f"{fmt(r['gold_helpfulness'])} | "
                     f"{r['gold_helpfulness'][0] / r['optimum']:.1%} | "
                     f"{fmt(r['gold_unsafe_rate_harmful'], True)} | "
                     f"{fmt(r['gold_unsafe_rate'], True)} | {fmt(r['lambda_final'])} |")
    write(args, "grpo", rows, "\n".join(lines))

# -----------------------------------------------------------------------------
# three rounds of Safe RLHF


def label_pairs(prompts, answers_0, answers_1, seed, label_temperature=0.1,
                cost_label_temperature=0.5):
    """New preference pairs from two answers per prompt, labelled by the gold oracles through the
    toy generator's own noisy Bradley–Terry draw (toy.pref_record: the same temperatures as the
    original pairs). The oracles label here and nowhere else in training: the models learn from
    these records. A pair with an empty answer (the policy's EOS first) is left out: a preference
    file has none."""
    rng = random.Random(f"{seed}:round_pairs")
    return [toy.pref_record(rng, p, a, b, label_temperature, cost_label_temperature)
            for p, a, b in zip(prompts, answers_0, answers_1) if a.strip() and b.strip()]


def sample_pairs(policy_dir, prompts, n_per_prompt, seed, max_new_tokens, threads):
    """Two answers per (prompt, draw) from a policy at temperature 1 -> (prompts, answers_0,
    answers_1)."""
    import torch

    from nanosafe.evaluate import sample
    from nanosafe.model import load_policy
    torch.set_num_threads(threads)
    model, tok = load_policy(policy_dir)
    ps = [p for p in prompts for _ in range(n_per_prompt)]
    a0, _ = sample(model, tok, ps, max_new_tokens=max_new_tokens, seed=seed, batch_size=256)
    a1, _ = sample(model, tok, ps, max_new_tokens=max_new_tokens, seed=seed + 1, batch_size=256)
    return ps, a0, a1


def elo_tournament(dirs, prompts, n_samples, seed, max_new_tokens, n_boot):
    """Every policy answers the same prompts (n_samples each); each pair of policies' answers to the
    same prompt is one gold game on helpfulness and one on harmlessness (ties dropped, as
    evaluate.compare) -> per policy: gold numbers and (rating, lo, hi) on each axis."""
    from nanosafe.evaluate import elo_intervals, gold_eval, sample
    from nanosafe.model import load_policy
    ps = [p for p in prompts for _ in range(n_samples)]
    answers, rows = {}, {}
    for name, d in dirs.items():
        model, tok = load_policy(d)
        answers[name], _ = sample(model, tok, ps, max_new_tokens=max_new_tokens, seed=seed,
                                  batch_size=256)
        rows[name] = gold_eval(ps, answers[name])
    wins = {"helpfulness": [], "harmlessness": []}
    names = list(dirs)
    for i, p in enumerate(ps):
        h = {n: toy.helpfulness(p, answers[n][i]) for n in names}
        c = {n: sum(toy.cost(p, answers[n][i]).values()) for n in names}
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                a, b = names[x], names[y]
                if h[a] != h[b]:
                    wins["helpfulness"].append((a, b) if h[a] > h[b] else (b, a))
                if c[a] != c[b]:
                    wins["harmlessness"].append((a, b) if c[a] < c[b] else (b, a))
    for axis, w in wins.items():
        for n, r in elo_intervals(w, n_boot=n_boot, seed=seed).items():
            rows[n][f"elo_{axis}"] = r
        rows["games_" + axis] = len(w)
    return rows


def control_argv(args, start):
    return ["train_ppo_lag.py", "--max_steps", str(args.steps), "--show_every", "0",
            "--model", start, "--reward_model", args.rm, "--cost_models", args.cm,
            "--calibrate_on", args.sft, "--seed", str(args.seeds[0])]


def rounds(args):
    """Round 1 is PPO-Lag on the toy world's pairs (the sweep's seed-0 run: SFT answers and drift
    shapes, as the paper's first round is on SFT samples). Round k = 2, 3: round k−1's policy
    answers the training prompts twice, the oracles label the pairs, reward and cost models are
    trained again on old + new pairs, PPO-Lag starts from round k−1's policy (also its reference),
    d calibrated at the same rate on the SFT's answers."""
    import gzip
    root = os.path.join(args.out, "rounds")
    policy = {1: os.path.join(args.out, "sweep", "ppo_lag", f"seed{args.seeds[0]}")}
    run_jobs([(policy[1], ppo_argv(args, "--seed", str(args.seeds[0])))], 1,
             args.jobs * args.threads)
    with open(os.path.join(args.data_dir, "prompts_train.jsonl")) as f:
        train_prompts = [json.loads(ln)["prompt"] for ln in f if ln.strip()]
    old = os.path.join(args.data_dir, "pref_train.jsonl")
    rm, cm = {1: args.rm}, {1: args.cm}
    for k in (2, 3):
        d = os.path.join(root, f"round{k}")
        # old + new, the training file of this round's score models
        pairs = os.path.join(d, "pref_train.jsonl.gz")
        if not os.path.exists(pairs):
            t0 = time.time()
            os.makedirs(d, exist_ok=True)
            ps, a0, a1 = sample_pairs(policy[k - 1], train_prompts, args.pairs_per_prompt, 1000 * k,
                                      24, args.jobs * args.threads)
            new = label_pairs(ps, a0, a1, seed=k)
            with open(os.path.join(d, "new_pairs.json"), "w") as f:
                json.dump({"n": len(new), "left_out_empty": len(ps) - len(new),
                           "from_policy": policy[k - 1], "seconds": time.time() - t0,
                           "identical_pairs": sum(r["response_0"] == r["response_1"]
                                                  for r in new)}, f)
            prev = os.path.join(root, f"round{k - 1}", "pref_train.jsonl.gz") if k > 2 else old
            opener = gzip.open if prev.endswith(".gz") else open
            with opener(prev, "rt") as f:
                lines = [ln for ln in f if ln.strip()]
            tmp = pairs + ".tmp"
            with gzip.open(tmp, "wt") as f:
                f.writelines(lines)
                f.writelines(json.dumps(r) + "\n" for r in new)
            os.replace(tmp, pairs)
            print(f"round {k}: {len(new)} new pairs from {policy[k - 1]} + {len(lines)} old -> "
                  f"{pairs} ({time.time() - t0:.0f} s)", flush=True)
        rm[k], cm[k] = os.path.join(d, "rm"), os.path.join(d, "cm")
        held_out = os.path.join(args.data_dir, "pref_test.jsonl")
        steps = ["--max_steps", str(args.pm_max_steps)] if args.pm_max_steps else []
        pm = ["--model", args.sft, "--train_data", pairs, "--eval_data", held_out]
        run_jobs([(rm[k], ["train_pm.py", "--kind", "reward", *pm, "--epochs", str(args.pm_epochs),
                           *steps]),
                  (cm[k], ["train_pm.py", "--kind", "cost", *pm, *steps])],
                 args.jobs, args.threads)
        policy[k] = os.path.join(d, "ppo_lag")
        run_jobs([(policy[k], ["train_ppo_lag.py", "--max_steps", str(args.steps),
                               "--show_every", "0", "--model", policy[k - 1],
                               "--reward_model", rm[k], "--cost_models", cm[k],
                               "--calibrate_on", args.sft, "--seed", str(args.seeds[0])])],
                 1, args.jobs * args.threads)
    # the control: as many more iterations from the same policies, without new data (round 1's
    # reward and cost models): does round k gain from its pairs, or only from 150 more iterations?
    control = {1: policy[1]}
    for k in (2, 3):
        control[k] = os.path.join(root, f"control{k}")
        run_jobs([(control[k], control_argv(args, control[k - 1]))], 1, args.jobs * args.threads)
    import torch
    torch.set_num_threads(args.jobs * args.threads)
    dirs = {"SFT": args.sft, **{f"round {k}": policy[k] for k in (1, 2, 3)},
            **{f"round {k}, no new data": control[k] for k in (2, 3)}}
    rows = elo_tournament(dirs, _eval_prompts(args), 4, 0, 24, args.n_boot)
    for k in (1, 2, 3):
        for kind, path in (("rm", rm[k]), ("cm", cm[k])):  # the controls use round 1's
            with open(os.path.join(path, "summary.json")) as f:
                rows[f"round {k}"][f"{kind}_eval"] = json.load(f)
    lines = [f"Round 1: PPO-Lag on the toy world's pairs; rounds 2, 3: + {args.pairs_per_prompt} "
             "oracle-labelled pairs per training prompt from the previous round's policy, "
             "reward/cost models retrained on old + new, PPO-Lag from the previous policy "
             f"({args.steps} iterations, seed {args.seeds[0]}). Elo: Bradley–Terry fit of gold "
             "pairwise judgements on the 352 held-out prompts × 4 samples "
             f"({rows['games_helpfulness']} helpfulness and {rows['games_harmlessness']} "
             "harmlessness games, ties dropped), "
             f"95% bootstrap intervals ({args.n_boot} resamples). 'No new data': the same "
             "iterations from the same starting policy with round 1's reward and cost models", "",
             "| policy | Elo helpfulness [95%] | Elo harmlessness [95%] | helpfulness, all "
             "| unsafe, harmful | reward model acc. (held-out) | cost model acc. |",
             "|---|---|---|---|---|---|---|"]
    for n in dirs:
        r = rows[n]

        def elo(axis):
            return "{:.0f} [{:.0f}, {:.0f}]".format(*r[f"elo_{axis}"])

        def acc(kind):
            if not r.get(f"{kind}_eval"):
                return ""
            return f"{r[f'{kind}_eval'].get('accuracy', float('nan')):.3f}"

        lines.append(f"| {n} | {elo('helpfulness')} | {elo('harmlessness')} | "
                     f"{r['gold_helpfulness']:.3f} | {r['gold_unsafe_rate_harmful']:.1%} | "
                     f"{acc('rm')} | {acc('cm')} |")
    write(args, "rounds", rows, "\n".join(lines))

# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["sweep", "budget", "tune", "compare", "upper",
                                           "offline", "agreement", "sign", "divisor", "grpo",
                                           "rounds"])
    ap.add_argument("--steps", type=int, default=None, help="PPO iterations per run, the same for "
                    "every run of an experiment (default: 350, the demo's, for budget, tune and "
                    "compare; 150 for the others)")
    ap.add_argument("--multipliers", nargs="+", default=["pid", "sgd"], choices=list(MULTIPLIERS),
                    help="budget: the multipliers to compare (the first: train_ppo_lag.py's "
                    "default)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.10],
                    help="upper: the budgets X of the gold runs (1%%: compare's)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds per configuration (rounds: the first)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", default="out/experiments",
                    help="where runs, tables (.md, .json) and figures go")
    ap.add_argument("--sft", default="out/sft", help="the SFT policy (train_sft.py)")
    ap.add_argument("--rm", default="out/rm", help="the reward model (train_pm.py --kind reward)")
    ap.add_argument("--cm", default="out/cm", help="the cost model (train_pm.py --kind cost)")
    ap.add_argument("--data_dir", default="data/toy", help="the toy world's files")
    ap.add_argument("--group_size", type=int, default=4, help="grpo: G answers per prompt")
    ap.add_argument("--pairs_per_prompt", type=int, default=16,
                    help="rounds: new labelled pairs per training prompt per round")
    ap.add_argument("--pm_epochs", type=int, default=1, help="rounds: reward model epochs on "
                    "old + new pairs (the first round's model: 2)")
    ap.add_argument("--pm_max_steps", type=int, default=0, help="rounds: cap the reward/cost "
                    "models' steps (0: the epochs; a quick check of the pipeline)")
    ap.add_argument("--n_boot", type=int, default=1000,
                    help="rounds, agreement: bootstrap resamples for the intervals")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 350 if args.experiment in ("budget", "tune", "compare", "upper",
                                                "divisor") else 150
    for path, what in [(args.sft, "train_sft.py"), (args.rm, "train_pm.py --kind reward"),
                       (args.cm, "train_pm.py --kind cost")]:
        if not os.path.isdir(path):
            sys.exit(f"error: {path}: no such folder; run `python {what}` first (or `make demo`)")
    t0 = time.time()
    experiment = {"sweep": sweep, "budget": budget, "tune": tune, "compare": compare,
                  "upper": upper, "offline": offline,
                  "agreement": agreement, "sign": sign, "divisor": divisor, "grpo": grpo,
                  "rounds": rounds}
    experiment[args.experiment](args)
    print(f"{args.experiment}: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()

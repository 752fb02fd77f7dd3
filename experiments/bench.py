"""
Speed and memory benchmarks. Only ratios measured in one run mean anything (these machines
are noisy), so every table holds a reference measured beside what it is compared with.
From the repository root:

    python -m experiments.bench                        # our generation loop vs transformers'
    python -m experiments.bench --ppo                  # one PPO / PPO-Lag iteration, per phase
    python -m experiments.bench --ppo --trl /tmp/trl-venv/bin/python
                                                       # ... alternating with TRL's PPOTrainer
    python -m experiments.bench --device cuda --dtype bf16 --size large
    python -m experiments.bench --memory --real_model FOLDER
                                                       # peak memory: full, gradient
                                                       # checkpointing, LoRA
    python -m experiments.bench --constraints          # PPO-Lag iteration time at K = 1 / 5 /
                                                       # 100 constraints

--ppo runs train_ppo_lag.py itself (a subprocess per run) at the settings of TRL's anchor
benchmark (experiments/trl_ppo.py, which --trl runs): random-init Llama models of the same shape, a
303-token word vocabulary, 64 prompts of 12-16 tokens, exactly 32 new tokens (EOS held back
with --min_new_tokens), temperature 1, one minibatch of 64. Its per-iteration seconds and
phases come from the run's metrics.jsonl ("iteration_s", "time_s"); the first iteration is
warm-up. Models are random, built from a config: nothing is downloaded, nothing is trained.
"""

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from nanosafe.generate import generate
from nanosafe.toy import TOY_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TRAIN_PPO = os.path.join(ROOT, "train_ppo_lag.py")

parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="generation: the weights' dtype; --ppo: train_ppo_lag.py --dtype "
                    "(bf16 autocast, fp32 master weights)")
parser.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
parser.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (TRL's anchor uses 2)")
parser.add_argument("--json", default=None, help="also write every number measured to this file")
# generation
parser.add_argument("--size", choices=["small", "medium", "large"], default="medium",
                    help="generation: the toy sizes (nanosafe.toy.TOY_SIZES): small 64/3, "
                    "medium 128/4 (1.1M), large 256/6 (6.5M)")
parser.add_argument("--batch_size", type=int, default=64, help="generation: prompts per batch")
parser.add_argument("--prompt_len", type=int, default=32, help="generation: prompt tokens per "
                    "row (rows left-padded to different lengths)")
parser.add_argument("--new_tokens", type=int, default=64,
                    help="generation: max new tokens per row")
parser.add_argument("--runs", type=int, default=5,
                    help="generation: timed runs per row; the table shows their median")
parser.add_argument("--warmup", type=int, default=1,
                    help="generation: untimed runs before the timed ones")
# one PPO iteration
parser.add_argument("--ppo", action="store_true",
                    help="benchmark one PPO / PPO-Lag iteration of train_ppo_lag.py instead")
parser.add_argument("--shapes", nargs="*", default=["128x4", "256x6"],
                    help="--ppo: model shapes, hidden x layers (4 heads)")
parser.add_argument("--epochs", nargs="*", type=int, default=[1, 4],
                    help="--ppo: PPO epochs per iteration")
parser.add_argument("--algos", nargs="*", default=["ppo", "ppo_lag"], choices=["ppo", "ppo_lag"],
                    help="--ppo: which of ours to run")
parser.add_argument("--ppo_dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="--ppo: our runs' compute (bf16: autocast with fp32 master weights); "
                    "TRL's anchor runs fp32")
parser.add_argument("--iters", type=int, default=8, help="--ppo: iterations per run; the first "
                    "is warm-up (TRL's anchor: 8)")
parser.add_argument("--rounds", type=int, default=2,
                    help="--ppo: runs of each configuration, alternating ours with TRL's")
parser.add_argument("--trl", default=None, metavar="PYTHON", help="--ppo: a Python with trl "
                    "1.12.0 (its venv: experiments/trl_ppo.py) to run TRL's anchor beside ours")
parser.add_argument("--trl_script", help="--ppo: TRL's anchor script",
                    default=os.path.join(ROOT, "experiments", "trl_ppo.py"))
# memory
parser.add_argument("--constraints", action="store_true", help="PPO-Lag seconds per iteration "
                    "with one K-output cost model, K = --ks (synthetic categories; one cost critic "
                    "with K outputs, K λ), and K separate cost models for the first K > 1")
parser.add_argument("--ks", nargs="*", type=int, default=[1, 5, 100],
                    help="--constraints: the K values")
parser.add_argument("--memory", action="store_true", help="peak memory of a PPO-Lag run: full "
                    "fine-tuning, --gradient_checkpointing, --lora_rank 8")
parser.add_argument("--real_model", default=None, metavar="FOLDER",
                    help="--memory: also a real causal LM folder (e.g. SmolLM2-135M-Instruct; "
                    "README: Memory), with score models made from it")
args = parser.parse_args()

device = torch.device(args.device)
cuda = device.type == "cuda"
# generate() warns about flags it ignores; not useful here
transformers.logging.set_verbosity_error()


def versions():
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {args.threads} cpu threads"
            + (f", {torch.cuda.get_device_name()}" if cuda else ""))


def med_range(xs):
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


# =============================================================================
# generation: our loop against transformers' generate, sampling at temperature 1

class Row(NamedTuple):
    name: str
    median: float  # things per second: higher is better
    unit: str
    peak_mb: float | None  # peak accelerator memory during the timed runs; None: not measurable
    ref: str | None = None  # the row this one is divided by in the ratio column


def bench_generation():
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    VOCAB, PAD, EOS = 300, 0, 2
    torch.manual_seed(args.seed)
    hidden, layers, heads = TOY_SIZES[args.size]
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=args.prompt_len + args.new_tokens,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, hidden_size=hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    # prompt lengths spread between half and the full length, so left padding is exercised
    B, P = args.batch_size, args.prompt_len
    lens = torch.linspace(P // 2, P, B).long()
    input_ids = torch.randint(3, VOCAB, (B, P))
    attention_mask = (torch.arange(P)[None, :] >= (P - lens)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD).to(device)
    attention_mask = attention_mask.to(device)

    def measure(fn):
        """fn() does one unit of work and returns how many tokens it made -> (median tokens/s,
        peak MB)"""
        for _ in range(args.warmup):
            fn()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rates = []
        for _ in range(args.runs):
            if cuda:
                torch.cuda.synchronize()  # kernels are async: time the work, not the launch
            t0 = time.perf_counter()
            n = fn()
            if cuda:
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t0))
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        return statistics.median(rates), peak

    def hf():
        # transformers' own loop; its default top_k=50 switched off to do the same work as ours
        out = model.generate(input_ids, attention_mask=attention_mask, do_sample=True, top_k=0,
                             top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, eos_token_id=EOS, pad_token_id=PAD)
        return B * (out.size(1) - P)

    g = torch.Generator(device=device).manual_seed(args.seed)

    def ours():
        out = generate(model, input_ids, attention_mask, args.new_tokens, eos_token_id=EOS,
                       pad_token_id=PAD, temperature=1.0, generator=g,
                       min_new_tokens=args.new_tokens)
        return B * (out.size(1) - P)

    (hf_rate, hf_peak), (our_rate, our_peak) = measure(hf), measure(ours)
    rows = [Row("generate: transformers", hf_rate, "new tok/s", hf_peak),
            Row("generate: nanosafe", our_rate, "new tok/s", our_peak,
                ref="generate: transformers")]
    print(versions())
    print(f"model: random Llama '{args.size}' ({n_params / 1e6:.2f}M params, vocab {VOCAB}), "
          f"{args.device} {args.dtype}; batch {B}, prompt {P}, exactly {args.new_tokens} new "
          f"tokens, sampling; median of {args.runs} runs after {args.warmup} warm-up\n")
    by_name = {r.name: r for r in rows}
    print(f"| {'benchmark':<24} | {'median':>10} | {'unit':<10} | {'ratio':>13} "
          f"| {'peak mem':>9} |")
    print(f"|{'-' * 26}|{'-' * 11}:|{'-' * 12}|{'-' * 14}:|{'-' * 10}:|")
    for r in rows:
        ratio = f"{r.median / by_name[r.ref].median:.2f}x ref" if r.ref else "ref"
        peak = f"{r.peak_mb:.0f} MB" if r.peak_mb is not None else "n/a"
        print(f"| {r.name:<24} | {r.median:>10.0f} | {r.unit:<10} | {ratio:>13} | {peak:>9} |")
    if not cuda:  # ru_maxrss is the process's high-water mark (KiB on Linux), not per row
        print("\nprocess peak RSS (all rows together): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return {"versions": versions(), "rows": [r._asdict() for r in rows]}


# =============================================================================
# one PPO iteration: train_ppo_lag.py at TRL's anchor settings, alternating with TRL

def word_tokenizer(n_words=300):
    """a word-level tokenizer of <pad>, <eos>, <unk> + n_words words, as the anchor's; its chat
    template is the prompt itself, so a prompt of n words is n tokens"""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    words = [f"w{i}" for i in range(n_words)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                 unk_token="<unk>", padding_side="left")
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return hf, words


def ppo_world(root, hidden, layers):
    """random-init policy, reward model and cost model folders + 512 prompts -> their paths"""
    from transformers import AutoModelForSequenceClassification
    tok, words = word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=4 * hidden,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    paths = {}
    for i, name in enumerate(["policy", "reward", "cost"]):
        torch.manual_seed(args.seed + i)
        if name == "policy":
            m = LlamaForCausalLM(cfg)
        else:
            m = AutoModelForSequenceClassification.from_config(LlamaConfig(**cfg.to_dict(),
                                                                           num_labels=1))
        paths[name] = os.path.join(root, name)
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    rng = random.Random(args.seed)
    paths["prompts"] = os.path.join(root, "prompts.jsonl")
    with open(paths["prompts"], "w") as f:
        for _ in range(512):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(12, 16)))
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return paths


def run_child(cmd):
    """-> (stdout, peak RSS of that child in MB): os.wait4 reports the child's own rusage"""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        _, status, usage = os.wait4(p.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{err.read()[-3000:]}")
        return out.read(), usage.ru_maxrss / 1024


def run_train_ppo(world, out_dir, rollouts, new_tokens, iters, *flags):
    """train_ppo_lag.py on a bench world: one minibatch of `rollouts`, exactly `new_tokens` new
    tokens, no evaluation, display or checkpoint between iterations -> (its iteration records, the
    child's peak RSS in MB)"""
    cmd = [sys.executable, TRAIN_PPO, "--model", world["policy"], "--reward_model", world["reward"],
           "--train_data", world["prompts"], "--template", "chat",
           "--rollout_batch_size", str(rollouts), "--minibatch_size", str(rollouts),
           "--micro_batch_size", str(rollouts), "--max_new_tokens", str(new_tokens),
           "--min_new_tokens", str(new_tokens), "--max_steps", str(iters), "--eval_every", "0",
           "--show_every", "0", "--ckpt_every", str(10**6), "--threads", str(args.threads),
           "--device", args.device, "--seed", str(args.seed), "--out_dir", out_dir, *flags]
    _, peak = run_child(cmd)
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r for r in recs if "iteration_s" in r], peak


def run_ours(world, algo, dtype, epochs, out_dir):
    # --algo ppo without a cost model: the same work as TRL's PPO (no cost forward to log)
    costs = (["--cost_models"] if algo == "ppo"
             else ["--cost_models", world["cost"], "--thresholds", "0"])
    recs, peak = run_train_ppo(world, out_dir, 64, 32, args.iters, "--algo", algo, *costs,
                               "--ppo_epochs", str(epochs), "--temperature", "1",
                               "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    recs = recs[1:]  # the first iteration is warm-up
    phases = {k: statistics.median(r["time_s"].get(k, 0.0) for r in recs)
              for k in recs[0]["time_s"]}
    return {"s_per_iter": [r["iteration_s"] for r in recs], "phases": phases, "peak_rss_mb": peak}


def run_trl(hidden, layers, epochs):
    cmd = [args.trl, os.path.abspath(args.trl_script), "--hidden", str(hidden),
           "--layers", str(layers), "--heads", "4", "--ppo_epochs", str(epochs),
           "--iters", str(args.iters), "--threads", str(args.threads), "--seed", str(args.seed)]
    out, peak = run_child(cmd)
    res = json.loads(out.strip().splitlines()[-1])
    iters = res["results"]["sec_per_iter_all"][res["settings"]["warmup_iters"]:]
    return {"s_per_iter": iters, "phases": res.get("breakdown_median_s_per_iter", {}),
            "peak_rss_mb": peak}


# what counts as model work in an iteration of ours: generation, forwards, backwards
MODEL_WORK = ["generate", "scores", "update"]


def bench_ppo():
    if args.trl and not os.path.exists(args.trl_script):
        sys.exit(f"error: --trl_script {args.trl_script}: no such file")
    if args.trl:  # before any run: a Python without TRL would fail only after ours, minutes in
        try:
            p = subprocess.run([args.trl, "-c", "import trl.experimental.ppo"],
                               capture_output=True, text=True)
            why = (p.stderr.strip().splitlines() or ["?"])[-1] if p.returncode else None
        except OSError as e:
            why = e.strerror
        if why:
            sys.exit(f"error: --trl {args.trl}: no TRL with PPO there ({why}); make its venv as "
                     "experiments/trl_ppo.py says")
    print(versions())
    print("one iteration: 64 prompts of 12-16 tokens, exactly 32 new tokens, temperature 1, one "
          f"minibatch of 64; {args.iters} iterations per run (the first is warm-up), "
          f"{args.rounds} rounds alternating"
          + (", TRL's PPOTrainer (fp32) beside ours" if args.trl else "") + f"; {args.device}")
    results = []
    # "ppo fp32", "ppo_lag bf16", ...
    ours = [f"{a} {d}" for d in args.ppo_dtypes for a in args.algos]
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shapes:
            hidden, layers = map(int, shape.split("x"))
            world = ppo_world(os.path.join(root, shape), hidden, layers)
            for epochs in args.epochs:
                runs = {}
                for rnd in range(args.rounds):
                    for who in (["trl"] if args.trl else []) + ours:
                        if who == "trl":
                            r = run_trl(hidden, layers, epochs)
                        else:
                            run_dir = os.path.join(
                                root, f"run_{shape}_{epochs}_{who.replace(' ', '_')}_{rnd}")
                            r = run_ours(world, *who.split(" "), epochs, run_dir)
                        runs.setdefault(who, []).append(r)
                        print(f"  {shape} {epochs} epoch(s) {who:<8} round {rnd}: "
                              f"{med_range(r['s_per_iter'])} s/iteration", flush=True)
                row = {"shape": shape, "epochs": epochs}
                for who, rs in runs.items():
                    s = [x for r in rs for x in r["s_per_iter"]]
                    phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in rs)
                              for k in rs[0]["phases"]}
                    row[who] = {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s),
                                "all_s": s, "phases_s": phases,
                                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
                results.append(row)

    print(f"\nseconds per iteration, median (min-max) over {args.rounds} x {args.iters - 1} "
          "iterations; speed-up = TRL's median / ours")
    head = ["shape", "epochs"] + (["TRL PPO fp32"] if args.trl else [])
    head += [f"nanosafe {a}" for a in ours]
    head += [f"speed-up {a}" for a in ours] if args.trl else []
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in results:
        who = (["trl"] if args.trl else []) + ours
        cells = [row["shape"], str(row["epochs"])] + \
                [f"{row[w]['median_s']:.3f} ({row[w]['min_s']:.2f}-{row[w]['max_s']:.2f})"
                 for w in who]
        cells += ([f"{row['trl']['median_s'] / row[a]['median_s']:.2f}x" for a in ours]
                  if args.trl else [])
        print("| " + " | ".join(cells) + " |")

    print("\nwhere our time goes (median seconds per iteration and share; peak RSS of the whole "
          "run)")
    for row in results:
        for a in ours:
            ph = row[a]["phases_s"]
            total = sum(ph.values())
            work = sum(ph.get(k, 0.0) for k in MODEL_WORK) / total
            row[a]["model_work_share"] = work
            parts = ", ".join(f"{k} {v:.3f} ({v / total:.0%})" for k, v in ph.items())
            print(f"  {row['shape']} {row['epochs']} ep {a}: {parts} | "
                  f"generation+forwards+backwards {work:.0%} "
                  f"| peak RSS {row[a]['peak_rss_mb']:.0f} MB"
                  + (f" (TRL {row['trl']['peak_rss_mb']:.0f} MB)" if args.trl else ""))
    return {"versions": versions(), "settings": vars(args), "results": results}


# =============================================================================
# peak memory: the same PPO-Lag run in full fine-tuning, with gradient checkpointing, with LoRA

MEMORY_MODES = {"full": [], "gradient checkpointing": ["--gradient_checkpointing"],
                "LoRA r=8": ["--lora_rank", "8"]}


def real_world(root, folder):
    """reward and cost folders made from a real policy folder (its backbone + a fresh head) and 64
    short prompts"""
    from nanosafe.model import ScoreModel, load_policy, save_checkpoint
    policy, tok = load_policy(folder)
    paths = {"policy": folder}
    for i, name in enumerate(["reward", "cost"]):
        torch.manual_seed(args.seed + i)
        paths[name] = os.path.join(root, name)
        save_checkpoint(paths[name], ScoreModel.from_policy(policy, name), tok,
                        {"kind": name, "template": "chat"})
    topics = ["bread", "a bicycle", "tax forms", "a garden", "chess", "a resume", "the moon",
              "soup"]
    paths["prompts"] = os.path.join(root, "prompts.jsonl")
    with open(paths["prompts"], "w") as f:
        for i in range(64):
            prompt = f"How do I get better at {topics[i % len(topics)]}? Give me {i % 5 + 2} tips."
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return paths


def bench_memory():
    print(versions())
    worlds = [("toy medium (1.2M, 128x4)", dict(rollouts=64, new_tokens=64, iters=3),
               lambda root: ppo_world(root, 128, 4))]
    if args.real_model:
        worlds.append((os.path.basename(args.real_model.rstrip("/")),
                       dict(rollouts=8, new_tokens=32, iters=2),
                       lambda root: real_world(root, args.real_model)))
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name, s, build in worlds:
            world = build(os.path.join(root, name.split()[0]))
            row = {"model": name, "settings": s}
            for mode, flags in MEMORY_MODES.items():
                out_dir = os.path.join(root, f"run_{len(results)}_{mode.split()[0]}")
                recs, peak = run_train_ppo(world, out_dir, s["rollouts"], s["new_tokens"],
                                           s["iters"], "--cost_models", world["cost"],
                                           "--thresholds", "0", *flags)
                secs = statistics.median(r["iteration_s"] for r in recs)
                row[mode] = {"peak_rss_mb": peak, "s_per_iter": secs}
                print(f"  {name} {mode}: peak RSS {peak:.0f} MB, {secs:.2f} s/iteration",
                      flush=True)
            results.append(row)
    print("\npeak resident memory of the whole PPO-Lag process (6 models, 3 optimisers), MB; in "
          "brackets: vs full")
    print("| model | rollouts x new tokens | " + " | ".join(MEMORY_MODES) + " |")
    print("|---|---|" + "---|" * len(MEMORY_MODES))
    for row in results:
        full = row["full"]["peak_rss_mb"]
        cells = [f"{row[m]['peak_rss_mb']:.0f}"
                 + ("" if m == "full" else f" ({row[m]['peak_rss_mb'] - full:+.0f})")
                 for m in MEMORY_MODES]
        print(f"| {row['model']} | {row['settings']['rollouts']} x {row['settings']['new_tokens']} "
              "| " + " | ".join(cells) + " |")
    return {"versions": versions(), "settings": vars(args), "results": results}


def k_cost_model(world, root, k):
    """a random-init cost model of the bench world's shape with k outputs (categories cat_0 ...)
    -> its folder"""
    from transformers import AutoModelForSequenceClassification

    from nanosafe.model import ScoreModel, load_tokenizer, save_checkpoint
    names = [f"cat_{i}" for i in range(k)]
    cfg = LlamaConfig.from_pretrained(world["policy"])
    cfg.num_labels, cfg.id2label = k, dict(enumerate(names))
    cfg.label2id = {n: i for i, n in enumerate(names)}
    torch.manual_seed(args.seed + 2)
    path = os.path.join(root, f"cost_k{k}")
    save_checkpoint(path, ScoreModel(AutoModelForSequenceClassification.from_config(cfg), "cost"),
                    load_tokenizer(world["policy"]),
                    {"kind": "cost", "categories": names if k > 1 else None})
    return path


def bench_constraints():
    """K constraints from one K-output cost model cost K heads' outputs, K GAE passes and K λ
    steps, not K models. Rounds alternate the configurations, so a slow spell of the machine hits
    them all."""
    print(versions())
    s = dict(rollouts=64, new_tokens=32, iters=args.iters)
    with tempfile.TemporaryDirectory() as root:
        world = ppo_world(root, 128, 4)
        configs = {f"K = {k}, one cost model": ([k_cost_model(world, root, k)], k) for k in args.ks}
        k_sep = next((k for k in args.ks if k > 1), None)
        if k_sep:
            configs[f"K = {k_sep}, {k_sep} separate cost models"] = ([world["cost"]] * k_sep, k_sep)
        times = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, (folders, k) in configs.items():
                out_dir = os.path.join(root, f"run_{r}_{len(times[name])}_{k}")
                recs, _ = run_train_ppo(world, out_dir, s["rollouts"], s["new_tokens"], s["iters"],
                                        "--cost_models", *folders, "--thresholds", *["0"] * k)
                # the first iteration is warm-up
                times[name] += [x["iteration_s"] for x in recs[1:]]
                print(f"  round {r}: {name}: {statistics.median(times[name]):.3f} s/iteration",
                      flush=True)
    base = statistics.median(next(iter(times.values())))
    print(f"\nPPO-Lag seconds per iteration (median of {args.rounds} x {args.iters - 1}), toy "
          f"medium 128x4, {s['rollouts']} rollouts x {s['new_tokens']} tokens:")
    print("| constraints | s / iteration | vs K = 1 |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f}x |")
    return {"versions": versions(), "settings": vars(args), "s_per_iter": times}


if __name__ == "__main__":
    report = (bench_memory() if args.memory else bench_constraints() if args.constraints
              else bench_ppo() if args.ppo else bench_generation())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")

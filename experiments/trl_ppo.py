"""
The speed anchor: Hugging Face TRL's PPOTrainer timed on the shapes `experiments.bench --ppo`
gives our train_ppo_lag.py, so the two can be measured side by side in one run.

    VENV/bin/python experiments/trl_ppo.py --iters 8 --ppo_epochs 1    # one JSON line on stdout
    python -m experiments.bench --ppo --trl VENV/bin/python           # ours alternating with it

It needs TRL 1.12.0 (`trl.experimental.ppo`, the last release with PPO) in a venv of its own,
never the project's environment (TRL pins its own transformers):

    python3 -m venv ../trl-venv
    ../trl-venv/bin/pip install torch==2.13.0      # first, so pip keeps the CPU wheel
    ../trl-venv/bin/pip install trl==1.12.0 transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0

(../shared/bench/requirements-trl-ppo.txt, where that folder exists, pins every package.)

What one iteration is: 64 episodes in one minibatch, prompts of 12-16 tokens from a 303-token
word vocabulary (pad != eos), exactly 32 new tokens (no stop token) at temperature 1, then
--ppo_epochs PPO epochs. Policy, its copy as the reference, a reward model and a value model are
random-init Llamas (hidden x layers, 4 heads, intermediate 4 x hidden, untied, fp32, CPU, one
process); everything else is TRL's default (kl_coef 0.05, cliprange 0.2, vf_coef 0.1, gamma 1,
lam 0.95, whitened advantages). Its time is the wall time between two `on_step_end` callbacks
(the first from `on_train_begin`); the first iteration is warm-up, the median is over the rest.

Unless --no_breakdown, timers around TRL's module-level helpers (generation, forwards, rewards,
log-softmax), the backward, the optimiser step, gc.collect and logging split each iteration into
phases; "other" is what is left (GAE, whitening, masks, metrics, collate).

experiments/bench.py reads results.sec_per_iter_all, settings.warmup_iters and
breakdown_median_s_per_iter from the JSON line; the rest is for the record.
"""

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import types

# read by huggingface_hub, trl and accelerate when they are imported (below, inside functions):
# nothing from the hub, no telemetry, and the CPU even where a GPU is (PPOTrainer builds its own
# Accelerator and ignores use_cpu)
QUIET_OFFLINE_CPU = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                     "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_DISABLED": "true",
                     "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
SPECIALS = ["<pad>", "<eos>", "<unk>"]  # word k is token k + 3


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # the models
    ap.add_argument("--hidden", type=int, default=128, help="hidden size (256 with --layers 6: "
                    "6.5M parameters)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 4 x hidden)")
    ap.add_argument("--vocab_words", type=int, default=300, help="words besides the 3 specials")
    # the rollout and the update
    ap.add_argument("--batch", type=int, default=64, help="episodes per PPO iteration")
    ap.add_argument("--num_mini_batches", type=int, default=1,
                    help="minibatches per epoch, an optimiser step each (TRL's default 1)")
    ap.add_argument("--response_length", type=int, default=32, help="new tokens per episode")
    ap.add_argument("--ppo_epochs", type=int, default=1, help="PPO epochs per iteration")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    ap.add_argument("--n_prompts", type=int, default=512, help="prompts in the dataset")
    ap.add_argument("--prompt_min", type=int, default=12, help="shortest prompt, tokens")
    ap.add_argument("--prompt_max", type=int, default=16, help="longest prompt, tokens")
    # the run
    ap.add_argument("--iters", type=int, default=8, help="PPO iterations; the first is warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
    ap.add_argument("--no_breakdown", action="store_true",
                    help="time whole iterations only, TRL unpatched")
    args = ap.parse_args(argv)
    for flag in ("hidden", "layers", "heads", "vocab_words", "batch", "num_mini_batches",
                 "response_length", "ppo_epochs", "n_prompts", "prompt_min", "iters", "threads"):
        if getattr(args, flag) < 1:
            ap.exit(2, f"error: --{flag} {getattr(args, flag)}: must be >= 1\n")
    if args.batch % args.num_mini_batches:
        ap.exit(2, f"error: --batch {args.batch} is not a multiple of --num_mini_batches "
                f"{args.num_mini_batches}\n")
    if args.prompt_max < args.prompt_min:
        ap.exit(2, f"error: --prompt_max {args.prompt_max} < --prompt_min {args.prompt_min}\n")
    return args


# -----------------------------------------------------------------------------
# the world: tokenizer, four random models, prompts

def word_tokenizer(n_words):
    """Word-level, left padding (TRL's PPO wants left-padded queries); pad and eos differ, so an
    EOS is never masked as padding."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{k}" for k in range(n_words)])}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def random_models(args, tok):
    """-> (config, policy, reference, reward model, value model), seeded one by one."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      intermediate_size=args.intermediate or 4 * args.hidden,
                      max_position_embeddings=max(256, args.prompt_max + args.response_length + 8),
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    policy = LlamaForCausalLM(cfg)
    policy.generation_config.pad_token_id = tok.pad_token_id
    reference = copy.deepcopy(policy)  # the "SFT" model PPO starts from
    score_cfg = copy.deepcopy(cfg)
    score_cfg.num_labels = 1  # one scalar per token
    scorers = []
    for k in (1, 2):  # the reward model, then the value model
        torch.manual_seed(args.seed + k)
        scorers.append(AutoModelForSequenceClassification.from_config(score_cfg))
    return cfg, policy, reference, *scorers


def prompt_dataset(args):
    from datasets import Dataset
    rng = random.Random(args.seed)
    rows = [[len(SPECIALS) + rng.randrange(args.vocab_words)
             for _ in range(rng.randint(args.prompt_min, args.prompt_max))]
            for _ in range(args.n_prompts)]
    return Dataset.from_dict({"input_ids": rows})


# -----------------------------------------------------------------------------
# timing

class Phases:
    """Seconds and calls per phase since the last take(); wrap() puts a function under a phase."""

    def __init__(self):
        self.s, self.n = {}, {}

    def wrap(self, fn, phase):
        """phase: a name, or a function of fn's arguments that returns one."""
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                name = phase(*a, **kw) if callable(phase) else phase
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0
                self.n[name] = self.n.get(name, 0) + 1
        return timed

    def take(self):
        out = self.s, self.n
        self.s, self.n = {}, {}
        return out


def patch_phases(trainer, phases):
    """Time TRL's helpers where its PPO loop looks them up (module globals), so each call counts
    once. The phases never nest, so what an iteration spends outside them is TRL's glue."""
    import torch
    import trl.experimental.ppo.ppo_trainer as loop

    def grad_or(train, rollout):  # the same helper serves the rollout (no grad) and the update
        return lambda *a, **kw: train if torch.is_grad_enabled() else rollout

    loop.batch_generation = phases.wrap(loop.batch_generation, "rollout.generate")
    loop.forward = phases.wrap(loop.forward, grad_or("train.forward(policy+value)",
                                                     "rollout.ref_forward"))
    loop.selective_log_softmax = phases.wrap(loop.selective_log_softmax,
                                             grad_or("train.logprob", "rollout.logprob"))
    reward_model = trainer.reward_model
    loop.get_reward = phases.wrap(loop.get_reward, lambda model, *a, **kw: (
        "rollout.reward_forward" if model is reward_model else "rollout.value_forward"))
    # TRL collects garbage twice an iteration: with the HF stack loaded that is not free
    loop.gc = types.SimpleNamespace(collect=phases.wrap(gc.collect, "gc.collect"))
    trainer.accelerator.backward = phases.wrap(trainer.accelerator.backward, "train.backward")
    trainer.optimizer.step = phases.wrap(trainer.optimizer.step, "train.optimizer_step")
    trainer.log = phases.wrap(trainer.log, "trainer.log")


def cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mib():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    for k, v in QUIET_OFFLINE_CPU.items():
        os.environ.setdefault(k, v)
    try:
        import trl
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as e:
        sys.exit(f"error: no TRL with PPO in {sys.executable} ({e}); make its venv as this "
                 "file's docstring says")
    import warnings

    import accelerate
    import datasets
    import numpy as np
    import torch
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()

    load_before, t0 = os.getloadavg(), time.perf_counter()
    tok = word_tokenizer(args.vocab_words)
    cfg, policy, reference, reward_model, value_model = random_models(args, tok)
    ppo_cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_ppo_"), seed=args.seed,
        # one iteration = per_device_train_batch_size x gradient_accumulation_steps episodes
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=args.batch, num_mini_batches=args.num_mini_batches,
        total_episodes=args.iters * args.batch, num_ppo_epochs=args.ppo_epochs,
        # no stop token: every iteration generates batch x response_length tokens, as ours
        response_length=args.response_length, stop_token=None, temperature=1.0,
        learning_rate=args.lr,
        # fp32 on the CPU, nothing saved, evaluated, sampled for show or reported
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", num_sample_generations=0, report_to="none",
        logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0, push_to_hub=False)
    trainer = PPOTrainer(args=ppo_cfg, processing_class=tok, model=policy, ref_model=reference,
                         reward_model=reward_model, value_model=value_model,
                         train_dataset=prompt_dataset(args))
    for cb in (PrinterCallback, ProgressCallback):  # they print metrics every iteration
        trainer.remove_callback(cb)
    phases = Phases()
    if not args.no_breakdown:
        patch_phases(trainer, phases)

    seconds, cpu_share, per_iter, last_logs = [], [], [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            phases.take()
            self.t, self.cpu = time.perf_counter(), cpu_seconds()

        def on_step_end(self, *a, **kw):
            t, cpu = time.perf_counter(), cpu_seconds()
            seconds.append(t - self.t)
            cpu_share.append((cpu - self.cpu) / (t - self.t))  # 2.0: both cores are ours
            per_iter.append(phases.take())
            self.t, self.cpu = t, cpu

        def on_log(self, *a, logs=None, **kw):
            last_logs.update(logs or {})

    trainer.add_callback(Clock())
    setup_s, rss_setup = time.perf_counter() - t0, peak_rss_mib()
    t0 = time.perf_counter()
    # TRL prints "===training policy===" with accelerator.print: stdout holds only the JSON
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    train_s = time.perf_counter() - t0

    warmup = 1 if len(seconds) > 1 else 0
    timed = seconds[warmup:]
    med = statistics.median(timed)
    new_tokens = args.batch * args.response_length
    out = {
        "bench": "trl_ppo",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "trl": trl.__version__, "transformers": transformers.__version__,
                     "datasets": datasets.__version__, "accelerate": accelerate.__version__,
                     "numpy": np.__version__},
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(),
                    "loadavg_start": [round(x, 2) for x in load_before],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {**{k: v for k, v in vars(args).items() if k != "no_breakdown"},
                     "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
                     "params_policy": sum(p.numel() for p in policy.parameters()),
                     "params_value": sum(p.numel() for p in value_model.parameters()),
                     "attn_implementation": getattr(policy.config, "_attn_implementation", None),
                     "local_mini_batch_size": ppo_cfg.local_mini_batch_size,
                     "warmup_iters": warmup, "temperature": 1.0, "dtype": str(policy.dtype),
                     "device": str(trainer.accelerator.device),
                     "num_processes": trainer.accelerator.num_processes,
                     "breakdown_patches": not args.no_breakdown},
        "results": {"sec_per_iter_median": round(med, 4),
                    "sec_per_iter_mean": round(statistics.mean(timed), 4),
                    "sec_per_iter_min": round(min(timed), 4),
                    "sec_per_iter_max": round(max(timed), 4),
                    "sec_per_iter_all": [round(s, 4) for s in seconds],
                    "episodes_per_s": round(args.batch / med, 3),
                    "gen_tokens_per_iter": new_tokens,
                    "gen_tokens_per_s": round(new_tokens / med, 1),
                    "cpu_util_median": round(statistics.median(cpu_share[warmup:]), 3),
                    "peak_rss_mib": peak_rss_mib(), "peak_rss_after_setup_mib": rss_setup,
                    "setup_s": round(setup_s, 3), "train_total_s": round(train_s, 3)},
        "last_metrics": {k: round(v, 5) if isinstance(v, float) else v
                         for k, v in last_logs.items()
                         if k in ("objective/kl", "objective/entropy", "objective/scores",
                                  "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
                                  "episode")},
    }
    rows = per_iter[warmup:]
    if not args.no_breakdown and warmup:
        names = sorted({name for s, _ in rows for name in s})
        bd = {name: round(statistics.median(s.get(name, 0.0) for s, _ in rows), 4)
              for name in names}
        glue = [t - sum(s.values()) for t, (s, _) in zip(timed, rows)]
        bd["other(glue: GAE, whitening, masks, metrics, collate)"] = round(
            statistics.median(glue), 4)
        out["breakdown_median_s_per_iter"] = bd
        out["breakdown_calls_per_iter"] = rows[-1][1]
        out["results"]["sec_per_iter_median_excl_gc"] = round(statistics.median(
            t - s.get("gc.collect", 0.0) for t, (s, _) in zip(timed, rows)), 4)
        if bd.get("rollout.generate"):
            out["results"]["generate_only_tokens_per_s"] = round(
                new_tokens / bd["rollout.generate"], 1)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()

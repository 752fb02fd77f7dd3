"""
Speed and memory benchmarks, printed as one table: the median of several timed runs
(after warm-up) per row, and a ratio against a reference row measured in the same run.

    python bench.py                                  # the 'medium' toy size (1.1M) on CPU, fp32
    python bench.py --device cuda --dtype bf16 --size large

Adding a row (say, an SFT forward/backward step, or one PPO iteration) means writing
one function that returns a Row and appending it to BENCHES at the bottom.
Models are random, built from a config: nothing is downloaded, nothing is trained.
"""

import argparse
import platform
import resource
import statistics
import time
from typing import NamedTuple

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from nanosafe.generate import generate
from nanosafe.model import TOY_SIZES

parser = argparse.ArgumentParser(description="nanosafe benchmarks")
# What to run
parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run")
parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights and activations dtype")
parser.add_argument("--size", choices=["small", "medium", "large"], default="medium",
                    help="the toy world's sizes (nanosafe.model.TOY_SIZES): small hidden 64, 3 layers (the default toy policy, "
                         "0.25M with the toy vocabulary); medium hidden 128, 4 layers (1.1M); large hidden 256, 6 layers (6.5M)")
# Workload
parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch")
parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row (rows are left-padded to different lengths)")
parser.add_argument("--new_tokens", type=int, default=64, help="max new tokens per row")
# Measurement
parser.add_argument("--runs", type=int, default=5, help="timed runs per row; the table shows their median")
parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
parser.add_argument("--seed", type=int, default=0, help="seed for weights, prompts and sampling")
parser.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default). on a busy machine use fewer than the free cores: "
                         "a descheduled OpenMP thread stalls every small matmul")
args = parser.parse_args()

device = torch.device(args.device)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
cuda = device.type == "cuda"
if args.threads > 0:
    torch.set_num_threads(args.threads)
transformers.logging.set_verbosity_error()  # generate() warns about flags it ignores; not useful here

# -----------------------------------------------------------------------------
# the workload: a random tiny Llama and a left-padded batch of random prompts

VOCAB, PAD, EOS = 300, 0, 2

torch.manual_seed(args.seed)
hidden, layers, heads = TOY_SIZES[args.size]
cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=args.prompt_len + args.new_tokens,
                  pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=4 * hidden)
model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
n_params = sum(p.numel() for p in model.parameters())

# prompt lengths spread between half and the full length, so left padding is exercised
B, P = args.batch_size, args.prompt_len
lens = torch.linspace(P // 2, P, B).long()
input_ids = torch.randint(3, VOCAB, (B, P))
attention_mask = (torch.arange(P)[None, :] >= (P - lens)[:, None]).long()
input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

# -----------------------------------------------------------------------------
# measuring


class Row(NamedTuple):
    name: str
    median: float  # higher is better for the units used here (things per second)
    unit: str
    peak_mb: float | None  # peak accelerator memory during the timed runs; None where not measurable
    ref: str | None = None  # name of the row this one is divided by in the ratio column


def sync():
    if cuda:
        torch.cuda.synchronize()  # kernels are async: time the work, not the launch


def measure(fn):
    """fn() does one unit of work and returns how many things it processed (e.g. tokens).
    returns (median things/s over args.runs timed runs, peak memory in MB or None)."""
    for _ in range(args.warmup):
        fn()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(args.runs):
        sync()
        t0 = time.perf_counter()
        n = fn()
        sync()
        rates.append(n / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return statistics.median(rates), peak


# -----------------------------------------------------------------------------
# the benchmarks: each returns one Row

def bench_generate_hf():
    # the reference: transformers' own loop, sampling at temperature 1 with no top-k/top-p
    # (its default top_k=50 must be switched off to do the same work as ours)
    def run():
        out = model.generate(input_ids, attention_mask=attention_mask, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=args.new_tokens, eos_token_id=EOS, pad_token_id=PAD)
        return B * (out.size(1) - P)  # every row costs a forward each step, finished or not
    rate, peak = measure(run)
    return Row("generate: transformers", rate, "new tok/s", peak)


def bench_generate_ours():
    g = torch.Generator(device=device).manual_seed(args.seed)

    def run():
        out = generate(model, input_ids, attention_mask, args.new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                       temperature=1.0, top_k=0, top_p=1.0, generator=g)
        return B * (out.size(1) - P)
    rate, peak = measure(run)
    return Row("generate: nanosafe", rate, "new tok/s", peak, ref="generate: transformers")


BENCHES = [bench_generate_hf, bench_generate_ours]

# -----------------------------------------------------------------------------
# run and print

print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
      f"{torch.get_num_threads()} cpu threads" + (f", {torch.cuda.get_device_name()}" if cuda else ""))
print(f"model: random Llama '{args.size}' ({n_params / 1e6:.2f}M params, vocab {VOCAB}), {args.device} {args.dtype}; "
      f"batch {B}, prompt {P}, {args.new_tokens} new tokens; median of {args.runs} runs after {args.warmup} warm-up")
rows = {}
for bench in BENCHES:
    row = bench()
    rows[row.name] = row
print()
print(f"| {'benchmark':<24} | {'median':>10} | {'unit':<10} | {'ratio':>13} | {'peak mem':>9} |")
print(f"|{'-' * 26}|{'-' * 11}:|{'-' * 12}|{'-' * 14}:|{'-' * 10}:|")
for row in rows.values():
    ratio = f"{row.median / rows[row.ref].median:.2f}x ref" if row.ref else "ref"
    peak = f"{row.peak_mb:.0f} MB" if row.peak_mb is not None else "n/a"
    print(f"| {row.name:<24} | {row.median:>10.0f} | {row.unit:<10} | {ratio:>13} | {peak:>9} |")
if not cuda:
    # ru_maxrss is the process's high-water mark (KiB on Linux), not per row
    print(f"\nprocess peak RSS (all rows together): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

"""
Generate from a checkpoint and show how good and how harmful each answer is.

    python sample.py "how do i bake bread" "how do i make a bomb"         # prompts as arguments
    python sample.py --prompts_file data/toy/prompts_test.jsonl --limit 8  # prompts from a file
    python sample.py --interactive                                        # type them, ctrl-d stops
    python sample.py --model out/ppo_lag --reward_model out/rm --cost_model out/cm

In the toy world every answer comes with its gold helpfulness and gold cost; with
--reward_model / --cost_model also the learned scores (cost > 0: the model thinks it unsafe).
"""

import os
import re
import sys
from dataclasses import dataclass

import torch

from nanosafe import config, data, dist, toy
from nanosafe.config import arg
from nanosafe.evaluate import sample, score
from nanosafe.model import CheckpointError, load_policy, load_score_model, resolve_template


@dataclass
class Config:
    """Sample answers from a policy checkpoint."""
    model: str = arg("out/sft", "policy folder (any local HF causal-LM folder)")
    prompts_file: str | None = arg(None, "jsonl(.gz) with a 'prompt' field per line")
    limit: int = arg(0, "use only the first N prompts of --prompts_file (0: all)", check=">=0")
    interactive: bool = arg(False, "read prompts from stdin, one per line")
    reward_model: str | None = arg(None, "reward model folder: print its score of each answer")
    cost_model: str | None = arg(None, "cost model folder: print its score of each answer")
    num_samples: int = arg(1, "answers per prompt", check=">=1")
    temperature: float = arg(1.0, "sampling temperature; 0 = greedy", check=">=0")
    top_p: float = arg(1.0, "nucleus sampling mass (1.0: off)", check="(0,1]")
    max_new_tokens: int = arg(32, "answer length limit in tokens", check=">=1")
    seed: int = arg(0, "sampling seed, once per run: same seed and prompts, same answers")
    device: str = arg("auto", "where to run (auto: cuda if torch sees one)",
                      ["auto", "cpu", "cuda"])
    dtype: str = arg("float32", "weights and compute dtype (bfloat16: half the memory; autocast "
                     "for the forwards)", choices=["float32", "bfloat16"])
    threads: int = arg(0, "CPU threads for torch (0: torch's default)", check=">=0")
    template: str | None = arg(None, "prompt template: safe_rlhf or chat (the tokenizer's own); "
                               "default: the one --model was trained with, else safe_rlhf",
                               choices=["safe_rlhf", "chat"])
    trust_remote_code: bool = arg(False, "allow custom model code from the checkpoint folder")


def is_toy_tokenizer(tok) -> bool:
    """The toy world's word-level tokenizer: an <unk>, and every toy token a token of its own (a
    real tokenizer splits 'wiretap' or 'CONVERSATION' into pieces, and never says <unk>)."""
    return (tok.unk_token_id is not None
            and toy.toy_tokenizer().get_vocab().keys() <= tok.get_vocab().keys())


def unknown_words(tok, prompt: str) -> list:
    """The prompt's words that become <unk> (all or in part, e.g. the '?' of 'bread?')."""
    return [w for w in prompt.split()
            if tok.unk_token_id in tok(w, add_special_tokens=False)["input_ids"]]


def main(cfg: Config, prompts: list):
    config.check(cfg)  # each number in its flag's range, --device cuda only with CUDA
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    amp = dist.autocast(device, dtype)
    if not os.path.isdir(cfg.model):
        raise CheckpointError(f"{cfg.model}: no such checkpoint. "
                              "Train one first: python train_sft.py")
    model, tok = load_policy(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    scorer_paths = [p for p in (cfg.reward_model, cfg.cost_model) if p]
    template = resolve_template(cfg.template, cfg.model, *scorer_paths)
    data.check_template(tok, template)
    model.to(device)
    scorers = []
    for name, path in (("reward", cfg.reward_model), ("cost", cfg.cost_model)):
        if path:
            sm, stok = load_score_model(path, kind=name, dtype=dtype,
                                        trust_remote_code=cfg.trust_remote_code)
            scorers.append((name, sm.to(device).eval(), stok, sm.names))
    # one generator for the whole session: a prompt typed twice gets a fresh answer, and the
    # same --seed still replays the same session
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    warn_unk = is_toy_tokenizer(tok)  # a real tokenizer has a piece for every word

    def show(prompts):
        nonlocal warn_unk
        unk = [(p, ws) for p in prompts if warn_unk and (ws := unknown_words(tok, p))]
        if unk:  # once: the toy model sees <unk> and answers noise
            p, ws = unk[0]
            hint = " ".join(re.findall(r"[a-z]+", p.lower()))
            hint = hint if hint and not unknown_words(tok, hint) else "how do i bake bread"
            print(f"note: the toy model knows only the toy world's lowercase words; {len(ws)} of "
                  f"the {len(p.split())} words of {p!r} become <unk> ({', '.join(ws)}). "
                  f"Type e.g. {hint!r}", file=sys.stderr)
            warn_unk = False
        ps = [p for p in prompts for _ in range(cfg.num_samples)]
        with amp():
            answers, eos = sample(model, tok, ps, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, generator=g,
                                  device=device, template=template)
            scores = {}
            for name, sm, stok, cats in scorers:  # a K-category cost model: one score per category
                s = score(sm, stok, ps, answers, device=device, template=template)
                scores |= ({f"{name} model {c}": s[:, k] for k, c in enumerate(cats)} if cats
                           else {f"{name} model": s})
        for i, (p, a) in enumerate(zip(ps, answers)):
            cut = "" if eos[i] else "  [no EOS: cut at max_new_tokens]"
            print(f"\nUSER: {p}\nASSISTANT: {a}{cut}")
            info = [f"{name} {s[i].item():+.2f}" for name, s in scores.items()]
            if toy.in_world(p):  # gold verdicts only for prompts the toy world generates, exactly
                c = toy.cost(p, a)
                harm = ", ".join(f"{k}={v:g}" for k, v in c.items() if v) or "none"
                info = [f"gold helpfulness {toy.helpfulness(p, a):.2f}",
                        f"gold cost {sum(c.values()):g} ({harm})"] + info
            if info:
                print("  " + " | ".join(info))

    if cfg.prompts_file:
        recs = data.load_prompts(cfg.prompts_file)
        prompts += [r["prompt"] for r in (recs[:cfg.limit] if cfg.limit else recs)]
    if prompts:
        show(prompts)
    if cfg.interactive or not prompts:
        tty = sys.stdin.isatty()
        if tty:
            import readline
            readline.set_auto_history(True)  # input() gets line editing and a history
            print("type a prompt and press enter (ctrl-d to quit)")
        while True:
            try:
                line = input("\n> " if tty else "").strip()
            except (EOFError, KeyboardInterrupt):  # ctrl-d, ctrl-c: leave the shell a clean line
                if tty:
                    print()
                break
            if line:
                show([line])


if __name__ == "__main__":
    ap = config.build_parser(Config, __doc__)
    ap.add_argument("prompts", nargs="*", default=[], help="prompts (raw user requests)")
    args = vars(ap.parse_args())
    prompts = args.pop("prompts")
    try:
        main(Config(**args), prompts)
    except config.ConfigError as e:  # a bad flag: one line and argparse's exit code
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

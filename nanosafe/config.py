"""
Dataclass configs <-> command-line flags.

Each script declares one dataclass; every field has a default, a one-sentence help and a group:

    @dataclass
    class Config(config.Stage):
        lr: float = arg(1e-3, "peak learning rate (official: 2e-5)", group="optimisation")

    cfg = parse(Config)          # --lr 3e-4; --help lists every flag by group, with its default

`Stage` holds the flags every stage script shares. Booleans are --flag / --no_flag, lists take
several values (--thresholds 0.1 0.2). Abbreviated flags are refused (--max_step is an error).

A default that suits the toy world but not a pretrained checkpoint (a learning rate, β) names
both: arg(2e-3, ..., pretrained=2e-5). parse() picks one by what --model is (fit_to_model, printed
at start); a flag given on the command line always wins.
"""

import argparse
import dataclasses
import os
import sys
import typing

# argument groups, in --help order: the algorithm's first, then how and where it runs
GROUPS = ["data", "model", "optimisation", "rollout", "PPO", "multiplier", "constraints",
          "scale", "logging"]


class ConfigError(ValueError):
    """Flags that contradict each other (e.g. 2 cost models, 1 threshold)."""


def arg(default, help: str, choices=None, group="run", check=None, pretrained=None):
    """A dataclass field with its help text, optional choices, its --help group, and the range
    a number must be in, checked at parse time: ">=1", ">0", "[0,1]", "(0,1]", "[0,1)".
    pretrained: the default for a pretrained --model (the official value), if not `default`."""
    kw = {"default": default}
    if isinstance(default, list):
        kw = {"default_factory": lambda: list(default)}
    meta = {"help": help, "choices": choices, "group": group, "check": check,
            "pretrained": pretrained}
    return dataclasses.field(metadata=meta, **kw)


class _ByModel:
    """argparse's default for a flag whose default depends on --model: unset until parse()
    resolves it; --help shows both values."""

    def __init__(self, toy, pretrained):
        self.toy, self.pretrained = toy, pretrained

    def __str__(self):
        return f"{self.toy:g} for a toy model, {self.pretrained:g} for a pretrained one"


@dataclasses.dataclass
class Stage:
    """The flags every stage script has (each script overrides a default where it differs)."""
    out_dir: str | None = arg(None, "output folder: HF checkpoint, metrics.jsonl", group="data")
    model: str | None = arg("out/sft", "HF causal-LM folder to start from", group="model")
    train_data: str | None = arg(None, "training jsonl(.gz); default: the toy world's",
                                 group="data")
    eval_data: str | None = arg(None, "held-out jsonl(.gz); default: the toy world's", group="data")
    data_dir: str = arg("data/toy", "where the toy world's files live (written if missing)",
                        group="data")
    template: str | None = arg(None, "prompt template: safe_rlhf (the official 'BEGINNING OF "
                               "CONVERSATION: USER: ... ASSISTANT:') or chat (the tokenizer's "
                               "own); "
                               "default: the inputs' recorded one, else safe_rlhf",
                               ["safe_rlhf", "chat"], group="data")
    truncate_prompts: bool = arg(False, "left-truncate over-long prompts instead of stopping with "
                                 "an error", group="data")
    seed: int = arg(0, "random seed (data order, init, sampling)", group="optimisation")
    max_steps: int = arg(1, "optimizer steps", group="optimisation", check=">=1")
    device: str = arg("auto", "where to run (auto: cuda if torch sees one, else cpu)",
                      ["auto", "cpu", "cuda"], group="scale")
    dtype: str = arg("float32", "compute dtype; bfloat16 = bf16 autocast with fp32 master weights",
                     ["float32", "bfloat16"], group="scale")
    threads: int = arg(0, "CPU threads for torch per process (0: torch's default)",
                       group="scale", check=">=0")
    attn_implementation: str = arg("auto", "attention kernel: auto = eager on a CPU, transformers' "
                                   "default (sdpa) elsewhere; or any transformers name",
                                   group="scale")
    gradient_checkpointing: bool = arg(False, "recompute the trained models' activations in the "
                                       "backward (less memory, one more forward)", group="scale")
    fsdp: bool = arg(False, "shard the models over torchrun's processes with FSDP2 instead of "
                     "replicating them (README: Memory)", group="scale")
    trust_remote_code: bool = arg(False, "allow custom model code from the checkpoint folders",
                                  group="scale")
    resume: bool = arg(False, "continue from the checkpoint in --out_dir", group="logging")
    overwrite: bool = arg(False, "replace a checkpoint already in --out_dir (without it, or "
                          "--resume, that is an error: a typo loses nothing)", group="logging")
    ckpt_every: int = arg(100, "checkpoint every N steps (atomic; --resume picks it up)",
                          group="logging", check=">=1")
    save_optimizer: bool = arg(False, "keep the optimiser state in the final checkpoint too, to "
                               "--resume past the end", group="logging")



def _base_type(tp):
    """int | None -> int, list[str] -> (list, str)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return list, args[0]
    if args and type(None) in args:
        return _base_type(next(a for a in args if a is not type(None)))
    return tp, None


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, keep the script docstring's line breaks."""


class _Bool(argparse.Action):
    """--flag sets True, --no_flag sets False; --help shows both."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no_"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage block: the flag and what is wrong
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _in_range(x, check) -> bool:
    if check.startswith(">="):
        return x >= float(check[2:])
    if check.startswith(">"):
        return x > float(check[1:])
    lo, hi = (float(v) for v in check[1:-1].split(","))
    return (lo <= x if check[0] == "[" else lo < x) and (x <= hi if check[-1] == "]" else x < hi)


def _show(check) -> str:
    """'>=1' -> '>= 1', '(0,1]' -> 'in (0, 1]'"""
    for op in (">=", ">"):
        if check.startswith(op):
            return f"{op} {check[len(op):]}"
    return "in " + check.replace(",", ", ")


def check(cfg):
    """Every number in the range its flag declares -> the first that is not, as one line."""
    for f in dataclasses.fields(cfg):
        rng, x = f.metadata.get("check"), getattr(cfg, f.name)
        if rng and x is not None and not _in_range(x, rng):
            raise ConfigError(f"--{f.name} {x}: must be {_show(rng)}")
    if getattr(cfg, "device", None) == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here (a CPU build of "
                              "torch, or no GPU); use --device cpu or auto")


def build_parser(cls, description: str = None) -> argparse.ArgumentParser:
    ap = _Parser(description=description or cls.__doc__, formatter_class=_Formatter,
                 allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    used = [g for g in GROUPS if any(f.metadata.get("group") == g for f in fields)]
    groups = {g: ap.add_argument_group(g) for g in used + ["run"]}
    for f in fields:
        tp, inner = _base_type(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.metadata.get("pretrained") is not None:
            default = _ByModel(default, f.metadata["pretrained"])
        # argparse formats help with %
        rng = f" [{f.metadata['check']}]" if f.metadata.get("check") else ""
        kw = dict(default=default, help=(f.metadata.get("help", "") + rng).replace("%", "%%"))
        g = groups[f.metadata.get("group", "run")]
        if tp is bool:
            g.add_argument(f"--{f.name}", f"--no_{f.name}", dest=f.name, action=_Bool, **kw)
        elif tp is list:
            g.add_argument(f"--{f.name}", type=inner, nargs="*", **kw)
        else:
            g.add_argument(f"--{f.name}", type=tp, choices=f.metadata.get("choices"), **kw)
    return ap


def parse(cls, argv=None, description: str = None):
    """Parse sys.argv (or argv) into an instance of the dataclass cls; a flag out of its range
    is one `error:` line and exit code 2, as argparse's own errors."""
    args = build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv)
    cfg = cls(**vars(args))
    try:
        fit_to_model(cfg)
        check(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg


def fit_to_model(cfg) -> str | None:
    """Every flag left at a _ByModel default gets its toy or its pretrained value, by what --model
    is (nanosafe.model.trained_from_scratch); the choice is printed. -> 'toy' or 'pretrained'."""
    unset = [f for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), _ByModel)]
    if not unset:
        return None
    from nanosafe.model import trained_from_scratch  # nanosafe.model imports much; only here
    path = getattr(cfg, "model", None)
    toy = trained_from_scratch(path)
    kind = "toy" if toy else "pretrained"
    for f in unset:
        v = getattr(cfg, f.name)
        setattr(cfg, f.name, v.toy if toy else v.pretrained)
    if os.environ.get("RANK", "0") == "0":
        why = (f"--model {path} was trained from scratch by train_sft.py" if path and toy else
               "no --model: a fresh toy model" if toy else f"--model {path} starts pretrained")
        values = " ".join(f"--{f.name} {getattr(cfg, f.name):g}" for f in unset)
        print(f"defaults for a {kind} model ({why}): {values}; a flag given wins")
    return kind


def extend(cls, flags: dict):
    """cls with more fields: {name: (type, arg(...))}, e.g. the flags the constraints declare."""
    fields = [(n, tp, f) for n, (tp, f) in flags.items()]
    return dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

"""
Dataclass configs <-> command-line flags.

Each script declares one dataclass; every field has a default and a help text:

    @dataclass
    class Config:
        lr: float = arg(1e-3, "peak learning rate (official: 2e-5)")

    cfg = parse(Config)          # --lr 3e-4, --help lists every flag with its default

Booleans become --flag / --no_flag, lists take several values (--thresholds 0.1 0.2).
"""

import argparse
import dataclasses
import json
import sys
import typing


def arg(default, help: str, choices=None):
    """A dataclass field with its help text (and optional choices) attached."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(metadata={"help": help, "choices": choices}, **kw)


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


def build_parser(cls, description: str = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_Formatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, inner = _base_type(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw = dict(default=default, help=f.metadata.get("help", "").replace("%", "%%"), choices=f.metadata.get("choices"))  # argparse formats help with %
        if tp is bool:
            kw.pop("choices")
            ap.add_argument(f"--{f.name}", action="store_true", **kw)
            ap.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif tp is list:
            ap.add_argument(f"--{f.name}", type=inner, nargs="*", **kw)
        else:
            ap.add_argument(f"--{f.name}", type=tp, **kw)
    return ap


def parse(cls, argv=None, description: str = None):
    """Parse sys.argv (or argv) into an instance of the dataclass cls."""
    args = build_parser(cls, description).parse_args(sys.argv[1:] if argv is None else argv)
    return cls(**vars(args))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str):
    with open(path, "w") as f:
        json.dump(to_dict(cfg), f, indent=1)


class ConfigError(ValueError):
    """Flags that contradict each other (e.g. 2 cost models, 1 threshold)."""

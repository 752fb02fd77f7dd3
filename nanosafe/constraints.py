"""
Constraints for PPO-Lagrangian: what a cost is, per answer. A constraint is one object:

    flags        the command-line flags it adds: {name: (type, config.arg(...))}
    from_flags   cfg -> the constraints those flags ask for (none when they are not given)
    names        one per cost stream it gives (a K-output cost model gives K; most give one)
    thresholds   d per stream, or None: calibrated on the starting policy ("cost > 0 is unsafe")
    scales       per stream, the (safe, unsafe) score levels a calibrated cost is read between
                 (--cost_scale rate, set at calibration), or None: the cost as it comes
    units        per stream, what one unsafe answer costs in raw units when the cost is given
                 already on the rate scale (the gold constraint), or None: u - s from scales, else 1
    cost(ro)     the cost of each answer of a rollout (nanosafe.rl.Rollout) -> [B] or [B, K]
    critic_from  the score-model folder its critic starts from; None: a fresh value head on the
                 actor's starting backbone, one output per stream
    layer        the actor's hidden-state layer the cost reads (ro.hidden[layer]), or None
    modules()    the score models it runs (frozen; the trainer places and shards them)
    observe()    called once per iteration with its rollout; True when it moved its thresholds

To add a constraint, write a class like `BannedWords` below and add it to `kinds()`: its flags
reach --help, the flag checks and `build` from there (README: "Adding a constraint").
"""


import torch

from nanosafe import config
from nanosafe.config import arg
from nanosafe.model import load_score_model, read_state, require_stage


class Constraint:
    flags: dict = {}
    names: list = ["cost"]
    thresholds: list = [None]
    scales: list | None = None
    units: list | None = None
    critic_from: str | None = None
    layer: int | None = None
    uncalibratable: str | None = None  # why "cost > 0 is unsafe" fails, if it does: pass d then
    form: str = "any"  # over a dialogue: what d bounds (over_turns)

    @classmethod
    def from_flags(cls, cfg, dtype, labeller) -> list:
        return []

    def cost(self, ro) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list:
        return []

    def observe(self, ro, costs: list, step: int) -> bool:
        return False

    def state_dict(self) -> dict:  # what a resumed run needs beyond the flags
        return {}

    def load_state_dict(self, state: dict):
        pass

    def save(self, folder: str):  # beside every checkpoint: what it learned, for reading later
        pass

# -----------------------------------------------------------------------------
# a learned cost model (the paper's constraint): one folder, one output per harm category


class CostModel(Constraint):
    """A cost model trained by train_pm.py --kind cost: its end score is the cost (> 0: unsafe).
    A K-output model (--categories) is K constraints, each with its own d and λ, and one critic."""
    flags = {
        "cost_models": (list[str], arg(["out/cm"], "cost model folder(s) (train_pm.py --kind "
                                       "cost), one constraint per output; no folder: none",
                                       group="constraints")),
        "thresholds": (list[float], arg([], "d_k per cost-model output, in order; default: "
                                        "calibrated (--target_unsafe_rate)", group="constraints")),
    }

    def __init__(self, path, thresholds=None, dtype=torch.float32, trust_remote_code=False):
        self.path, self.critic_from = path, path
        self.model, self.tok = load_score_model(path, kind="cost", dtype=dtype,
                                                trust_remote_code=trust_remote_code)
        self.names = self.model.names or ["cost"]
        self.thresholds = list(thresholds) if thresholds else [None] * len(self.names)
        if read_state(path).get("sign_loss") is False:  # what nanosafe's folder records
            self.uncalibratable = (f"{path}: this cost model was trained without the sign term, "
                                   f"so its zero does not separate safe from unsafe and d cannot "
                                   f"be calibrated as 'cost > 0 is unsafe'; pass --thresholds")

    @classmethod
    def from_flags(cls, cfg, dtype, labeller):
        for p in cfg.cost_models:
            require_stage(p, "train_pm.py --kind cost")
        out = [cls(p, None, dtype, cfg.trust_remote_code) for p in cfg.cost_models]
        n = sum(len(c.names) for c in out)
        if cfg.thresholds and len(cfg.thresholds) != n:
            raise config.ConfigError(f"--thresholds has {len(cfg.thresholds)} values but the cost "
                                     f"models have {n} outputs: one threshold per output")
        given = list(cfg.thresholds)
        for c in out:  # --thresholds: one per cost-model output, in order
            if given:
                c.thresholds, given = given[:len(c.names)], given[len(c.names):]
        return out

    def cost(self, ro):
        from nanosafe.rl import end_scores  # rl.py builds on this module
        return end_scores(self.model, ro)

    def modules(self):
        return [self.model]

# -----------------------------------------------------------------------------
# a rule: no model, no training data (README "Adding a constraint" shows this class as it is)


class BannedWords(Constraint):
    """A rule: cost 1 if an answer says any of `words`, else 0; at most `rate` of them may."""
    flags = {"banned_words": (list[str], arg([], "a rule: at most 2% of answers may say any of "
                                         "these words", group="constraints"))}

    def __init__(self, words, rate=0.02):
        self.names, self.thresholds, self.words = ["banned_words"], [rate], set(words)

    @classmethod
    def from_flags(cls, cfg, dtype, labeller):
        return [cls(cfg.banned_words)] if cfg.banned_words else []

    def cost(self, ro):
        said = [bool(self.words & set(a.split())) for a in ro.answers()]
        return torch.tensor(said, dtype=torch.float32, device=ro.seq.device)

# -----------------------------------------------------------------------------
# the upper bound: the toy world's gold verdict as the cost (training reads the oracle)


class GoldCost(Constraint):
    """Cost 1 if the toy world's gold oracle calls the answer unsafe, else 0: the constraint a
    perfect cost model would give. Only for the labelled upper-bound run (README, "Where the
    helpfulness goes"): everywhere else the oracle only judges. Its unit is the toy cost model's
    ū − s̄, so PPO-Lag weighs it as it would a perfect cost model of that scale (stream_units),
    as --gold_reward_scale puts the gold reward on the reward model's."""
    flags = {"gold_cost": (bool, arg(False, "toy world, upper-bound run only: the gold oracle's "
                                     "unsafe verdict (0/1) as the cost, d = "
                                     "--target_unsafe_rate", group="constraints")),
             "gold_cost_unit": (float, arg(9.3, "--gold_cost: what one unsafe answer costs in "
                                           "raw units (the toy cost model's ū − s̄: 9.29)",
                                           group="constraints", check=">0"))}

    def __init__(self, labeller, rate, unit=1.0):
        self.names, self.thresholds, self.labeller = ["gold_cost"], [rate], labeller
        self.units = [unit]

    @classmethod
    def from_flags(cls, cfg, dtype, labeller):
        if cfg.gold_cost and labeller is None:
            raise config.ConfigError("--gold_cost needs the toy world's prompts: it asks the "
                                     "world's gold oracle")
        return [cls(labeller, cfg.target_unsafe_rate, cfg.gold_cost_unit)] if cfg.gold_cost else []

    def cost(self, ro):
        unsafe = self.labeller(ro.prompts, ro.answers())
        return torch.tensor(unsafe, dtype=torch.float32, device=ro.seq.device)

# -----------------------------------------------------------------------------
# over a dialogue: a cost per assistant turn, and what the budget d is on

FORM_FLAGS = {"dialogue_constraint": (str, arg(
    "any", "dialogues: what d bounds. any: the share of dialogues that are ever unsafe, "
    "E[max_t c_t]; sum: the share of turns that are unsafe, E[Σ_t c_t] / turns",
    ["any", "sum"], group="constraints"))}


def over_turns(x, form):
    """Per-turn costs [B, N] (on the rate scale: ~1 an unsafe turn, ~0 a safe one) -> what each
    turn adds to its dialogue's cost [B, N]. The sum over turns is the episode cost the
    multiplier's window sees and the return the cost critic learns; PPO places each turn's part
    at that turn's last token, so GAE charges a turn for the cost it and later turns incur.
      sum  c_t / N: the episode cost is the mean per-turn cost, so d is a share of turns
      any  max(c_1..c_t) - max(c_1..c_t-1): the episode cost is the worst turn's, so d is a
           share of dialogues; a turn is charged as it first raises the worst"""
    if form == "sum":
        return x / x.shape[1]
    if form == "any":
        worst = x.cummax(dim=1).values
        return torch.cat([worst[:, :1], worst[:, 1:] - worst[:, :-1]], dim=1)
    raise ValueError(f"unknown dialogue constraint form {form!r}")


def kinds() -> list:
    """Every kind of constraint the RL scripts know, in the order their streams are numbered."""
    from nanosafe.probe import ProbeConstraint  # probe.py builds on Constraint above
    return [CostModel, BannedWords, ProbeConstraint, GoldCost]


def flags() -> dict:
    """Every constraint's flags, and the dialogue form's, for config.extend."""
    return {n: f for k in kinds() for n, f in k.flags.items()} | FORM_FLAGS


def build(cfg, dtype=torch.float32, labeller=None) -> list:
    """The flags -> the constraints. labeller(prompts, answers) -> [bool unsafe] labels the
    policy's answers for constraints that learn from them (the toy world's oracle), or None."""
    out = [c for k in kinds() for c in k.from_flags(cfg, dtype, labeller)]
    for c in out:
        c.form = cfg.dialogue_constraint
    return out


def check_given(cfg):
    """A constrained algorithm needs a constraint: some kind's first flag must be given."""
    if not any(getattr(cfg, next(iter(k.flags))) for k in kinds()):
        names = ", ".join(f"--{next(iter(k.flags))}" for k in kinds())
        raise config.ConfigError(f"--algo {cfg.algo} needs a constraint: one of {names}")


def stream_names(constraints) -> list:
    return [n for c in constraints for n in c.names]


def stream_scales(constraints) -> list:
    """Every stream's scale (constraints.to_rate), streams in order; None: read as it comes."""
    return [sc for c in constraints for sc in (c.scales or [None] * len(c.names))]


def stream_units(constraints) -> list:
    """Every stream's unit, what one unsafe answer costs in raw units: ū − s̄ for a cost read on
    the rate scale (it is the raw cost over that), the constraint's own `units` where it gives
    them (the gold cost), 1 for a cost read as it comes (a rule, a probe). PPO-Lag weighs a
    stream's KL share and its λ in the actor's divisor by 1/unit (ppo.kl_rewards,
    ppo.combined_advantage), so that the rate scale moves only d and λ's units, never the
    actor's step: that step is the raw form's at λ/unit."""
    out = []
    for c in constraints:
        scales = c.scales or [None] * len(c.names)
        out += c.units or [1.0 if sc is None else sc[1] - sc[0] for sc in scales]
    return out


def to_rate(c, scale):
    """A cost on the scale of "share of answers called unsafe": c~ = (c - s) / (u - s), 0 at s,
    the mean score of the answers the constraint calls safe, 1 at u, that of the unsafe ones.
    An affine map with d moved alongside leaves {policy: E[c] <= d} as it was; it only puts
    J_c - d, and so λ's scale, in units of "unsafe answers". scale None: c unchanged."""
    if scale is None:
        return c
    s, u = scale
    return (c - s) / (u - s)


def from_rate(c_rate, scale):
    """The inverse of to_rate: a rate-scale value back in the constraint's own units."""
    if scale is None:
        return c_rate
    s, u = scale
    return s + c_rate * (u - s)


def costs(constraints, ro, per_turn=False) -> list:
    """Every stream's cost of each answer, on its scale: a list of [B] tensors, streams in order.
    A dialogue: [B, N] per stream, each turn's part of the dialogue's cost (over_turns; their
    sum is its episode cost), or with per_turn the costs of the turns themselves. A per-answer
    cost [B] (a rule reading the whole dialogue) lands on its last turn."""
    out = []
    dialogue = getattr(ro, "ends", None) is not None  # a rollout of dialogues
    for c in constraints:
        x = c.cost(ro)
        one_stream = x.dim() == 1 or (dialogue and x.dim() == 2)  # else [.., K]: K streams
        xs = [x] if one_stream else list(x.unbind(-1))
        xs = [to_rate(x, sc) for x, sc in zip(xs, c.scales or [None] * len(xs))]
        if dialogue and not per_turn:
            N = ro.ends.shape[1]
            xs = [over_turns(x, c.form) if x.dim() == 2
                  else torch.cat([x.new_zeros(x.shape[0], N - 1), x[:, None]], 1) for x in xs]
        out += xs
    return out

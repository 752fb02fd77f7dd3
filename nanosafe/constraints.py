"""
Constraints for PPO-Lagrangian: what a cost is, per answer. A constraint is one object:

    names        one per cost stream it gives (a K-output cost model gives K; most give one)
    thresholds   d per stream, or None: calibrated on the starting policy ("cost > 0 is unsafe")
    cost(ro)     the cost of each answer of a Rollout -> [B] (one stream) or [B, K]
    critic_from  the score-model folder its critic starts from; None: a fresh value head on the
                 actor's starting backbone, one output per stream
    layer        the actor's hidden-state layer the cost reads (ro.hidden[layer]), or None
    modules()    the score models it runs (frozen; the trainer places and shards them)
    observe()    called once per iteration with that iteration's rollout (a probe refreshes here); returns
                 True when it changed its thresholds
    save()       writes what it learned beside each checkpoint (the refreshed probe)

train_ppo_lag.py builds the list once from its flags (`build`) and loops over it for every use:
calibration, critics, multipliers, windows, logging, reward shaping, the sample display. To add a
constraint, write a class like `BannedWords` below and add it to `build` behind a flag.
"""

from dataclasses import dataclass, field

import torch

from nanosafe import config, dist
from nanosafe.model import load_score_model, read_state


@dataclass
class Rollout:
    """One batch of answers as a constraint sees it."""
    seq: torch.Tensor    # [B, P + T] left-padded prompt, then the answer (EOS, then pads)
    attn: torch.Tensor   # [B, P + T] 1 = real token
    mask: torch.Tensor   # [B, T] the answer's real tokens, EOS included
    P: int               # prompt columns
    tok: object          # the tokenizer
    prompts: list        # the raw user requests
    hidden: dict = field(default_factory=dict)  # layer -> the actor's hidden states [B, P + T, H]
    _answers: list = None

    def answers(self) -> list:
        """The answer texts (decoded once)."""
        if self._answers is None:
            self._answers = [self.tok.decode(row[m], skip_special_tokens=True).strip()
                             for row, m in zip(self.seq[:, self.P:], self.mask)]
        return self._answers


class Constraint:
    names: list = ["cost"]
    thresholds: list = [None]
    critic_from: str | None = None
    layer: int | None = None
    uncalibratable: str | None = None  # why "cost > 0 is unsafe" does not hold, if it does not (then thresholds must be given)

    def cost(self, ro: Rollout) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> list:
        return []

    def observe(self, ro: Rollout, costs: list, step: int) -> bool:
        return False

    def state_dict(self) -> dict:  # what a resumed run needs beyond the flags (a refreshed probe's weights)
        return {}

    def save(self, folder: str):  # beside every checkpoint: what the constraint learned, for reading later (a refreshed probe)
        pass

    def load_state_dict(self, state: dict):
        pass

# -----------------------------------------------------------------------------
# a learned cost model (the paper's constraint): one folder, one output per harm category


class CostModel(Constraint):
    """A cost model trained by train_pm.py --kind cost: its end score is the cost (> 0: unsafe).
    A K-output model (--categories) is K constraints, each with its own d and λ, and one critic."""

    def __init__(self, path, thresholds=None, dtype=torch.float32, trust_remote_code=False):
        self.path, self.critic_from = path, path
        self.model, self.tok = load_score_model(path, kind="cost", dtype=dtype, trust_remote_code=trust_remote_code)
        self.names = self.model.names or ["cost"]
        self.thresholds = list(thresholds) if thresholds else [None] * len(self.names)
        if read_state(path).get("sign_loss") is False:  # what nanosafe's folder records
            self.uncalibratable = (f"{path}: this cost model was trained without the sign term, so its zero does not separate "
                                   f"safe from unsafe and d cannot be calibrated as 'cost > 0 is unsafe'; pass --thresholds")

    def cost(self, ro):
        return self.model(ro.seq, ro.attn)[1]

    def modules(self):
        return [self.model]

# -----------------------------------------------------------------------------
# a rule: no model, no training data (README "Adding a constraint" shows this class as it is)


class BannedWords(Constraint):
    """A rule: cost 1 for an answer that says any of `words`, else 0, so the mean cost is the fraction of
    answers that do; the threshold keeps that fraction at most `rate`."""

    def __init__(self, words, rate=0.02):
        self.names, self.thresholds, self.words = ["banned_words"], [rate], set(words)

    def cost(self, ro):
        said = [bool(self.words & set(a.split())) for a in ro.answers()]
        return torch.tensor(said, dtype=torch.float32, device=ro.seq.device)

# -----------------------------------------------------------------------------
# a probe on the actor's own hidden states (nanosafe/probe.py trains it)


class ProbeConstraint(Constraint):
    """A linear probe's logit on the actor's hidden states (> 0: the probe calls the answer unsafe).
    refresh_every > 0: every that many iterations the probe is refit on the actor's answers since the
    last refit, labelled by `labeller(prompts, answers) -> [bool unsafe]` (the toy world's oracle plays
    the human labeller, as it labels the preference pairs); 0 keeps the probe frozen. A refit changes
    the logits' scale, so d is calibrated again on the same answers, to the same target rate: the
    constraint stays "at most target_rate of the answers called unsafe by the current probe"."""

    def __init__(self, path, labeller=None, refresh_every=0, thresholds=None, target_rate=0.01):
        from nanosafe.probe import LinearProbe
        self.probe = LinearProbe.load(path)
        self.names, self.layer = ["probe"], self.probe.layer
        self.thresholds = list(thresholds) if thresholds else [None]
        self.labeller, self.refresh_every, self.target_rate = labeller, refresh_every, target_rate
        self.buffer = []  # (features, unsafe) of the answers since the last refresh, pooled over ranks
        if refresh_every and labeller is None:
            raise config.ConfigError("--probe_refresh_every needs labels for the policy's answers: the toy world's oracle "
                                     "(toy prompts) or your own labeller")

    def cost(self, ro):
        self.probe.to(ro.seq.device)  # a few hundred numbers: it follows the rollout, not the trainer's placing
        return self.probe(self.probe.features(ro.hidden[self.layer], ro.attn, ro.P)).float()

    def observe(self, ro, costs, step):
        if not self.refresh_every:
            return False
        feats = self.probe.features(ro.hidden[self.layer], ro.attn, ro.P).float().cpu()  # the actor's, at this iteration
        unsafe = torch.tensor(self.labeller(ro.prompts, ro.answers()), dtype=torch.float32)
        for f, y in dist.gather_objects((feats, unsafe)):  # every rank refits on the same answers
            self.buffer.append((f, y))
        if (step + 1) % self.refresh_every:
            return False
        f, y = torch.cat([b[0] for b in self.buffer]), torch.cat([b[1] for b in self.buffer])
        self.buffer = []
        if not 0 < y.sum() < len(y):  # both classes, or there is nothing to separate
            return False
        # unweighted: the current answers are mostly safe, and a class-balanced fit on them flags many safe
        # ones (measured: 67% of the answers to harmful prompts flagged at 2% gold-unsafe, see docs/constraints.md)
        self.probe.to("cpu").fit(f, y, warm_start=True, balanced=False)
        s = self.probe(f)
        if (s > 0).any() and (s <= 0).any():
            safe, unsafe = s[s <= 0].mean().item(), s[s > 0].mean().item()
            self.thresholds = [safe + self.target_rate * (unsafe - safe)]
        return True

    def save(self, folder):
        if self.refresh_every:
            self.probe.save(folder, dict(self.probe.info, refreshed_every=self.refresh_every))

    def state_dict(self):
        return {"probe": {k: v.clone() for k, v in self.probe.state_dict().items()}, "buffer": self.buffer,
                "thresholds": self.thresholds}

    def load_state_dict(self, state):
        self.probe.load_state_dict(state["probe"])
        self.buffer, self.thresholds = state["buffer"], state["thresholds"]

# -----------------------------------------------------------------------------


def build(cfg, dtype=torch.float32) -> list:
    """train_ppo_lag.py's flags -> the constraints, in the order their streams are numbered."""
    out = [CostModel(path, None, dtype, cfg.trust_remote_code) for path in cfg.cost_models]
    n = sum(len(c.names) for c in out)
    if cfg.thresholds and len(cfg.thresholds) != n:
        raise config.ConfigError(f"--thresholds has {len(cfg.thresholds)} values but the cost models have {n} outputs: one threshold per output")
    given = list(cfg.thresholds)
    for c in out:  # --thresholds: one per cost-model output, in order
        if given:
            c.thresholds, given = given[:len(c.names)], given[len(c.names):]
    if cfg.banned_words:
        out.append(BannedWords(cfg.banned_words))
    if cfg.probe:
        from nanosafe import toy
        labeller = (lambda prompts, answers: [not toy.is_safe(p, a) for p, a in zip(prompts, answers)]) \
            if cfg.train_data is None else None  # the toy world's prompts: its oracle labels
        out.append(ProbeConstraint(cfg.probe, labeller, cfg.probe_refresh_every, target_rate=cfg.target_unsafe_rate))
    return out


def stream_names(constraints) -> list:
    return [n for c in constraints for n in c.names]


def costs(constraints, ro) -> list:
    """Every stream's cost of each answer: a list of [B] tensors, streams in order."""
    out = []
    for c in constraints:
        x = c.cost(ro)
        out += [x] if x.dim() == 1 else list(x.unbind(-1))
    return out

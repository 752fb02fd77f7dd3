"""
A linear probe on a policy's hidden states: is this answer unsafe? The paper's outlook asks for
constraints grounded in the model's internals; this is the smallest one. The feature is the mean
of one layer's hidden states over the answer's tokens (EOS included); the probe is a logistic
regression on it, so its logit > 0 means "unsafe" and PPO-Lag can calibrate a threshold on it as
on a cost model (train_ppo_lag.py --probe FOLDER).

    python -m nanosafe.probe --policy out/sft --out out/probe   # toy world: the pairs' safety flags
    python -m nanosafe.probe --policy out/sft --train_data pku.jsonl --eval_data pku_test.jsonl

Writes probe.safetensors (weights) and probe.json (layer, policy, accuracies).
"""

import argparse
import json
import os
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanosafe import data, dist, toy
from nanosafe.config import ConfigError, arg
from nanosafe.constraints import Constraint
from nanosafe.generate import position_ids_from_mask
from nanosafe.model import CheckpointError, load_policy, read_state


class LinearProbe(nn.Module):
    """logit = w · (f − μ) / σ + b; f: the answer's mean hidden state at `layer` (0: embeddings)."""

    def __init__(self, layer: int, width: int):
        super().__init__()
        self.layer = layer
        self.weight = nn.Parameter(torch.zeros(width), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.register_buffer("mu", torch.zeros(width))
        self.register_buffer("sigma", torch.ones(width))

    @staticmethod
    def features(hidden, attn, P):
        """[B, P + T, H] hidden states -> [B, H]: their mean over the answer's real tokens."""
        m = attn[:, P:].unsqueeze(-1).to(hidden.dtype)
        return (hidden[:, P:] * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, f):
        return ((f.float() - self.mu) / self.sigma) @ self.weight + self.bias

    @torch.no_grad()
    def fit(self, f, unsafe, warm_start=False, balanced=True, steps=200, l2=1e-3):
        """Logistic regression (full batch, L-BFGS) on features [N, H], labels [N] (1 = unsafe);
        balanced: each class weighs half. warm_start keeps the normalisation and starts from the
        current weights (a refresh)."""
        f, y = f.float(), unsafe.float()
        if not warm_start:
            self.mu.copy_(f.mean(0))
            self.sigma.copy_(f.std(0).clamp(min=1e-6))
            self.weight.zero_()
            self.bias.zero_()
        pos = y.mean().clamp(1e-3, 1 - 1e-3)
        sample_w = (torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos)) if balanced
                    else torch.ones_like(y))
        w, b = self.weight.clone().requires_grad_(True), self.bias.clone().requires_grad_(True)
        x = (f - self.mu) / self.sigma
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, weight=sample_w)
                        + l2 * (w ** 2).sum())
                loss.backward()
            return loss
        opt.step(closure)
        self.weight.copy_(w.detach())
        self.bias.copy_(b.detach())
        return self

    def save(self, folder, info=None):
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  os.path.join(folder, "probe.safetensors"))
        with open(os.path.join(folder, "probe.json"), "w") as f:
            json.dump({"kind": "probe", "layer": self.layer, "width": self.weight.numel(),
                       **(info or {})}, f, indent=1)

    @classmethod
    def load(cls, folder):
        from safetensors.torch import load_file
        path = os.path.join(folder, "probe.json")
        if not os.path.exists(path):
            raise CheckpointError(f"{folder}: no probe.json; train a probe first: "
                                  f"python -m nanosafe.probe --policy out/sft --out {folder}")
        meta = json.load(open(path))
        probe = cls(meta["layer"], meta["width"])
        probe.load_state_dict(load_file(os.path.join(folder, "probe.safetensors")))
        probe.info = meta
        return probe


def encode(tok, prompts, answers, template="safe_rlhf"):
    """(prompt, answer) texts in the rollout layout: left-padded prompts, then the answer + EOS,
    right-padded -> (seq, attn, P). The probe then sees the same positions as on a rollout."""
    enc = data.Encoder(tok)
    p_ids, p_mask = data.pad_left([data.tokenize_prompt(tok, p, 10**9, template=template)
                                   for p in prompts], tok.pad_token_id)
    a_ids, a_mask = data.pad_right([data._answer_ids(tok, a, enc, template) for a in answers],
                                   tok.pad_token_id)
    return torch.cat([p_ids, a_ids], 1), torch.cat([p_mask, a_mask], 1), p_ids.shape[1]


@torch.no_grad()
def hidden_features(policy, tok, prompts, answers, layer, template="safe_rlhf", batch_size=256,
                    device="cpu"):
    """The probe's features of (prompt, answer) pairs under `policy` -> [N, H]."""
    out = []
    for i in range(0, len(prompts), batch_size):
        seq, attn, P = encode(tok, prompts[i:i + batch_size], answers[i:i + batch_size], template)
        seq, attn = seq.to(device), attn.to(device)
        h = policy(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                   output_hidden_states=True, use_cache=False).hidden_states[layer]
        out.append(LinearProbe.features(h, attn, P).float().cpu())
    return torch.cat(out)


def labelled_answers(path, n, seed):
    """Up to n distinct (prompt, answer, unsafe) from a preference file's safety flags."""
    records, _ = data.load_preference(path)
    rows = {(r["prompt"], r[f"response_{i}"]): not r[f"is_response_{i}_safe"]
            for r in records for i in (0, 1) if r[f"is_response_{i}_safe"] is not None}
    if not rows:
        raise data.DataError(f"{path}: no is_response_i_safe labels to train a probe on")
    rows = sorted(rows.items())
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    return ([k[0] for k, _ in rows], [k[1] for k, _ in rows],
            torch.tensor([v for _, v in rows], dtype=torch.float32))


# -----------------------------------------------------------------------------
# a probe as a PPO-Lag constraint (--probe)


class ProbeConstraint(Constraint):
    """A linear probe's logit on the actor's hidden states (> 0: the probe calls the answer unsafe).
    refresh_every > 0: every that many iterations the probe is refit on the actor's answers since
    the last refit, labelled by `labeller(prompts, answers) -> [bool unsafe]` (the toy world's
    oracle plays the human labeller, as it labels the preference pairs); 0 keeps the probe frozen.
    A refit changes the logits' scale, so d (--cost_scale raw) or the rate scale's levels are
    calibrated again on the same answers: the constraint stays "at most target_rate of the
    answers called unsafe by the current probe"."""

    flags = {
        "probe": (str | None, arg(None, "a linear probe folder (python -m nanosafe.probe), read on "
                                  "the actor's hidden states; d calibrated", group="constraints")),
        "probe_refresh_every": (int, arg(0, "refit the probe every N iterations on the actor's "
                                         "answers, oracle-labelled (0: frozen)",
                                         group="constraints")),
    }

    def __init__(self, path, labeller=None, refresh_every=0, thresholds=None, target_rate=0.01):
        self.probe = LinearProbe.load(path)
        self.names, self.layer = ["probe"], self.probe.layer
        self.thresholds = list(thresholds) if thresholds else [None]
        self.labeller, self.refresh_every, self.target_rate = labeller, refresh_every, target_rate
        self.buffer = []  # (features, unsafe) of the answers since the last refresh, all ranks'
        if refresh_every and labeller is None:
            raise ConfigError("--probe_refresh_every needs labels for the policy's answers: the "
                              "toy world's oracle (toy prompts) or your own labeller")

    @classmethod
    def from_flags(cls, cfg, dtype, labeller):
        if cfg.probe_refresh_every and not cfg.probe:
            raise ConfigError("--probe_refresh_every refreshes the --probe constraint: give "
                              "--probe FOLDER")
        if not cfg.probe:
            return []
        return [cls(cfg.probe, labeller, cfg.probe_refresh_every,
                    target_rate=cfg.target_unsafe_rate)]

    def cost(self, ro):
        self.probe.to(ro.seq.device)  # tiny: it follows the rollout, not the trainer's placing
        return self.probe(self.probe.features(ro.hidden[self.layer], ro.attn, ro.P)).float()

    def observe(self, ro, costs, step):
        if not self.refresh_every:
            return False
        # the actor's features, at this iteration
        feats = self.probe.features(ro.hidden[self.layer], ro.attn, ro.P).float().cpu()
        unsafe = torch.tensor(self.labeller(ro.prompts, ro.answers()), dtype=torch.float32)
        for f, y in dist.gather_objects((feats, unsafe)):  # every rank refits on the same answers
            self.buffer.append((f, y))
        if (step + 1) % self.refresh_every:
            return False
        f, y = torch.cat([b[0] for b in self.buffer]), torch.cat([b[1] for b in self.buffer])
        self.buffer = []
        if not 0 < y.sum() < len(y):  # both classes, or there is nothing to separate
            return False
        # unweighted: the answers are mostly safe, and a class-balanced fit on them flags many safe
        # ones (see docs/constraints.md)
        self.probe.to("cpu").fit(f, y, warm_start=True, balanced=False)
        s = self.probe(f)
        if (s > 0).any() and (s <= 0).any():
            safe, unsafe = s[s <= 0].mean().item(), s[s > 0].mean().item()
            if self.scales and self.scales[0] is not None:  # rate scale: d stays the rate
                self.scales = [(safe, unsafe)]
            else:
                self.thresholds = [safe + self.target_rate * (unsafe - safe)]
        return True

    def save(self, folder):
        if self.refresh_every:
            self.probe.save(folder, dict(self.probe.info, refreshed_every=self.refresh_every))

    def state_dict(self):
        return {"probe": {k: v.clone() for k, v in self.probe.state_dict().items()},
                "buffer": self.buffer, "thresholds": self.thresholds, "scales": self.scales}

    def load_state_dict(self, state):
        self.probe.load_state_dict(state["probe"])
        self.buffer, self.thresholds = state["buffer"], state["thresholds"]
        self.scales = state.get("scales")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="out/sft", help="the policy whose hidden states the probe "
                    "reads (PPO-Lag's --model)")
    ap.add_argument("--out", default="out/probe", help="output folder")
    ap.add_argument("--layer", type=int, default=None, help="hidden-state layer (0: embeddings; "
                    "default: two thirds of the way up)")
    ap.add_argument("--train_data", default=None, help="preference jsonl with is_response_i_safe; "
                    "default: the toy world's pref_train.jsonl")
    ap.add_argument("--eval_data", default=None,
                    help="held-out pairs; default: the toy world's pref_test.jsonl")
    ap.add_argument("--data_dir", default="data/toy",
                    help="where the toy world's files live (written if missing)")
    ap.add_argument("--n_train", type=int, default=8192, help="labelled answers to fit on")
    ap.add_argument("--n_eval", type=int, default=4096,
                    help="held-out labelled answers to report accuracy on")
    ap.add_argument("--seed", type=int, default=0, help="which answers are drawn")
    a = ap.parse_args(argv)
    try:
        if a.train_data is None:
            toy.ensure_dataset(a.data_dir)
        train_path = a.train_data or os.path.join(a.data_dir, "pref_train.jsonl")
        eval_path = a.eval_data or (os.path.join(a.data_dir, "pref_test.jsonl")
                                    if a.train_data is None else None)
        policy, tok = load_policy(a.policy)
        policy.eval()
        template = read_state(a.policy).get("template") or "safe_rlhf"
        layer = a.layer if a.layer is not None else round(2 * policy.config.num_hidden_layers / 3)
        if not 0 <= layer <= policy.config.num_hidden_layers:
            raise data.DataError(f"--layer {layer}: {a.policy} has hidden states "
                                 f"0..{policy.config.num_hidden_layers}")
        p, r, y = labelled_answers(train_path, a.n_train, a.seed)
        feats = hidden_features(policy, tok, p, r, layer, template)
        probe = LinearProbe(layer, policy.config.hidden_size).fit(feats, y)

        def acc(f, y):
            return ((probe(f) > 0).float() == y).float().mean().item()
        info = {"policy": a.policy, "template": template, "train_accuracy": acc(feats, y),
                "n_train": len(y), "train_unsafe_frac": y.mean().item()}
        if eval_path:
            p, r, y = labelled_answers(eval_path, a.n_eval, a.seed)
            info.update(eval_accuracy=acc(hidden_features(policy, tok, p, r, layer, template), y),
                        n_eval=len(y))
        probe.save(a.out, info)
        print(json.dumps(info, indent=1))
        print(f"saved {a.out}. use it: python train_ppo_lag.py --cost_models --probe {a.out} "
              "[--probe_refresh_every 25]")
    except (data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

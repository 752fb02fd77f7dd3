"""
Direct preference optimisation and two safe variants of it, as pure functions on tensors and
records (train_dpo.py runs them):

- DPO (Rafailov et al., 2023): β·log π/π_ref is an implicit reward; a Bradley–Terry loss on it.
- SafeDPO (Kim et al., ICLR 2026, "SafeDPO: A Simple Approach to Direct Preference Optimization
  with Enhanced Safety", arXiv 2505.20065): the pairs transformed by their per-answer safety
  labels, then DPO with a safety offset Δ.
- MoCAN (Huang et al., NeurIPS 2024, "One-Shot Safety Alignment for Large Language Models via
  Optimal Dualization", arXiv 2405.19544): the Lagrangian's dual has a closed form over samples of
  the reference; minimise it once for λ*, then align once on r − λ*·c.

A pair is a record in the PKU-SafeRLHF schema (data.load_preference), *oriented*: response_0 is
the answer the loss pushes up ("w"), response_1 the other ("l"); h = 1 marks an unsafe answer.

What was checked, and against what (neither paper's text could be read here past its opening):
- SafeDPO has no official code. The transform T (keep a pair whose preferred answer is safe, swap
  an unsafe preferred answer with a safe other one, drop the pair when both are unsafe), the loss
  -log σ(β·[log-ratio(ỹ_w) - log-ratio(ỹ_l)] - (h̃_l - h̃_w)·Δ) and the defaults β = 0.1, Δ = 10
  agree across two paper notes (one built from the PDF), a review summary and two third-party
  re-implementations. Their section and equation numbers disagree (§3 and Eq. 11-12 in one
  re-implementation; the notes put the supporting results at Propositions 4.2-4.4), and arXiv
  has two versions, so no number is cited here. Δ >= 0 leaving the optimum unchanged is the
  notes' Proposition 4.4.
- MoCAN: the dual is the official code's (github shuoli90/CAN, safe_rlhf/trainers/
  model_based.py: safety = -cost, E[safety] >= threshold, so b = -d): β·mean_x logmeanexp[(r +
  λ(safety - b))/β], minimised there by projected gradient descent, here by bisection on D' (the
  same λ* to 1e-7 on a random case). The authors estimate it from 1,000 prompts x 128 reference
  samples; train_dpo.py's K defaults to 8 (fewer samples make π_λ's reweighting coarser).
  Stage 2 in the official code (safe_rlhf/algorithms/cdpo/dpo.py) relabels the existing
  preference pairs, scored by the reward and cost models, with one hard label per pair drawn
  once, P(y_1 chosen) = σ(w_1 - w_0), w = r - λ*·c, then runs standard DPO. Here the same
  probability is the soft label of can_labels: the same expected loss and optimum, without the
  draw's noise (a stated departure).
"""

import math

import torch
import torch.nn.functional as F

from nanosafe.data import IGNORE_INDEX
from nanosafe.ppo import logprobs_from_logits

# -----------------------------------------------------------------------------
# log-probs of answers, and the loss


def sequence_logprobs(logits, labels):
    """log π(y | x) = Σ_t log π(y_t | x, y_<t) over the answer's tokens (EOS included): logits
    [B, L, V] of a batch whose labels [B, L] are IGNORE_INDEX on the prompt and the pads, as
    data.collate_sft makes them -> [B]."""
    labels = labels[:, 1:]  # the logits at position i predict token i + 1
    keep = labels != IGNORE_INDEX
    lp = logprobs_from_logits(logits[:, :-1], labels.clamp(min=0))
    return torch.where(keep, lp, 0.0).sum(-1)


def dpo_logits(logp_w, logp_l, ref_w, ref_l, beta):
    """β·[log π/π_ref (y_w) − log π/π_ref (y_l)]: the implicit reward margin -> [B]."""
    return beta * ((logp_w - ref_w) - (logp_l - ref_l))


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta, offset=0.0, label=1.0):
    """The per-pair loss -> [B]. With z = dpo_logits(...) - offset:

        -label·log σ(z) - (1 - label)·log σ(-z)

    label 1 (the default) is DPO's -log σ(z) (Rafailov et al., 2023); offset is
    SafeDPO's (h_l - h_w)·Δ (safety_offset); a label in (0, 1) is the Bradley–Terry probability
    that y_w is preferred (MoCAN's relabelled pairs, can_labels), whose minimiser is
    z = logit(label): the policy's implicit reward margin equals the labelling reward's."""
    z = dpo_logits(logp_w, logp_l, ref_w, ref_l, beta) - offset
    return -(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z))

# -----------------------------------------------------------------------------
# pairs: which answer is y_w


def orient(record, chosen: int) -> dict:
    """The record with answer `chosen` (0 or 1) as response_0 (y_w); every per-answer field and
    both label ids follow their answer."""
    if chosen == 0:
        return dict(record)
    out = dict(record)
    for key in record:  # response_0... <-> response_1..., is_response_0_safe <-> ..._1_safe
        other = key.replace("_0", "_#").replace("_1", "_0").replace("_#", "_1")
        if other != key:
            out[key] = record.get(other)
    for key in ("better_response_id", "safer_response_id"):
        if record.get(key) is not None:
            out[key] = 1 - record[key]
    return out


def preference_pairs(records, label="better"):
    """Plain DPO: each pair oriented by its better_response_id (label 'better': the helpfulness
    preference) or safer_response_id ('safer'), kept whatever its safety labels."""
    return [orient(r, r[f"{label}_response_id"]) for r in records]


def has_safety_labels(record) -> bool:
    return all(record.get(f"is_response_{i}_safe") is not None for i in (0, 1))


def safe_dpo_pairs(records):
    """SafeDPO's transform T of the pairs (Kim et al.; no section cited: see the module
    docstring), on the helpfulness preference y_w ≻ y_l and the safety labels h:

        h_w = 0            keep (y_w, y_l)           whatever h_l
        h_w = 1, h_l = 0   swap: (y_l, y_w)          the safe answer becomes the preferred one
        h_w = 1, h_l = 1   drop

    so every kept pair's preferred answer is safe: T encodes "r = -inf for an unsafe answer",
    under which the KL-regularised optimum gives unsafe answers probability 0.
    -> (pairs, counts {'kept', 'swapped', 'dropped'}); every record needs both safety labels."""
    pairs, counts = [], {"kept": 0, "swapped": 0, "dropped": 0}
    for r in records:
        if not has_safety_labels(r):
            raise ValueError(f"{r.get('_where', '<record>')}: SafeDPO needs both answers' safety "
                             f"labels (is_response_0_safe, is_response_1_safe)")
        p = orient(r, r["better_response_id"])
        if p["is_response_0_safe"]:
            counts["kept"] += 1
            pairs.append(p)
        elif p["is_response_1_safe"]:
            counts["swapped"] += 1
            pairs.append(orient(p, 1))
        else:
            counts["dropped"] += 1
    return pairs, counts


def unsafe_flags(pairs) -> torch.Tensor:
    """[N, 2] float: h_w, h_l (1 = unsafe; 0 where a pair has no safety labels)."""
    return torch.tensor([[float(p.get(f"is_response_{i}_safe") is False) for i in (0, 1)]
                         for p in pairs])


def safety_offset(h_w, h_l, delta):
    """SafeDPO's offset (h_l - h_w)·Δ, subtracted from the DPO logit (the loss the module
    docstring gives): on a pair with a safe y_w and an unsafe
    y_l the implicit reward margin must exceed Δ before the loss flattens, pushing the unsafe
    answer down harder. After T, h_w = 0, so the offset is Δ·h_l. The paper shows Δ >= 0 leaves
    the optimum unchanged."""
    return (h_l - h_w) * delta

# -----------------------------------------------------------------------------
# MoCAN: the dual, minimised once, and the relabelled pairs
#
# The problem, for one cost constraint with threshold d:
#     max_π  E_x [ E_{y~π} r(x,y) - β·KL(π(.|x) || π_ref(.|x)) ]   s.t.   E_x E_{y~π} c(x,y) <= d
# The Lagrangian with λ >= 0 is the KL-regularised objective for the reward r + λ(d - c), whose
# maximiser is π_λ(y|x) ∝ π_ref(y|x)·exp((r - λc)/β) and whose value is the dual
#     D(λ) = β·E_x log E_{y~π_ref} exp[(r + λ(d - c)) / β]
#     D'(λ) = d - E_x E_{y~π_λ} c          D''(λ) = E_x Var_{π_λ}(c) / β >= 0
# so D is convex, λ* = argmin_{λ>=0} D(λ) is where π_λ's mean cost meets d (0 when π_ref already
# meets it), and π_λ* solves the constrained problem. Here E_{y~π_ref} is the mean over K samples
# of the reference per prompt, scored by the learned reward and cost models: r, c are [N, K].


def can_dual(lam, r, c, d, beta):
    """D(λ) on N prompts x K reference samples (r, c: [N, K]) -> a float."""
    r, c = r.double(), c.double()
    z = (r + lam * (d - c)) / beta
    return (beta * (torch.logsumexp(z, dim=1) - math.log(r.shape[1]))).mean().item()


def can_dual_grad(lam, r, c, d, beta):
    """D'(λ) = d - E_x E_{π_λ} c, π_λ the reference samples reweighted by exp((r - λc)/β)."""
    r, c = r.double(), c.double()
    w = torch.softmax((r - lam * c) / beta, dim=1)
    return d - (w * c).sum(1).mean().item()


def solve_can_dual(r, c, d, beta, lambda_max, tol=1e-7):
    """λ* = argmin_{0 <= λ <= lambda_max} D(λ), by bisection on D' (non-decreasing: D is
    convex). -> (λ*, info): 0 when π_0 ∝ π_ref·exp(r/β), the unconstrained optimum, already
    meets d; lambda_max when even π_lambda_max cannot (infeasible on these samples: as λ grows
    π_λ tends to each prompt's lowest-cost samples)."""
    g0, g_max = can_dual_grad(0.0, r, c, d, beta), can_dual_grad(lambda_max, r, c, d, beta)
    info = {"mean_cost_at_0": d - g0, "mean_cost_at_lambda_max": d - g_max,
            "feasible": g_max >= 0}
    if g0 >= 0:
        return 0.0, info
    if g_max < 0:
        return float(lambda_max), info
    lo, hi = 0.0, float(lambda_max)
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if can_dual_grad(mid, r, c, d, beta) >= 0 else (mid, hi)
    return hi, info


def can_labels(r, c, lam):
    """MoCAN's second stage as DPO on relabelled pairs: the Bradley–Terry probability that y_w
    beats y_l under the Lagrangian reward r - λ·c (d cancels in a difference): r, c [2, B] for
    (y_w, y_l) -> [B] in (0, 1). The official code draws one hard label from it per pair; here it
    is a soft label (the same expected loss): dpo_loss's minimiser then has
    β·[log-ratio(y_w) - log-ratio(y_l)] = (r - λc)(y_w) - (r - λc)(y_l), the pairwise form of
    π_λ ∝ π_ref·exp((r - λc)/β)."""
    s = r - lam * c
    return torch.sigmoid(s[0] - s[1])

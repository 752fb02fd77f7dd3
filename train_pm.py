"""
Stage 2 of Safe RLHF: the preference models. Helpfulness and harmlessness are learned from
*separate* labels on the same pairs:

    reward model:  -log σ(r_better - r_worse)                                 + reg·mean(r²)
    cost model:    -log σ(c_unsafer - c_safer) - Σ_i log σ(s_i · c_i)          + reg·mean(c²)
                   s_i = +1 if response i is unsafe, -1 if safe  (so cost > 0 means unsafe)

    python train_pm.py --kind reward                # toy world -> out/rm (~4 min on 2 cores)
    python train_pm.py --kind cost                  # toy world -> out/cm
    python train_pm.py --kind cost --no_sign_loss   # the ablation: no sign term, no meaningful zero
    python train_pm.py --kind cost --category violence --out_dir out/cm_violence  # one category
    python train_pm.py --kind cost --categories all --out_dir out/cm_k5  # one output per category
    python train_pm.py --eval_only --model out/cm   # accuracy + the score-distribution figure
    torchrun --nproc_per_node=2 train_pm.py --kind reward

A score model is a causal-LM backbone (--model's architecture: its SFT weights, or fresh weights
for a toy model trained from scratch, see --init) plus a linear head; the
score of a sequence is the score at its last non-pad token, its EOS.
"""

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosafe import config, data, dist, fsdp, toy, train
from nanosafe.config import arg
from nanosafe.model import (
    CheckpointError,
    checkpoint_kind,
    gradient_checkpointing,
    load_score_model,
    num_params,
    place,
    read_state,
    recover_checkpoint,
    resolve_template,
    trained_from_scratch,
)


@dataclass
class Config(config.Stage):
    """Stage 2: reward model (helpfulness) or cost model (harmfulness) from preference pairs."""
    kind: str = arg("reward", "which model to train", ["reward", "cost"], group="model")
    out_dir: str | None = arg(None, "output folder (default: out/rm for reward, out/cm for cost)",
                              group="data")
    model: str = arg("out/sft", "backbone to start from: an SFT policy folder (official: the SFT "
                     "model)", group="model")
    train_data: str | None = arg(None, "PKU-SafeRLHF or HH-RLHF jsonl(.gz); default: the toy "
                                 "world's pref_train.jsonl", group="data")
    eval_data: str | None = arg(None, "held-out pairs; default: the toy world's pref_test.jsonl",
                                group="data")
    max_length: int = arg(64, "max tokens of prompt + response; longer responses are cut",
                          group="data", check=">=2")
    drop_bad: bool = arg(False, "drop pairs with identical responses or contradictory safety "
                         "labels (default: keep, report)", group="data")
    category: str | None = arg(None, "cost model for one harm category only "
                               "(response_i_harm_category)", group="model")
    categories: list[str] = arg([], "cost model with one output per harm category: names, or "
                                "'all'", group="model")
    sign_loss: bool = arg(True, "cost model: add the sign term -log σ(s·c) (official: on)",
                          group="model")
    init: str = arg("auto", "sft: start from --model's weights (official); random: its "
                    "architecture, fresh weights; auto: random for a toy model trained from "
                    "scratch", ["auto", "sft", "random"], group="model")
    eval_only: bool = arg(False, "only evaluate --model (a trained score model) and draw its "
                          "score distribution", group="model")
    epochs: int = arg(0, "passes over the pairs; 0: 2 for a reward model (official: 2), 1 for a "
                      "cost model", group="optimisation", check=">=0")
    max_steps: int = arg(0, "stop after this many optimizer steps (0: use --epochs)",
                         group="optimisation", check=">=0")
    batch_size: int = arg(32, "pairs per micro-batch per process (official: 16 per GPU)",
                          group="optimisation", check=">=1")
    grad_accum: int = arg(1, "micro-batches per optimizer step", group="optimisation", check=">=1")
    lr: float = arg(8e-4, "peak learning rate (official: 2e-5 for 7B)", pretrained=2e-5,
                    group="optimisation", check=">=0")
    warmup_steps: int = arg(10, "linear warmup steps", group="optimisation", check=">=0")
    group_by_length: bool = arg(True, "batch pairs of similar length together (each pair still "
                                "once per epoch)", group="optimisation")
    weight_decay: float = arg(0.1, "AdamW weight decay (official: 0.1)",
                              group="optimisation", check=">=0")
    reg: float = arg(0.001, "score regularisation reg·mean(score²) (official: 0.001)",
                     group="optimisation", check=">=0")
    grad_clip: float = arg(1.0, "clip the global gradient norm (official: 1.0)",
                           group="optimisation", check=">0")
    eval_every: int = arg(0, "evaluate every N steps (0: once per epoch and at the end)",
                          group="logging", check=">=0")

# -----------------------------------------------------------------------------
# the losses (pure functions: tests check them against hand-computed values)

def reward_loss(r0, r1, better, reg):
    """-log σ(r_better - r_worse) + reg·mean(r²), per pair -> [B]. better: 0/1 tensor."""
    r_b = torch.where(better == 0, r0, r1)
    r_w = torch.where(better == 0, r1, r0)
    return -F.logsigmoid(r_b - r_w) + reg * 0.5 * (r_b ** 2 + r_w ** 2)


def cost_loss(c0, c1, safer, safe0, safe1, reg, sign_loss=True):
    """-log σ(c_unsafer - c_safer) - log σ(s0·c0) - log σ(s1·c1) + reg·mean(c²), per pair -> [B].
    safer = -1 skips the pairwise term (no order known); safe_i = -1 skips that sign term
    (no safety label, e.g. HH-RLHF)."""
    c_safe = torch.where(safer == 0, c0, c1)
    c_unsafe = torch.where(safer == 0, c1, c0)
    loss = torch.where(safer >= 0, -F.logsigmoid(c_unsafe - c_safe), torch.zeros_like(c0))
    if sign_loss:
        for c, safe in ((c0, safe0), (c1, safe1)):
            s = 1.0 - 2.0 * safe.float()  # +1 unsafe, -1 safe
            loss = loss + torch.where(safe >= 0, -F.logsigmoid(s * c), torch.zeros_like(c))
    return loss + reg * 0.5 * (c0 ** 2 + c1 ** 2)


def pair_scores(model, b):
    """End scores of both responses of each pair, in one [2B, L] forward."""
    _, end = model(torch.cat([b["input_ids_0"], b["input_ids_1"]]),
                   torch.cat([b["mask_0"], b["mask_1"]]))
    return end.chunk(2)


def pair_loss(kind, model, b, cfg):
    c0, c1 = pair_scores(model, b)
    if kind == "reward":
        return reward_loss(c0, c1, b["better_response_id"], cfg.reg)
    if "category_labels" in b:  # [B, 3, K]: K cost models' losses on one backbone, summed
        L = b["category_labels"]
        return cost_loss(c0, c1, L[:, 0], L[:, 1], L[:, 2], cfg.reg, cfg.sign_loss).sum(-1)
    return cost_loss(c0, c1, b["safer_response_id"], b["is_safe_0"], b["is_safe_1"], cfg.reg,
                     cfg.sign_loss)


def for_category(records, cat):
    """Relabel pairs for a one-category cost model: safe_i = not harm_category_i[cat]; the safer
    one is the one without that harm (pairs where both or neither have it get no order)."""
    out = []
    for r in records:
        flags = [r.get(f"response_{i}_harm_category") for i in (0, 1)]
        if any(f is None or cat not in f for f in flags):
            raise data.DataError(f"{r['_where']}: --category {cat}: the pair has no "
                                 f"response_i_harm_category[{cat!r}]")
        h0, h1 = bool(flags[0][cat]), bool(flags[1][cat])
        out.append(dict(r, is_response_0_safe=not h0, is_response_1_safe=not h1,
                        safer_response_id=None if h0 == h1 else int(h0), _category=cat))
    return out

def category_names(records, asked):
    """--categories: the names asked for, or 'all' -> every category the pairs are labelled with."""
    found = sorted({c for r in records for i in (0, 1)
                    for c in (r.get(f"response_{i}_harm_category") or {})})
    names = found if asked == ["all"] else list(asked)
    if not names:
        raise data.DataError(f"{records[0]['_where'] if records else 'the data'}: --categories "
                             f"all: the pairs have no response_i_harm_category labels")
    return names


def category_labels(records, names):
    """[N, 3, K] long: per pair and category, the safer id, is_safe_0 and is_safe_1 (-1: none),
    as for_category."""
    rows = []
    for r in records:
        per = [for_category([r], c)[0] for c in names]
        rows.append([[-1 if x[key] is None else int(x[key]) for x in per]
                     for key in ("safer_response_id", "is_response_0_safe", "is_response_1_safe")])
    return torch.tensor(rows, dtype=torch.long)


class Column(torch.nn.Module):
    """Output k of a K-output score model as a one-output model: how each category is evaluated."""

    def __init__(self, model, k):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, input_ids, attention_mask):
        scores, end = self.model(input_ids, attention_mask)
        return scores[..., self.k], end[:, self.k]

# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(kind, model, records, dataset, tok, device, amp=nullcontext, batch_size=64):
    """Pairwise accuracy, sign accuracy (cost), oracle accuracy (toy world) and the scores."""
    model.eval()
    s0, s1 = [], []
    for i in range(0, len(dataset), batch_size):
        b = data.collate_pref([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))],
                              tok.pad_token_id)
        with amp():
            a, c = pair_scores(model, {k: v.to(device) for k, v in b.items()})
        s0.append(a.cpu())
        s1.append(c.cpu())
    model.train()
    s0, s1 = torch.cat(s0), torch.cat(s1)
    key = "better_response_id" if kind == "reward" else "safer_response_id"
    label = torch.tensor([-1 if d[key] is None else d[key] for d in dataset.items])
    has = label >= 0
    # reward: the better one scores higher; cost: the unsafer one (not the safer) scores higher
    first_wins = (s0 > s1) if kind == "reward" else (s0 < s1)
    out = {"n_pairs": len(dataset),
           "accuracy": (first_wins == (label == 0))[has].float().mean().item(),
           "scores_0": s0, "scores_1": s1}
    if kind == "cost":
        safe = torch.tensor([[-1 if d[k] is None else d[k] for k in ("is_safe_0", "is_safe_1")]
                             for d in dataset.items])
        scores = torch.stack([s0, s1], 1)
        known = safe >= 0
        if known.any():
            out["sign_accuracy"] = ((scores > 0) == (safe == 0))[known].float().mean().item()
        out["safe"] = safe
    if records and toy.in_world(records[0]["prompt"]):
        out["oracle_accuracy"] = oracle_accuracy(kind, records)
    return out


def evaluate_categories(model, records, tok, device, amp, cfg, template):
    """A K-output cost model: each output evaluated as a one-category cost model, means on top."""
    per = {}
    for k, cat in enumerate(model.names):
        recs = for_category(records, cat)
        ds = data.PreferenceDataset(recs, tok, cfg.max_length, cfg.truncate_prompts, template)
        per[cat] = report(evaluate("cost", Column(model, k), recs, ds, tok, device, amp))
    out = {key: sum(r[key] for r in per.values()) / len(per)
           for key in per[model.names[0]] if key != "n_pairs"}
    return dict(out, n_pairs=len(records), categories=per)


def oracle_accuracy(kind, records):
    """How often the gold oracle agrees with the same noisy labels: the ceiling the labels allow
    (a gold tie counts as a coin flip)."""
    agree = n = 0
    for r in records:
        label = r["better_response_id" if kind == "reward" else "safer_response_id"]
        if label is None:
            continue
        if kind == "reward":
            g0, g1 = (toy.helpfulness(r["prompt"], r[f"response_{i}"]) for i in (0, 1))
        else:  # higher gold safety = lower cost (of one category for a --category model)
            c = [toy.cost(r["prompt"], r[f"response_{i}"]) for i in (0, 1)]
            g0, g1 = (-(ci[r["_category"]] if "_category" in r else sum(ci.values())) for ci in c)
        agree += 0.5 if g0 == g1 else float((g0 > g1) == (label == 0))
        n += 1
    return agree / max(1, n)


def score_figure(kind, ev, path):
    """The paper's figure: reward scores; cost scores split by safe / unsafe responses.
    A PNG with matplotlib, else a text histogram. Returns the text summary."""
    scores = torch.cat([ev["scores_0"], ev["scores_1"]])
    groups = {"all responses": scores}
    if kind == "cost" and "safe" in ev:
        safe = torch.cat([ev["safe"][:, 0], ev["safe"][:, 1]])
        groups = {"safe": scores[safe == 1], "unsafe": scores[safe == 0]}
        if (safe == -1).any():
            groups["unlabelled"] = scores[safe == -1]
    lines = [f"{kind} scores on {ev['n_pairs']} test pairs:"]
    for name, s in groups.items():
        if len(s):
            lines.append(f"  {name:14s} n={len(s):5d} mean {s.mean():+.2f} std {s.std():.2f} "
                         f"min {s.min():+.2f} max {s.max():+.2f} "
                         f"(>0: {(s > 0).float().mean():.1%})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, s in groups.items():
            ax.hist(s.numpy(), bins=40, alpha=0.6, label=f"{name} (n={len(s)})")
        if kind == "cost":
            ax.axvline(0, color="k", lw=0.8, ls="--")
        ax.set_xlabel(f"{kind} score")
        ax.set_ylabel("responses")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        lines.append(f"  figure: {path}")
    except ImportError:
        lo, hi = scores.min().item(), scores.max().item()
        for name, s in groups.items():
            counts = torch.histc(s, bins=20, min=lo, max=hi).int().tolist()
            lines.append(f"  {name}: " + " ".join(f"{c}" for c in counts)
                         + f"   (20 bins from {lo:+.1f} to {hi:+.1f})")
        lines.append("  (pip install matplotlib for the figure)")
    return "\n".join(lines)


def report(ev):
    return {k: v for k, v in ev.items() if not isinstance(v, torch.Tensor)}

# -----------------------------------------------------------------------------

def choose_init(cfg):
    """--init auto: a backbone trained from scratch on a few thousand toy answers carries little
    a score model can use (measured: README), so it starts fresh; a pretrained one is kept."""
    if cfg.init != "auto":
        return cfg.init
    from_scratch = trained_from_scratch(cfg.model)
    init = "random" if from_scratch else "sft"
    why = "was trained from scratch by train_sft.py" if from_scratch else "starts pretrained"
    dist.print0(f"init: {init} (--model {why}; --init sft|random overrides)")
    return init


def main(cfg: Config):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    fsdp.check(rt, cfg.fsdp)
    print0 = dist.print0
    amp = dist.autocast(rt.device, getattr(torch, cfg.dtype))  # model stays fp32: master weights
    if cfg.eval_only and checkpoint_kind(cfg.model) in ("reward", "cost"):
        cfg.kind = checkpoint_kind(cfg.model)
    out_dir = cfg.out_dir or ("out/rm" if cfg.kind == "reward" else "out/cm")
    if cfg.categories and (cfg.kind != "cost" or cfg.category):
        raise config.ConfigError("--categories trains a cost model with one output per category: "
                                 "use it with --kind cost and without --category")

    # ---- data
    if not cfg.eval_only:
        train.check_out_dir(out_dir, cfg)
    _, train_path, eval_path = train.data_paths(cfg, rt, "pref")

    def load(path):
        records, rep = data.load_preference(path, drop_bad=cfg.drop_bad)
        print0(data.format_report(rep))
        if cfg.kind == "cost" and cfg.category:
            records = for_category(records, cfg.category)
        return records

    # ---- model
    if cfg.resume:
        recover_checkpoint(out_dir)  # a crash between save_checkpoint's two renames
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"{out_dir}: nothing to resume from; run without --resume")
    elif not os.path.isdir(cfg.model):
        raise CheckpointError(f"{cfg.model}: no such checkpoint. Run stage 1 first: "
                              f"python train_sft.py")
    train_records = None if cfg.eval_only else load(train_path)
    names = category_names(train_records, cfg.categories) if cfg.categories else None
    trust = cfg.trust_remote_code
    if cfg.resume:
        model, tok = load_score_model(out_dir, kind=cfg.kind, trust_remote_code=trust)
        if model.names != (names or []):
            raise config.ConfigError(f"{out_dir} has outputs {model.names or '(one)'}, "
                                     f"--categories asks for {names or '(one)'}; resume with the "
                                     f"flags it was started with")
    else:
        model, tok = load_score_model(cfg.model, kind=cfg.kind, init_from_policy=not cfg.eval_only,
                                      trust_remote_code=trust, labels=names)
    init = read_state(out_dir).get("init") if cfg.resume else None  # what the resumed run chose
    if not cfg.resume and not cfg.eval_only:
        init = choose_init(cfg)
        if init == "random":  # --model's architecture, fresh weights (seeded: same on every rank)
            torch.manual_seed(cfg.seed)
            fresh = type(model.backbone)(model.backbone.config).state_dict()
            model.backbone.load_state_dict(fresh)
    place(model, rt.device, cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        gradient_checkpointing(model)
    if cfg.fsdp:  # before the optimiser: it must hold the sharded parameters
        fsdp.shard(model, getattr(torch, cfg.dtype))
    eval_records = load(eval_path) if eval_path else []
    template = resolve_template(cfg.template, out_dir if cfg.resume else cfg.model)
    eval_set = None
    if eval_records:
        eval_set = data.PreferenceDataset(eval_records, tok, cfg.max_length, cfg.truncate_prompts,
                                          template)
        if eval_set.truncation_report():
            print0(eval_set.truncation_report())

    def run_eval():  # rank 0 only
        if model.names:  # a K-output cost model: each output as a one-category cost model
            return evaluate_categories(model, eval_records, tok, rt.device, amp, cfg, template)
        return evaluate(cfg.kind, model, eval_records, eval_set, tok, rt.device, amp)

    def figure(ev, folder):
        if model.names:
            return ""
        return score_figure(cfg.kind, ev, os.path.join(folder, "score_distribution.png"))

    if cfg.eval_only:
        if eval_set is not None:
            with fsdp.gathered(model):  # every rank enters (FSDP gathers), rank 0 evaluates
                if rt.master:
                    ev = run_eval()
                    print0(json.dumps(report(ev), indent=1))
                    print0(figure(ev, cfg.model))
        dist.cleanup()
        return

    train_set = data.PreferenceDataset(train_records, tok, cfg.max_length, cfg.truncate_prompts,
                                       template)
    if train_set.truncation_report():
        print0(train_set.truncation_report())
    cat_labels = category_labels(train_records, names) if names else None  # [N, 3, K]
    # the sign term needs safe/unsafe labels; without them it is off, and the folder says so
    has_labels = any(r["is_response_0_safe"] is not None for r in train_records)
    sign_loss = cfg.kind == "cost" and cfg.sign_loss and has_labels
    if cfg.kind == "cost" and cfg.sign_loss and not sign_loss:
        print0("note: the training pairs have no safe/unsafe labels (HH-RLHF): the sign term is "
               "off, so the cost model's zero means nothing; PPO-Lag then needs --thresholds (it "
               "cannot calibrate 'cost > 0 is unsafe')")
    global_batch = cfg.batch_size * cfg.grad_accum * rt.world_size
    # batches of pairs of similar length pad to less: the same pairs per epoch, fewer tokens
    lengths = None
    if cfg.group_by_length:
        lengths = tuple(max(len(x["input_ids_0"]), len(x["input_ids_1"])) for x in train_set.items)
    steps_per_epoch = -(-len(train_set) // global_batch)
    epochs = cfg.epochs or (2 if cfg.kind == "reward" else 1)
    max_steps = cfg.max_steps or epochs * steps_per_epoch
    eval_every = cfg.eval_every or steps_per_epoch
    print0(f"{cfg.kind} model: {num_params(model) / 1e6:.2f}M params from {cfg.model} | "
           f"{len(train_set)} pairs | global batch {global_batch} = {cfg.batch_size} x "
           f"{cfg.grad_accum} accum x {rt.world_size} procs | {max_steps} steps"
           + (f" | category {cfg.category}" if cfg.category else "")
           + (f" | {len(names)} categories: {' '.join(names)}" if names else "")
           + ("" if sign_loss or cfg.kind == "reward" else " | no sign loss"))

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    start_step = train.resume(out_dir, rt, model, optimizer) if cfg.resume else 0
    ddp_model = DDP(model) if rt.ddp and not cfg.fsdp else model  # FSDP shards in place
    os.makedirs(out_dir, exist_ok=True)
    meta = {"kind": cfg.kind, "template": template, "category": cfg.category, "categories": names,
            "sign_loss": sign_loss if cfg.kind == "cost" else None, "init": init,
            "args": config.to_dict(cfg)}
    t0 = time.time()

    def step_loss(step):
        idx = train.step_indices(len(train_set), step, global_batch, rt.rank, rt.world_size,
                                 cfg.seed, lengths)
        loss_sum = torch.zeros((), device=rt.device)
        micro = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        for i, mi in enumerate(micro):
            b = data.collate_pref([train_set[j] for j in mi], tok.pad_token_id)
            b = {k: v.to(rt.device) for k, v in b.items()}
            if cat_labels is not None:
                b["category_labels"] = cat_labels[mi].to(rt.device)
            with fsdp.no_sync([ddp_model], rt.ddp and i < len(micro) - 1):
                with amp():
                    loss = pair_loss(cfg.kind, ddp_model, b, cfg).sum()
                # a mean over the global batch of pairs, however it is split (DDP averages ranks)
                (loss * rt.world_size / global_batch).backward()
            loss_sum += loss.detach()
        rate = (step + 1 - start_step) * global_batch / (time.time() - t0)
        return dist.all_reduce_sum(loss_sum) / global_batch, {"pairs_per_s": rate}

    last = {}

    def evaluate_now(step):
        if eval_set is None or not ((step + 1) % eval_every == 0 or step + 1 == max_steps):
            return {}
        with fsdp.gathered(model):
            if rt.master:
                last["ev"] = run_eval()
                return {f"eval_{k}": v for k, v in report(last["ev"]).items()}
        return {}

    def save(step, final):
        train.save(out_dir, rt, model, tok, optimizer, meta, step, final)

    rec = train.fit(rt, model, optimizer, cfg, out_dir, max_steps, start_step, step_loss,
                    evaluate_now, save)

    # ---- summary
    ev = last.get("ev")
    if eval_set is not None and dist.broadcast_object(ev is None):  # one decision for all ranks
        with fsdp.gathered(model):
            ev = run_eval() if rt.master else None
    if rt.master and eval_set is not None:
        summary = dict(report(ev), steps=max_steps, skipped_steps=rec["skipped_steps"])
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print0(json.dumps(summary, indent=1))
        print0(figure(ev, out_dir))
    nxt = (f"python train_pm.py --kind cost --model {cfg.model}" if cfg.kind == "reward"
           else f"python train_ppo_lag.py --model {cfg.model} --cost_models {out_dir}")
    print0(f"saved {out_dir}. next: {nxt}")
    dist.cleanup()


if __name__ == "__main__":
    train.run(main, config.parse(Config, description=__doc__))

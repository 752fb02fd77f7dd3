"""
DPO on preference pairs, the SFT model as the frozen reference, and two safe variants of it.
With z = β·[log π/π_ref (y_w) - log π/π_ref (y_l)], the policy's implicit reward margin:

    dpo        -log σ(z), y_w the better answer of each pair (--preference safer: the safer one)
    safe_dpo   SafeDPO (Kim et al., ICLR 2026): the pairs transformed by their safety labels (an
               unsafe y_w swapped with a safe y_l, the pair dropped when both are unsafe), then
               -log σ(z - (h_l - h_w)·Δ), h = 1 for an unsafe answer
    --dual can MoCAN (Huang et al., NeurIPS 2024): λ* = argmin_{λ>=0} D(λ), the dual
               D(λ) = β·E_x log E_{y~π_ref} exp[(r + λ(d - c))/β] over K samples of the
               reference per prompt scored by the reward and cost models; then one DPO run on the
               pairs relabelled by r - λ*·c, as soft labels q = σ((r - λ*c)(y_0) - (r - λ*c)(y_1))
               in -q·log σ(z) - (1 - q)·log σ(-z), whose optimum is π ∝ π_ref·exp((r - λ*c)/β)

The losses, the pair transform and the dual are in nanosafe/dpo.py (with what could be checked
against the papers); the step loop, checkpoints and resume are the supervised stages'
(nanosafe/train.py). No sampling during training: MoCAN samples the reference once, before it.

    python train_dpo.py                       # toy world, from out/sft -> out/dpo (~1.5 min)
    python train_dpo.py --loss safe_dpo       # -> out/safe_dpo (~1.5 min)
    python train_dpo.py --dual can            # after train_pm.py (out/rm, out/cm) -> out/mocan
    python train_dpo.py --preference safer    # DPO on the safer labels -> out/dpo_safer
    torchrun --nproc_per_node=2 train_dpo.py
    python train_dpo.py --model path/to/sft --train_data pku.jsonl --eval_data pku_test.jsonl

Writes the policy as a Hugging Face folder, metrics.jsonl, and (toy world) summary.json with
the final gold evaluation on the held-out prompts, in the RL scripts' form ("final").
"""

import json
import os
import random
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosafe import config, data, dist, dpo, fsdp, rl, train
from nanosafe.config import ConfigError, arg
from nanosafe.evaluate import gold_evaluate
from nanosafe.model import (
    CheckpointError,
    check_same_tokenizer,
    gradient_checkpointing,
    load_policy,
    load_score_model,
    num_params,
    place,
    read_state,
    recover_checkpoint,
    require_stage,
    resolve_template,
)
from nanosafe.monitor import MetricsLog


@dataclass
class Config(config.Stage):
    """DPO, SafeDPO or MoCAN from preference pairs, the SFT model as the reference."""
    out_dir: str | None = arg(None, "output folder (default: out/dpo, out/dpo_safer, "
                              "out/safe_dpo or out/mocan)", group="data")
    train_data: str | None = arg(None, "PKU-SafeRLHF or HH-RLHF pairs, jsonl(.gz); default: the "
                                 "toy world's pref_train.jsonl", group="data")
    eval_data: str | None = arg(None, "held-out pairs; default: the toy world's pref_test.jsonl",
                                group="data")
    eval_split: str = arg("test", "toy world: the final gold evaluation on the test prompts, or on "
                          "the validation ones (choose hyper-parameters there)", ["test", "val"],
                          group="data")
    eval_pairs: int = arg(512, "held-out pairs in each evaluation, a seeded sample (0: all)",
                          group="data", check=">=0")
    max_length: int = arg(64, "max tokens of prompt + answer; longer answers are cut",
                          group="data", check=">=2")
    drop_bad: bool = arg(False, "drop pairs with identical answers or contradictory safety "
                         "labels (default: keep, report)", group="data")
    model: str = arg("out/sft", "the policy to start from, also the frozen reference (official: "
                     "the SFT model)", group="model")
    loss: str = arg("dpo", "dpo: -log σ(z); safe_dpo: SafeDPO's pair transform and safety offset",
                    ["dpo", "safe_dpo"], group="model")
    preference: str = arg("better", "plain DPO: the label that picks y_w (better: helpfulness; "
                          "safer: the DPO-harmless baseline)", ["better", "safer"], group="model")
    # β 0.1 and lr 3e-4 from a sweep on the toy world's validation prompts (β 0.5 and lr 1e-3:
    # less helpful); Δ is the paper's
    beta: float = arg(0.1, "β: the KL coefficient scaling the log-ratios (DPO, SafeDPO papers: "
                      "0.1)", group="model", check=">0")
    safety_margin: float = arg(10.0, "SafeDPO's Δ: the offset on a pair of a safe and an unsafe "
                               "answer (paper: 10)", group="model", check=">=0")
    max_steps: int = arg(600, "optimizer steps (0.2 epochs of the toy pairs)",
                         group="optimisation", check=">=1")
    batch_size: int = arg(32, "pairs per micro-batch per process", group="optimisation",
                          check=">=1")
    grad_accum: int = arg(1, "micro-batches per optimizer step", group="optimisation", check=">=1")
    lr: float = arg(3e-4, "peak learning rate (DPO, SafeDPO papers: 1e-6 for 7B)", pretrained=1e-6,
                    group="optimisation", check=">=0")
    warmup_steps: int = arg(20, "linear warmup steps", group="optimisation", check=">=0")
    weight_decay: float = arg(0.0, "AdamW weight decay", group="optimisation", check=">=0")
    grad_clip: float = arg(1.0, "clip the global gradient norm", group="optimisation",
                           check=">0")
    max_new_tokens: int = arg(24, "answer length limit in tokens: the dual's samples and the gold "
                              "evaluation (the RL scripts')", group="rollout", check=">=1")
    dual_samples: int = arg(8, "--dual can: K, answers of the reference per prompt (toy world: "
                            "with 4, d was out of reach and λ* at its cap)", group="rollout",
                            check=">=1")
    dual_prompts: int = arg(0, "--dual can: prompts of the training pairs it samples, a seeded "
                            "choice (0: every distinct one)", group="rollout", check=">=0")
    dual: str = arg("none", "can: MoCAN, λ* from the dual, then DPO on pairs relabelled by "
                    "r - λ*·c", ["none", "can"], group="multiplier")
    reward_model: str = arg("out/rm", "--dual can: reward model folder (train_pm.py --kind "
                            "reward)", group="multiplier")
    cost_model: str = arg("out/cm", "--dual can: cost model folder (train_pm.py --kind cost)",
                          group="multiplier")
    lambda_max: float = arg(20.0, "--dual can: cap on λ*, reached when even each prompt's safest "
                            "sample misses d (the RL scripts' cap)", group="multiplier",
                            check=">0")
    target_unsafe_rate: float = arg(0.01, "--dual can: d, the mean cost of answers the cost "
                                    "model calls unsafe this often (the RL scripts' calibration)",
                                    group="constraints", check="[0,1]")
    threshold: float | None = arg(None, "--dual can: d on the cost model's scale, instead of "
                                  "calibrating it", group="constraints")
    eval_every: int = arg(200, "held-out loss and accuracy every N steps (0: at the end)",
                          group="logging", check=">=0")
    ckpt_every: int = arg(200, "checkpoint every N steps (atomic; --resume picks it up)",
                          group="logging", check=">=1")
    gold_samples: int = arg(4, "toy world: samples per held-out prompt for the final gold "
                            "evaluation (0: skip)", group="logging", check=">=0")


def check_flags(cfg) -> str:
    """The checks that need no model -> the run's name (its default folder under out/)."""
    mocan = cfg.dual == "can"
    if mocan and cfg.loss != "dpo":
        raise ConfigError("--dual can relabels the pairs by r - λ*·c and runs DPO on them; it "
                          "does not combine with --loss safe_dpo")
    if cfg.preference != "better" and (cfg.loss != "dpo" or mocan):
        raise ConfigError("--preference safer is plain DPO's: SafeDPO transforms the better-"
                          "labelled pairs, MoCAN relabels them")
    needs = [(cfg.model, "train_sft.py")]
    if mocan:
        needs += [(cfg.reward_model, "train_pm.py --kind reward"),
                  (cfg.cost_model, "train_pm.py --kind cost")]
    for path, what in needs:
        require_stage(path, what)
    if mocan:
        return "mocan"
    return "safe_dpo" if cfg.loss == "safe_dpo" else f"dpo_{cfg.preference}".replace("_better", "")


def make_pairs(cfg, records, path):
    """The records as oriented pairs, response_0 = y_w (dpo.py) -> (pairs, counts)."""
    if cfg.loss == "safe_dpo":
        if not all(dpo.has_safety_labels(r) for r in records):
            raise data.DataError(f"{path}: --loss safe_dpo needs both answers' safety labels "
                                 f"(is_response_0_safe, is_response_1_safe); HH-RLHF pairs have "
                                 f"none")
        pairs, counts = dpo.safe_dpo_pairs(records)
        if not pairs:
            raise data.DataError(f"{path}: SafeDPO's transform dropped every pair (both answers "
                                 f"unsafe in each)")
        return pairs, counts
    if cfg.dual == "can":  # as they come: the labels come from r - λ*·c, batch by batch
        return records, {"kept": len(records)}
    return dpo.preference_pairs(records, cfg.preference), {"kept": len(records)}


@torch.no_grad()
def solve_dual(cfg, rt, ref, scorers, pairs, tok, template, amp):
    """MoCAN's first stage, on rank 0 (then broadcast, its error too): K answers of the reference
    to each prompt, scored by the reward and cost models; d calibrated on their costs as the RL
    scripts do (or --threshold); λ* minimises the dual. -> what summary.json records"""
    out = err = None
    if rt.master:
        try:
            out = _dual(cfg, rt, ref, scorers, pairs, tok, template, amp)
        except ConfigError as e:
            err = str(e)
    out, err = dist.broadcast_object((out, err))
    if err:
        raise ConfigError(err)
    dist.print0(f"MoCAN dual over {out['prompts']} prompts x {cfg.dual_samples} answers of the "
                f"reference: λ* = {out['lambda']:.4g} for d = {out['threshold']:+.3f}. Mean cost "
                f"(unsafe by the cost model): the reference {out['reference_mean_cost']:+.3f} "
                f"({out['reference_unsafe']:.1%}); reweighted by exp((r - λc)/β), at λ = 0 "
                f"{out['mean_cost_at_0']:+.3f}, at λ* {out['mean_cost']:+.3f} ({out['unsafe']:.1%})"
                + ("" if out["feasible"] else " (infeasible on these samples: λ* is --lambda_max)"))
    return out


def _dual(cfg, rt, ref, scorers, pairs, tok, template, amp):
    K = cfg.dual_samples
    prompts, _ = data.dedupe_prompts([{"prompt": p["prompt"]} for p in pairs])
    if cfg.dual_prompts and cfg.dual_prompts < len(prompts):
        prompts = random.Random(cfg.seed).sample(prompts, cfg.dual_prompts)
    items = data.PromptDataset(prompts, tok, cfg.max_length, cfg.truncate_prompts,
                               template).items
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 77)  # its own stream
    r, c, per = [], [], max(1, 128 // K)
    for i in dist.progress(range(0, len(items), per), True, desc="dual: sampling the reference"):
        group = [it for it in items[i:i + per] for _ in range(K)]  # K consecutive copies
        with amp():
            ro, _ = rl.sample(ref, group, tok, gen, rt.device, max_new_tokens=cfg.max_new_tokens)
            scores = [s(ro.seq, ro.attn)[1].float().cpu() for s in scorers]
        r.append(scores[0])
        c.append(scores[1])
    r, c = torch.cat(r).view(-1, K), torch.cat(c).view(-1, K)
    calib = None
    d = cfg.threshold
    if d is None:
        d, calib = rl.threshold_between(c.flatten(), cfg.target_unsafe_rate)
        if d is None:
            raise ConfigError(f"--dual can: the cost model {cfg.cost_model} {calib}; pass "
                              f"--threshold")
    lam, info = dpo.solve_can_dual(r, c, d, cfg.beta, cfg.lambda_max)
    w = torch.softmax((r.double() - lam * c.double()) / cfg.beta, dim=1)  # π_λ* on the samples
    return {"lambda": lam, "threshold": d, "calibration": calib, "prompts": len(items),
            "samples_per_prompt": K, **info,
            "reference_mean_cost": c.mean().item(),
            "reference_unsafe": (c > 0).float().mean().item(),
            "mean_cost": (w * c).sum(1).mean().item(),
            "unsafe": (w * (c > 0)).sum(1).mean().item(),
            "mean_reward": (w * r).sum(1).mean().item(),
            "reference_mean_reward": r.mean().item()}

# -----------------------------------------------------------------------------


def main(cfg: Config):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    fsdp.check(rt, cfg.fsdp)
    print0 = dist.print0
    dtype = getattr(torch, cfg.dtype)  # the frozen models' weights; the policy stays fp32
    amp = dist.autocast(rt.device, dtype)  # bf16 compute, fp32 master weights
    mocan, trust = cfg.dual == "can", cfg.trust_remote_code
    name = check_flags(cfg)
    out_dir = cfg.out_dir or f"out/{name}"

    # ---- data: the pairs, oriented so that response_0 is y_w
    train.check_out_dir(out_dir, cfg)
    toy_world, train_path, eval_path = train.data_paths(cfg, rt, "pref")

    def load(path):
        records, rep = data.load_preference(path, drop_bad=cfg.drop_bad)
        print0(data.format_report(rep))
        pairs, counts = make_pairs(cfg, records, path)
        if cfg.loss == "safe_dpo":
            print0(f"{path}: SafeDPO's transform kept {counts['kept']}, swapped "
                   f"{counts['swapped']}, dropped {counts['dropped']} of {len(records)} pairs")
        return pairs, counts
    train_pairs, counts = load(train_path)
    eval_pairs = load(eval_path)[0] if eval_path else []
    if cfg.eval_pairs and len(eval_pairs) > cfg.eval_pairs:  # the same sample at every evaluation
        eval_pairs = random.Random(cfg.seed).sample(eval_pairs, cfg.eval_pairs)

    # ---- models: the policy, its frozen reference, (MoCAN) the frozen reward and cost models
    if cfg.resume:
        recover_checkpoint(out_dir)  # a crash between save_checkpoint's two renames
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"{out_dir}: nothing to resume from; run without --resume")
        was = read_state(out_dir).get("args") or {}
        for k in ("loss", "preference", "beta", "safety_margin", "dual", "dual_samples",
                  "target_unsafe_rate", "threshold"):  # what the loss (and λ*) depend on
            if k in was and was[k] != getattr(cfg, k):
                raise ConfigError(f"{out_dir} was trained with --{k} {was[k]}, not "
                                  f"{getattr(cfg, k)}; resume it with the flags it was started "
                                  f"with")
    model, tok = load_policy(out_dir if cfg.resume else cfg.model, trust_remote_code=trust)
    data.check_tokenizer(tok)
    ref = load_policy(cfg.model, dtype=dtype, trust_remote_code=trust)[0]
    scorers = []
    for path, kind in ([(cfg.reward_model, "reward"), (cfg.cost_model, "cost")] if mocan else []):
        m, stok = load_score_model(path, kind=kind, dtype=dtype, trust_remote_code=trust)
        check_same_tokenizer(tok, stok, cfg.model, path)
        if m.names:
            raise ConfigError(f"{path}: a cost model with {len(m.names)} outputs; the dual here "
                              f"is written for one cost")
        scorers.append(m)
    template = resolve_template(cfg.template, *([out_dir] if cfg.resume else []), cfg.model,
                                *([cfg.reward_model, cfg.cost_model] if mocan else []))
    for m in [model, ref, *scorers]:
        place(m, rt.device, cfg.attn_implementation)
    for m in [ref, *scorers]:
        m.eval().requires_grad_(False)
    model.float()

    # ---- MoCAN's dual, once (a resumed run keeps the λ* and d it started with)
    dual = read_state(out_dir).get("dual") if cfg.resume else None
    if mocan and dual is None:
        dual = solve_dual(cfg, rt, ref, scorers, train_pairs, tok, template, amp)
    if cfg.gradient_checkpointing:
        gradient_checkpointing(model)
    if cfg.fsdp:  # after the dual's sampling, before the optimiser (it holds the shards)
        for m in [model, ref, *scorers]:
            fsdp.shard(m, dtype)

    def dataset(pairs):
        """A pair as two SFT examples (their labels mark the answer tokens), and h_w, h_l."""
        sets = []
        for i in (0, 1):
            ds = data.SFTDataset([{"prompt": p["prompt"], "response": p[f"response_{i}"],
                                   "_where": p.get("_where", "<record>")} for p in pairs],
                                 tok, cfg.max_length, cfg.truncate_prompts, template)
            if ds.truncation_report():
                print0(ds.truncation_report())
            sets.append(ds)
        return sets + [dpo.unsafe_flags(pairs)]
    train_set = dataset(train_pairs)
    eval_set = dataset(eval_pairs) if eval_pairs else None

    global_batch = cfg.batch_size * cfg.grad_accum * rt.world_size
    print0(f"{name}: {num_params(model) / 1e6:.2f}M params from {cfg.model} (also the frozen "
           f"reference) | {len(train_pairs)} pairs ({train_path}) | global batch {global_batch} = "
           f"{cfg.batch_size} x {cfg.grad_accum} accum x {rt.world_size} procs | {cfg.max_steps} "
           f"steps = {cfg.max_steps * global_batch / len(train_pairs):.2f} epochs | β {cfg.beta}"
           + (f" | Δ {cfg.safety_margin}" if cfg.loss == "safe_dpo" else "")
           + (f" | λ* {dual['lambda']:.4g}" if mocan else ""))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    start_step = train.resume(out_dir, rt, model, optimizer) if cfg.resume else 0
    ddp_model = DDP(model) if rt.ddp and not cfg.fsdp else model  # FSDP shards in place
    os.makedirs(out_dir, exist_ok=True)

    def batch(dataset, indices):
        """B pairs as one [2B, L] batch: the B y_w, then the B y_l."""
        chosen, other, h = dataset
        b = data.collate_sft([chosen[i] for i in indices] + [other[i] for i in indices],
                             tok.pad_token_id)
        b = {k: v.to(rt.device) for k, v in b.items()}
        b["h"] = h[list(indices)].to(rt.device)
        return b

    def pair_losses(m, b):
        """Per-pair losses, implicit reward margins z, and whether z sides with the label."""
        B = b["h"].shape[0]
        with amp():
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logp = dpo.sequence_logprobs(logits.float(), b["labels"])
        with torch.no_grad():
            with amp():
                ref_logits = ref(input_ids=b["input_ids"],
                                 attention_mask=b["attention_mask"]).logits
            ref_logp = dpo.sequence_logprobs(ref_logits.float(), b["labels"])
            label = torch.ones(B, device=rt.device)
            if mocan:  # the pair relabelled by r - λ*·c of the frozen reward and cost models
                with amp():
                    r, c = (s(b["input_ids"], b["attention_mask"])[1].float().view(2, B)
                            for s in scorers)
                label = dpo.can_labels(r, c, dual["lambda"])
        offset = 0.0
        if cfg.loss == "safe_dpo":
            offset = dpo.safety_offset(b["h"][:, 0], b["h"][:, 1], cfg.safety_margin)
        losses = dpo.dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], cfg.beta, offset,
                              label)
        z = dpo.dpo_logits(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], cfg.beta).detach()
        return losses, z, ((z > 0) == (label > 0.5)).float()

    t0 = time.time()

    def step_loss(step):
        idx = train.step_indices(len(train_pairs), step, global_batch, rt.rank, rt.world_size,
                                 cfg.seed)
        sums = torch.zeros(3, device=rt.device)  # loss, margin, accuracy: summed over pairs
        micro = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        for i, mi in enumerate(micro):
            b = batch(train_set, mi)
            with fsdp.no_sync([ddp_model], rt.ddp and i < len(micro) - 1):
                losses, z, right = pair_losses(ddp_model, b)
                # a mean over the global batch of pairs, however it is split (DDP averages ranks)
                (losses.sum() * rt.world_size / global_batch).backward()
            sums += torch.stack([losses.detach().sum(), z.sum(), right.sum()])
        loss, margin, acc = dist.all_reduce_sum(sums) / global_batch
        rate = (step + 1 - start_step) * global_batch / (time.time() - t0)
        return loss, {"margin": margin.item(), "accuracy": acc.item(), "pairs_per_s": rate}

    @torch.no_grad()
    def evaluate(step):  # ranks may run different numbers of batches: under FSDP, gathered first
        final = step + 1 == cfg.max_steps
        if eval_set is None or not (final or cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            return {}
        model.eval()
        sums, n = torch.zeros(3, device=rt.device), len(eval_pairs)
        with fsdp.gathered(model, ref, *scorers):
            for i in range(rt.rank * cfg.batch_size, n, cfg.batch_size * rt.world_size):
                losses, z, right = pair_losses(model, batch(eval_set,
                                                            range(i, min(i + cfg.batch_size, n))))
                sums += torch.stack([losses.sum(), z.sum(), right.sum()])
        model.train()
        loss, margin, acc = (dist.all_reduce_sum(sums) / n).tolist()
        return {"eval_loss": loss, "eval_margin": margin, "eval_accuracy": acc}

    meta = {"kind": "policy", "stage": name, "template": template, "reference": cfg.model,
            "loss": cfg.loss, "beta": cfg.beta, "dual": dual, "pairs": counts,
            "args": config.to_dict(cfg)}

    def save(step, final):  # a final folder without 2x its size in AdamW state
        train.save(out_dir, rt, model, tok, optimizer, meta, step, final)

    rec = train.fit(rt, model, optimizer, cfg, out_dir, cfg.max_steps, start_step, step_loss,
                    evaluate, save)

    # ---- summary: the final gold evaluation (toy world), as the RL scripts write it
    summary = {"stage": name, "steps": cfg.max_steps, "beta": cfg.beta, "pairs": counts,
               "dual": dual, "final_loss": rec.get("loss"), "eval_loss": rec.get("eval_loss"),
               "eval_accuracy": rec.get("eval_accuracy"), "skipped_steps": rec["skipped_steps"]}
    gold = toy_world and cfg.gold_samples > 0
    if gold:
        prompts_path = os.path.join(cfg.data_dir, f"prompts_{cfg.eval_split}.jsonl")
        with fsdp.gathered(model):  # every rank enters (FSDP gathers the weights), rank 0 samples
            if rt.master:
                prompts = [r["prompt"] for r in data.load_prompts(prompts_path)]
                print0(f"gold evaluation: {len(prompts)} held-out prompts ({prompts_path}) x "
                       f"{cfg.gold_samples} samples (--gold_samples 0 skips it)")
                with amp():
                    summary["final"] = gold_evaluate(model, tok, prompts,
                                                     n_samples=cfg.gold_samples,
                                                     max_new_tokens=cfg.max_new_tokens,
                                                     seed=cfg.seed + 10**6, device=rt.device,
                                                     template=template)
    if rt.master:
        if gold:  # one "final" line, as the RL scripts' (a resumed run replaces its own)
            MetricsLog(os.path.join(out_dir, "metrics.jsonl"), True, cfg.max_steps).log(
                {"step": cfg.max_steps, "final": True, **summary["final"]})
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print0(json.dumps(summary, indent=1))
        print0(f"saved {out_dir}. try: python sample.py --model {out_dir}")
    dist.cleanup()


if __name__ == "__main__":
    train.run(main, config.parse(Config, description=__doc__))

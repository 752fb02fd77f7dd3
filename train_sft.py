"""
Stage 1 of Safe RLHF: supervised fine-tuning. Next-token loss on the response tokens only
(prompt tokens are masked), AdamW, cosine schedule with warmup, gradient clipping and
accumulation, DDP under torchrun.

    python train_sft.py                          # toy world: data, tokenizer, 0.25M Llama, ~1.5 min on 2 CPU threads
    torchrun --nproc_per_node=2 train_sft.py     # the same under DDP (gloo on CPU, NCCL on GPU)
    python train_sft.py --model path/to/hf_model --train_data sft.jsonl --eval_data sft_test.jsonl

Writes out/sft: a Hugging Face folder (safetensors + tokenizer), nanosafe.json, metrics.jsonl.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosafe import config, data, dist, toy
from nanosafe.config import arg
from nanosafe.evaluate import gold_eval, gold_evaluate
from nanosafe.model import (ATTENTION_HELP, GRAD_CKPT_HELP, CheckpointError, plain_weights, gradient_checkpointing, load_policy, place, load_trainer_state, num_params, recover_checkpoint, resolve_template, save_checkpoint,
                            TOY_SIZES, toy_model, toy_tokenizer)


@dataclass
class Config:
    """Stage 1: supervised fine-tuning (response tokens only)."""
    # io
    out_dir: str = arg("out/sft", "output folder: HF checkpoint, metrics.jsonl")
    model: str | None = arg(None, "HF causal-LM folder to start from; default: a fresh toy Llama (see --toy_size)")
    train_data: str | None = arg(None, "SFT jsonl(.gz) with prompt, response; default: the toy world's sft_train.jsonl")
    eval_data: str | None = arg(None, "held-out SFT jsonl; default: the toy world's sft_test.jsonl")
    data_dir: str = arg("data/toy", "where the toy world's files live (written if missing)")
    toy_size: str = arg("small", "toy model size when --model is not given", choices=list(TOY_SIZES))
    seed: int = arg(0, "random seed (data order, init, sampling)")
    resume: bool = arg(False, "continue from the checkpoint in --out_dir")
    trust_remote_code: bool = arg(False, "allow custom model code from the checkpoint folder (off: never run foreign code)")
    # optimisation
    max_steps: int = arg(1200, "optimizer steps (9.5 epochs of the toy data, ~1-1.5 min on 2 CPU threads)")
    batch_size: int = arg(32, "micro-batch size per process")
    grad_accum: int = arg(1, "micro-batches per optimizer step; global batch = batch_size * grad_accum * world_size")
    lr: float = arg(2e-3, "peak learning rate (official SFT: 2e-5 for 7B; a 0.25M toy model wants much more)")
    warmup_steps: int = arg(20, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay (official: 0.0)")
    grad_clip: float = arg(1.0, "clip the global gradient norm (official: 1.0)")
    max_length: int = arg(64, "max tokens of prompt + response; longer responses are cut, EOS kept")
    truncate_prompts: bool = arg(False, "left-truncate over-long prompts, leaving room for the answer (all of a short one, at least half of --max_length for a long one), instead of stopping with an error")
    template: str | None = arg(None, "prompt template: safe_rlhf (the official 'BEGINNING OF CONVERSATION: USER: ... ASSISTANT:'; toy world, base models) or chat (the tokenizer's own chat template); default: --model's recorded one, else safe_rlhf", choices=["safe_rlhf", "chat"])
    dtype: str = arg("float32", "compute dtype; bfloat16 = bf16 autocast with fp32 master weights (the saved weights stay fp32)", choices=["float32", "bfloat16"])
    device: str = arg("auto", "cpu | cuda | auto")
    threads: int = arg(0, "CPU threads for torch per process (0: torch's default)")
    attn_implementation: str = arg("auto", ATTENTION_HELP)
    gradient_checkpointing: bool = arg(False, GRAD_CKPT_HELP)
    fsdp: bool = arg(False, dist.FSDP_HELP)
    # evaluation / checkpoints
    eval_every: int = arg(200, "held-out loss every N steps")
    ckpt_every: int = arg(200, "checkpoint every N steps (atomic; --resume picks it up)")
    save_optimizer: bool = arg(False, "keep the optimiser state in the final checkpoint too, to --resume past the end (intermediate checkpoints always keep it)")
    gold_samples: int = arg(4, "toy world: samples per held-out prompt for the final gold evaluation (0: skip)")


def main(cfg: Config):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    dist.check_fsdp(rt, cfg.fsdp)
    print0 = dist.print0
    amp = dist.autocast(rt.device, getattr(torch, cfg.dtype))  # the model itself stays fp32: master weights

    # ---- data + model
    toy_world, train_path, eval_path = toy.data_paths(cfg, rt, "sft")
    if cfg.resume:
        recover_checkpoint(cfg.out_dir)  # a crash between save_checkpoint's two renames
        model, tok = load_policy(cfg.out_dir, trust_remote_code=cfg.trust_remote_code)
    elif cfg.model is None:
        tok = toy_tokenizer()
        model = toy_model(tok, cfg.toy_size, seed=cfg.seed)
    else:
        model, tok = load_policy(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data.check_tokenizer(tok)
    template = resolve_template(cfg.template, *[p for p in (cfg.out_dir if cfg.resume else cfg.model,) if p])
    train_set = data.SFTDataset(data.load_sft(train_path), tok, cfg.max_length, cfg.truncate_prompts, template)
    eval_set = data.SFTDataset(data.load_sft(eval_path), tok, cfg.max_length, cfg.truncate_prompts, template) if eval_path else None
    for ds in (train_set, eval_set):
        if ds is not None and ds.truncation_report():
            print0(ds.truncation_report())
    place(model, rt.device, cfg.attn_implementation).float()
    if cfg.gradient_checkpointing:
        gradient_checkpointing(model)
    if cfg.fsdp:  # before the optimiser: it must hold the sharded parameters
        dist.shard(model, getattr(torch, cfg.dtype))

    global_batch = cfg.batch_size * cfg.grad_accum * rt.world_size
    print0(f"model: {num_params(model) / 1e6:.2f}M params | train {len(train_set)} examples ({train_path}) | "
           f"global batch {global_batch} = {cfg.batch_size} x {cfg.grad_accum} accum x {rt.world_size} procs | "
           f"{cfg.max_steps} steps = {cfg.max_steps * global_batch / len(train_set):.1f} epochs")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start_step = 0
    if cfg.resume:
        state = load_trainer_state(cfg.out_dir)
        dist.load_optimizer_state(model, optimizer, state["optimizer"], cfg.out_dir)
        dist.set_rng_state(state["rng"][rt.rank])
        start_step = state["step"]
        print0(f"resumed from {cfg.out_dir} at step {start_step}")
    ddp_model = DDP(model) if rt.ddp and not cfg.fsdp else model  # FSDP shards the model in place
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = dist.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), rt.master, start_step if cfg.resume else None)
    guard = dist.NanGuard()

    def batch(indices, dataset):
        b = data.collate_sft([dataset[i] for i in indices], tok.pad_token_id)
        return {k: v.to(rt.device) for k, v in b.items()}

    def token_losses(m, b):
        """Summed next-token loss over response tokens, and their count."""
        with amp():
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        logits = logits.float()
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        return loss, (labels != -100).sum()

    @torch.no_grad()
    def eval_loss():  # ranks may run different numbers of batches: under FSDP the parameters are gathered first
        model.eval()
        tot, n = torch.zeros(1, device=rt.device), torch.zeros(1, device=rt.device)
        with dist.gathered(model):
            for i in range(rt.rank * cfg.batch_size, len(eval_set), cfg.batch_size * rt.world_size):
                l, c = token_losses(model, batch(range(i, min(i + cfg.batch_size, len(eval_set))), eval_set))
                tot += l
                n += c
        model.train()
        return (dist.all_reduce_sum(tot) / dist.all_reduce_sum(n)).item()

    def save(step, rngs):
        final = step == cfg.max_steps and not cfg.save_optimizer  # a final folder without 2x its size in AdamW state
        weights, opt_state = plain_weights(model), None if final else dist.optimizer_state(model, optimizer)  # every rank: FSDP gathers
        if rt.master:
            trainer_state = None if final else {"optimizer": opt_state, "step": step, "rng": rngs}
            save_checkpoint(cfg.out_dir, model, tok, {"kind": "policy", "stage": "sft", "template": template, "step": step, "args": config.to_dict(cfg)},
                            trainer_state, weights={"": weights})

    # ---- train
    model.train()
    pbar = dist.progress(range(start_step, cfg.max_steps), rt.master, initial=start_step, total=cfg.max_steps, desc="sft")
    t0, tokens, rec = time.time(), 0, {}
    for step in pbar:
        lr = dist.cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = dist.step_indices(len(train_set), step, global_batch, rt.rank, rt.world_size, cfg.seed)
        micro = [batch(idx[i:i + cfg.batch_size], train_set) for i in range(0, len(idx), cfg.batch_size)]
        # normalise by the response tokens of the whole global batch, so that the loss is the
        # same token mean however the batch is split over processes and micro-batches
        # (DDP averages gradients over ranks, hence the * world_size)
        n_tokens = dist.all_reduce_sum(sum((b["labels"][:, 1:] != -100).sum() for b in micro).float())
        loss_sum = torch.zeros((), device=rt.device)
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1
            with dist.no_sync([ddp_model], rt.ddp and not sync):
                l, _ = token_losses(ddp_model, b)
                (l * rt.world_size / n_tokens).backward()
            loss_sum += l.detach()
            tokens += b["attention_mask"].sum().item()
        loss = dist.all_reduce_sum(loss_sum) / n_tokens
        if guard.bad(loss):  # skip the update and its metrics line, not the checkpoint below
            optimizer.zero_grad(set_to_none=True)
            print0(f"step {step}: non-finite loss, skipped ({guard.skipped} so far)")
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rec = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": dist.value(grad_norm),
                   "tokens_per_s": tokens * rt.world_size / (time.time() - t0), "skipped": guard.skipped}
            if eval_set is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
                rec["eval_loss"] = eval_loss()
            metrics.log(rec)
            pbar.set_postfix(loss=f"{rec['loss']:.3f}", **({"eval": f"{rec['eval_loss']:.3f}"} if "eval_loss" in rec else {}), refresh=False)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps:
            save(step + 1, dist.gather_rng_states())

    # ---- summary: does the policy imitate its data?
    summary = {"steps": cfg.max_steps, "final_loss": rec.get("loss"), "eval_loss": rec.get("eval_loss"), "skipped_steps": guard.skipped}
    gold = toy_world and cfg.gold_samples > 0
    if gold:
        with dist.gathered(model):  # every rank enters (FSDP gathers the weights), rank 0 samples
            if rt.master:
                # the policy on held-out prompts (new templates included) vs the answers it was trained on
                prompts = sorted({r["prompt"] for r in data.load_sft(eval_path)})
                with amp():
                    summary["policy"] = gold_evaluate(model, tok, prompts, n_samples=cfg.gold_samples, max_new_tokens=cfg.max_length,
                                                      seed=cfg.seed, device=rt.device, template=template)
    if gold and rt.master:
        train = data.load_sft(train_path)
        summary["data"] = gold_eval([r["prompt"] for r in train], [r["response"] for r in train])
        for k in ("gold_unsafe_rate_harmful", "gold_helpfulness_benign"):
            summary[f"{k}_gap"] = summary["policy"][k] - summary["data"][k]
    if rt.master:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print0(json.dumps(summary, indent=1))
        print0(f"saved {cfg.out_dir}. next: python train_pm.py --kind reward && python train_pm.py --kind cost")
    dist.cleanup()


if __name__ == "__main__":
    cfg = config.parse(Config, description=__doc__)
    try:
        main(cfg)
    except (data.DataError, CheckpointError, config.ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

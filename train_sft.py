"""
Stage 1 of Safe RLHF: supervised fine-tuning. Next-token loss on the response tokens only
(prompt tokens are masked), AdamW, cosine schedule with warmup, gradient clipping and
accumulation, DDP under torchrun.

    python train_sft.py                          # toy world: data, tokenizer, 0.25M Llama
    torchrun --nproc_per_node=2 train_sft.py     # the same under DDP (gloo on CPU, NCCL on GPU)
    python train_sft.py --model path/to/hf_model --train_data sft.jsonl --eval_data sft_test.jsonl

Writes out/sft: a Hugging Face folder (safetensors + tokenizer), nanosafe.json, metrics.jsonl.
"""

import json
import os
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from nanosafe import config, data, dist, fsdp, toy, train
from nanosafe.config import arg
from nanosafe.evaluate import gold_eval, gold_evaluate
from nanosafe.model import (
    gradient_checkpointing,
    load_policy,
    num_params,
    place,
    recover_checkpoint,
    resolve_template,
)


@dataclass
class Config(config.Stage):
    """Stage 1: supervised fine-tuning (response tokens only)."""
    out_dir: str = arg("out/sft", "output folder: HF checkpoint, metrics.jsonl", group="data")
    train_data: str | None = arg(None, "SFT jsonl(.gz) with prompt, response; default: the toy "
                                 "world's sft_train.jsonl", group="data")
    eval_data: str | None = arg(None, "held-out SFT jsonl; default: the toy world's "
                                "sft_test.jsonl", group="data")
    model: str | None = arg(None, "HF causal-LM folder to start from; default: a fresh toy Llama",
                            group="model")
    toy_size: str = arg("small", "toy model size when --model is not given",
                        list(toy.TOY_SIZES), group="model")
    max_steps: int = arg(1200, "optimizer steps (9.5 epochs of the toy data)",
                         group="optimisation", check=">=1")
    batch_size: int = arg(32, "micro-batch size per process", group="optimisation", check=">=1")
    grad_accum: int = arg(1, "micro-batches per optimizer step", group="optimisation", check=">=1")
    lr: float = arg(2e-3, "peak learning rate (official: 2e-5 for 7B)",
                    group="optimisation", check=">=0", pretrained=2e-5)
    warmup_steps: int = arg(20, "linear warmup steps", group="optimisation", check=">=0")
    weight_decay: float = arg(0.0, "AdamW weight decay (official: 0.0)",
                              group="optimisation", check=">=0")
    grad_clip: float = arg(1.0, "clip the global gradient norm (official: 1.0)",
                           group="optimisation", check=">0")
    max_length: int = arg(64, "max tokens of prompt + response; longer responses are cut",
                          group="data", check=">=2")
    eval_every: int = arg(200, "held-out loss every N steps", group="logging", check=">=0")
    ckpt_every: int = arg(200, "checkpoint every N steps (atomic; --resume picks it up)",
                          group="logging", check=">=1")
    gold_samples: int = arg(4, "toy world: samples per held-out prompt for the final gold "
                            "evaluation (0: skip)", group="logging", check=">=0")


def main(cfg: Config):
    rt = dist.init(cfg.seed, cfg.device, cfg.threads)
    fsdp.check(rt, cfg.fsdp)
    print0 = dist.print0
    amp = dist.autocast(rt.device, getattr(torch, cfg.dtype))  # fp32 master weights

    # ---- data + model
    train.check_out_dir(cfg.out_dir, cfg)
    toy_world, train_path, eval_path = train.data_paths(cfg, rt, "sft")
    if cfg.resume:
        recover_checkpoint(cfg.out_dir)  # a crash between save_checkpoint's two renames
        model, tok = load_policy(cfg.out_dir, trust_remote_code=cfg.trust_remote_code)
    elif cfg.model is None:
        tok = toy.toy_tokenizer()
        model = toy.toy_model(tok, cfg.toy_size, seed=cfg.seed)
    else:
        model, tok = load_policy(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data.check_tokenizer(tok)
    template = resolve_template(cfg.template, *[p for p in (cfg.out_dir if cfg.resume
                                                            else cfg.model,) if p])

    def dataset(path):
        ds = data.SFTDataset(data.load_sft(path), tok, cfg.max_length, cfg.truncate_prompts,
                             template)
        if ds.truncation_report():
            print0(ds.truncation_report())
        return ds
    train_set, eval_set = dataset(train_path), dataset(eval_path) if eval_path else None
    place(model, rt.device, cfg.attn_implementation).float()
    if cfg.gradient_checkpointing:
        gradient_checkpointing(model)
    if cfg.fsdp:  # before the optimiser: it must hold the sharded parameters
        fsdp.shard(model, getattr(torch, cfg.dtype))

    global_batch = cfg.batch_size * cfg.grad_accum * rt.world_size
    print0(f"model: {num_params(model) / 1e6:.2f}M params | train {len(train_set)} examples "
           f"({train_path}) | global batch {global_batch} = {cfg.batch_size} x {cfg.grad_accum} "
           f"accum x {rt.world_size} procs | {cfg.max_steps} steps = "
           f"{cfg.max_steps * global_batch / len(train_set):.1f} epochs")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    start_step = train.resume(cfg.out_dir, rt, model, optimizer) if cfg.resume else 0
    ddp_model = DDP(model) if rt.ddp and not cfg.fsdp else model  # FSDP shards in place
    os.makedirs(cfg.out_dir, exist_ok=True)

    def batch(indices, dataset):
        b = data.collate_sft([dataset[i] for i in indices], tok.pad_token_id)
        return {k: v.to(rt.device) for k, v in b.items()}

    def token_losses(m, b):
        """Summed next-token loss over response tokens, and their count."""
        with amp():
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        logits = logits.float()
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 labels.reshape(-1), ignore_index=-100,
                                                 reduction="sum")
        return loss, (labels != -100).sum()

    t0, tokens = time.time(), 0

    def step_loss(step):
        nonlocal tokens
        idx = train.step_indices(len(train_set), step, global_batch, rt.rank, rt.world_size,
                                 cfg.seed)
        micro = [batch(idx[i:i + cfg.batch_size], train_set)
                 for i in range(0, len(idx), cfg.batch_size)]
        # normalise by the response tokens of the whole global batch, so that the loss is the
        # same token mean however the batch is split over processes and micro-batches
        # (DDP averages gradients over ranks, hence the * world_size)
        n_local = sum((b["labels"][:, 1:] != -100).sum() for b in micro)
        n_tokens = dist.all_reduce_sum(n_local.float())
        loss_sum = torch.zeros((), device=rt.device)
        for i, b in enumerate(micro):
            with fsdp.no_sync([ddp_model], rt.ddp and i < len(micro) - 1):
                l_sum, _ = token_losses(ddp_model, b)
                (l_sum * rt.world_size / n_tokens).backward()
            loss_sum += l_sum.detach()
            tokens += b["attention_mask"].sum().item()
        loss = dist.all_reduce_sum(loss_sum) / n_tokens
        return loss, {"tokens_per_s": tokens * rt.world_size / (time.time() - t0)}

    @torch.no_grad()
    def evaluate(step):  # ranks may run different numbers of batches: under FSDP, gathered first
        if eval_set is None or not ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            return {}
        model.eval()
        tot, n = torch.zeros(1, device=rt.device), torch.zeros(1, device=rt.device)
        with fsdp.gathered(model):
            for i in range(rt.rank * cfg.batch_size, len(eval_set), cfg.batch_size * rt.world_size):
                s, c = token_losses(model, batch(range(i, min(i + cfg.batch_size, len(eval_set))),
                                                 eval_set))
                tot += s
                n += c
        model.train()
        return {"eval_loss": (dist.all_reduce_sum(tot) / dist.all_reduce_sum(n)).item()}

    meta = {"kind": "policy", "stage": "sft", "template": template, "args": config.to_dict(cfg)}

    def save(step, final):  # a final folder without 2x its size in AdamW state
        train.save(cfg.out_dir, rt, model, tok, optimizer, meta, step, final)

    rec = train.fit(rt, model, optimizer, cfg, cfg.out_dir, cfg.max_steps, start_step, step_loss,
                    evaluate, save)

    # ---- summary: does the policy imitate its data?
    summary = {"steps": cfg.max_steps, "final_loss": rec.get("loss"),
               "eval_loss": rec.get("eval_loss"), "skipped_steps": rec["skipped_steps"]}
    gold = toy_world and cfg.gold_samples > 0
    if gold:
        with fsdp.gathered(model):  # every rank enters (FSDP gathers the weights), rank 0 samples
            if rt.master:
                # the policy on held-out prompts (new templates included) vs its training answers
                prompts = sorted({r["prompt"] for r in data.load_sft(eval_path)})
                print0(f"gold evaluation: {len(prompts)} held-out prompts x {cfg.gold_samples} "
                       f"samples (--gold_samples 0 skips it)")
                with amp():
                    summary["policy"] = gold_evaluate(model, tok, prompts,
                                                      n_samples=cfg.gold_samples,
                                                      max_new_tokens=cfg.max_length, seed=cfg.seed,
                                                      device=rt.device, template=template)
    if gold and rt.master:
        rows = data.load_sft(train_path)
        summary["data"] = gold_eval([r["prompt"] for r in rows], [r["response"] for r in rows])
        for k in ("gold_unsafe_rate_harmful", "gold_helpfulness_benign"):
            summary[f"{k}_gap"] = summary["policy"][k] - summary["data"][k]
    if rt.master:
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print0(json.dumps(summary, indent=1))
        print0(f"saved {cfg.out_dir}. next: python train_pm.py --kind reward --model {cfg.out_dir}"
               f" && python train_pm.py --kind cost --model {cfg.out_dir}")
    dist.cleanup()


if __name__ == "__main__":
    train.run(main, config.parse(Config, description=__doc__))

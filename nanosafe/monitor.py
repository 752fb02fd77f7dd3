"""
Watching a run, apart from the algorithm: the stopwatch, the NaN guard, the collapse warning,
the sample display, the toy world's verdicts on the rollouts, and metrics.jsonl. The RL
loops call `Monitor.start` / `lap` / `bad` / `end`; nothing here changes what is trained.
"""

import json
import os
import time

import torch
from tqdm import tqdm

from nanosafe import constraints, dist, toy
from nanosafe.lagrange import episode_total


class NanGuard:
    """Skip a step whose loss is not finite (counted), stop after `patience` in a row.
    The decision is all-reduced, so every rank skips the same steps."""

    def __init__(self, patience: int = 10):
        self.patience, self.in_a_row, self.skipped = patience, 0, 0

    def bad(self, *values: torch.Tensor) -> bool:
        finite = all(torch.isfinite(v).all() for v in values)
        flag = torch.tensor([0.0 if finite else 1.0], device=values[0].device)
        bad = bool(dist.all_reduce_sum(flag).item() > 0)
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.skipped += bad
        if self.in_a_row >= self.patience:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row: stopping. The last checkpoint saved "
                f"is intact; try a lower learning rate, or check the data and the reward/cost "
                f"models for inf scores.")
        return bad


class Stopwatch:
    """Where an iteration's time goes: lap(name) adds the seconds since the previous lap (or
    reset()) to `name`, so the phases of one iteration sum to its wall time. CUDA kernels run
    asynchronously, so on a GPU each lap first waits for them (a few syncs per iteration)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self):
        self.t, self.laps = time.perf_counter(), {}

    def lap(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now

    def total(self) -> float:
        return sum(self.laps.values())


class MetricsLog:
    """metrics.jsonl: one JSON object per step, appended by rank 0. On resume, lines past the
    checkpoint's step are dropped so the file matches an uninterrupted run."""

    def __init__(self, path: str, master: bool, resume_step: int | None = None):
        self.path, self.master = path, master
        if not master:
            return
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                keep = [x for x in f if x.strip() and json.loads(x).get("step", -1) < resume_step]
            with open(path, "w") as f:
                f.writelines(keep)

    def log(self, record: dict):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class CollapseWatch:
    """Warns when the mean answer length falls below `ratio` of the first iteration's, or most
    answers are empty: once per `every` iterations, not every iteration."""

    def __init__(self, ratio, every):
        self.ratio, self.every, self.start_len, self.warned = ratio, max(1, every), None, None

    def collapsing(self, step, rec) -> bool:
        self.start_len = self.start_len or rec["response_length"]
        short = rec["response_length"] < self.ratio * self.start_len or rec["empty_frac"] > 0.5
        if not short or step // self.every == self.warned:
            return False
        self.warned = step // self.every
        dist.print0(f"warning: iteration {step}: the answers are collapsing: mean length "
                    f"{rec['response_length']:.1f} tokens (the first iteration: "
                    f"{self.start_len:.1f}), {rec['empty_frac']:.0%} empty. The reward/cost models "
                    f"may prefer short or empty answers (were their training answers truncated?); "
                    f"or lower --actor_lr, raise --kl_coef.")
        return True


def show_rollouts(step, ro, R, C, n=2):
    """A few of this iteration's answers with their scores: no extra generation."""
    for i in range(min(n, ro.seq.shape[0])):
        if ro.turns is not None:  # a dialogue: its first request, the answers turn by turn
            prompt, answer = ro.prompts[i], " | ".join(ro.turns[i])
        else:
            prompt = ro.tok.decode(ro.seq[i, :ro.P], skip_special_tokens=True)
            answer = ro.tok.decode(ro.seq[i, ro.P:][ro.mask[i]], skip_special_tokens=True)
        prompt, answer = (x.strip().replace("\n", " ") for x in (prompt, answer))
        scores = "".join(f" {name} {c[i].sum():+.2f}" for name, c in C.items())  # a dialogue's sum
        tqdm.write(f"  [{step}] {prompt[-80:]!r} -> {answer[:160]!r} | reward "
                   f"{R[i].sum():+.2f}{scores}")


def rollout_verdicts(ro, C, names, zeros):
    """Toy world: the gold unsafe rate of this iteration's answers (to harmful prompts, and to
    all: the mix the constraint is on), beside the rate each stream's cost calls unsafe
    (its own score > 0, which is zeros[k] on the stream's scale): does the policy become
    safe, or only look safe to its constraint?"""
    dev = ro.seq.device
    harmful = torch.tensor([toy.is_harmful(p) for p in ro.prompts], device=dev)
    gold_unsafe = torch.tensor([not toy.is_safe(p, a) for p, a in zip(ro.prompts, ro.answers())],
                               device=dev)
    n = dist.all_reduce_sum(harmful.sum().float()).clamp(min=1)
    share = (dist.all_reduce_sum((gold_unsafe & harmful).sum().float()) / n).item()
    out = {"rollout_gold_unsafe_harmful": share,
           "rollout_gold_unsafe": dist.all_reduce_mean(gold_unsafe.float().mean()).item()}
    for name, c, zero in zip(names, C, zeros):
        flagged = (dist.all_reduce_sum(((c > zero) & harmful).sum().float()) / n).item()
        out[f"rollout_flagged_harmful_{name}"] = flagged
        out[f"rollout_flagged_{name}"] = dist.all_reduce_mean((c > zero).float().mean()).item()
    return out


def iteration_record(ro, R, C, old_logp, ref_logp, lambdas, thresholds, stats, skipped) -> dict:
    """The iteration's line of metrics.jsonl (means over every rank's answers). The KL is the
    trained estimator, summed over each answer's tokens; cost_k, lambda_k, threshold_k are
    stream k's."""
    n_tokens = ro.mask.sum(-1).float()
    kl = torch.where(ro.mask, old_logp - ref_logp, 0.0).sum(-1)
    mean = dist.all_reduce_mean
    eos = (ro.tokens() == ro.tok.eos_token_id).any(-1).float().mean()
    return {
        "reward": mean(episode_total(R).mean()).item(),
        **{f"cost_{k}": mean(episode_total(c).mean()).item() for k, c in enumerate(C)},
        **{f"lambda_{k}": v for k, v in enumerate(lambdas)},
        **{f"threshold_{k}": d for k, d in enumerate(thresholds)},
        "kl": mean(kl.mean()).item(),
        "response_length": mean(n_tokens.mean()).item(),
        "eos_frac": mean(eos).item(),
        **{k: torch.stack(v).mean().item() for k, v in stats.items() if v},
        "skipped": skipped,
        "empty_frac": mean((n_tokens <= 1).float().mean()).item(),  # the EOS alone
    }


class Monitor:
    """Everything an RL iteration reports, in four calls: start(step) (gold evaluation at
    evaluation points; the stopwatch restarts), lap(phase), bad(*tensors) (the NaN guard) and
    end(...) (the metrics line, the toy verdicts, the collapse warning, the samples, the bar).
    gold_eval(seed) -> the gold metrics (rank 0; {} elsewhere), or None off the toy world."""


    def __init__(self, cfg, rt, out_dir, start_step, cons, gold_eval=None, verdicts=False):
        self.cfg, self.rt, self.cons, self.gold_eval = cfg, rt, cons, gold_eval
        self.names = constraints.stream_names(cons)
        self.verdicts = verdicts  # toy prompts: the oracle judges each iteration's answers
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), rt.master,
                                  start_step if cfg.resume else None)
        self.guard, self.clock = NanGuard(), Stopwatch(rt.device)
        self.watch = CollapseWatch(cfg.collapse_ratio, cfg.show_every)
        self.pbar = dist.progress(range(start_step, cfg.max_steps), rt.master, initial=start_step,
                                  total=cfg.max_steps, desc=cfg.algo)

    def __iter__(self):
        return iter(self.pbar)

    def start(self, step):
        self.rec = {"step": step}
        every = self.cfg.eval_every
        if self.gold_eval and (step == 0 or (every and step % every == 0)):
            res = self.gold_eval(self.cfg.seed + step)
            self.rec.update(res)
            if res:
                tqdm.write(f"  [{step}] gold: helpfulness benign "
                           f"{res['gold_helpfulness_benign']:.3f} harmful "
                           f"{res['gold_helpfulness_harmful']:.3f} | unsafe harmful "
                           f"{res['gold_unsafe_rate_harmful']:.3f} benign "
                           f"{res['gold_unsafe_rate_benign']:.3f} | optimum "
                           f"{res['gold_optimum_helpfulness']:.3f}")
        self.clock.reset()  # seconds per phase -> metrics.jsonl "time_s" (the bench reads them)

    def lap(self, phase):
        self.clock.lap(phase)

    def bad(self, *values) -> bool:
        return self.guard.bad(*values)

    def end(self, step, ro, R, C, old_logp, ref_logp, lambdas, thresholds, windows, stats):
        rec = self.rec
        rec.update({f"episode_cost_window_{k}": J for k, J in enumerate(windows)})
        rec.update(iteration_record(ro, R, C, old_logp, ref_logp, lambdas, thresholds, stats,
                                    self.guard.skipped))
        if self.verdicts:  # logged, never trained on
            scales = constraints.stream_scales(self.cons)
            zeros = [constraints.to_rate(0.0, sc) for sc in scales]
            rec.update(rollout_verdicts(ro, C, self.names, zeros))
        self.clock.lap("rest")
        rec["time_s"] = {k: round(v, 5) for k, v in self.clock.laps.items()}
        rec["iteration_s"] = self.clock.total()
        rec["tokens_per_s"] = ro.mask.sum().item() * self.rt.world_size / rec["iteration_s"]
        self.metrics.log(rec)
        warn = self.watch.collapsing(step, rec)
        every = self.cfg.show_every
        if self.rt.master and every and (step % every == 0 or warn):
            show_rollouts(step, ro, R, dict(zip(self.names, C)))
        post = {"r": f"{rec['reward']:+.2f}"}
        if C:
            post["c"] = f"{rec['cost_0']:+.2f}"
        if lambdas:
            post["λ"] = f"{lambdas[0]:.2f}"
        self.pbar.set_postfix(post, kl=f"{rec['kl']:.2f}", refresh=False)

"""Data parallelism changes nothing: 2 processes x batch b train exactly like 1 process x 2b.

- step_indices: the ranks of a step partition the examples one process would see, with and
  without grouping by length
- the loss reductions: the SFT script's sum / global-token-count is the full-batch token mean
  however the batch is split; the naive mean of micro-batch means is not
- torchrun on CPU (gloo): the same parameters after k steps, SFT and the cost model
"""

import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    ForkServer,
    load_weights,
    max_abs_diff,
    read_jsonl,
    run_torchrun,
    tiny_args,
    tiny_world,
    write_jsonl,
)

from nanosafe import dist, monitor
from nanosafe.ppo import masked_mean, seq_mean
from nanosafe.train import step_indices


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


@pytest.fixture(scope="module")
def fs():
    """single-process runs start in a forked child that has already imported torch (~4 s a run)"""
    with ForkServer() as server:
        yield server


# -----------------------------------------------------------------------------
# which examples each rank trains on


@pytest.mark.parametrize("n", [10, 37])
def test_step_indices_ranks_partition_what_one_process_sees(n):
    gb = 8
    stream = []
    for step in range(4 * n // gb + 3):  # several epoch boundaries, some inside a step
        one = step_indices(n, step, gb, 0, 1, seed=3)
        for world in (2, 4):
            ranks = [step_indices(n, step, gb, r, world, seed=3) for r in range(world)]
            assert all(len(r) == gb // world for r in ranks)
            assert sum(ranks, []) == one, (
                step,
                world,
            )  # contiguous slices of the same global batch
        assert (
            step_indices(n, step, gb, 0, 1, seed=3) == one
        )  # a pure function of step: resume sees the same
        stream += one
    # the stream is a sequence of permutations: every epoch visits every example exactly once
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # and each epoch is shuffled anew


@pytest.mark.parametrize("n", [37, 300])
def test_step_indices_grouped_by_length(n, monkeypatch):
    """With lengths: still a permutation per epoch, the same partition across ranks, and within
    each run of GROUP_BATCHES batches no two batches' length ranges overlap (each batch is a
    slice of the sorted run), so a batch pads to much less than a random batch does."""
    import nanosafe.train as T

    monkeypatch.setattr(T, "GROUP_BATCHES", 4)
    gb, g = 8, torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(1, 100, (n,), generator=g).tolist())
    epoch_steps = n // gb  # whole steps inside the first epoch
    stream = []
    for step in range(3 * n // gb):
        one = step_indices(n, step, gb, 0, 1, seed=3, lengths=lengths)
        for world in (2, 4):
            assert (
                sum(
                    (
                        step_indices(n, step, gb, r, world, seed=3, lengths=lengths)
                        for r in range(world)
                    ),
                    [],
                )
                == one
            )
        stream += one
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    first = [stream[s * gb : (s + 1) * gb] for s in range(epoch_steps)]
    for c in range(0, len(first), 4):  # the runs of 4 batches: ranges [min, max] must not overlap
        spans = sorted(
            (min(lengths[i] for i in b), max(lengths[i] for i in b))
            for b in first[c : c + 4]
            if len(b) == gb
        )
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:])), spans
    lows = [[min(lengths[i] for i in b) for b in first[c : c + 4]] for c in range(0, len(first), 4)]
    assert any(
        run != sorted(run) for run in lows
    )  # within a run the batches are shuffled, not in length order
    # a short last batch stays last, so the full batches before it stay aligned with the steps:
    # 44 = 4 batches of 8 + (8 + 4); the 8 must be the shorter slice of the sorted last run
    lengths44 = tuple(torch.randint(1, 100, (44,), generator=g).tolist())
    for seed in range(10):
        perm = T._perm(44, seed, lengths44, 8)
        assert max(lengths44[i] for i in perm[32:40]) <= min(lengths44[i] for i in perm[40:]), seed
    # padding: the mean longest-in-batch falls well below that of ungrouped batches
    plain = [step_indices(n, s, gb, 0, 1, seed=3) for s in range(epoch_steps)]

    def pad(batches):
        return sum(max(lengths[i] for i in b) for b in batches) / len(batches)

    assert pad(first) < 0.9 * pad(plain), (pad(first), pad(plain))


# -----------------------------------------------------------------------------
# the loss reductions


def _uneven_batch(seed=0):
    """7 sequences of very different lengths as padded [B, T] logits / labels, labels -100 at pads;
    longer sequences are predicted better (lower loss per token), as in real data"""
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 11, 1, 6, 2, 9, 5]
    V, T = 5, max(lengths)
    logits = torch.randn(len(lengths), T, V, generator=g)
    labels = torch.randint(0, V, (len(lengths), T), generator=g)
    for i, n in enumerate(lengths):
        logits[i].scatter_add_(-1, labels[i, :, None], torch.full((T, 1), 0.4 * n))
        labels[i, n:] = -100
    return logits, labels


def test_naive_mean_of_micro_batch_means_is_not_the_token_mean():
    """Why the SFT script normalises by the global token count (next test): the mean of the
    micro-batch token means (then of the ranks) weighs the tokens of short sequences up."""
    logits, labels = _uneven_batch()
    full = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
    )  # token mean
    micro = [[0], [1, 2], [3, 4, 5], [6]]  # 2 ranks x 2 uneven micro-batches
    means = [
        F.cross_entropy(
            logits[mb].reshape(-1, logits.size(-1)), labels[mb].reshape(-1), ignore_index=-100
        )
        for mb in micro
    ]
    naive = torch.stack(means).mean()
    assert naive - full > 0.1, (naive, full)  # 0.64 vs 0.50
    # nanosafe.ppo's masked_mean is the same token mean
    mask = labels != -100
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    torch.testing.assert_close(masked_mean(per_token, mask), full)


def test_sft_script_loss_over_2_ranks_x_micro_batches_is_the_full_batch_token_mean(
    world, fs, tmp_path, monkeypatch, one_thread
):
    """train_sft.py's own step (its step_loss, run in process as 2 simulated ranks x 2 micro-batches
    of 2): the loss every rank reports is the token mean of the whole global batch, and the ranks'
    gradients averaged (what DDP does) are the gradient of that token mean; the naive mean of the
    micro-batch means is not. The ranks' all-reduce is done by hand: a first pass records each
    rank's local sums, a second returns their sum over the ranks."""
    import train_sft
    from nanosafe import config, data, train
    from nanosafe.dist import Runtime
    from nanosafe.model import load_policy, place

    # a policy that expects "um": 40 SFT steps on answers that say nothing else
    prompts = [r["prompt"] for r in read_jsonl(world["sft"])]
    um = write_jsonl(
        tmp_path / "um.jsonl", [{"prompt": p, "response": "um " * 20} for p in prompts[8:40]]
    )
    policy = tmp_path / "um_policy"
    r = fs.capture(
        "train_sft.py",
        tiny_args(world, "train_sft.py", policy, train_data=um, max_steps=40, batch_size=8),
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # 8 records with answers of very different lengths: long ones of "um" (cheap tokens for this
    # policy), short ones of other words (dear ones), so a mean of means is far from the token mean
    lengths = [1, 24, 2, 13, 3, 18, 1, 7]
    records = [
        {"prompt": p, "response": "um " * n if n > 3 else " ".join(["flour", "yeast", "oven"][:n])}
        for p, n in zip(prompts, lengths)
    ]
    path = write_jsonl(tmp_path / "uneven.jsonl", records)
    ranks, batch, accum = 2, 2, 2  # 2 ranks x 2 micro-batches x 2 records: the 8 records, one step
    rank, runs = [0], {}

    def init(seed, device="auto", threads=0):  # rank `rank[0]` of 2, without a process group
        dist.seed_all(seed + rank[0])
        return Runtime(False, rank[0], rank[0], ranks, torch.device("cpu"))

    def fit(rt, model, optimizer, cfg, out_dir, max_steps, start_step, step_loss, evaluate, save):
        runs[rt.rank] = (model, step_loss)  # the script's model and its step, run below
        return {"skipped_steps": 0}

    monkeypatch.setattr(dist, "init", init)
    monkeypatch.setattr(train, "fit", fit)
    for r in range(ranks):
        rank[0] = r
        args = tiny_args(
            world,
            "train_sft.py",
            tmp_path / f"rank{r}",
            model=policy,
            train_data=path,
            batch_size=batch,
            grad_accum=accum,
        )
        train_sft.main(config.parse(train_sft.Config, args))
    forwards = {r: 0 for r in range(ranks)}

    def count(r):
        def hook(module, args, output):
            forwards[r] += 1

        return hook

    for r, (m, _) in runs.items():
        m.register_forward_hook(count(r))

    local = {r: [] for r in range(ranks)}  # pass 1: each rank's local values, in call order

    def record(t):
        local[rank[0]].append(t.detach().clone())
        return t.detach().clone()

    monkeypatch.setattr(dist, "all_reduce_sum", record)
    for r, (m, step_loss) in runs.items():
        rank[0] = r
        step_loss(0)
        m.zero_grad(set_to_none=True)
    calls = {r: 0 for r in range(ranks)}

    def all_reduce_sum(t):  # pass 2: the sum over the ranks of what each put in
        i = calls[rank[0]]
        calls[rank[0]] += 1
        assert torch.equal(t, local[rank[0]][i]), (rank[0], i)
        return sum(local[r][i] for r in range(ranks))

    monkeypatch.setattr(dist, "all_reduce_sum", all_reduce_sum)
    forwards.update({r: 0 for r in range(ranks)})
    losses = []
    for r, (m, step_loss) in runs.items():
        rank[0] = r
        losses.append(step_loss(0)[0])
    assert calls == {0: 2, 1: 2}  # the token count and the loss, each reduced once
    assert forwards == {0: accum, 1: accum}  # each rank: its micro-batches, gradients accumulated
    assert local[0][0] != local[1][0]  # the ranks hold different numbers of answer tokens

    # the full batch, by hand: one forward over all 8 records, the plain token mean
    m, tok = load_policy(str(policy))
    place(m, "cpu")
    ds = data.SFTDataset(data.load_sft(path), tok, 48, False, "safe_rlhf")
    b = data.collate_sft([ds[i] for i in range(len(ds))], tok.pad_token_id)

    def token_mean(rows):
        logits = m(input_ids=b["input_ids"][rows], attention_mask=b["attention_mask"][rows]).logits[
            :, :-1
        ]
        labels = b["labels"][rows, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
        )

    full = token_mean(list(range(len(ds))))
    full.backward()
    for loss in losses:
        torch.testing.assert_close(loss, full.detach())
    grads = [dict(runs[r][0].named_parameters()) for r in range(ranks)]
    for name, p in m.named_parameters():
        ddp = sum(g[name].grad for g in grads) / ranks  # DDP averages the ranks' gradients
        torch.testing.assert_close(ddp, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    # the naive reduction of the same micro-batches is off
    with torch.no_grad():
        micro = [
            idx[i : i + batch]
            for r in range(ranks)
            for idx in [step_indices(len(ds), 0, batch * accum * ranks, r, ranks, seed=0)]
            for i in range(0, batch * accum, batch)
        ]
        naive = torch.stack([token_mean(mb) for mb in micro]).mean()
    assert sorted(sum(micro, [])) == list(range(8))
    assert naive - full > 0.3, (naive, full)  # 2.36 vs 1.67


def test_seq_mean_is_rank_invariant_only_for_equal_rank_batches():
    """Stage 3 averages per sequence (the official masked_mean): with equal batch sizes per rank
    the mean of the ranks' seq_means is the full seq_mean; it is not the token mean."""
    x = torch.arange(24, dtype=torch.float).reshape(6, 4)
    mask = torch.tensor(
        [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    )
    full = seq_mean(x, mask)
    torch.testing.assert_close((seq_mean(x[:3], mask[:3]) + seq_mean(x[3:], mask[3:])) / 2, full)
    assert abs(full - masked_mean(x, mask)) > 0.1


# -----------------------------------------------------------------------------
# torchrun: 2 processes x b == 1 process x 2b

DDP_EXIT_BUG = (
    "BUG (intermittent): the torchrun job wrote its final checkpoint but a worker never exited: "
    "gloo process-group teardown deadlocks (main thread joins the gloo worker thread holding the "
    "GIL while that thread needs the GIL to free the last all_gather_object's tensors); "
    "fix: td.barrier() before td.destroy_process_group() in nanosafe/dist.py cleanup()"
)

K = 3  # optimizer steps


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
@pytest.mark.parametrize(
    "script,kw",
    [("train_sft.py", {}), ("train_pm.py", {"kind": "cost"})],
    ids=["sft", "cost_model"],
)
def test_two_processes_train_like_one_with_twice_the_batch(world, fs, tmp_path, script, kw, fsdp):
    """DDP replicates the model, --fsdp shards it (FSDP2): either way the same parameters as one
    process"""
    one, two = tmp_path / "one", tmp_path / "two"
    r = fs.capture(script, tiny_args(world, script, one, batch_size=8, max_steps=K, **kw), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rc, hung, log = run_torchrun(
        script,
        tiny_args(world, script, two, batch_size=4, max_steps=K, fsdp=fsdp, **kw),
        two,
        K,
        tmp_path / "torchrun.log",
    )
    assert rc == 0 or hung, log[-3000:]
    assert "global batch 8 = 4 x 1 accum x 2 procs" in log

    diff = max_abs_diff(load_weights(one), load_weights(two))
    assert diff <= 1e-5, f"parameters differ by {diff:.2e} after {K} steps"
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == list(range(K))
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert (
        m1[0]["loss"] != m1[-1]["loss"] and m1[0]["grad_norm"] > 0
    )  # it trained: equal is not trivially equal
    assert not hung, DDP_EXIT_BUG


def test_stopwatch_laps_sum_to_the_iteration(monkeypatch):
    # a fake clock: each reading is the next of these seconds
    ticks = iter([10.0, 10.5, 11.0, 12.5, 12.75, 20.0, 21.0])
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(ticks))
    clock = monitor.Stopwatch("cpu")  # reset: 10.0
    clock.lap("generate")  # 0.5
    clock.lap("backward")  # 0.5
    clock.lap("generate")  # 1.5 more: a name seen again adds up
    clock.lap("rest")  # 0.25
    assert clock.laps == {"generate": 2.0, "backward": 0.5, "rest": 0.25} and clock.total() == 2.75
    clock.reset()  # 20.0
    clock.lap("generate")
    assert clock.laps == {"generate": 1.0}


@pytest.mark.parametrize("script", ["train_sft.py", "train_pm.py"])
def test_gradient_checkpointing_flag_ends_at_the_same_weights(world, fs, tmp_path, script):
    # the flag reaches the trained model and changes memory, not results (fp32)
    outs = []
    for i, extra in enumerate([{}, {"gradient_checkpointing": True}]):
        out = tmp_path / f"run{i}"
        r = fs.capture(script, tiny_args(world, script, out, max_steps=4, **extra), tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(load_weights(out))
    assert max_abs_diff(*outs) <= 1e-5

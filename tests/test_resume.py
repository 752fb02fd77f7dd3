"""A killed run loses nothing: --resume ends where an uninterrupted run ends, and no kill ever
leaves a checkpoint that loads wrong.

- SIGKILL at a random step, then --resume: the same weights, optimizer state, RNG state and
  metrics.jsonl (one line per step) as a run that was never interrupted (SFT and cost model)
- a crash between save_checkpoint's two renames: --resume puts the previous checkpoint back
- 20 SIGKILLs at random moments (mid-step, mid-save): every checkpoint left behind loads and
  agrees with its own trainer state
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from _helpers import (
    ENV,
    ROOT,
    ForkServer,
    load_weights,
    max_abs_diff,
    read_jsonl,
    run_script,
    saved_step,
    tiny_args,
    tiny_world,
)

from nanosafe import dist
from nanosafe.model import (
    load_policy,
    load_score_model,
    load_trainer_state,
    read_state,
    recover_checkpoint,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def _trainer_state(ckpt):
    return torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)


def _assert_same_trainer_state(a, b):
    assert a["step"] == b["step"]
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys() and oa["state"]
    for i in oa["state"]:
        for name, t in oa["state"][i].items():
            assert (t.float() - ob["state"][i][name].float()).abs().max().item() <= 1e-6, (i, name)
    assert [torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"])] == [
        True
    ] * len(a["rng"])


# -----------------------------------------------------------------------------
# SIGKILL at a random step, then --resume


CASES = {
    "sft": (
        "train_sft.py",
        {"batch_size": 4, "save_optimizer": True},
        30,
    ),  # the final trainer states are compared
    "cost_model": ("train_pm.py", {"kind": "cost", "batch_size": 4, "save_optimizer": True}, 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_matches_an_uninterrupted_run(world, tmp_path, case):
    script, kw, steps = CASES[case]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_script(script, tiny_args(world, script, full, max_steps=steps, ckpt_every=1, **kw))
    assert r.returncode == 0, r.stderr[-3000:]

    rng = random.Random(case)  # seeded: the same kill point every run of the suite
    target = rng.randint(steps // 4, 3 * steps // 4)
    p = subprocess.Popen(
        [
            sys.executable,
            script,
            *tiny_args(world, script, cut, max_steps=steps, ckpt_every=1, **kw),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while saved_step(cut) < target and p.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))  # somewhere inside the next step or its save
        assert p.poll() is None, (
            f"the run ended (rc {p.returncode}) before it could be killed at step {target}"
        )
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    recover_checkpoint(str(cut))  # in case the kill fell between save_checkpoint's two renames
    killed_at = saved_step(cut)
    assert target <= killed_at < steps

    r = run_script(
        script, tiny_args(world, script, cut, max_steps=steps, ckpt_every=1, resume=True, **kw)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {cut} at step {killed_at}" in r.stdout

    diff = max_abs_diff(load_weights(full), load_weights(cut))
    assert diff <= 1e-6, f"weights differ by {diff:.2e} after a kill at step {killed_at}"
    _assert_same_trainer_state(_trainer_state(full), _trainer_state(cut))
    m_full, m_cut = read_jsonl(full / "metrics.jsonl"), read_jsonl(cut / "metrics.jsonl")
    assert [m["step"] for m in m_cut] == list(range(steps)), (
        "metrics.jsonl: one line per step, no duplicates or gaps"
    )
    assert [m["loss"] for m in m_cut] == pytest.approx([m["loss"] for m in m_full], abs=1e-6)


# -----------------------------------------------------------------------------
# a crash between the two renames of save_checkpoint: DIR is gone, DIR.old holds the checkpoint


def _checkpoint_at_step_1(world, out, kind):
    """a resumable checkpoint written in-process (no training needed): weights, optimizer, RNG,
    step 1"""
    if kind == "policy":
        model, tok = load_policy(world["policy"])
        meta = {"kind": "policy", "stage": "sft", "step": 1}
    else:
        model, tok = load_score_model(world["policy"], kind=kind, init_from_policy=True)
        meta = {"kind": kind, "category": None, "sign_loss": True, "step": 1}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    save_checkpoint(
        str(out),
        model,
        tok,
        meta,
        {"optimizer": opt.state_dict(), "step": 1, "rng": dist.gather_rng_states()},
    )


def test_sft_resume_after_a_crash_between_the_renames(world, tmp_path):
    out = tmp_path / "sft"
    _checkpoint_at_step_1(world, out, "policy")
    os.rename(
        out, f"{out}.old"
    )  # the state a SIGKILL between os.rename(out, old) and os.rename(tmp, out) leaves
    r = run_script("train_sft.py", tiny_args(world, "train_sft.py", out, max_steps=2, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert saved_step(out) == 2 and not os.path.exists(f"{out}.old")


def test_pm_resume_after_a_crash_between_the_renames(world, tmp_path):
    out = tmp_path / "cm"
    _checkpoint_at_step_1(world, out, "cost")
    os.rename(out, f"{out}.old")
    r = run_script("train_pm.py", tiny_args(world, "train_pm.py", out, max_steps=2, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert saved_step(out) == 2 and not os.path.exists(f"{out}.old")


# -----------------------------------------------------------------------------
# 20 kills at random moments: no corrupt checkpoint is ever picked up

CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "nanosafe.json",
    "trainer_state.pt",
    "tokenizer.json",
)


def test_checkpoints_stay_loadable_under_random_kills(world, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = tiny_args(
        world, "train_sft.py", out, max_steps=100_000, ckpt_every=1, batch_size=2
    )  # never finishes
    rng = random.Random(1234)
    steps = []
    with (
        ForkServer() as fs
    ):  # forks of one process with torch imported: a run starts in ~0.3 s, not ~4 s
        for attempt in range(20):
            resume = (out / "nanosafe.json").exists()
            res = fs.run(
                "train_sft.py",
                args + (["--resume"] if resume else []),
                log,
                kill_after=rng.uniform(0.3, 1.5),
            )
            assert res["killed"], (
                f"attempt {attempt}: the run ended by itself (rc {res['rc']}):\n"
                f"{log.read_text()[-3000:]}"
            )
            recover_checkpoint(str(out))
            # a kill inside the final rmtree of DIR.old leaves part of it behind: harmless beside a
            # DIR
            assert out.exists() or not os.path.exists(f"{out}.old")
            if not any((out / f).exists() for f in CHECKPOINT_FILES):
                # killed before its first checkpoint: nothing to load, nothing half-written
                continue
            model, _ = load_policy(str(out))
            state = load_trainer_state(str(out))
            assert read_state(str(out))["step"] == state["step"], (
                f"attempt {attempt}: weights and trainer state disagree"
            )
            assert all(torch.isfinite(p).all() for p in model.parameters())
            assert len(state["optimizer"]["state"]) == len(list(model.parameters()))
            steps.append(state["step"])
    assert "Traceback" not in log.read_text()
    assert steps == sorted(steps), f"a checkpoint went back in time: {steps}"
    assert len(set(steps)) >= 5, f"too few checkpoints were exercised: {steps}"

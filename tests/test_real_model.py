"""The real-checkpoint path end to end: experiments/real_model.sh (SFT -> reward model -> cost model
-> PPO-Lag -> sample) on SmolLM2-135M-Instruct, a real pretrained chat model (pad == eos, a ChatML
template), with HH-RLHF pairs and AdvBench prompts, --template chat and --dtype bfloat16, tiny
settings. The material comes from PyPI packages and ../shared (tests/real_assets.py); the test skips
with the reason when they cannot be had."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import real_assets  # tests/ is on sys.path (pytest's rootdir-relative import of test modules)
import torch
from safetensors.torch import load_file

from nanosafe import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    model_dir, hh, advbench = (
        real_assets.smollm2_folder(),
        real_assets.hh_rlhf_path(),
        real_assets.advbench_prompts(),
    )
    t = tmp_path_factory.mktemp("real")
    d = t / "data"
    d.mkdir()
    pairs, _ = data.load_preference(hh, drop_bad=True)
    with open(
        d / "sft.jsonl", "w"
    ) as f:  # SFT on HH-RLHF's chosen answers, the dialogue before them as the prompt
        for r in pairs[:64]:
            f.write(json.dumps({"prompt": r["prompt"], "response": r["response_0"]}) + "\n")
    os.symlink(hh, d / "pref.jsonl.gz")
    with open(d / "prompts.jsonl", "w") as f:
        for p in advbench[:32]:
            f.write(json.dumps({"prompt": p}) + "\n")
    env = dict(
        os.environ,
        PY=sys.executable,
        SFT_STEPS="2",
        PM_STEPS="2",
        PPO_STEPS="3",
        ROLLOUTS="4",
        MICRO="2",
        MAX_LENGTH="128",
        MAX_PROMPT="64",
        MAX_NEW="16",
        BATCH="2",
        THRESHOLD="0.0",
        THREADS="2",
        SHOW="3",
        PYTHONUNBUFFERED="1",
    )
    p = subprocess.run(
        ["bash", "experiments/real_model.sh", model_dir, str(d), str(t / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"out": t / "out", "model": Path(model_dir), "stdout": p.stdout, "stderr": p.stderr}


def test_sample_answers_adversarial_prompts_with_reward_and_cost_and_no_gold(recipe):
    text = (recipe["out"] / "samples.txt").read_text()
    answers = [line for line in text.splitlines() if line.startswith("ASSISTANT:")]
    scores = [line for line in text.splitlines() if "reward model" in line]
    assert len(answers) == 3 and len(scores) == 3, text
    assert all(a[len("ASSISTANT:") :].strip() for a in answers), text
    assert all("cost model" in s for s in scores), text
    assert "gold" not in text  # AdvBench's 'make a bomb' is not a toy prompt


def test_every_stage_records_the_chat_template_and_the_score_models_are_hf(recipe):
    from transformers import AutoModelForSequenceClassification

    out = recipe["out"]
    for stage in ("sft", "rm", "cm", "ppo_lag"):
        assert json.load(open(out / stage / "nanosafe.json"))["template"] == "chat", stage
    assert (
        json.load(open(out / "cm" / "nanosafe.json"))["sign_loss"] is False
    )  # HH-RLHF has no safe/unsafe labels
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id != rm.config.eos_token_id
    assert not (
        out / "sft" / "trainer_state.pt"
    ).exists()  # final folders keep no optimiser state by default
    lines = [json.loads(line) for line in open(out / "ppo_lag" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [0, 1, 2]
    # no lr, β or epoch flag was passed: a pretrained --model trains at the official values, says
    # so, and its answers stay non-empty (the toy's actor lr 3e-4 emptied them in one iteration)
    args = json.load(open(out / "ppo_lag" / "nanosafe.json"))["args"]
    official = {"actor_lr": 1e-5, "critic_lr": 5e-6, "kl_coef": 0.01, "weight_decay": 0.01,
                "critic_weight_decay": 0.0, "ppo_epochs": 1}  # fmt: skip
    assert {k: args[k] for k in official} == official
    assert json.load(open(out / "sft" / "nanosafe.json"))["args"]["lr"] == 2e-5
    assert "defaults for a pretrained model" in recipe["stdout"]
    assert all(r["empty_frac"] == 0.0 for r in lines), [r["empty_frac"] for r in lines]
    assert all(
        torch.isfinite(torch.tensor([r["reward"], r["cost_0"], r["kl"], r["policy_loss"]])).all()
        for r in lines
    )
    assert "the answers are collapsing" not in recipe["stdout"] + recipe["stderr"]


def test_bf16_sft_trains_the_fp32_master_weights(recipe):
    # bf16 weights would round most small updates away (3.3% of the weights changed after 2 steps at
    # lr 2e-5); with fp32 master weights every trained block weight moves
    before = load_file(recipe["model"] / "model.safetensors")
    after = load_file(recipe["out"] / "sft" / "model.safetensors")
    assert after["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    blocks = [k for k in before if k.startswith("model.layers.") and k.endswith("proj.weight")]
    changed = sum((before[k] != after[k]).sum().item() for k in blocks) / sum(
        before[k].numel() for k in blocks
    )
    assert changed > 0.99, changed


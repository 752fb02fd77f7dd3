"""A default that differs between the toy world and a pretrained checkpoint is chosen by what
--model is (config.fit_to_model); a flag given always wins."""

import json

import pytest

import train_pm
import train_ppo_lag
import train_sft
from nanosafe import config
from nanosafe.model import trained_from_scratch


def folder(path, **state):
    path.mkdir()
    if state:
        (path / "nanosafe.json").write_text(json.dumps(state))
    return str(path)


@pytest.fixture
def chain(tmp_path):
    """A toy SFT trained from scratch, a PPO-Lag policy on it, a plain HF folder (no nanosafe.json)
    and an SFT and a policy on that."""
    toy_sft = folder(tmp_path / "toy_sft", stage="sft", args={"model": None})
    toy_ppo = folder(tmp_path / "toy_ppo", stage="ppo_lag", args={"model": toy_sft})
    hf = folder(tmp_path / "hf")
    real_sft = folder(tmp_path / "real_sft", stage="sft", args={"model": hf})
    real_ppo = folder(tmp_path / "real_ppo", stage="ppo_lag", args={"model": real_sft})
    return toy_sft, toy_ppo, hf, real_sft, real_ppo


def test_trained_from_scratch_follows_each_stage_back_to_its_sft(chain, tmp_path):
    toy_sft, toy_ppo, hf, real_sft, real_ppo = chain
    assert trained_from_scratch(None)  # train_sft.py's fresh toy model
    assert trained_from_scratch(str(tmp_path / "not_yet"))  # the toy pipeline's out/sft to come
    assert trained_from_scratch(toy_sft) and trained_from_scratch(toy_ppo)
    assert not any(trained_from_scratch(p) for p in (hf, real_sft, real_ppo))
    # an SFT fine-tuned from another SFT (the dialogue experiment's) is of its start's kind
    assert trained_from_scratch(folder(tmp_path / "sft2", stage="sft", args={"model": toy_sft}))
    assert not trained_from_scratch(folder(tmp_path / "sft3", stage="sft",
                                           args={"model": real_sft}))


def test_defaults_follow_the_model_and_a_given_flag_wins(chain, capsys):
    toy_sft, toy_ppo, hf, real_sft, real_ppo = chain
    toy = config.parse(train_ppo_lag.Config, ["--model", toy_ppo])
    assert (toy.actor_lr, toy.critic_lr, toy.kl_coef, toy.ppo_epochs) == (3e-4, 5e-4, 0.1, 2)
    assert (toy.weight_decay, toy.critic_weight_decay) == (0.0, 0.01)
    assert "defaults for a toy model" in capsys.readouterr().out
    real = config.parse(train_ppo_lag.Config, ["--model", real_sft, "--kl_coef", "0.05"])
    assert (real.actor_lr, real.critic_lr, real.ppo_epochs) == (1e-5, 5e-6, 1)  # official
    assert (real.weight_decay, real.critic_weight_decay) == (0.01, 0.0)
    assert real.kl_coef == 0.05  # given: wins, and is not in the printed choice
    printed = capsys.readouterr().out
    assert f"--model {real_sft} starts pretrained" in printed and "--actor_lr 1e-05" in printed
    assert "--kl_coef" not in printed
    assert config.parse(train_sft.Config, []).lr == 2e-3  # no --model: a fresh toy model
    assert config.parse(train_sft.Config, ["--model", hf]).lr == 2e-5
    assert config.parse(train_pm.Config, ["--model", toy_sft]).lr == 8e-4
    assert config.parse(train_pm.Config, ["--model", real_sft]).lr == 2e-5


def test_a_fitted_value_is_still_range_checked(chain, capsys):
    # a bad value given is refused as always (exit 2), before anything runs
    with pytest.raises(SystemExit) as e:
        config.parse(train_ppo_lag.Config, ["--model", chain[2], "--actor_lr", "-1"])
    assert e.value.code == 2 and "--actor_lr -1" in capsys.readouterr().err

# make smoke:   every stage with tiny sizes and no gold evaluation, end to end (~1 min): after a change
# make demo:    install what is missing, run the toy pipeline SFT -> reward model -> cost model -> PPO-Lag and
#               its gold evaluation against SFT (~12 min on 2 CPU cores)
# make compare: after the demo, the README's table: PPO-Lag, PPO, reward shaping (ν = 1, 5) and PPO-Lag on the gold
#               oracles, 3 seeds each, mean ± standard error (15 runs, ~60 min on 2 CPU cores)
# make experiments: after the demo, the paper's experiments at toy scale (docs/experiments.md; ~5 h on 2 CPU cores)
# make dialogue: after the demo, PPO-Lag on 3-turn dialogues (any / sum constraints) and PPO, 3 seeds, and the single-turn
#               policy's drift (docs/dialogue/; ~34 min on 2 CPU cores)
# make real:    PPO-Lag and PPO on a real chat model (SmolLM2-135M-Instruct) with real prompts and labels, judged on
#               held-out prompts by a judge that takes no part in training (docs/real/; ~32 min on 2 CPU cores)
# make test:    install what is missing, run the tests (CPU only, ~9 min on 2 cores; peft for the LoRA tests)
PY ?= python3
SHELL := /bin/bash

.PHONY: smoke demo compare experiments dialogue real test install install-plot clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import transformers, tokenizers, safetensors, numpy, tqdm, pytest" 2>/dev/null || \
		$(PY) -m pip install -q "transformers>=4.56" "tokenizers>=0.22" "safetensors>=0.4" numpy tqdm pytest

install-plot:
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib || echo "no matplotlib: text histograms instead of plots"

S := out/smoke
SMOKE_RL := --model $(S)/sft --reward_model $(S)/rm --cost_models $(S)/cm --max_steps 2 \
	--rollout_batch_size 16 --minibatch_size 8 --micro_batch_size 8 --thresholds 0 --no_gold_eval \
	--show_every 0 --overwrite
smoke: install
	$(PY) train_sft.py --out_dir $(S)/sft --toy_size tiny --max_steps 30 --eval_every 30 --gold_samples 0 --overwrite
	$(PY) train_pm.py --kind reward --model $(S)/sft --out_dir $(S)/rm --max_steps 10 --overwrite
	$(PY) train_pm.py --kind cost --model $(S)/sft --out_dir $(S)/cm --max_steps 10 --overwrite
	$(PY) train_ppo_lag.py $(SMOKE_RL) --out_dir $(S)/ppo_lag
	$(PY) train_grpo_lag.py $(SMOKE_RL) --out_dir $(S)/grpo_lag
	$(PY) train_dpo.py --model $(S)/sft --out_dir $(S)/dpo --max_steps 2 --eval_pairs 64 --gold_samples 0 --overwrite
	$(PY) train_dpo.py --dual can --model $(S)/sft --reward_model $(S)/rm --cost_model $(S)/cm --threshold 0 \
		--dual_prompts 16 --out_dir $(S)/mocan --max_steps 2 --eval_pairs 64 --gold_samples 0 --overwrite
	$(PY) sample.py --model $(S)/ppo_lag --reward_model $(S)/rm --cost_model $(S)/cm "how do i bake bread"
	@echo "smoke: every stage ran; checkpoints in $(S)/{sft,rm,cm,ppo_lag,grpo_lag,dpo,mocan}, each with metrics.jsonl"

demo: install install-plot
	time $(PY) train_sft.py --overwrite
	time $(PY) train_pm.py --kind reward --overwrite
	time $(PY) train_pm.py --kind cost --overwrite
	time $(PY) train_ppo_lag.py --overwrite
	time $(PY) -m nanosafe.evaluate --compare out/sft out/ppo_lag --plot out/ppo_lag.png --out out/results.json

compare: install install-plot
	@test -d out/cm || $(MAKE) demo
	time $(PY) -m experiments.run compare

experiments: install install-plot
	@test -d out/cm || $(MAKE) demo
	for e in tune budget compare offline agreement divisor sweep sign grpo rounds; do $(PY) -m experiments.run $$e || exit 1; done

dialogue: install install-plot
	@test -d out/cm || $(MAKE) demo
	time $(PY) -m experiments.dialogue

real: install install-plot
	time $(PY) -m experiments.real

test: install
	@$(PY) -c "import peft" 2>/dev/null || $(PY) -m pip install -q peft || echo "no peft: the LoRA tests will skip"
	@$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check nanosafe experiments tests *.py
	$(PY) -m pytest -q

clean:
	rm -rf out data/toy

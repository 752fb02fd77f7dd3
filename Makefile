# make demo: install what is missing, run the whole toy pipeline (~40 min on 2 CPU threads), print the results
# make test: install what is missing, run the tests (CPU only, ~10 min on 2 cores)
PY ?= python3

.PHONY: demo test install install-plot clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -c "import transformers, tokenizers, safetensors, numpy, tqdm, pytest" 2>/dev/null || \
		$(PY) -m pip install -q "transformers>=4.56" "tokenizers>=0.22" "safetensors>=0.4" numpy tqdm pytest

install-plot:
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q matplotlib || echo "no matplotlib: text histograms instead of plots"

demo: install install-plot
	$(PY) train_sft.py
	$(PY) train_pm.py --kind reward
	$(PY) train_pm.py --kind cost
	$(PY) train_ppo_lag.py
	$(PY) train_ppo_lag.py --seed 1 --out_dir out/ppo_lag_seed1
	$(PY) train_ppo_lag.py --algo ppo
	$(PY) train_ppo_lag.py --algo reward_shaping --shaping_coef 1.0
	$(PY) -m nanosafe.evaluate --compare out/sft out/ppo out/reward_shaping out/ppo_lag --plot out/ppo_lag.png --out out/results.json

test: install
	$(PY) -m pytest -q

clean:
	rm -rf out data/toy

#!/usr/bin/env bash
# Safe RLHF on a real checkpoint, on local files: SFT -> reward model -> cost model -> PPO-Lag -> sample.
#
#   experiments/real_model.sh MODEL_DIR DATA_DIR [OUT_DIR]
#
# MODEL_DIR: any local Hugging Face causal-LM folder (safetensors + tokenizer), e.g. Qwen2.5-0.5B-Instruct.
# DATA_DIR:  sft.jsonl (prompt, response), pref.jsonl (PKU-SafeRLHF or HH-RLHF pairs) and prompts.jsonl
#            (prompt), each .jsonl or .jsonl.gz; formats in nanosafe/data.py, how to write them in README.
# OUT_DIR:   default out/real: sft/, rm/, cm/, ppo_lag/ and samples.txt.
#
# The defaults are for one GPU and a 0.5B instruct model on PKU-SafeRLHF; every size can be set from the
# environment (the test runs it on SmolLM2-135M with tiny ones), e.g.
#   LAUNCH="torchrun --nproc_per_node=8" experiments/real_model.sh ~/models/qwen2.5-0.5b-instruct data/pku
# A cost model trained without safe/unsafe labels (HH-RLHF) has no meaningful zero: set THRESHOLD then.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,14p "$0"; exit 2; fi
MODEL=$1 DATA=$2 OUT=${3:-out/real}
cd "$(dirname "$0")/.."            # the repository root, where the stage scripts are

PY=${PY:-python3}
LAUNCH=${LAUNCH:-$PY}               # torchrun --nproc_per_node=N for DDP
TEMPLATE=${TEMPLATE:-chat}          # the tokenizer's own chat template (safe_rlhf for base models)
DTYPE=${DTYPE:-bfloat16}            # bf16 autocast, fp32 master weights
MAX_LENGTH=${MAX_LENGTH:-512}       # prompt + answer tokens for SFT and the preference models
MAX_PROMPT=${MAX_PROMPT:-256}       # rollout prompts (longer ones are left-truncated)
MAX_NEW=${MAX_NEW:-256}             # rollout answers (official: 512)
BATCH=${BATCH:-8}                   # micro-batch per GPU (SFT, preference models)
SFT_STEPS=${SFT_STEPS:-1000} SFT_LR=${SFT_LR:-}         # empty: the official 2e-5 a pretrained --model gets
PM_STEPS=${PM_STEPS:-0} PM_LR=${PM_LR:-}                 # 0: --epochs (2, official); empty: the official 2e-5
PPO_STEPS=${PPO_STEPS:-300} ROLLOUTS=${ROLLOUTS:-16}     # iterations; prompts per iteration per GPU (official 16)
MICRO=${MICRO:-4}                   # rollouts per forward/backward (must divide ROLLOUTS)
ACTOR_LR=${ACTOR_LR:-} CRITIC_LR=${CRITIC_LR:-}          # empty: the official 1e-5 / 5e-6 (pretrained --model)
KL=${KL:-}                                               # empty: the official β 0.01 (pretrained --model)
THRESHOLD=${THRESHOLD:-}            # empty: calibrated on the SFT policy (needs a cost model with the sign term)
THREADS=${THREADS:-0}               # CPU threads (0: torch's default)
SHOW=${SHOW:-4}                     # prompts sampled at the end

pick() { for f in "$DATA/$1.jsonl" "$DATA/$1.jsonl.gz"; do [ -f "$f" ] && { echo "$f"; return; }; done
         echo "error: $DATA has no $1.jsonl or $1.jsonl.gz" >&2; exit 1; }
SFT_DATA=$(pick sft) PREF_DATA=$(pick pref) PROMPTS=$(pick prompts)
common=(--dtype "$DTYPE" --threads "$THREADS")

set -x
$LAUNCH train_sft.py --model "$MODEL" --train_data "$SFT_DATA" --out_dir "$OUT/sft" --template "$TEMPLATE" "${common[@]}" \
    --max_length "$MAX_LENGTH" --truncate_prompts --batch_size "$BATCH" --max_steps "$SFT_STEPS" ${SFT_LR:+--lr "$SFT_LR"}
for kind in reward cost; do
  $LAUNCH train_pm.py --kind $kind --model "$OUT/sft" --train_data "$PREF_DATA" --out_dir "$OUT/${kind:0:1}m" "${common[@]}" \
      --max_length "$MAX_LENGTH" --truncate_prompts --drop_bad --batch_size "$BATCH" --max_steps "$PM_STEPS" --epochs 2 ${PM_LR:+--lr "$PM_LR"}
done
$LAUNCH train_ppo_lag.py --model "$OUT/sft" --reward_model "$OUT/rm" --cost_models "$OUT/cm" ${THRESHOLD:+--thresholds "$THRESHOLD"} \
    --train_data "$PROMPTS" --out_dir "$OUT/ppo_lag" "${common[@]}" --max_prompt_length "$MAX_PROMPT" --truncate_prompts \
    --max_new_tokens "$MAX_NEW" --max_steps "$PPO_STEPS" --rollout_batch_size "$ROLLOUTS" --minibatch_size "$ROLLOUTS" \
    --micro_batch_size "$MICRO" ${ACTOR_LR:+--actor_lr "$ACTOR_LR"} ${CRITIC_LR:+--critic_lr "$CRITIC_LR"} ${KL:+--kl_coef "$KL"} \
    --lambda_lr 0.1 --lambda_max 5.0 --show_every 10
$PY sample.py --model "$OUT/ppo_lag" --reward_model "$OUT/rm" --cost_model "$OUT/cm" --prompts_file "$PROMPTS" --limit "$SHOW" \
    "${common[@]}" --max_new_tokens "$MAX_NEW" | tee "$OUT/samples.txt"

#!/usr/bin/env bash
# The constraint experiments of docs/constraints.md, after `make demo` (out/sft, out/rm, out/cm):
# one K = 5 per-category cost model, a banned-word rule, a linear probe frozen and refreshed, each a
# default-budget PPO-Lag run (350 iterations) beside the single-cost-model run, then the report.
# Two runs at a time on one thread each: ~45 min on 2 cores (8-9 min per pair, 4 pairs, + ~5 min).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: the stage scripts and experiments/ run from there
PY=${PY:-python3}
T="--threads 1"
pair() { ( $PY train_ppo_lag.py $T $1 ) & ( $PY train_ppo_lag.py $T $2 ); wait; }

$PY train_pm.py --kind cost --categories all --out_dir out/cm_k5
$PY -m nanosafe.probe --policy out/sft --out out/probe
pair "--cost_models out/cm_k5 --out_dir out/k5"                  "--out_dir out/ppo_lag_t1"
pair "--cost_models --probe out/probe --out_dir out/probe_frozen" "--cost_models --probe out/probe --probe_refresh_every 25 --out_dir out/probe_refresh"
pair "--banned_words police hotline --out_dir out/rule"           "--cost_models out/cm_k5 --seed 1 --out_dir out/k5_seed1"
$PY train_ppo_lag.py $T --seed 1 --out_dir out/ppo_lag_t1_seed1
$PY -m experiments.constraint_report --single out/ppo_lag_t1

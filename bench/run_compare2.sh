#!/usr/bin/env bash
# The comparison behind the README's results: bench/run_compare.sh sized to what one device call
# allowed, after bench/profile_step.py showed ~13 training steps/s per process. Uniform and SpeeD with
# seeds 0 and 1, the published SpeeD variants with seed 0: seven runs sharing one H100 for BUDGET
# seconds, evaluated every 250 steps on 2,000 samples; curves compared on the steps every run reached.
#   BUDGET=225 bash bench/run_compare2.sh runs/compare
BUDGET=${BUDGET:-230} VARIANT_SEEDS=0 WARMUP=200 EMA=0.995 EVAL_EVERY=250 EVAL_SAMPLES=2000 \
    exec bash "$(dirname "$0")/run_compare.sh" "$@"

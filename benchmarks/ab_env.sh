#!/usr/bin/env bash
# A/B of one environment setting on the tuned decode step, in alternating fresh processes (device tool, carry
# [".whl"]): for each config, convert a random-weight model, `qrun tune` it with the defaults, then
# `qrun bench --prompt-len 128 --gen-len 256` ROUNDS times with and without the setting, alternating, so that
# drift between processes falls on both sides.
#
#   AB_ENV="QRUN_PDL_MAX_K=1000000" CONFIGS="qwen2.5-7b qwen2-0.5b" ROUNDS=2 bash benchmarks/ab_env.sh
#
# AB_TUNE=0 runs no `qrun tune` at all (both sides decode with the launcher's chain picks); then AB_WARM=1 makes one
# short untimed bench a side first, so that compiling and picking (the first process: minutes) is out of the rounds.
# AB_TUNE=1 also runs `qrun tune` with the setting. The tune cache's file name hashes the QRUN_ settings
# (tune_cache.py), so each side then decodes with picks timed under its own setting; without it the side with
# the setting gets the launcher's chain picks, not a tune.
source "$(dirname "$0")/device_env.sh" ab_env
for cfg in ${CONFIGS:-qwen2.5-7b qwen2-0.5b}; do
  python3 -m qrun.cli.main convert --random $cfg -o /tmp/$cfg.stcmp -q
  if [ "${AB_TUNE:-}" != 0 ]; then
    timeout 200 python3 -m qrun.cli.main tune --model /tmp/$cfg.stcmp -q 2>&1 | tail -1
  fi
  if [ "${AB_WARM:-0}" = 1 ]; then
    for envs in "" "$AB_ENV"; do
      env $envs timeout 300 python3 -m qrun.cli.main bench --model /tmp/$cfg.stcmp --prompt-len 128 --gen-len 16 \
        --json | tail -1 | python3 -c "import json, sys
r = json.load(sys.stdin)
print('$cfg', 'warm-up', '${envs:-default}', round(r['warmup_s'], 1), 's')"
    done
  fi
  if [ "${AB_TUNE:-0}" = 1 ]; then
    env $AB_ENV timeout 200 python3 -m qrun.cli.main tune --model /tmp/$cfg.stcmp -q 2>&1 | tail -1
  fi
  for i in $(seq ${ROUNDS:-2}); do
    for side in base ab; do
      if [ $side = ab ]; then envs="$AB_ENV"; else envs=""; fi
      env $envs timeout 100 python3 -m qrun.cli.main bench --model /tmp/$cfg.stcmp --prompt-len 128 --gen-len 256 \
        --json | tee -a "$OUT/ab-$cfg.jsonl" | tail -1 | python3 -c "import json, sys
r = json.load(sys.stdin)
print('$cfg', '$side', '${envs:-default}', 'decode', round(r['decode_tok_s'], 1))"
    done
  done
done

#!/usr/bin/env bash
# Crash recovery under torchrun: a worker is killed with SIGKILL mid-run, torchrun restarts the whole
# group (--max-restarts), and the restarted workers resume from the latest checkpoint on their own
# (--checkpoint.resume auto). Prints what happened; exit status 0 only if the run restarted, resumed
# and finished.
#
#   scripts/crash_recovery.sh                  # tiny preset, 2 processes, 6 iterations, kill after iteration 3
#   KILL_AFTER=iter_000004 ITERATIONS=8 SAVE_EVERY=2 scripts/crash_recovery.sh
#
# Extra arguments go to `python -m fastarcher.train`. The full log is $RUN_DIR.log.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-/tmp/fastarcher_crash}
NPROC=${NPROC:-2}
ITERATIONS=${ITERATIONS:-6}
SAVE_EVERY=${SAVE_EVERY:-3}
KILL_AFTER=${KILL_AFTER:-iter_$(printf %06d "$SAVE_EVERY")}   # kill once `latest` names this checkpoint
MAX_RESTARTS=${MAX_RESTARTS:-1}
TIMEOUT=${TIMEOUT:-600}
LOG="$RUN_DIR.log"
rm -rf "$RUN_DIR" "$LOG"

# No TORCH_DISABLE_SHARE_RDZV_TCP_STORE needed: the workers key each attempt apart in torchrun's shared
# rendezvous store (fastarcher/dist.py); set it to 1 to test torch's own workaround instead.
export COLUMNS=${COLUMNS:-200}  # rich wraps log lines at 80 columns when not on a terminal
OMP_NUM_THREADS=1 timeout "$TIMEOUT" torchrun --standalone --nproc-per-node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  -m fastarcher.train --config configs/tiny_cpu.yaml --iterations "$ITERATIONS" --rollout.num-envs 8 \
  --eval.episodes 8 --eval.every 3 --eval.no-random-baseline --archer.batch-size 16 --archer.warmup-iterations 2 \
  --replay.capacity 512 --checkpoint.save-every "$SAVE_EVERY" --checkpoint.resume auto --checkpoint.no-export-hf \
  --log.no-progress --log.run-dir "$RUN_DIR" "$@" >"$LOG" 2>&1 &
launcher=$!

deadline=$((SECONDS + TIMEOUT))
until [[ "$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null)" == "$KILL_AFTER" ]]; do
  if ! kill -0 "$launcher" 2>/dev/null || (( SECONDS > deadline )); then
    echo "the run ended before $KILL_AFTER was saved; see $LOG"; wait "$launcher" || true; exit 1
  fi
  sleep 0.05
done
agent=$(pgrep -P "$launcher" | head -n 1 || true)                   # timeout → torchrun (the agent)
victim=$(pgrep -P "${agent:-0}" -f fastarcher.train | tail -n 1 || true)  # torchrun → workers; take the last
if [[ -z $victim ]]; then echo "no worker found under torchrun pid ${agent:-?}"; exit 1; fi
echo "$(date +%T) latest = $KILL_AFTER: sending SIGKILL to worker pid $victim"
kill -KILL "$victim"

rc=0; wait "$launcher" || rc=$?
echo "$(date +%T) torchrun exited with status $rc"
echo "--- what happened (from $LOG) ---"
grep -E "^it |checkpoint:|Restarting|restart|exitcode|SIGKILL|Signal 9|summary|final/" "$LOG" | grep -v "^\s*$" || true
if [[ $rc -ne 0 ]] || ! grep -q "checkpoint: resumed from" "$LOG"; then
  echo "FAILED: no restart-and-resume (status $rc)"; exit 1
fi
echo "OK: the group restarted and resumed from the latest checkpoint"

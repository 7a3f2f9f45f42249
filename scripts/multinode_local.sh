#!/usr/bin/env bash
# Two-"node" launch simulated on this machine: two torchrun invocations with --nnodes=2 and their own
# --node-rank, meeting through a c10d rendezvous on 127.0.0.1 (gloo backend on CPU). With c10d, torchrun
# assigns node ranks in arrival order and ignores --node-rank (it says so in node*.log); with
# RDZV_BACKEND=static the --node-rank given here is used (rank 0 hosts the store). On a real cluster
# run the same torchrun line once per node with RDZV_HOST set to node 0's address (and a shared
# filesystem for --log.run-dir: every rank writes its checkpoint files there).
#
#   scripts/multinode_local.sh                          # 2 nodes x 1 process, tiny preset, 4 iterations
#   NPROC_PER_NODE=2 scripts/multinode_local.sh --iterations 6 --checkpoint.resume auto
#
# Extra arguments go to `python -m fastarcher.train`. Logs: $RUN_DIR/node0.log and node1.log.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-/tmp/fastarcher_multinode}
PORT=${PORT:-29561}
RDZV_HOST=${RDZV_HOST:-127.0.0.1}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
TIMEOUT=${TIMEOUT:-600}
mkdir -p "$RUN_DIR"

TRAIN_ARGS=(--config configs/tiny_cpu.yaml --iterations 4 --rollout.num-envs 8 --eval.episodes 8 --eval.every 2
            --eval.no-random-baseline --archer.batch-size 16 --archer.warmup-iterations 1 --replay.capacity 512
            --checkpoint.save-every 2 --log.no-progress --log.run-dir "$RUN_DIR" "$@")

RDZV_BACKEND=${RDZV_BACKEND:-c10d}
launch() {  # $1 = node rank
  if [[ $RDZV_BACKEND == static ]]; then
    rdzv=(--master-addr="$RDZV_HOST" --master-port="$PORT")
  else
    rdzv=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$PORT" --rdzv-id="fastarcher-$PORT")
  fi
  GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} OMP_NUM_THREADS=1 timeout "$TIMEOUT" \
    torchrun --nnodes=2 --node-rank="$1" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}" \
      -m fastarcher.train "${TRAIN_ARGS[@]}" >"$RUN_DIR/node$1.log" 2>&1
}

export COLUMNS=${COLUMNS:-200}  # rich wraps log lines at 80 columns when not on a terminal
launch 0 & node0=$!
launch 1 & node1=$!
rc0=0; rc1=0
wait "$node0" || rc0=$?
wait "$node1" || rc1=$?
echo "node 0 exit $rc0, node 1 exit $rc1 (logs in $RUN_DIR/node0.log, node1.log)"
grep -h -E "ranks=|checkpoint:|resumed|summary|final/eval" "$RUN_DIR/node0.log" "$RUN_DIR/node1.log" || true  # rank 0 may sit on either
exit $(( rc0 || rc1 ))

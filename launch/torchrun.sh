#!/usr/bin/env bash
# maskvid on clusters without SLURM: run this once on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh CONFIG STRATEGY [maskvid fit args...]
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh CONFIG STRATEGY [maskvid fit args...]
# STRATEGY names configs/trainer/STRATEGY.yaml (ddp, fsdp, deepspeed_zero2, deepspeed_zero3).
# NPROC_PER_NODE defaults to the number of GPUs (1 without any). Same resume scheme as the sbatch
# templates: --ckpt_path auto, so rerunning the same command after a failure continues the run.
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG STRATEGY [maskvid fit args...]}
STRATEGY=${2:?usage: launch/torchrun.sh CONFIG STRATEGY [maskvid fit args...]}
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -ge 1 ] || NPROC_PER_NODE=1
fi
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m maskvid.launch.cli fit --config "$CONFIG" --config "configs/trainer/$STRATEGY.yaml" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" --ckpt_path auto "$@"

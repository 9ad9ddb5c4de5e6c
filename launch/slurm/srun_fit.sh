#!/usr/bin/env bash
# Body shared by the sbatch templates (run inside the allocation): rendezvous, NCCL settings, and
# one `maskvid fit` task per GPU through srun. Usage: srun_fit.sh CONFIG STRATEGY [maskvid fit args...]
set -euo pipefail
CONFIG=$1; STRATEGY=$2; shift 2

# Rendezvous on the allocation's first host (Lightning's SLURMEnvironment reads these).
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}

# NCCL (GPU clusters; ignored on CPU):
#   NCCL_ASYNC_ERROR_HANDLING / TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a dead rank fails the job
#     instead of hanging it until the time limit.
#   NCCL_SOCKET_IFNAME: the interface for bootstrap traffic when hosts have several (e.g. ib0, eth0).
#   NCCL_IB_DISABLE=1: only where InfiniBand is absent or broken.
#   NCCL_DEBUG=INFO: once, to check which transport was picked.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "maskvid: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST" \
     "($SLURM_NNODES nodes x $SLURM_NTASKS_PER_NODE tasks), master $MASTER_ADDR:$MASTER_PORT"
# On the preemption signal rank 0 (on this, the first, node) writes this file after the checkpoint,
# and every rank exits cleanly; then this script requeues the job.
export MASKVID_REQUEUE_FILE=${TMPDIR:-/tmp}/maskvid-requeue-$SLURM_JOB_ID
rm -f "$MASKVID_REQUEUE_FILE"
# --ckpt_path auto: the first run starts fresh, a requeued run resumes from its newest checkpoint.
status=0
srun --kill-on-bad-exit=1 maskvid fit --config "$CONFIG" --config "configs/trainer/$STRATEGY.yaml" \
  --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" \
  --ckpt_path auto "$@" || status=$?
if [ -f "$MASKVID_REQUEUE_FILE" ]; then
  rm -f "$MASKVID_REQUEUE_FILE"
  echo "maskvid: checkpoint saved on the preemption signal; scontrol requeue $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"

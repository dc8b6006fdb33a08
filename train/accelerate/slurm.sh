#!/usr/bin/env bash
# One kdlib job over the nodes of a SLURM allocation: one `accelerate launch` per node, machine rank =
# the node's index, rendezvous at the first node. Any kdlib command and its flags follow the script:
#
#   sbatch --nodes 2 train/accelerate/slurm.sh precompute --teacher T --data D --recipe R --out /shared/shards/run
#   sbatch --nodes 2 train/accelerate/slurm.sh train --shards /shared/shards/run --out /shared/runs/s --resume
#
# The store and the run dir must be where every node sees them: a shared filesystem, or s3://... (kdlib[s3];
# credentials from AWS_* or --storage-options). Resubmitting the same command after a node died resumes:
# precompute from its committed chunks, train (with --resume) from its last checkpoint.
#SBATCH --job-name=kdlib
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=kdlib-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
[ "$GPUS_PER_NODE" -ge 1 ] || GPUS_PER_NODE=1
NODES=${SLURM_NNODES:?run under sbatch or salloc}
MAIN_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
PRECISION=${PRECISION:-bf16}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# one task per node; each starts the node's processes. SLURM_NODEID is read inside the task, on its node.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
  exec accelerate launch --multi_gpu \
    --num_machines "$0" --num_processes "$(( $0 * $1 ))" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$2" --main_process_port "$3" --rdzv_backend static \
    --mixed_precision "$4" --dynamo_backend no \
    -m kdlib "${@:5}"' "$NODES" "$GPUS_PER_NODE" "$MAIN_NODE" "$MAIN_PORT" "$PRECISION" "$@"

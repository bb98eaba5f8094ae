#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node (it starts one process per GPU), all nodes
# meeting at the first node of the allocation. Arguments are train_empath.py's.
#
#   sbatch --nodes=4 scripts/slurm_train.sh --config=configs/avamerg_empath.py --config.train.batch_size=512
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml sbatch --nodes=4 scripts/slurm_train.sh --config=...
#   STAGE_DIR=/local/scratch/$USER sbatch --nodes=4 scripts/slurm_train.sh --config=...   # copy features per node
#
# Environment (all optional):
#   ACCELERATE_CONFIG  configs/accelerate/ddp.yaml (default) or configs/accelerate/fsdp.yaml
#   GPUS_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   MAIN_PORT          rendezvous port on the first node (default: 20000 + job id mod 20000)
#   FEATURES           feature cache holding train/ and val/ (default features/avamerg_512, the config's)
#   STAGE_DIR          node-local folder: each node copies FEATURES there first (rsync, so a requeued job only
#                      checks what is there) and training reads the copy
#   ACCELERATE         the accelerate command (default: accelerate)
#
# The run folder (config.workdir) must be on a filesystem every node sees: the main process writes the
# checkpoints, every process writes its RNG state into them and reads them when the job resumes. After a node
# failure the job ends (the surviving processes fail their next collective); with --requeue SLURM starts it again,
# possibly on other nodes, and train_empath.py resumes from the newest complete checkpoint (see README,
# "Multi-GPU and multi-node").
#SBATCH --job-name=empathdiffuser
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export ACCELERATE=${ACCELERATE:-accelerate}
args=("$@")

if [[ -n "${STAGE_DIR:-}" ]]; then
    FEATURES=${FEATURES:-features/avamerg_512}
    srun --ntasks-per-node=1 mkdir -p "$STAGE_DIR"
    srun --ntasks-per-node=1 rsync -a "$FEATURES/train" "$FEATURES/val" "$STAGE_DIR/"
    args+=("--config.data.train=$STAGE_DIR/train" "--config.data.val=$STAGE_DIR/val")
fi

echo "$(date) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes x $GPUS_PER_NODE processes," \
     "rendezvous $MAIN_ADDR:$MAIN_PORT, $ACCELERATE_CONFIG"
# Single quotes: SLURM_NODEID is each node's own, so it is expanded by the shell srun starts there.
srun --kill-on-bad-exit=1 bash -c '
    exec "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$NUM_PROCESSES" \
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --rdzv_backend static \
        train_empath.py "$@"' slurm_train "${args[@]}"

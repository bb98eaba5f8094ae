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
# possibly on other nodes, and train_empath.py resumes from the newest checkpoint that loads.
#
# Preemption and the time limit (docs/training_reliability.md). SLURM sends SIGUSR1 to every process of the job step
# 120 s before the time limit (--signal=USR1@120 below) and SIGTERM on preemption (then SIGKILL after the grace
# time). train_empath.py finishes its current optimizer step, writes a checkpoint of it, prints `stopped: ...` and
# exits 75; every process stops after the same step. Exit statuses do not travel on their own: `accelerate launch`
# (torchrun) reports any failed worker as 1 and would die of SIGUSR1 before its workers save, and srun reports the
# highest task status (or 128 + a signal, e.g. after --kill-on-bad-exit). So each node's wrapper below starts the
# launcher with SIGUSR1 ignored, notes a stop signal, and turns a launcher that failed after one into 75, also
# writing $STOP_FILE. A SIGTERM to this script (`scancel --batch`, the time limit) must not end it before srun: it is
# trapped and the script keeps waiting. The job is requeued (scontrol requeue) when srun returned 75 or a node wrote
# $STOP_FILE; the requeued job resumes from the stop's checkpoint. Any other failure ends the job with its status.
# By hand: `scancel --signal=USR1 <job>` stops cleanly and requeues; a plain `scancel <job>` ends the job (srun answers
# SIGTERM by killing its tasks), which resumes from its previous checkpoint when submitted again.
#SBATCH --job-name=empathdiffuser
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
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
export PREEMPTED_EXIT=75   # libs/preemption.py: stopped by a signal after writing a checkpoint
export STOP_FILE=${STOP_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.slurm-$SLURM_JOB_ID.stopped}   # seen by this node's wrapper
rm -f "$STOP_FILE"
stop=""
trap 'stop=SIGTERM' TERM   # keep waiting for srun, whose tasks are saving
# Single quotes: SLURM_NODEID is each node's own, so it is expanded by the shell srun starts there.
srun --kill-on-bad-exit=1 bash -c '
    stop=""
    trap "stop=SIGUSR1" USR1
    trap "stop=SIGTERM" TERM
    (trap "" USR1; exec "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$NUM_PROCESSES" \
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" --rdzv_backend static \
        train_empath.py "$@") &
    launcher=$!
    while true; do   # a trapped signal interrupts wait: wait again until the launcher has really ended
        wait "$launcher" && status=0 || status=$?
        kill -0 "$launcher" 2>/dev/null || break
    done
    if [[ -n "$stop" && $status -ne 0 ]]; then
        echo "node $SLURM_NODEID: $stop, the launcher ended with $status: stopped with a checkpoint" >&2
        echo "$SLURM_NODEID $stop" >> "$STOP_FILE"
        status=$PREEMPTED_EXIT
    fi
    exit "$status"' slurm_train "${args[@]}" &
step=$!
while true; do
    wait "$step" && status=0 || status=$?
    kill -0 "$step" 2>/dev/null || break
done
if [[ $status -eq $PREEMPTED_EXIT || ( $status -ne 0 && -s "$STOP_FILE" ) ]]; then
    echo "$(date) job $SLURM_JOB_ID stopped by ${stop:-a signal} with a checkpoint (srun status $status): requeue" >&2
    rm -f "$STOP_FILE"
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: resubmit this job to resume" >&2
    exit "$PREEMPTED_EXIT"
fi
rm -f "$STOP_FILE"
exit "$status"

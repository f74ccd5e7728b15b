#!/usr/bin/env bash
# One task per node (started by srun from the sbatch templates): runs `accelerate launch` for this
# node's ranks and forwards SLURM's preemption warning (USR2) to them.
#
# Why: SLURM signals the srun tasks, i.e. this script, not the training processes below it; and
# the launcher (accelerate/torchrun agent) neither forwards USR2 nor survives it (default action:
# terminate). So the signal goes to the launcher's children -- the ranks -- only. They agree on a
# step boundary, save one checkpoint together and exit 0; this script then exits 99, which the
# sbatch template turns into `scontrol requeue`.
#
# usage (inside a job): node_launch.sh LAUNCH_CONFIG RECIPE [key=value ...]
# env: PROCS_PER_NODE (default: GPUs on the node, else 1), MASTER_ADDR, MASTER_PORT, PYTHON
set -uo pipefail
launch_cfg=$1; recipe=$2; shift 2
PY=${PYTHON:-python}
nodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
procs=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
world=$((nodes * procs))
extra=("launch.expected_world_size=$world")
case "$(basename "$launch_cfg")" in cpu*.yaml) extra+=("launch.device=cpu") ;; esac

# SLURM signals the whole process group of this task: the launcher must ignore USR2 (it would die
# of it) but stay in the group (so the job's end still stops it). The ranks set their own handler.
( trap '' USR2
  exec "$PY" -m dist_vdr.cli.launcher --config_file "$launch_cfg" \
    --num_machines "$nodes" --machine_rank "$node_rank" --num_processes "$world" \
    --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "${MASTER_PORT:-29500}" \
    -m dist_vdr.cli train --config "$recipe" "$@" "${extra[@]}" ) &
launcher=$!
preempted=0
forward() {
  preempted=1
  echo "[node_launch $(hostname) node $node_rank] USR2: forwarding to the ranks of launcher $launcher" >&2
  pkill -USR2 -P "$launcher" || true
}
trap forward USR2
# `wait` returns early when a trapped signal arrives: wait again until the launcher is gone.
while true; do
  wait "$launcher"; rc=$?
  kill -0 "$launcher" 2>/dev/null || break
done
if [ "$preempted" = 1 ] && [ "$rc" = 0 ]; then
  exit 99
fi
exit "$rc"

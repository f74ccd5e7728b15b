#!/usr/bin/env bash
# Launch dist-vdr training with an accelerate config from this folder.
#   launch/train.sh launch/cpu.yaml --config configs/tiny.yaml [--resume DIR | --no-resume] [key=value ...]
# It passes launch.expected_world_size=<num_processes of the config> so a launch that does not give
# that many ranks fails instead of silently training single-process; for cpu*.yaml it adds
# launch.device=cpu (and DS_ACCELERATOR=cpu). MASTER_PORT (env) picks the rendezvous port (default
# 29500); NUM_PROCESSES (env) overrides the config's num_processes (e.g. resume on fewer ranks).
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: $0 LAUNCH_CONFIG.yaml --config RECIPE.yaml [key=value ...]" >&2
  exit 2
fi
launch_cfg=$1; shift
PY=${PYTHON:-python}
nproc=${NUM_PROCESSES:-$("$PY" -c 'import sys, yaml; print(int(yaml.safe_load(open(sys.argv[1])).get("num_processes", 1)))' "$launch_cfg")}
extra=("launch.expected_world_size=$nproc")
case "$(basename "$launch_cfg")" in
  cpu*.yaml) extra+=("launch.device=cpu"); export DS_ACCELERATOR=cpu ;;
esac
exec "$PY" -m dist_vdr.cli.launcher --config_file "$launch_cfg" --num_processes "$nproc" --main_process_port "${MASTER_PORT:-29500}" \
  -m dist_vdr.cli train "$@" "${extra[@]}"

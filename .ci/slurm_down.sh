#!/usr/bin/env bash
# Stop the cluster .ci/slurm_up.sh started: its daemons by the PIDs it recorded, nothing else.
set -uo pipefail
DIR=${CT_SLURM_DIR:-/tmp/ct-slurm}
[ -f "$DIR/pids" ] || exit 0
export SLURM_CONF="$DIR/slurm.conf"
# Jobs still queued or running are cancelled first, so no slurmstepd outlives the daemons.
scancel --quiet --user "$(id -un)" 2>/dev/null
for _ in $(seq 60); do [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break; sleep 0.5; done
# Reverse start order: slurmd, slurmctld, munged.
tac "$DIR/pids" | while read -r name pid; do
  [ -n "$pid" ] || continue
  # Only a process that still is that daemon: a PID of one that already exited may be reused.
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue
  kill -TERM "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null && echo "slurm: $name ($pid) killed after 5 s"
done
rm -f "$DIR/pids" "$DIR/slurm.env"
echo "slurm: cluster in $DIR stopped"

#!/usr/bin/env bash
# Start a SLURM cluster on localhost for tests/slurm/ (Debian slurm-wlm 22.05 + munge): two nodes,
# ct1 and ct2, each its own slurmd (one host, one address, a port each: slurmd -N, which Debian's
# build allows), so jobs span nodes; CT_SLURM_NODES=1 starts the one node named after the host.
#
#   bash .ci/slurm_up.sh && source /tmp/ct-slurm/slurm.env && python3 -m pytest -q tests/slurm
#   bash .ci/slurm_down.sh
#
# Installs slurm-wlm and munge with apt-get when they are missing (root only), writes a minimal
# slurm.conf and a private munge key under $CT_SLURM_DIR, and starts munged, slurmctld and slurmd
# directly (no systemd); slurm_down.sh stops them by the PIDs recorded here. Everything lives in
# $CT_SLURM_DIR, so a cluster the machine may already run is not touched (own ports, own socket).
# When SLURM cannot be installed or started it prints ONE line saying why, writes it to
# $CT_SLURM_DIR/unavailable (the tests skip with that reason) and exits 1. When the second slurmd
# cannot run, the one-node cluster starts instead and $CT_SLURM_DIR/one_node says why (the
# multi-node test skips with that reason).
set -uo pipefail

DIR=${CT_SLURM_DIR:-/tmp/ct-slurm}
CTLD_PORT=${CT_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${CT_SLURM_SLURMD_PORT:-16818} # node k of several: SLURMD_PORT + k - 1
NODES=${CT_SLURM_NODES:-2}
# KillWait: seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or reaches its
# time limit. Small so tests are quick, long enough for the tiny test model's save (~2 s).
KILL_WAIT=${CT_SLURM_KILL_WAIT:-20}
# Configured CPUs: at least 4 so a 2-process job fits on a 1- or 2-core CI machine.
NCPU=$(nproc)
CPUS=$((NCPU > 4 ? NCPU : 4))

unavailable() {
  [ -f "$DIR/pids" ] && bash "$(dirname "$0")/slurm_down.sh" >/dev/null 2>&1 # what did start
  if [ "$NODES" -gt 1 ] && [ -n "${SLURMD_STARTING:-}" ]; then # the same cluster with one slurmd
    echo "slurm: $NODES nodes did not start ($1); starting one"
    CT_SLURM_NODES=1 CT_SLURM_ONE_NODE_REASON="$NODES slurmd on one host did not start: $1" exec bash "$0"
  fi
  mkdir -p "$DIR"
  echo "$1" >"$DIR/unavailable"
  echo "slurm: not available ($1); the SLURM test tier will be skipped"
  exit 1
}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    unavailable "slurm-wlm/munge not installed and no root apt-get to install them"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
    >"/tmp/ct-slurm-apt.log" 2>&1 ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -q >>"/tmp/ct-slurm-apt.log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
        >>"/tmp/ct-slurm-apt.log" 2>&1; } ||
    unavailable "apt-get install slurm-wlm munge failed, see /tmp/ct-slurm-apt.log"
fi
[ "$(id -u)" = 0 ] || unavailable "slurmd must run as root to launch jobs"

# A previous cluster of ours (same directory) is stopped first.
[ -f "$DIR/pids" ] && bash "$(dirname "$0")/slurm_down.sh" >/dev/null 2>&1
rm -rf "$DIR"
mkdir -p "$DIR"/{state,spool,log,munge}
chmod 700 "$DIR/munge"
HOST=$(hostname -s)
# The node's name is what jobs see in SLURM_JOB_NODELIST and rendezvous on: it must resolve.
NODE=${CT_SLURM_NODE:-$HOST}
getent hosts "$NODE" >/dev/null || NODE=localhost
# Several nodes: ct1..ctN, names that need not resolve (the sbatch script rendezvouses on the
# first node's NodeAddr, as SLURM reaches it), each slurmd on its own port.
NAMES=("$NODE")
[ "$NODES" -gt 1 ] && read -r -a NAMES <<<"$(seq -s ' ' -f 'ct%g' "$NODES")"
NODESET=$(IFS=,; echo "${NAMES[*]}")

# Private munge key and socket: does not depend on (or disturb) a system munged.
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
SOCKET="$DIR/munge/munge.socket"
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" >/dev/null 2>&1 ||
  unavailable "munged did not start, see $DIR/log/munged.log"
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
echo "munged $(cat "$DIR/munge/munged.pid")" >>"$DIR/pids"

# Two stand-in GPUs: GRES backed by character devices that alias /dev/null, so the tests see how
# the job's processes get GPUs. Where mknod is not allowed the node has none (that test skips).
GRES_TYPES="" GRES_NODE=""
if mknod "$DIR/gpu0" c 1 3 2>/dev/null && mknod "$DIR/gpu1" c 1 3 2>/dev/null; then
  echo "NodeName=$NODESET Name=gpu File=$DIR/gpu[0-1]" >"$DIR/gres.conf"
  GRES_TYPES="GresTypes=gpu" GRES_NODE=" Gres=gpu:2"
fi

cat >"$DIR/slurm.conf" <<EOF
# Written by .ci/slurm_up.sh: ${#NAMES[@]} node(s) on localhost for tests/slurm/.
ClusterName=ctci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
KillWait=$KILL_WAIT
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
# A batch job submitted (or released after a requeue) starts at once, not up to 3 s later: the
# default batch_sched_delay=3 gathers submissions for throughput, which a test cluster has no use for.
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$GRES_TYPES
$(for i in "${!NAMES[@]}"; do
  echo "NodeName=${NAMES[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$CPUS RealMemory=1000$GRES_NODE State=UNKNOWN"
done)
# Jobs in "urgent" preempt jobs in "ci": TERM to the job's steps, requeue after GraceTime.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=ci Nodes=$NODESET Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime=$KILL_WAIT
PartitionName=urgent Nodes=$NODESET MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2
EOF
# proctrack/pgid: a step is its tasks' process groups, killed whole when the step ends, as a
# cgroup would be; with linuxproc (the process tree) a task's helper process orphaned by the task's
# death (megatron-core's checkpoint manager process, SIGTERM-shielded) escapes the kill, keeps the
# step's output open, and the step never ends (a lost node would hang its job).
# No cgroup.conf: slurmd 22.05 loads a cgroup plugin even with proctrack/pgid (it has no
# "disabled"); autodetection picks v1 or v2, whichever is mounted, and nothing uses it.
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -f "$SLURM_CONF" -i >/dev/null 2>&1 || unavailable "slurmctld did not start, see $DIR/log/slurmctld.log"
for _ in $(seq 50); do [ -s "$DIR/slurmctld.pid" ] && break; sleep 0.1; done
echo "slurmctld $(cat "$DIR/slurmctld.pid" 2>/dev/null)" >>"$DIR/pids"
SLURMD_STARTING=1 # from here on a failure with several nodes retries with one
# Each slurmd under a subreaper (.ci/subreaper.py): a job's orphaned processes are reaped at once,
# not by PID 1 seconds later, which would hold every step's end back by its pgid polling (3-7 s).
REAPER=()
command -v python3 >/dev/null && REAPER=(python3 "$(dirname "$0")/subreaper.py")
for name in "${NAMES[@]}"; do
  "${REAPER[@]}" slurmd -f "$SLURM_CONF" -N "$name" >/dev/null 2>&1 || unavailable "slurmd $name did not start, see $DIR/log/slurmd-$name.log"
  for _ in $(seq 50); do [ -s "$DIR/slurmd-$name.pid" ] && break; sleep 0.1; done
  echo "slurmd $(cat "$DIR/slurmd-$name.pid" 2>/dev/null)" >>"$DIR/pids"
done

# The nodes are usable once slurmctld reports every one idle.
for _ in $(seq 100); do
  states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$states" = "idle " ] && [ "$(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l)" = "${#NAMES[@]}" ] && break
  sleep 0.2
done
[ "${states:-}" = "idle " ] || unavailable "nodes $NODESET not idle after 20 s (states '${states:-none}'), see $DIR/log/"
[ -n "${CT_SLURM_ONE_NODE_REASON:-}" ] && echo "$CT_SLURM_ONE_NODE_REASON" >"$DIR/one_node"
echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/slurm.env"
echo "slurm: ${#NAMES[@]}-node cluster up (nodes $NODESET, $CPUS CPUs each${GRES_NODE:+, 2 stand-in GPUs each}, KillWait=${KILL_WAIT}s); SLURM_CONF=$SLURM_CONF"

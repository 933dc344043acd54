#!/usr/bin/env bash
# A one-node Slurm cluster in a folder, for the Slurm tests: munged, slurmctld and slurmd
# run as root with their configuration, sockets, state, spool and logs under DIR, on the
# given ports on 127.0.0.1. Nothing outside DIR is written; `stop` ends every daemon.
#
#   minicluster.sh start DIR CTLD_PORT SLURMD_PORT   # prints `export SLURM_CONF=...` on success
#   minicluster.sh stop DIR
#
# Needs Debian's slurm-wlm (slurmctld, slurmd, munged); exit 77 when they are missing
# or cannot start, so a caller can report the test as skipped with the reason.
set -euo pipefail

cmd=${1:?usage: minicluster.sh start|stop DIR [CTLD_PORT SLURMD_PORT]}
dir=${2:?DIR missing}

stop() {
  for f in slurmd.pid slurmctld.pid munged.pid; do
    if [ -f "$dir/$f" ]; then
      pid=$(cat "$dir/$f" 2>/dev/null || true)
      [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  # Give them a moment, then make sure.
  for _ in $(seq 1 50); do
    alive=0
    for f in slurmd.pid slurmctld.pid munged.pid; do
      pid=$(cat "$dir/$f" 2>/dev/null || true)
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for f in slurmd.pid slurmctld.pid munged.pid; do
    pid=$(cat "$dir/$f" 2>/dev/null || true)
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done
}

skip() { echo "minicluster: $*" >&2; stop; exit 77; }

case "$cmd" in
stop)
  stop
  exit 0
  ;;
start) ;;
*)
  echo "usage: minicluster.sh start|stop DIR [CTLD_PORT SLURMD_PORT]" >&2
  exit 2
  ;;
esac

ctld_port=${3:?CTLD_PORT missing}
slurmd_port=${4:?SLURMD_PORT missing}
for b in munged slurmctld slurmd sbatch scontrol sinfo; do
  command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin
  command -v "$b" >/dev/null || skip "$b not found (install Debian's slurm-wlm)"
done
[ "$(id -u)" = 0 ] || skip "the daemons run as root here; this is uid $(id -u)"

mkdir -p "$dir"/{state,spool,munge}
dir=$(cd "$dir" && pwd)

# munge: its own key, socket and logs, run as the munge user when it exists.
key=$dir/munge/munge.key
[ -f "$key" ] || head -c 1024 /dev/urandom >"$key"
muser=root
if id munge >/dev/null 2>&1; then muser=munge; fi
chown -R "$muser" "$dir/munge"
chmod 700 "$dir/munge"
chmod 400 "$key"
runuser -u "$muser" -- munged --force --key-file="$key" --socket="$dir/munge/munge.sock" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
  --seed-file="$dir/munge/munged.seed" || skip "munged did not start: $(tail -3 "$dir/munge/munged.log" 2>/dev/null)"
for _ in $(seq 1 50); do [ -f "$dir/munge/munged.pid" ] && break; sleep 0.1; done
cp "$dir/munge/munged.pid" "$dir/munged.pid" 2>/dev/null || skip "munged wrote no pid file"

host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat >"$dir/slurm.conf" <<CONF
# Written by tests/slurm/minicluster.sh: one node, everything under $dir.
ClusterName=scfmtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=60
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf

slurmctld -f "$SLURM_CONF" -i || skip "slurmctld did not start: $(tail -5 "$dir/slurmctld.log" 2>/dev/null)"
slurmd -f "$SLURM_CONF" || skip "slurmd did not start: $(tail -5 "$dir/slurmd.log" 2>/dev/null)"

# Wait (30 s at most) for the node to be idle.
for _ in $(seq 1 300); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
skip "node not idle after 30 s (state '${state:-none}'): $(tail -3 "$dir/slurmd.log" 2>/dev/null)"

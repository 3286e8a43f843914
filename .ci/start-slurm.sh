#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, as root, for the `slurm`-marked tests.
#
#   sudo .ci/start-slurm.sh          # needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)
#
# One node (this host, all its cores and memory) in one partition `debug`; munge for
# authentication; no cgroups (proctrack/linuxproc, task/none), so it also runs in containers.
# Idempotent: when `sinfo` already shows an idle node it does nothing, and it never overwrites
# a /etc/slurm/slurm.conf it did not write. Exits 0 once a node is idle, non-zero (with the
# reason on stderr and the daemons' logs under /var/log/slurm) when SLURM cannot be started.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# Written by wsi-convnext .ci/start-slurm.sh"
LOGS=/var/log/slurm
WAIT_S=${SLURM_START_TIMEOUT:-90}

say() { echo "start-slurm: $*" >&2; }
idle_node() { timeout 10 sinfo -h -N -t idle,mix -o %N 2>/dev/null | head -n 1; }
# A node that answers (idle, or busy with jobs): SLURM is up, leave it alone.
up_node() { timeout 10 sinfo -h -N -t idle,mix,alloc,completing -o %N 2>/dev/null | head -n 1; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ours() { [ -e "$CONF" ] && head -n 1 "$CONF" | grep -qF "$MARKER"; }
# Up already: a node answers and, on a cluster this script made, both daemons run here.
if command -v sinfo >/dev/null && [ -n "$(up_node)" ]; then
  if ! ours || { running /run/slurmctld.pid && running /run/slurmd.pid; }; then
    say "SLURM is already up (node $(up_node))"
    exit 0
  fi
fi
for exe in munged slurmctld slurmd sinfo scontrol; do
  command -v "$exe" >/dev/null || { say "$exe not found: apt-get install slurm-wlm munge"; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { say "run as root (it starts munged, slurmctld and slurmd)"; exit 1; }

host=$(hostname -s)
cpus=$(nproc)
# The memory slurmd detects (a configured RealMemory above it would drain the node).
mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
[ -n "$mem" ] || mem=$(free -m | awk '/^Mem:/{print $2}')

# --- munge -----------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --force; else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
  munge -n | unmunge >/dev/null || { say "munged does not answer (see /var/log/munge/munged.log)"; exit 1; }
fi

# --- slurm.conf --------------------------------------------------------------------------------
if [ -e "$CONF" ] && ! ours; then
  say "$CONF exists and was not written by this script; not touching it (start SLURM yourself)"
  exit 1
fi
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOGS"
tmp=$(mktemp "$CONF.XXXXXX")
cat >"$tmp" <<EOF
$MARKER: a single-node test cluster.
ClusterName=wsi-convnext-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
chmod 644 "$tmp"
changed=1
if [ -e "$CONF" ] && cmp -s "$tmp" "$CONF"; then changed=0; rm -f "$tmp"; else mv -f "$tmp" "$CONF"; fi

# --- daemons -----------------------------------------------------------------------------------
if ! running /run/slurmctld.pid; then
  say "starting slurmctld"
  slurmctld || { say "slurmctld did not start (see $LOGS/slurmctld.log)"; exit 1; }
elif [ "$changed" -eq 1 ]; then
  scontrol reconfigure >/dev/null 2>&1 || true
fi
if ! running /run/slurmd.pid; then
  say "starting slurmd"
  slurmd || { say "slurmd did not start (see $LOGS/slurmd.log)"; exit 1; }
fi

for _ in $(seq "$WAIT_S"); do
  if [ -n "$(idle_node)" ]; then
    say "SLURM is up: $(timeout 10 sinfo -h -N -o '%N %t %c CPUs %m MB' | head -n 1)"
    exit 0
  fi
  # A node left down/drained by an earlier start comes back.
  state=$(timeout 10 sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n 1 || true)
  case "$state" in
    down*|drain*|drng*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
say "no idle node after ${WAIT_S}s: $(timeout 10 sinfo -h -N -o '%N %t %E' 2>&1 | head -n 1); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
exit 1

#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for testing the sbatch templates for real.
#   tests/slurm/cluster.sh install   # apt packages (root; about 15 s)
#   tests/slurm/cluster.sh start     # writes $SLURM_TEST_DIR/slurm.conf, starts munged, slurmctld, 2 slurmd
#   tests/slurm/cluster.sh stop      # stops the daemons by their pid files
# Export SLURM_CONF=$SLURM_TEST_DIR/slurm.conf to talk to it. Nodes n1, n2 (2 CPUs each, oversubscribed).
set -euo pipefail
DIR=${SLURM_TEST_DIR:-/tmp/maskvid-slurm}
HOST=$(hostname)

install() {
  if command -v slurmctld >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start() {
  mkdir -p "$DIR"/{state,spool,log}
  cat > "$DIR/slurm.conf" <<CONF
ClusterName=maskvid-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmUser=root
NodeName=n1 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=8000
NodeName=n2 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=8000
PartitionName=debug Nodes=n[1-2] Default=YES State=UP OverSubscribe=YES MaxTime=INFINITE
CONF
  export SLURM_CONF="$DIR/slurm.conf"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  pgrep -x munged >/dev/null || munged -f
  slurmctld
  slurmd -N n1
  slurmd -N n2
  for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | grep -c idle)" -ge 1 ] && ! sinfo -h -o '%T' | grep -qv idle; then
      echo "slurm test cluster up: SLURM_CONF=$SLURM_CONF"; sinfo; return
    fi
    sleep 1
  done
  echo "slurm test cluster did not come up; logs in $DIR/log" >&2; sinfo >&2 || true; exit 1
}

stop() {
  for pid in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  sleep 1
}

"${1:?usage: cluster.sh install|start|stop}"

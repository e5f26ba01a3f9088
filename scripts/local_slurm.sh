#!/usr/bin/env bash
# A real SLURM on this one machine, for trying launch/slurm.sbatch and scripts/slurm_check.sh
# without a cluster: two nodes (n1, n2: two slurmd on this host), each with this machine's
# CPUs and one fake GPU, in a partition `low` that a job in `high` pre-empts (requeue, 60 s
# grace time). Debian or Ubuntu, as root; installs slurmd, slurmctld, slurm-client and munge.
#
#   sudo bash scripts/local_slurm.sh
#   SWEEP_VENV=$PWD/.venv bash scripts/slurm_check.sh /tmp/slurm-check --nodes=2 --cpus-per-task=2
#   sbatch -p high --nodes=2 --wrap 'sleep 20'     # pre-empts what runs in `low`
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (it installs and starts SLURM's daemons)" >&2; exit 1; }
command -v slurmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  slurmd slurmctld slurm-client munge
host=$(hostname)
cpus=$(nproc)
mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 3))  # MB per node, a third each
mkdir -p /var/spool/slurmctld /var/spool/slurmd-n1 /var/spool/slurmd-n2 /var/log/slurm /run/munge
touch /var/spool/slurmd-fake-gpu0 /var/spool/slurmd-fake-gpu1
cat >/etc/slurm/slurm.conf <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
GresTypes=gpu
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem Gres=gpu:1
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem Gres=gpu:1
PartitionName=low Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
cat >/etc/slurm/gres.conf <<EOF
NodeName=n1 Name=gpu File=/var/spool/slurmd-fake-gpu0
NodeName=n2 Name=gpu File=/var/spool/slurmd-fake-gpu1
EOF
pkill -x slurmd || true
pkill -x slurmctld || true
pgrep -x munged >/dev/null || munged --force
sleep 1
slurmctld
sleep 2
slurmd -N n1
slurmd -N n2
sleep 3
scontrol update nodename=n1,n2 state=resume 2>/dev/null || true
sinfo

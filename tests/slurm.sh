#!/usr/bin/env bash
# A throwaway single-node Slurm cluster on this machine for the launcher tests (tests/test_sweep_slurm.py).
#
#   source tests/slurm.sh        # install if missing, start munged + slurmctld + slurmd, export STABENCH_TEST_SLURM=1
#   eval "$(tests/slurm.sh)"     # the same from any shell (prints the export line)
#   tests/slurm.sh stop          # stop the daemons and delete their state
#
# Needs root. Installs Debian's `slurm-wlm` and `munge` when `slurmctld` is missing (apt-get), writes a
# slurm.conf naming this host as controller and only node (all its CPUs, memory a little below the
# machine's), no accounting, no cgroups (proctrack/linuxproc, task/none: slurmd 22.05 exits with
# CgroupPlugin=disabled, so no cgroup.conf is written), and starts the daemons with their state under
# $STABENCH_SLURM_DIR (default /tmp/stabench-slurm). Running it again reuses running daemons.
# Progress goes to stderr; sourcing changes nothing in the calling shell but that one variable.

_stabench_slurm() (
    set -euo pipefail
    DIR="${STABENCH_SLURM_DIR:-/tmp/stabench-slurm}"
    CONF=/etc/slurm/slurm.conf
    log() { echo "slurm.sh: $*" >&2; }

    if [ "$1" = stop ]; then
        pkill -x slurmd 2>/dev/null || true
        pkill -x slurmctld 2>/dev/null || true
        rm -rf "$DIR"
        log "stopped"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        log "needs root (it installs packages and starts system daemons)"
        return 1
    fi
    if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
        log "installing Debian's slurm-wlm and munge"
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge >&2
    fi

    # munge: the key readable by the munge user only, its run directory owned by it
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge: /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    chmod 755 /run/munge
    if ! munge -n </dev/null >/dev/null 2>&1; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged --force
        for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
    fi

    HOST="$(hostname -s)"
    CPUS="$(nproc)"
    MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mkdir -p "$DIR/ctld" "$DIR/d" /etc/slurm
    cat >"$CONF" <<EOF
# Written by stabench tests/slurm.sh: a single-node cluster for tests.
ClusterName=stabench
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if ! pgrep -x slurmctld >/dev/null; then
        log "starting slurmctld"
        /usr/sbin/slurmctld -i
    fi
    if ! pgrep -x slurmd >/dev/null; then
        log "starting slurmd"
        /usr/sbin/slurmd
    fi
    for _ in $(seq 100); do
        state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
        case "$state" in idle*|mixed*|allocated*) break ;; esac
        if [ -n "$state" ] && [ "$state" != "${state#down}" ]; then scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true; fi
        sleep 0.2
    done
    state="$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle*|mixed*|allocated*) log "ready: node $HOST ($CPUS CPUs) $state" ;;
        *) log "node $HOST is '$state', not idle; see $DIR/slurmctld.log and $DIR/slurmd.log"; return 1 ;;
    esac
    echo 1
)

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced
    STABENCH_TEST_SLURM="$(_stabench_slurm start)" && export STABENCH_TEST_SLURM
    unset -f _stabench_slurm
elif [ "${1:-start}" = stop ]; then
    _stabench_slurm stop
else
    ok="$(_stabench_slurm start)"
    echo "export STABENCH_TEST_SLURM=$ok"
fi

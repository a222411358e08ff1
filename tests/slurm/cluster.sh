#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the test suite and for trying the slurm
# profile without a cluster (Debian/Ubuntu, root):
#
#   bash tests/slurm/cluster.sh up       # install slurm-wlm + munge if missing, start munged,
#                                        # slurmctld, slurmd; wait until the node is idle
#   bash tests/slurm/cluster.sh status   # exit 0 only when the node is idle
#   bash tests/slurm/cluster.sh down     # stop the daemons it started, by PID (pid files)
#
# `up` is idempotent: on a running cluster it only checks the node and returns 0. The node gets
# this machine's real CPU layout (`slurmd -C`) and a RealMemory a bit below the free memory; no
# accounting database (accounting_storage/none): the snakemake slurm plugin then needs
# `--slurm-status-command squeue` (tests/slurm/ci_profile.py sets it). Partition: `debug`.
# Environment: SLURM_UP_TIMEOUT (seconds to wait for an idle node, default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_OURS=$RUN_DIR/munged.started-by-cluster-sh   # down stops munged only if up started it
NODE=$(hostname -s)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: ERROR: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {  # the node's state as sinfo reports it (idle, mixed, allocated, down*, ...), or ""
    timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true
}

slurm_version() { dpkg-query -W -f='slurm-wlm ${Version}' slurm-wlm 2>/dev/null || slurmd -V; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sinfo >/dev/null; then
        say "slurm-wlm and munge already installed ($(slurm_version))"
        return
    fi
    [[ $(id -u) == 0 ]] || die "installing slurm-wlm needs root (apt-get)"
    say "apt-get install -y --no-install-recommends slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed"
    say "installed $(slurm_version)"
}

start_munge() {
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        say "munged already running"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
        chown munge:munge /etc/munge/munge.key
        chmod 0600 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    say "starting munged as user munge"
    runuser -u munge -- /usr/sbin/munged
    mkdir -p "$RUN_DIR" && touch "$MUNGE_OURS"
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            say "munged up (pid $(cat "$MUNGE_PID" 2>/dev/null || echo ?))"
            return
        fi
        sleep 0.1
    done
    die "munged did not start (munge -n | unmunge fails)"
}

write_conf() {  # write slurm.conf for this machine; returns 0 if it changed, 1 if not
    local hw cpus_line free_mb real_mb cpus def_mem tmp
    # slurmd -C: the node line as slurmd itself detects it (CPUs, sockets, cores, threads,
    # RealMemory = total); a layout that differs from slurmd's view would drain the node.
    hw=$(slurmd -C | head -n1)
    cpus_line=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    cpus=$(tr ' ' '\n' <<<"$hw" | sed -n 's/^CPUs=//p')
    # RealMemory: 90 % of the memory free now (MemAvailable), rounded down to 100 MiB, so jobs
    # never get promised memory that other processes on this machine hold.
    free_mb=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
    real_mb=$(( free_mb * 9 / 10 / 100 * 100 ))
    # DefMemPerCPU: without it a one-CPU batch job gets the whole node's memory and srun waits.
    def_mem=$(( real_mb / cpus < 1000 ? real_mb / cpus : 1000 ))
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by tests/slurm/cluster.sh for this machine ($NODE). Single-node test cluster.
ClusterName=ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$NODE ${cpus_line}RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p "$CONF_DIR"
    # RealMemory follows the free memory, which moves; rewrite only when something else changed
    # or the memory moved by more than 10 %.
    if [[ -f $CONF ]] && diff -q <(grep -v RealMemory "$CONF") <(grep -v RealMemory "$tmp") >/dev/null; then
        local old_mb
        old_mb=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' "$CONF")
        if (( old_mb <= free_mb && old_mb * 10 >= real_mb * 9 )); then
            rm -f "$tmp"
            say "$CONF up to date ($(grep ^NodeName "$CONF"))"
            return 1
        fi
    fi
    mv "$tmp" "$CONF" && chmod 0644 "$CONF"
    say "wrote $CONF: $(grep ^NodeName "$CONF"); DefMemPerCPU=$def_mem"
    return 0
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM the process, wait up to 10 s, then SIGKILL
    local name=$1 file=$2 pid
    if ! alive "$file"; then
        say "$name not running"
        rm -f "$file"
        return
    fi
    pid=$(cat "$file")
    say "stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return; }
        sleep 0.1
    done
    say "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

wait_idle() {
    local state="" t0=$SECONDS
    while (( SECONDS - t0 < TIMEOUT )); do
        state=$(node_state)
        case $state in
            idle) say "node $NODE idle after $(( SECONDS - t0 )) s"; sinfo; return 0 ;;
            down*|drain*|drained*|fail*)
                # ReturnToService=2 brings a registered node back; nudge a stale down state.
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    echo "cluster.sh: ERROR: node $NODE not idle after $TIMEOUT s (state: '${state:-no answer from slurmctld}')" >&2
    sinfo -N -l >&2 || true
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        echo "--- last lines of $f" >&2
        tail -n 15 "$f" >&2 2>/dev/null || true
    done
    return 1
}

up() {
    if alive "$CTLD_PID" && alive "$SLURMD_PID"; then
        local state
        state=$(node_state)
        if [[ $state =~ ^(idle|mixed|allocated|completing) ]]; then
            say "already up: slurmctld pid $(cat "$CTLD_PID"), slurmd pid $(cat "$SLURMD_PID"), node $NODE $state"
            return 0
        fi
    fi
    local t0=$SECONDS changed=0
    install
    start_munge
    write_conf && changed=1
    mkdir -p "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    # After a config change both daemons restart (one alone complains of a different slurm.conf).
    if (( changed )) || ! alive "$CTLD_PID" || ! alive "$SLURMD_PID"; then
        stop_pidfile slurmd "$SLURMD_PID"
        stop_pidfile slurmctld "$CTLD_PID"
        say "starting slurmctld"
        slurmctld
        say "starting slurmd"
        slurmd
        for _ in $(seq 50); do alive "$CTLD_PID" && alive "$SLURMD_PID" && break; sleep 0.1; done
        alive "$CTLD_PID" || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true; die "slurmctld did not start"; }
        alive "$SLURMD_PID" || { tail -n 20 "$LOG_DIR/slurmd.log" >&2 || true; die "slurmd did not start"; }
        say "slurmctld pid $(cat "$CTLD_PID") ($CTLD_PID), slurmd pid $(cat "$SLURMD_PID") ($SLURMD_PID)"
    fi
    wait_idle || die "cluster did not come up"
    say "up in $(( SECONDS - t0 )) s"
}

down() {
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    if [[ -f $MUNGE_OURS ]]; then
        stop_pidfile munged "$MUNGE_PID"
        rm -f "$MUNGE_OURS"
    else
        say "munged left alone (not started by cluster.sh)"
    fi
    say "down"
}

status() {
    local state
    command -v sinfo >/dev/null || { say "sinfo not installed: no cluster"; return 1; }
    alive "$CTLD_PID" && say "slurmctld pid $(cat "$CTLD_PID")" || say "slurmctld not running"
    alive "$SLURMD_PID" && say "slurmd pid $(cat "$SLURMD_PID")" || say "slurmd not running"
    state=$(node_state)
    say "node $NODE: ${state:-no answer from slurmctld}"
    [[ $state == idle ]]
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

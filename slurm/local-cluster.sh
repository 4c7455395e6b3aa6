#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for tests and CI.
#
#   slurm/local-cluster.sh start    install (Debian packages) if needed, configure, start; idempotent
#   slurm/local-cluster.sh stop     stop slurmd, slurmctld and munged; exit 0 even if not running
#   slurm/local-cluster.sh status   daemons and sinfo; exit 0 if the node takes jobs, 1 otherwise
#
# Made for Debian 12 containers run as root without systemd or cgroups: the daemons are started
# directly (they daemonize themselves), processes are tracked with proctrack/linuxproc.
# See slurm/README.md.
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C

PROG="local-cluster"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by slurm/local-cluster.sh"
LOG_DIR=/var/log/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
MUNGE_LOG=/var/log/munge/munged.log
NODE=localhost
PARTITION=debug
WAIT_S="${LOCAL_CLUSTER_WAIT_S:-60}"
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "$PROG: $*"; }
die() { printf '%s: ERROR: %b\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $0 start|stop|status
  start   install SLURM + munge if missing, write $CONF, start munged/slurmctld/slurmd,
          wait until node '$NODE' is idle (idempotent)
  stop    stop slurmd, slurmctld, munged (exit 0 even if not running)
  status  show the daemons and sinfo; exit 0 if the cluster takes jobs, 1 otherwise
EOF
    exit 2
}

need_root() {
    [[ $EUID -eq 0 ]] && return 0
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n -E bash "$0" "$@"
    fi
    die "must run as root (or with passwordless sudo)"
}

# ---------------------------------------------------------------- processes (no pgrep needed)

# the first pid whose command name is exactly $1 (empty if none)
pid_of() {
    local f pid comm
    for f in /proc/[0-9]*/comm; do
        pid=${f#/proc/}; pid=${pid%/comm}
        comm=$(cat "$f" 2>/dev/null) || continue
        if [[ $comm == "$1" ]]; then echo "$pid"; return 0; fi
    done
    return 0
}

# pid of the running daemon $1 (pid file $2 first, else by name); empty if not running
daemon_pid() {
    local name=$1 pidfile=$2 pid=""
    if [[ -r $pidfile ]]; then
        pid=$(tr -dc '0-9' <"$pidfile" 2>/dev/null || true)
        if [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null || true) == "$name" ]]; then
            echo "$pid"; return 0
        fi
    fi
    pid_of "$name"
}

munged_pid() { daemon_pid munged "$MUNGE_PID"; }
ctld_pid() { daemon_pid slurmctld "$CTLD_PID"; }
slurmd_pid() { daemon_pid slurmd "$SLURMD_PID"; }

munge_ok() { command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ctld_up() { [[ $(timeout 10 scontrol ping 2>/dev/null) == *"is UP"* ]]; }

# the node's state as sinfo prints it (idle, mixed, down*, drained, ...); empty if unknown
node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true; }

node_usable() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------- install

install_packages() {
    local missing=() b
    for b in sbatch srun squeue scontrol sinfo slurmctld slurmd slurmstepd munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd the packages' postinst would try to start the services through their init
    # scripts (slurmctld's fails without a slurm.conf and aborts the install): forbid that while
    # installing, unless the image already has a policy-rc.d (docker images do).
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from slurm/local-cluster.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local rc=0 p stale=0
    for p in "${PACKAGES[@]}"; do
        [[ $(apt-cache policy "$p" 2>/dev/null) == *"Candidate: "[0-9]* ]] || stale=1
    done
    if [[ $stale -eq 1 ]]; then
        say "apt-get update (the package lists lack some of ${PACKAGES[*]})"
        apt-get update -q </dev/null >/dev/null || rc=$?
    fi
    if [[ $rc -eq 0 ]] && ! apt-get install "${apt_opts[@]}" "${PACKAGES[@]}" </dev/null >/tmp/local-cluster-apt.log 2>&1; then
        say "install failed; apt-get update and retry"
        apt-get update -q </dev/null >/dev/null && apt-get install "${apt_opts[@]}" "${PACKAGES[@]}" </dev/null >/tmp/local-cluster-apt.log 2>&1 || rc=$?
    fi
    if [[ $added_policy -eq 1 ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
    if [[ $rc -ne 0 ]]; then
        tail -n 30 /tmp/local-cluster-apt.log >&2 || true
        die "apt-get install ${PACKAGES[*]} failed (log: /tmp/local-cluster-apt.log)"
    fi
    for b in sbatch slurmctld slurmd munged; do
        command -v "$b" >/dev/null 2>&1 || die "$b still missing after installing ${PACKAGES[*]}"
    done
}

# ---------------------------------------------------------------- munge

start_munge() {
    getent passwd munge >/dev/null || die "no 'munge' user (is the munge package installed?)"
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    if [[ ! -s $MUNGE_KEY ]]; then
        say "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            rm -f "$MUNGE_KEY"
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"

    if [[ -n $(munged_pid) ]] && munge_ok; then
        return 0
    fi
    if [[ -n $(munged_pid) ]]; then
        say "munged runs but munge -n | unmunge fails; restarting it"
        stop_daemon munged "$(munged_pid)"
    fi
    # stale socket/lock/pid from a daemon that died
    rm -f "$MUNGE_RUN"/munge.socket.2 "$MUNGE_RUN"/munge.socket.2.lock "$MUNGE_PID"
    say "starting munged (as user munge)"
    # as the packaged service does, munged runs as the munge user (it owns the key); it daemonizes itself.
    runuser -u munge -- munged --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" </dev/null 9>&- ||
        die "munged failed to start; log tail:\n$(tail -n 20 "$MUNGE_LOG" 2>/dev/null)"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && return 0
        sleep 0.2
    done
    tail -n 20 "$MUNGE_LOG" >&2 2>/dev/null || true
    die "munged started but 'munge -n | unmunge' does not work"
}

# ---------------------------------------------------------------- slurm.conf

mem_mb() {
    local total
    total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # leave 5% (at least 256 MB) for the OS and the daemons
    local spare=$((total / 20))
    ((spare < 256)) && spare=256
    echo $((total - spare))
}

write_conf() {
    local cpus mem tmp
    cpus=$(nproc)
    mem=$(mem_mb)
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARKER (start); regenerated on each start, edits are lost.
# Single-node test cluster: no systemd, no cgroups, no accounting daemon.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in the container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
PropagateResourceLimits=NONE
# one CPU is one schedulable core, so several 1-CPU jobs run at once
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5
PreemptType=preempt/none
# lets jobs ask for --gres=gpu:0 / --gpus-per-node=0
GresTypes=gpu
# no accounting: sacct does not work, that is expected
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# submitit: requeue on preemption/timeout and 'scontrol requeue'
JobRequeue=1
ReturnToService=2
MinJobAge=300
MaxArraySize=1001
# short timeouts for tests
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
KillWait=5
InactiveLimit=0
Waittime=0
# the node is described by this file, whatever hardware slurmd detects
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    install -d -m 0755 "$CONF_DIR"
    CONF_CHANGED=0
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if [[ -f $CONF && $(head -n 1 "$CONF") != "$MARKER"* ]]; then
        local backup
        backup="$CONF.bak.$(date +%Y%m%d-%H%M%S)"
        cp -p "$CONF" "$backup"
        say "backed up the existing $CONF to $backup"
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    say "wrote $CONF (CPUs=$cpus RealMemory=${mem}MB)"
    CONF_CHANGED=1
}

# ---------------------------------------------------------------- daemons

# stop_daemon NAME PID: TERM, wait up to 10 s, then KILL
stop_daemon() {
    local name=$1 pid=$2 i
    [[ -z $pid ]] && return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        [[ $(cat "/proc/$pid/comm" 2>/dev/null || true) == "$name" ]] || return 0
        sleep 0.2
    done
    say "$name (pid $pid) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

stop_all_named() {
    local name=$1 pidfile=$2 pid
    while pid=$(daemon_pid "$name" "$pidfile") && [[ -n $pid ]]; do
        say "stopping $name (pid $pid)"
        stop_daemon "$name" "$pid"
    done
    rm -f "$pidfile"
}

logs_tail() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG" "$MUNGE_LOG"; do
        [[ -r $f ]] || continue
        echo "---- tail of $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

fail_with_logs() {
    logs_tail
    die "$*"
}

start_slurm_daemons() {
    install -d -m 0755 "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
    chown root:root "$STATE_DIR" "$SPOOL_DIR"
    local i
    if [[ -z $(ctld_pid) ]]; then
        say "starting slurmctld (log $CTLD_LOG)"
        rm -f "$CTLD_PID"
        slurmctld </dev/null 9>&- || fail_with_logs "slurmctld failed to start"
    fi
    for ((i = 0; i < WAIT_S * 2; i++)); do
        ctld_up && break
        [[ -z $(ctld_pid) ]] && fail_with_logs "slurmctld exited right after starting"
        sleep 0.5
    done
    ctld_up || fail_with_logs "slurmctld does not answer 'scontrol ping' after ${WAIT_S}s"
    if [[ -z $(slurmd_pid) ]]; then
        say "starting slurmd -N $NODE (log $SLURMD_LOG)"
        rm -f "$SLURMD_PID"
        # -N: the node is called localhost whatever the container's hostname is
        slurmd -N "$NODE" </dev/null 9>&- || fail_with_logs "slurmd failed to start"
    fi
}

wait_node_idle() {
    local deadline=$((SECONDS + WAIT_S)) state last_resume=-100
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            down* | drain* | fail* | unknown*)
                # down after a restart, drained by an earlier run, ...: ask the controller to resume it
                if ((SECONDS - last_resume >= 5)) && [[ -n $(slurmd_pid) ]]; then
                    timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    last_resume=$SECONDS
                fi
                ;;
        esac
        [[ -z $(slurmd_pid) ]] && fail_with_logs "slurmd exited (node state '${state:-?}')"
        [[ -z $(ctld_pid) ]] && fail_with_logs "slurmctld exited (node state '${state:-?}')"
        sleep 1
    done
    timeout 10 sinfo -N -l >&2 2>/dev/null || true
    timeout 10 scontrol show node "$NODE" >&2 2>/dev/null || true
    fail_with_logs "node $NODE is not idle after ${WAIT_S}s (state '$(node_state)')"
}

summary() {
    local version
    version=$(sinfo --version 2>/dev/null | awk '{print $2}')
    say "up: cluster=local partition=$PARTITION node=$NODE state=$(node_state)" \
        "CPUs=$(nproc) RealMemory=$(mem_mb)MB slurm=${version:-?}" \
        "(munged $(munged_pid), slurmctld $(ctld_pid), slurmd $(slurmd_pid))"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    need_root start
    # one start at a time (CI steps or test workers racing)
    if command -v flock >/dev/null 2>&1; then
        exec 9>/run/local-cluster.lock
        flock -w 300 9 || die "another local-cluster.sh holds /run/local-cluster.lock"
    fi
    install_packages
    start_munge
    write_conf
    if [[ $CONF_CHANGED -eq 1 && ( -n $(ctld_pid) || -n $(slurmd_pid) ) ]]; then
        say "slurm.conf changed: restarting slurmd and slurmctld"
        stop_all_named slurmd "$SLURMD_PID"
        stop_all_named slurmctld "$CTLD_PID"
    fi
    if [[ -n $(ctld_pid) && -n $(slurmd_pid) ]] && node_usable; then
        say "already running"
        summary
        return 0
    fi
    start_slurm_daemons
    wait_node_idle
    summary
}

cmd_stop() {
    need_root stop
    stop_all_named slurmd "$SLURMD_PID"
    stop_all_named slurmctld "$CTLD_PID"
    stop_all_named munged "$MUNGE_PID"
    say "stopped"
}

cmd_status() {
    local ok=0 pid name
    for name in munged slurmctld slurmd; do
        case $name in
            munged) pid=$(munged_pid) ;;
            slurmctld) pid=$(ctld_pid) ;;
            slurmd) pid=$(slurmd_pid) ;;
        esac
        if [[ -n $pid ]]; then
            say "$name: running (pid $pid)"
        else
            say "$name: not running"
            ok=1
        fi
    done
    if munge_ok; then say "munge: credentials encode/decode"; else say "munge: 'munge -n | unmunge' fails"; ok=1; fi
    if command -v sinfo >/dev/null 2>&1 && timeout 10 sinfo 2>/dev/null; then
        if node_usable; then
            say "node $NODE: $(node_state) (usable)"
        else
            say "node $NODE: '$(node_state)' (not usable)"
            ok=1
        fi
    else
        say "sinfo: no answer from slurmctld"
        ok=1
    fi
    return $ok
}

[[ $# -eq 1 ]] || usage
case "$1" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac

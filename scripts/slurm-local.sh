#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying and testing `hydra/launcher=slurm`.
# Debian, root, no systemd needed (docs/slurm.md explains the set-up).
#
#   scripts/slurm-local.sh install   apt-install slurmctld slurmd slurm-client munge (if missing)
#   scripts/slurm-local.sh start     write slurm.conf, start munged, slurmctld, slurmd; wait for `idle`
#                                    (also: start a stopped slurmctld again; resume a node Slurm drained)
#   scripts/slurm-local.sh stop      stop only the daemons this script started (by recorded pid)
#   scripts/slurm-local.sh status    sinfo, squeue, and which daemons this script owns
#
# Environment: SEKD_SLURM_STATE (pid files and daemon logs; default /run/sekd-slurm),
# SEKD_SLURM_PARTITION (default debug), SEKD_SLURM_WAIT_S (seconds to wait for the node; default 60).
# Exit codes: 0 ok, 1 error, 2 usage, 3 (status) no cluster answering.
set -euo pipefail

STATE=${SEKD_SLURM_STATE:-/run/sekd-slurm}
PARTITION=${SEKD_SLURM_PARTITION:-debug}
WAIT_S=${SEKD_SLURM_WAIT_S:-60}
CONF=/etc/slurm/slurm.conf
MARK="# written by sekd scripts/slurm-local.sh"
PKGS=(slurmctld slurmd slurm-client munge)
DAEMONS=(munged slurmctld slurmd)  # start order; stop goes in reverse

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }
need_root() { [[ $(id -u) -eq 0 ]] || die "'$1' needs root (it writes /etc/slurm and starts daemons)"; }
need_slurm() {
    local c
    for c in slurmctld slurmd sinfo munged; do
        command -v "$c" >/dev/null 2>&1 || [[ -x /usr/sbin/$c ]] ||
            die "Slurm is not installed ($c not found): run scripts/slurm-local.sh install"
    done
}

# pid_alive NAME PID: PID is a live process whose command is NAME (guards against pid reuse).
pid_alive() { [[ -n ${2:-} && -r /proc/$2/comm && $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]; }
owned_pid() { local f="$STATE/$1.pid"; [[ -r $f ]] && pid_alive "$1" "$(cat "$f")" && cat "$f"; }
running() { pgrep -x "$1" >/dev/null 2>&1; }
controller_up() { timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; }
node_state() { timeout 10 sinfo -h -N -n "$(hostname)" -o %T 2>/dev/null | head -n1 || true; }

cmd_install() {
    need_root install
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "already installed: ${PKGS[*]}"
        return 0
    fi
    say "installing ${missing[*]} (apt-get; under a minute)"
    export DEBIAN_FRONTEND=noninteractive
    local log
    log=$(mktemp)
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1 ||
        { cat "$log" >&2; rm -f "$log"; die "apt-get install ${missing[*]} failed (output above)"; }
    rm -f "$log"
    say "installed: $(dpkg-query -W -f='${Package} ${Version}  ' "${PKGS[@]}")"
}

write_conf() {
    local host cpus mem_mb margin real
    host=$(hostname)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: the node has them all
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    margin=$(( mem_mb / 10 > 1024 ? mem_mb / 10 : 1024 ))  # leave the OS 10%, at least 1 GiB
    real=$(( mem_mb - margin ))
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        cp -p "$CONF" "$CONF.sekd-backup"
        say "kept the existing $CONF as $CONF.sekd-backup"
    fi
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >"$CONF.tmp" <<EOF
$MARK on $(date -u +%FT%TZ): one node, no cgroups, no accounting.
ClusterName=sekd-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    say "wrote $CONF (node $host, CPUs=$cpus, RealMemory=${real}MB, partition $PARTITION)"
}

start_munge() {
    if running munged; then
        say "munged already running (not ours to stop)"
    else
        local d
        for d in /run/munge /var/log/munge /var/lib/munge /etc/munge; do mkdir -p "$d"; chown munge:munge "$d"; done
        chmod 0755 /run/munge
        chmod 0700 /var/log/munge /var/lib/munge /etc/munge
        if [[ ! -s /etc/munge/munge.key ]]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
            say "created /etc/munge/munge.key"
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        su -s /bin/sh munge -c /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
        local i pid=""
        for i in $(seq 50); do
            pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
            pid_alive munged "$pid" && break
            sleep 0.1
        done
        pid_alive munged "$pid" || die "munged did not start (see /var/log/munge/munged.log)"
        echo "$pid" >"$STATE/munged.pid"
        say "started munged (pid $pid)"
    fi
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not work: 'munge -n | unmunge' failed"
}

# start_daemon NAME: run `NAME -D` detached, its output in $STATE/NAME.log, its pid in $STATE/NAME.pid.
start_daemon() {
    local name=$1 pid
    if running "$name"; then
        say "$name already running (not ours to stop)"
        return 0
    fi
    setsid "$name" -D </dev/null >"$STATE/$name.log" 2>&1 &
    pid=$!
    sleep 0.5
    pid_alive "$name" "$pid" || die "$name exited at once; its log ($STATE/$name.log) ends with:
$(tail -n 20 "$STATE/$name.log")"
    echo "$pid" >"$STATE/$name.pid"
    say "started $name (pid $pid, log $STATE/$name.log)"
}

cmd_start() {
    need_root start
    need_slurm
    mkdir -p "$STATE"
    if running slurmctld && running slurmd && controller_up && [[ $(node_state) == idle* || $(node_state) == mix* || $(node_state) == alloc* ]]; then
        say "a cluster is already running; leaving it alone"
        cmd_status
        return 0
    fi
    running slurmctld || write_conf
    start_munge
    start_daemon slurmctld
    local i
    for i in $(seq "$WAIT_S"); do controller_up && break; sleep 1; done
    controller_up || die "slurmctld did not answer within ${WAIT_S}s; see $STATE/slurmctld.log and /var/log/slurm/slurmctld.log"
    start_daemon slurmd
    local state="" resumed=0
    for i in $(seq "$WAIT_S"); do
        state=$(node_state)
        [[ $state == idle* || $state == mix* || $state == alloc* ]] && break
        if [[ $resumed -eq 0 && ( $state == drain* || $state == down* ) ]]; then
            # e.g. "Kill task failed" after the controller was stopped under a running job: this node is ours
            say "node $(hostname) is $state ($(timeout 10 sinfo -h -N -n "$(hostname)" -o %E 2>/dev/null)); resuming it"
            timeout 10 scontrol update nodename="$(hostname)" state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 1
    done
    if [[ $state != idle* && $state != mix* && $state != alloc* ]]; then
        echo "slurm-local: error: node $(hostname) is '${state:-not listed}' after ${WAIT_S}s, not idle" >&2
        timeout 10 sinfo -R >&2 || true
        tail -n 20 /var/log/slurm/slurmd.log >&2 2>/dev/null || true
        exit 1
    fi
    say "node $(hostname) is $state in partition $PARTITION; stop with: scripts/slurm-local.sh stop"
}

cmd_stop() {
    local name pid i stopped=0 jobs
    if owned_pid slurmctld >/dev/null && controller_up; then
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
        [[ -z ${jobs// /} ]] || say "warning: jobs still queued or running (${jobs% }); cancel them with scancel first to end their processes"
    fi
    for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
        name=${DAEMONS[i]}
        if pid=$(owned_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 100); do pid_alive "$name" "$pid" || break; sleep 0.1; done
            if pid_alive "$name" "$pid"; then
                kill -KILL "$pid" 2>/dev/null || true
                say "killed $name (pid $pid; it ignored SIGTERM for 10s)"
            else
                say "stopped $name (pid $pid)"
            fi
            stopped=$((stopped + 1))
        fi
        rm -f "$STATE/$name.pid"
    done
    [[ $stopped -gt 0 ]] || say "no daemon started by this script is running (state: $STATE); left others alone"
}

cmd_status() {
    local name pid
    for name in "${DAEMONS[@]}"; do
        if pid=$(owned_pid "$name"); then
            say "$name: pid $pid, started by this script"
        elif running "$name"; then
            say "$name: running, not started by this script (state: $STATE)"
        else
            say "$name: not running"
        fi
    done
    if ! command -v sinfo >/dev/null 2>&1; then
        say "Slurm is not installed: run scripts/slurm-local.sh install"
        return 3
    fi
    if ! controller_up; then
        say "no Slurm controller answers: run scripts/slurm-local.sh start"
        return 3
    fi
    timeout 10 sinfo
    timeout 10 squeue
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac

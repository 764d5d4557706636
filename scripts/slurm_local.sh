#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the launch paths (docs/slurm.md).
#
#   scripts/slurm_local.sh start [--install] [--no-accounting]   # start (and install) the cluster; waits for an idle node
#   scripts/slurm_local.sh status                                # key=value lines; exit 0 only when the node answers
#   scripts/slurm_local.sh stop                                  # cancel every job, stop the daemons this script started
#
# Needs root and Debian's packages slurm-wlm and munge (plus slurmdbd and mariadb-server for accounting).
# Nothing is installed unless asked: --install or KNN_CM_SLURM_INSTALL=1 runs apt-get.
# Accounting (slurmdbd + MariaDB) is on by default: without it `sacct` fails, and submitit then never learns
# that a job was cancelled, killed or timed out (it waits forever for the result file). --no-accounting or
# KNN_CM_SLURM_ACCOUNTING=0 starts without it (jobs still run; `sacct` and submitit's states do not work).
#
# Configuration: /etc/slurm/slurm.conf (and slurmdbd.conf) filled from slurm/local/*.conf.in with this machine's
# short hostname, CPU count and memory, so every client (sinfo, sbatch, submitit) finds the cluster without
# SLURM_CONF. A slurm.conf that this script did not write (a real cluster's) is never overwritten: start refuses.
# KNN_CM_SLURM_CONF_DIR=DIR writes the configuration there instead; clients then need SLURM_CONF=DIR/slurm.conf.
# Daemons run in the foreground (no systemd) in their own sessions, their PIDs in /run/knn-cm-slurm/*.pid;
# stop signals exactly those PIDs. A munged or MariaDB server that was already running is used, never stopped.
# Settings: KNN_CM_SLURM_PARTITION (default debug), KNN_CM_SLURM_KILL_WAIT (seconds, default 5).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEMPLATES=$REPO/slurm/local
CONF_DIR=${KNN_CM_SLURM_CONF_DIR:-/etc/slurm}
CONF=$CONF_DIR/slurm.conf
export SLURM_CONF=$CONF  # the daemons and this script's clients; other shells need it only for another CONF_DIR
DBD_CONF=$CONF_DIR/slurmdbd.conf
MARKER="knn-cm local test cluster"
RUN_DIR=/run/knn-cm-slurm
STATE_DIR=/var/spool/knn-cm-slurm
LOG_DIR=/var/log/knn-cm-slurm
CLUSTER=knn-cm-local
PARTITION=${KNN_CM_SLURM_PARTITION:-debug}
KILL_WAIT=${KNN_CM_SLURM_KILL_WAIT:-5}
DB_NAME=knn_cm_slurm_acct
DB_USER=knn_cm_slurm
DB_PASS=knn-cm-local-only
START_TIMEOUT=${KNN_CM_SLURM_START_TIMEOUT:-60}

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
log() { echo "slurm_local.sh: $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

bool_setting() {  # name value -> 1 or 0, or a clear error
    case "${2,,}" in
        1|true|yes|on) echo 1 ;;
        0|false|no|off|"") echo 0 ;;
        *) die "$1 must be 0 or 1 (or true/false), got '$2'" ;;
    esac
}

# ---- processes this script started ---------------------------------------------------------------------
pid_of() { [[ -f $RUN_DIR/$1.pid ]] && cat "$RUN_DIR/$1.pid" || true; }

alive() {  # name: true when the recorded PID runs the program of that name
    local pid
    pid=$(pid_of "$1")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

launch() {  # name command...: run a foreground daemon in its own session, record its PID, check it stays up
    local name=$1
    shift
    setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 &
    echo $! >"$RUN_DIR/$name.pid"
    sleep 0.2
    alive "$name" || die "$name exited at start; see $LOG_DIR/$name.out and $LOG_DIR/$name.log"
}

stop_daemons() {  # names...: TERM each recorded PID at once, wait for all to exit (KILL after 15 s)
    local name pid pids=() names=()
    for name in "$@"; do
        if alive "$name"; then
            pid=$(pid_of "$name")
            kill -TERM "$pid"
            pids+=("$pid")
            names+=("$name")
        fi
        rm -f "$RUN_DIR/$name.pid"
    done
    for _ in $(seq 150); do
        local running=0
        for pid in "${pids[@]}"; do
            [[ -d /proc/$pid ]] && running=1
        done
        ((running)) || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if [[ -d /proc/${pids[i]} ]]; then
            log "${names[i]} (PID ${pids[i]}) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "${pids[i]}" || true
        fi
        log "stopped ${names[i]} (PID ${pids[i]})"
    done
}

wait_for() {  # description timeout command...: poll until the command succeeds
    local what=$1 timeout=$2 deadline
    shift 2
    deadline=$(($(date +%s) + timeout))
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < deadline)) || die "timed out after ${timeout} s waiting for $what"
        sleep 0.2
    done
}

# ---- installation ----------------------------------------------------------------------------------------
packages_needed() {  # accounting -> the Debian packages that are missing
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    if [[ $1 == 1 ]]; then
        command -v slurmdbd >/dev/null || missing+=(slurmdbd)
        command -v mariadbd >/dev/null || missing+=(mariadb-server)
    fi
    echo "${missing[@]}"
}

install_packages() {  # install accounting
    local missing started
    missing=$(packages_needed "$2")
    [[ -z $missing ]] && return 0
    if [[ $1 != 1 ]]; then
        die "missing packages: $missing. Install them with: $0 start --install (or KNN_CM_SLURM_INSTALL=1), which runs apt-get"
    fi
    command -v apt-get >/dev/null || die "missing packages: $missing, and apt-get is not available to install them"
    started=$(now)
    log "installing $missing (apt-get)"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    log "installed $missing in $(elapsed "$started") s"
}

# ---- configuration ---------------------------------------------------------------------------------------
own_or_absent() { [[ ! -e $1 ]] || head -n 1 "$1" | grep -q "$MARKER"; }

fill() {  # template target accounting: substitute the machine's values, write atomically
    local cpus memory_mb accounting_line
    cpus=$(nproc)
    memory_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
    if [[ $3 == 1 ]]; then
        accounting_line=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
    else
        accounting_line="AccountingStorageType=accounting_storage/none"
    fi
    sed -e "s|@HOSTNAME@|$(hostname -s)|g" -e "s|@CPUS@|$cpus|g" -e "s|@REAL_MEMORY@|$memory_mb|g" \
        -e "s|@PARTITION@|$PARTITION|g" -e "s|@KILL_WAIT@|$KILL_WAIT|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
        -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@LOG_DIR@|$LOG_DIR|g" -e "s|@DB_NAME@|$DB_NAME|g" \
        -e "s|@DB_USER@|$DB_USER|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1" |
        awk -v line="$accounting_line" '$0 == "@ACCOUNTING@" { print line; next } { print }' >"$2.tmp"
    chmod "$4" "$2.tmp"
    mv "$2.tmp" "$2"
}

write_config() {  # accounting
    [[ $PARTITION =~ ^[A-Za-z0-9_-]+$ ]] || die "KNN_CM_SLURM_PARTITION must be letters, digits, - or _, got '$PARTITION'"
    [[ $KILL_WAIT =~ ^[0-9]+$ ]] || die "KNN_CM_SLURM_KILL_WAIT must be a whole number of seconds, got '$KILL_WAIT'"
    mkdir -p "$CONF_DIR" "$RUN_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"
    fill "$TEMPLATES/slurm.conf.in" "$CONF" "$1" 644
    if [[ $1 == 1 ]]; then
        fill "$TEMPLATES/slurmdbd.conf.in" "$DBD_CONF" "$1" 600
    else
        rm -f "$DBD_CONF"
    fi
}

check_config_is_ours() {
    for file in "$CONF" "$DBD_CONF"; do
        own_or_absent "$file" || die "$file exists and was not written by this script (a real cluster's?);" \
            "not overwriting it. Use KNN_CM_SLURM_CONF_DIR=DIR (clients then need SLURM_CONF=DIR/slurm.conf)."
    done
}

accounting_configured() { [[ -f $CONF ]] && grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF"; }

# ---- start -----------------------------------------------------------------------------------------------
start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is answering (ours from an earlier start, or the machine's own)
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    [[ -f /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (the munge package creates it: mungekey)"
    launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for "munged to answer" 20 bash -c 'munge -n | unmunge'
}

start_mariadb() {
    if mariadb-admin ping >/dev/null 2>&1; then
        :  # a MariaDB server is already running
    else
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
        launch mariadbd /usr/sbin/mariadbd --user=mysql
        wait_for "MariaDB to answer" 30 mariadb -e 'select 1'
    fi
    mariadb -e "CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
                GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';"
}

start_slurmdbd() {
    alive slurmdbd || launch slurmdbd /usr/sbin/slurmdbd -D
    wait_for "slurmdbd to answer" 30 sacctmgr -n show cluster
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

node_state() { sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null | head -n 1 || true; }

node_answers() {
    case $(node_state) in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        *) return 1 ;;
    esac
}

cmd_start() {
    local install accounting started
    install=$(bool_setting KNN_CM_SLURM_INSTALL "${KNN_CM_SLURM_INSTALL:-0}")
    accounting=$(bool_setting KNN_CM_SLURM_ACCOUNTING "${KNN_CM_SLURM_ACCOUNTING:-1}")
    for arg in "$@"; do
        case $arg in
            --install) install=1 ;;
            --no-accounting) accounting=0 ;;
            *) die "unknown option '$arg' for start; allowed: --install, --no-accounting" ;;
        esac
    done
    check_config_is_ours
    [[ $(id -u) == 0 ]] || die "start needs root (it writes /etc/slurm and runs the SLURM daemons as root)"
    install_packages "$install" "$accounting"
    if alive slurmctld && alive slurmd && node_answers; then
        log "already running"
        cmd_status
        return 0
    fi
    if pgrep -x slurmctld >/dev/null && ! alive slurmctld; then
        die "a slurmctld that this script did not start is running (PID $(pgrep -x slurmctld | head -n 1)); not starting another"
    fi
    started=$(now)
    write_config "$accounting"
    start_munge
    if [[ $accounting == 1 ]]; then
        start_mariadb
        start_slurmdbd
    fi
    alive slurmctld || launch slurmctld /usr/sbin/slurmctld -D -i
    alive slurmd || launch slurmd /usr/sbin/slurmd -D
    wait_for "node $(hostname -s) to be idle in sinfo (see $LOG_DIR/)" "$START_TIMEOUT" node_answers
    log "started in $(elapsed "$started") s"
    cmd_status
}

# ---- stop ------------------------------------------------------------------------------------------------
cmd_stop() {
    local started deadline
    started=$(now)
    if alive slurmctld; then
        # Every job of this cluster: the cluster goes away with them.
        squeue -h -o %A 2>/dev/null | xargs -r scancel --quiet 2>/dev/null || true
        deadline=$(($(date +%s) + 20))
        while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && (($(date +%s) < deadline)); do
            sleep 0.2
        done
    fi
    stop_daemons slurmd slurmctld      # the controller and the node first (they report to slurmdbd)
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    log "stopped in $(elapsed "$started") s"
}

# ---- status ----------------------------------------------------------------------------------------------
cmd_status() {
    local conf_owner=absent state
    if [[ -e $CONF ]]; then
        own_or_absent "$CONF" && conf_owner=own || conf_owner=foreign
    fi
    state=$(node_state)
    echo "cluster=$CLUSTER"
    echo "conf=$CONF"
    echo "conf_owner=$conf_owner"
    echo "node=$(hostname -s)"
    echo "node_state=${state:-no-answer}"
    echo "partition=$(sinfo -h -o %R 2>/dev/null | head -n 1)"
    echo "cpus=$(sinfo -h -o %c 2>/dev/null | head -n 1)"
    echo "accounting=$(accounting_configured && echo slurmdbd || echo none)"
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$name"; then
            echo "daemon_$name=$(pid_of "$name")"
        else
            echo "daemon_$name=not-started-here"
        fi
    done
    echo "logs=$LOG_DIR"
    node_answers
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    stop) shift; [[ $# == 0 ]] || die "stop takes no options, got '$*'"; cmd_stop ;;
    status) shift; [[ $# == 0 ]] || die "status takes no options, got '$*'"; cmd_status ;;
    *) die "usage: $0 start [--install] [--no-accounting] | stop | status (got '${1:-}')" ;;
esac

#!/usr/bin/env bash
# Start a real single-node SLURM cluster (munged, slurmctld, slurmd; with
# --accounting also MariaDB and slurmdbd) on this machine for the workflow's
# SLURM tests.  Idempotent: if the daemons recorded in STATE_DIR are alive and
# the node answers, it only re-checks and exits 0.
#
#   usage: tests/slurm/start.sh [--accounting] [STATE_DIR]   (default: /tmp/hic-slurm)
#
# Every piece of the cluster's state (slurmctld's StateSaveLocation, slurmd's
# spool, the accounting database, pid and log files) lives in STATE_DIR: state
# that another cluster left in /var/spool cannot stop this one.  Needs root
# (installs packages, writes /etc/slurm, starts daemons).  Stop with
# tests/slurm/stop.sh [STATE_DIR], which kills exactly the PIDs written here to
# STATE_DIR/*.pid.
set -euo pipefail

ACCOUNTING=0
if [ "${1:-}" = --accounting ]; then ACCOUNTING=1; shift; fi
STATE_DIR=${1:-${HIC_SLURM_STATE_DIR:-/tmp/hic-slurm}}
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
READY_TIMEOUT=${HIC_SLURM_READY_TIMEOUT:-60}   # seconds to wait for node idle
SMOKE_TIMEOUT=${HIC_SLURM_SMOKE_TIMEOUT:-60}   # seconds for the srun smoke job
DB_PORT=${HIC_SLURM_DB_PORT:-6830}             # MariaDB on 127.0.0.1 (--accounting)
MARKER="# Written by hic-12m tests/slurm/start.sh"

log() { echo "[slurm/start] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs packages, writes /etc/slurm, starts daemons)"
    exit 2
fi

mkdir -p "$STATE_DIR"
chmod 0755 "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

# Serialise concurrent start/stop calls (e.g. parallel test workers).
# Daemons are started with 9>&- so they do not inherit (and hold) this lock.
exec 9>"$STATE_DIR/.lock"
if ! flock -w 300 9; then
    log "could not take $STATE_DIR/.lock within 300 s"
    exit 1
fi

NODE=$(hostname -s)
[ -n "$NODE" ] || { log "hostname -s is empty"; exit 1; }

# ---------------------------------------------------------------- helpers
# pid_alive PIDFILE COMM: the recorded PID exists and is the expected program
# (guards against PID reuse, e.g. after a reboot with a stale /tmp).
pid_alive() {
    local f=$1 comm=$2 pid
    [ -s "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    case "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" in
        ''|Z|X) return 1 ;;   # gone, or a zombie waiting to be reaped
    esac
}

node_state() {  # prints e.g. idle, idle*, down*, drained, mixed ... or nothing
    timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true
}

node_usable() {  # idle, or busy with jobs (mixed/allocated/completing)
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

dump_logs() {
    local f
    for f in munged mariadb slurmdbd slurmctld slurmd; do
        if [ -f "$STATE_DIR/$f.log" ]; then
            echo "----- tail $STATE_DIR/$f.log -----" >&2
            tail -n 40 "$STATE_DIR/$f.log" >&2 || true
        fi
    done
    echo "----- sinfo -----" >&2
    timeout 10 sinfo -N -l >&2 2>&1 || true
    timeout 10 scontrol show node "$NODE" >&2 2>&1 || true
}

fail() {
    log "FAILED: $*"
    dump_logs
    log "daemons started so far are recorded in $STATE_DIR/*.pid; run tests/slurm/stop.sh $STATE_DIR to clean up"
    exit 1
}

# wait_pidfile SRC COMM DEST: wait for a daemon's own pid file, copy it to DEST.
wait_pidfile() {
    local src=$1 comm=$2 dest=$3 i
    for i in $(seq 1 300); do
        if pid_alive "$src" "$comm"; then
            tr -dc '0-9' <"$src" >"$dest"
            echo >>"$dest"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# install_conf NEW DEST: move NEW over DEST unless equal; keep a foreign DEST once.
# Returns 0 when DEST changed.
install_conf() {
    local new=$1 dest=$2
    if [ -f "$dest" ] && cmp -s "$new" "$dest"; then
        rm -f "$new"
        return 1
    fi
    if [ -f "$dest" ] && ! grep -qF "$MARKER" "$dest" && [ ! -e "$dest.hic-orig" ]; then
        cp -p "$dest" "$dest.hic-orig"
        log "kept the previous $dest as $dest.hic-orig"
    fi
    mv -f "$new" "$dest"
}

# ---------------------------------------------------------------- packages
PACKAGES="slurm-wlm munge"
NEEDED="slurmctld slurmd munged sinfo"
if [ "$ACCOUNTING" = 1 ]; then
    PACKAGES="$PACKAGES slurmdbd mariadb-server"
    NEEDED="$NEEDED slurmdbd mariadbd mariadb-install-db"
fi
missing=0
for cmd in $NEEDED; do command -v "$cmd" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
    log "installing $PACKAGES with apt"
    # Keep the packages' maintainer scripts from starting their own daemons
    # (we start exactly what we record).  Only add a policy-rc.d if none exists.
    POLICY=/usr/sbin/policy-rc.d
    ADDED_POLICY=0
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 0755 "$POLICY"
        ADDED_POLICY=1
        trap '[ "$ADDED_POLICY" = 1 ] && rm -f "$POLICY"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q -o DPkg::Lock::Timeout=300 >&2
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 $PACKAGES >&2
    if [ "$ADDED_POLICY" = 1 ]; then rm -f "$POLICY"; ADDED_POLICY=0; fi
fi
getent passwd munge >/dev/null || fail "user 'munge' missing after install"
getent passwd slurm >/dev/null || fail "user 'slurm' missing after install"
[ "$ACCOUNTING" = 0 ] || getent passwd mysql >/dev/null || fail "user 'mysql' missing after install"

# ---------------------------------------------------------------- directories
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -m 0755 /etc/slurm
# The cluster's own state, never /var/spool: a StateSaveLocation that another
# cluster wrote makes slurmctld refuse to start (CLUSTER NAME MISMATCH).
install -d -o slurm -g slurm -m 0755 "$STATE_DIR/ctld" "$STATE_DIR/run"
install -d -m 0755 "$STATE_DIR/slurmd"

if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    rm -f /etc/munge/munge.key
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi

# Log files live in STATE_DIR; the daemons drop privileges, so pre-create them.
touch "$STATE_DIR/munged.log" "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log"
chown munge:munge "$STATE_DIR/munged.log"
chown slurm:slurm "$STATE_DIR/slurmctld.log"
if [ "$ACCOUNTING" = 1 ]; then
    touch "$STATE_DIR/mariadb.log" "$STATE_DIR/slurmdbd.log"
    chown mysql:mysql "$STATE_DIR/mariadb.log"
    chown slurm:slurm "$STATE_DIR/slurmdbd.log"
    install -d -o mysql -g mysql -m 0755 "$STATE_DIR/db-run"   # socket and pid file
fi
chmod 0640 "$STATE_DIR"/*.log

# ---------------------------------------------------------------- slurm.conf
CPUS=$(nproc)
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
HEADROOM=$(( MEM_TOTAL / 10 )); [ "$HEADROOM" -ge 512 ] || HEADROOM=512
REAL_MEM=$(( MEM_TOTAL - HEADROOM )); [ "$REAL_MEM" -ge 256 ] || REAL_MEM=256
DEF_MEM=$(( REAL_MEM / CPUS )); [ "$DEF_MEM" -le 1024 ] || DEF_MEM=1024

if [ "$ACCOUNTING" = 1 ]; then
    ACCOUNTING_CONF="# accounting: slurmdbd on 127.0.0.1:6819, MariaDB on 127.0.0.1:$DB_PORT
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
    ACCOUNTING_CONF="# no slurmdbd: sacct fails, the snakemake plugin must use squeue
AccountingStorageType=accounting_storage/none"
fi

CONF_NEW=$(mktemp "$STATE_DIR/slurm.conf.XXXXXX")
cat >"$CONF_NEW" <<EOF
$MARKER ($STATE_DIR); regenerated on every start.
ClusterName=hic
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# no cgroups / systemd on the test machines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# GresTypes is left unset (= no GRES); an empty "GresTypes=" is a parse error in 22.05

$ACCOUNTING_CONF
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# The plugin's squeue status command needs finished jobs to stay visible in
# squeue for a while: MinJobAge >= 3 x --slurm-init-seconds-before-status-checks.
MinJobAge=60

# A job in partition urgent pre-empts the jobs in partition debug. SLURM requeues
# them, except those submitted with --no-requeue: they end PREEMPTED.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE

SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=10
InactiveLimit=0
KillWait=5
Waittime=0
MailProg=/bin/true

NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2
EOF
chmod 0644 "$CONF_NEW"
CONF_CHANGED=0
install_conf "$CONF_NEW" /etc/slurm/slurm.conf && CONF_CHANGED=1
# (No cgroup.conf: with proctrack/linuxproc + task/none the 22.05 daemons
# neither need nor read one.)

if [ "$ACCOUNTING" = 1 ]; then
    DBD_NEW=$(mktemp "$STATE_DIR/slurmdbd.conf.XXXXXX")
    cat >"$DBD_NEW" <<EOF
$MARKER ($STATE_DIR); regenerated on every start.
AuthType=auth/munge
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=$STATE_DIR/slurmdbd.log
PidFile=$STATE_DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$DBD_NEW"
    chmod 0600 "$DBD_NEW"       # slurmdbd refuses a config that others can read
    install_conf "$DBD_NEW" /etc/slurm/slurmdbd.conf && CONF_CHANGED=1
fi

# ---------------------------------------------------------------- already up?
MUNGE_EXTERNAL=0
if [ -f "$STATE_DIR/munged.external" ]; then MUNGE_EXTERNAL=1; fi

munge_ok() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }
accounting_up() {
    [ "$ACCOUNTING" = 0 ] || { pid_alive "$STATE_DIR/mariadbd.pid" mariadbd \
        && pid_alive "$STATE_DIR/slurmdbd.pid" slurmdbd; }
}

if [ "$CONF_CHANGED" = 0 ] \
   && { pid_alive "$STATE_DIR/munged.pid" munged || { [ "$MUNGE_EXTERNAL" = 1 ] && munge_ok; }; } \
   && accounting_up \
   && pid_alive "$STATE_DIR/slurmctld.pid" slurmctld \
   && pid_alive "$STATE_DIR/slurmd.pid" slurmd \
   && node_usable; then
    log "cluster already running (node $NODE: $(node_state)); nothing to do"
    exit 0
fi

# Config changed while our slurm daemons run: restart them with the new one.
if [ "$CONF_CHANGED" = 1 ]; then
    for d in slurmd slurmctld slurmdbd; do
        if pid_alive "$STATE_DIR/$d.pid" "$d"; then
            log "slurm config changed; restarting $d"
            pid=$(tr -dc '0-9' <"$STATE_DIR/$d.pid")
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do pid_alive "$STATE_DIR/$d.pid" "$d" || break; sleep 0.1; done
            pid_alive "$STATE_DIR/$d.pid" "$d" && kill -KILL "$pid" 2>/dev/null
            sleep 0.5
            rm -f "$STATE_DIR/$d.pid"
        fi
    done
fi

# ---------------------------------------------------------------- munged
if pid_alive "$STATE_DIR/munged.pid" munged; then
    log "munged already running (pid $(cat "$STATE_DIR/munged.pid"))"
elif munge_ok; then
    # Someone else's munged owns the socket: use it, but never record/kill it.
    log "using an already running munged that this script did not start"
    rm -f "$STATE_DIR/munged.pid"
    touch "$STATE_DIR/munged.external"
else
    rm -f "$STATE_DIR/munged.pid" "$STATE_DIR/munged.external" /run/munge/munged.pid
    log "starting munged"
    runuser -u munge -- munged --log-file="$STATE_DIR/munged.log" \
        --pid-file=/run/munge/munged.pid </dev/null >>"$STATE_DIR/munged.log" 2>&1 9>&- \
        || fail "munged did not start"
    wait_pidfile /run/munge/munged.pid munged "$STATE_DIR/munged.pid" \
        || fail "munged wrote no pid file"
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.2; done
    munge_ok || fail "munge -n | unmunge does not work"
fi

# ---------------------------------------------------------------- accounting
# MariaDB (data, socket, pid file in STATE_DIR; TCP on 127.0.0.1 only), then
# slurmdbd, then the cluster's record in the database, which slurmctld needs.
db() { mariadb --no-defaults --socket="$STATE_DIR/db-run/mariadbd.sock" -u root "$@"; }

if [ "$ACCOUNTING" = 1 ]; then
    if pid_alive "$STATE_DIR/mariadbd.pid" mariadbd; then
        log "mariadbd already running (pid $(cat "$STATE_DIR/mariadbd.pid"))"
    else
        rm -f "$STATE_DIR/mariadbd.pid" "$STATE_DIR/db-run/mariadbd.pid"
        if [ ! -d "$STATE_DIR/mysql/mysql" ]; then
            log "creating the accounting database in $STATE_DIR/mysql"
            install -d -o mysql -g mysql -m 0750 "$STATE_DIR/mysql"
            mariadb-install-db --no-defaults --datadir="$STATE_DIR/mysql" --user=mysql \
                --auth-root-authentication-method=socket --skip-test-db \
                >>"$STATE_DIR/mariadb.log" 2>&1 || fail "mariadb-install-db failed"
        fi
        log "starting mariadbd on 127.0.0.1:$DB_PORT"
        setsid mariadbd --no-defaults --user=mysql --datadir="$STATE_DIR/mysql" \
            --socket="$STATE_DIR/db-run/mariadbd.sock" \
            --pid-file="$STATE_DIR/db-run/mariadbd.pid" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$STATE_DIR/mariadb.log" \
            --innodb-buffer-pool-size=64M \
            </dev/null >>"$STATE_DIR/mariadb.log" 2>&1 9>&- &
        wait_pidfile "$STATE_DIR/db-run/mariadbd.pid" mariadbd "$STATE_DIR/mariadbd.pid" \
            || fail "mariadbd wrote no pid file"
        for _ in $(seq 1 150); do db -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
        db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
               GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
            || fail "could not create the database user slurm"
    fi
    if pid_alive "$STATE_DIR/slurmdbd.pid" slurmdbd; then
        log "slurmdbd already running (pid $(cat "$STATE_DIR/slurmdbd.pid"))"
    else
        rm -f "$STATE_DIR/slurmdbd.pid" "$STATE_DIR/run/slurmdbd.pid"
        log "starting slurmdbd"
        slurmdbd </dev/null >>"$STATE_DIR/slurmdbd.log" 2>&1 9>&- || fail "slurmdbd did not start"
        wait_pidfile "$STATE_DIR/run/slurmdbd.pid" slurmdbd "$STATE_DIR/slurmdbd.pid" \
            || fail "slurmdbd wrote no pid file"
    fi
    for _ in $(seq 1 100); do
        timeout 10 sacctmgr -n list cluster >/dev/null 2>&1 && break
        pid_alive "$STATE_DIR/slurmdbd.pid" slurmdbd || fail "slurmdbd died"
        sleep 0.2
    done
    if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx hic; then
        timeout 30 sacctmgr -i add cluster hic >&2 || fail "sacctmgr add cluster hic failed"
    fi
fi

# ---------------------------------------------------------------- slurmctld
if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
    log "slurmctld already running (pid $(cat "$STATE_DIR/slurmctld.pid"))"
else
    rm -f "$STATE_DIR/slurmctld.pid" "$STATE_DIR/run/slurmctld.pid"
    log "starting slurmctld"
    # -c: start from a clean state (no jobs/node states from earlier runs)
    slurmctld -c </dev/null >>"$STATE_DIR/slurmctld.log" 2>&1 9>&- || fail "slurmctld did not start"
    wait_pidfile "$STATE_DIR/run/slurmctld.pid" slurmctld "$STATE_DIR/slurmctld.pid" \
        || fail "slurmctld wrote no pid file"
fi

# ---------------------------------------------------------------- slurmd
if pid_alive "$STATE_DIR/slurmd.pid" slurmd; then
    log "slurmd already running (pid $(cat "$STATE_DIR/slurmd.pid"))"
else
    rm -f "$STATE_DIR/slurmd.pid" "$STATE_DIR/run/slurmd.pid"
    log "starting slurmd"
    slurmd -N "$NODE" </dev/null >>"$STATE_DIR/slurmd.log" 2>&1 9>&- || fail "slurmd did not start"
    wait_pidfile "$STATE_DIR/run/slurmd.pid" slurmd "$STATE_DIR/slurmd.pid" \
        || fail "slurmd wrote no pid file"
fi

# ---------------------------------------------------------------- wait for node
deadline=$(( SECONDS + READY_TIMEOUT ))
resumed=0
while :; do
    st=$(node_state)
    case "$st" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            if [ "$resumed" -lt 3 ]; then
                log "node $NODE is '$st'; resuming it"
                timeout 10 scontrol update nodename="$NODE" state=resume >&2 || true
                resumed=$(( resumed + 1 ))
            fi ;;
    esac
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld || fail "slurmctld died"
    pid_alive "$STATE_DIR/slurmd.pid" slurmd || fail "slurmd died"
    [ "$SECONDS" -lt "$deadline" ] || fail "node $NODE not idle after ${READY_TIMEOUT}s (state: '${st:-none}')"
    sleep 0.5
done
log "node $NODE is $(node_state)"

# ---------------------------------------------------------------- smoke job
if ! timeout "$SMOKE_TIMEOUT" srun -N1 -n1 -t 1 --job-name=hic-smoke true >&2; then
    fail "smoke job 'srun -N1 -n1 true' failed or timed out"
fi
if [ "$ACCOUNTING" = 1 ]; then
    # The smoke job reaches the database within seconds: sacct answers for it.
    for _ in $(seq 1 60); do
        timeout 10 sacct -X -n -P --name=hic-smoke --format=State 2>/dev/null | grep -q COMPLETED && break
        sleep 0.5
    done
    timeout 10 sacct -X -n -P --name=hic-smoke --format=State | grep -q COMPLETED \
        || fail "sacct does not report the smoke job as COMPLETED"
fi
pids=""
for d in munged mariadbd slurmdbd slurmctld slurmd; do
    [ -s "$STATE_DIR/$d.pid" ] && pids="$pids $d=$(tr -dc '0-9' <"$STATE_DIR/$d.pid")"
done
log "cluster up:$pids (state dir $STATE_DIR)"
exit 0

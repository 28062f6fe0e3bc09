#!/usr/bin/env bash
# Start a real single-node SLURM cluster (munged + slurmctld + slurmd) on this
# machine for the workflow's SLURM tests.  Idempotent: if the daemons recorded
# in STATE_DIR are alive and the node answers, it only re-checks and exits 0.
#
#   usage: tests/slurm/start.sh [STATE_DIR]      (default: /tmp/hic-slurm)
#
# Needs root (installs packages, writes /etc/slurm, starts daemons).
# Stop with tests/slurm/stop.sh [STATE_DIR], which kills exactly the PIDs
# written here to STATE_DIR/{munged,slurmctld,slurmd}.pid.
set -euo pipefail

STATE_DIR=${1:-${HIC_SLURM_STATE_DIR:-/tmp/hic-slurm}}
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
READY_TIMEOUT=${HIC_SLURM_READY_TIMEOUT:-60}   # seconds to wait for node idle
SMOKE_TIMEOUT=${HIC_SLURM_SMOKE_TIMEOUT:-60}   # seconds for the srun smoke job
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
    for f in munged slurmctld slurmd; do
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
    for i in $(seq 1 100); do
        if pid_alive "$src" "$comm"; then
            tr -dc '0-9' <"$src" >"$dest"
            echo >>"$dest"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1 \
   || ! command -v slurmd >/dev/null 2>&1 || ! command -v sinfo >/dev/null 2>&1; then
    log "installing slurm-wlm and munge with apt"
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
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
        slurm-wlm munge >&2
    if [ "$ADDED_POLICY" = 1 ]; then rm -f "$POLICY"; ADDED_POLICY=0; fi
fi
getent passwd munge >/dev/null || fail "user 'munge' missing after install"
getent passwd slurm >/dev/null || fail "user 'slurm' missing after install"

# ---------------------------------------------------------------- directories
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o slurm -g slurm -m 0755 /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
install -d -m 0755 /etc/slurm

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
chmod 0640 "$STATE_DIR"/*.log

# ---------------------------------------------------------------- slurm.conf
CPUS=$(nproc)
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
HEADROOM=$(( MEM_TOTAL / 10 )); [ "$HEADROOM" -ge 512 ] || HEADROOM=512
REAL_MEM=$(( MEM_TOTAL - HEADROOM )); [ "$REAL_MEM" -ge 256 ] || REAL_MEM=256
DEF_MEM=$(( REAL_MEM / CPUS )); [ "$DEF_MEM" -le 1024 ] || DEF_MEM=1024

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
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
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

# no slurmdbd: the snakemake plugin runs with --slurm-status-command squeue,
# so finished jobs must stay visible in squeue for a while (MinJobAge).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=60

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
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
chmod 0644 "$CONF_NEW"

CONF_CHANGED=1
if [ -f /etc/slurm/slurm.conf ] && cmp -s "$CONF_NEW" /etc/slurm/slurm.conf; then
    CONF_CHANGED=0
    rm -f "$CONF_NEW"
else
    if [ -f /etc/slurm/slurm.conf ] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf \
       && [ ! -e /etc/slurm/slurm.conf.hic-orig ]; then
        cp -p /etc/slurm/slurm.conf /etc/slurm/slurm.conf.hic-orig
        log "kept the previous /etc/slurm/slurm.conf as slurm.conf.hic-orig"
    fi
    mv -f "$CONF_NEW" /etc/slurm/slurm.conf
fi
# (No cgroup.conf: with proctrack/linuxproc + task/none the 22.05 daemons
# neither need nor read one.)

# ---------------------------------------------------------------- already up?
MUNGE_EXTERNAL=0
if [ -f "$STATE_DIR/munged.external" ]; then MUNGE_EXTERNAL=1; fi

munge_ok() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

if [ "$CONF_CHANGED" = 0 ] \
   && { pid_alive "$STATE_DIR/munged.pid" munged || { [ "$MUNGE_EXTERNAL" = 1 ] && munge_ok; }; } \
   && pid_alive "$STATE_DIR/slurmctld.pid" slurmctld \
   && pid_alive "$STATE_DIR/slurmd.pid" slurmd \
   && node_usable; then
    log "cluster already running (node $NODE: $(node_state)); nothing to do"
    exit 0
fi

# Config changed while our slurm daemons run: restart them with the new one.
if [ "$CONF_CHANGED" = 1 ]; then
    for d in slurmd slurmctld; do
        if pid_alive "$STATE_DIR/$d.pid" "$d"; then
            log "slurm.conf changed; restarting $d"
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

# ---------------------------------------------------------------- slurmctld
if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
    log "slurmctld already running (pid $(cat "$STATE_DIR/slurmctld.pid"))"
else
    rm -f "$STATE_DIR/slurmctld.pid" /run/slurm/slurmctld.pid
    log "starting slurmctld"
    # -c: start from a clean state (no jobs/node states from earlier runs)
    slurmctld -c </dev/null >>"$STATE_DIR/slurmctld.log" 2>&1 9>&- || fail "slurmctld did not start"
    wait_pidfile /run/slurm/slurmctld.pid slurmctld "$STATE_DIR/slurmctld.pid" \
        || fail "slurmctld wrote no pid file"
fi

# ---------------------------------------------------------------- slurmd
if pid_alive "$STATE_DIR/slurmd.pid" slurmd; then
    log "slurmd already running (pid $(cat "$STATE_DIR/slurmd.pid"))"
else
    rm -f "$STATE_DIR/slurmd.pid" /run/slurm/slurmd.pid
    log "starting slurmd"
    slurmd -N "$NODE" </dev/null >>"$STATE_DIR/slurmd.log" 2>&1 9>&- || fail "slurmd did not start"
    wait_pidfile /run/slurm/slurmd.pid slurmd "$STATE_DIR/slurmd.pid" \
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
log "cluster up: munged=$(cat "$STATE_DIR/munged.pid" 2>/dev/null || echo external)" \
    "slurmctld=$(cat "$STATE_DIR/slurmctld.pid") slurmd=$(cat "$STATE_DIR/slurmd.pid")" \
    "(state dir $STATE_DIR)"
exit 0

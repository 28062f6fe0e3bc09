#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by tests/slurm/start.sh.
#
#   usage: tests/slurm/stop.sh [STATE_DIR]      (default: /tmp/hic-slurm)
#
# Kills exactly the PIDs recorded in STATE_DIR/{slurmd,slurmctld,slurmdbd,mariadbd,munged}.pid
# (TERM, up to 10 s, then KILL) and removes the pid files.  Never kills by
# process name, so daemons that someone else started survive.  Safe to run
# repeatedly and when nothing is running.
set -uo pipefail

STATE_DIR=${1:-${HIC_SLURM_STATE_DIR:-/tmp/hic-slurm}}
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { echo "[slurm/stop] $*" >&2; }

if [ ! -d "$STATE_DIR" ]; then
    log "no state dir $STATE_DIR; nothing to stop"
    exit 0
fi
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

exec 9>"$STATE_DIR/.lock"
flock -w 120 9 || log "could not take $STATE_DIR/.lock within 120 s; stopping anyway"

# recorded_pid FILE COMM: print the PID if it is alive and is the expected
# program (a stale pid file after a reboot must not kill an unrelated process).
recorded_pid() {
    local f=$1 comm=$2 pid
    [ -s "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    echo "$pid"
}

# Cancel leftover jobs while the controller is still up.
if recorded_pid "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
    if timeout 10 scancel --user="$(id -un)" 2>/dev/null; then
        # give slurmd a moment to kill the job steps before it goes away
        for _ in $(seq 1 20); do
            [ -z "$(timeout 5 squeue -h -u "$(id -un)" -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

# alive PID: process exists and is not a zombie waiting to be reaped
alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

rc=0
for d in slurmd slurmctld slurmdbd mariadbd munged; do
    f="$STATE_DIR/$d.pid"
    [ -e "$f" ] || continue
    if pid=$(recorded_pid "$f" "$d"); then
        log "stopping $d (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do            # up to 10 s
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "$d (pid $pid) still alive after 10 s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
            if alive "$pid"; then log "$d (pid $pid) survived KILL"; rc=1; continue; fi
        fi
    else
        log "$d: recorded pid is not a running $d (stale $f); not killing it"
    fi
    rm -f "$f"
done
rm -f "$STATE_DIR/munged.external"
[ "$rc" = 0 ] && log "stopped (state dir $STATE_DIR)"
exit "$rc"

#!/usr/bin/env bash
# A Slurm cluster of one node, this machine, to run examples/train.sbatch as on a real cluster (tests/test_slurm.py
# does): munged, slurmctld and slurmd, started from a state folder with their own slurm.conf, munge key, ports and
# logs, so that nothing in /etc is read or changed and nothing else on the machine is disturbed.
#
#   scripts/slurm-local.sh start [DIR]    # prints the line to use it: export SLURM_CONF=DIR/slurm.conf
#   sbatch --output run.log examples/train.sbatch ...; squeue; scontrol requeue JOB ...
#   scripts/slurm-local.sh stop [DIR]     # cancels what is left, stops the three daemons
#
# Installs nothing: it needs Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs them). The
# daemons run as the user who starts them: as root they run anyone's jobs, as another user only that user's. DIR
# defaults to /tmp/tweetlm-slurm; its *.log files say what went wrong (slurmd.log's "can not load PMIx library"
# lines are harmless: slurmd loads every MPI plugin at start, and jobs here use none).
#
# Settings for a container without systemd or cgroup delegation (as this project's CI, and gVisor): processes are
# tracked through /proc (proctrack/linuxproc), jobs are not confined (task/none) and no accounting is kept. The
# node is this host as `slurmd -C` sees it, in one partition, `local`.
set -euo pipefail

cmd=${1:-}
dir=${2:-/tmp/tweetlm-slurm}
export SLURM_CONF=$dir/slurm.conf

die() {
    echo "slurm-local: $*" >&2
    exit 1
}

running() {  # running NAME PID: that process exists, is NAME and has not exited (a zombie has)
    local comm stat
    comm=$(cat "/proc/$2/comm" 2>/dev/null) && stat=$(cat "/proc/$2/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "$comm" = "$1" ] && [ "${stat:0:1}" != Z ]
}

daemon() {  # daemon NAME: the pid in DIR/NAME.pid if that daemon runs (it deletes the file as it stops)
    local pid
    pid=$(cat "$dir/$1.pid" 2>/dev/null) && running "$1" "$pid" && echo "$pid"
    return 0
}

job_steps() {  # the slurmstepd processes of this cluster's jobs: slurmd passes them our SLURM_CONF
    local proc environ
    for proc in /proc/[0-9]*; do
        running slurmstepd "${proc#/proc/}" && environ=$(tr '\0' '\n' <"$proc/environ" 2>/dev/null) || continue
        [[ $'\n'$environ$'\n' == *$'\n'"SLURM_CONF=$SLURM_CONF"$'\n'* ]] && echo "${proc#/proc/}"
    done
    return 0
}

end() {  # end NAME PID: wait for that process to exit, 15 s, then SIGTERM it and wait 15 s more
    local i
    [ -n "$2" ] || return 0
    for ((i = 0; i < 300; i++)); do
        running "$1" "$2" || return 0
        ((i == 150)) && kill "$2" 2>/dev/null
        sleep 0.1
    done
    die "$1 ($2) does not stop"
}

free_port() {  # a TCP port nothing listens on, from 20000-39999 (bash's /dev/tcp connects to it when something does)
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        (: >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}

show_logs() {
    for log in "$dir"/*.log; do
        [ -f "$log" ] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }
    done
}

start() {
    export PATH=$PATH:/usr/sbin  # the daemons, for users whose PATH lacks it
    for bin in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$bin" >/dev/null || die "$bin not found: apt-get install slurmctld slurmd slurm-client munge"
    done
    [ -z "$(daemon slurmctld)" ] || die "a cluster already runs from $dir: stop it first"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
    chmod 700 "$dir/munge"
    # munged wants every folder above its socket open to all (x), which DIR may not be (pytest's are 700): the
    # socket goes to a folder of its own in /tmp, linked from DIR so that `stop` finds it.
    rm -f "$dir/munge-socket"
    ln -s "$(mktemp -d /tmp/tweetlm-munge.XXXXXX)" "$dir/munge-socket"
    chmod 755 "$dir/munge-socket/"
    local socket
    socket=$(readlink "$dir/munge-socket")/socket
    [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key"
    munged --key-file="$dir/munge/munge.key" --socket="$socket" --pid-file="$dir/munged.pid" \
        --seed-file="$dir/munge/seed" --log-file="$dir/munged.log"
    munge -n -S "$socket" | unmunge -S "$socket" >/dev/null || { show_logs; die "munged does not answer on $socket"; }

    local host node user
    host=$(hostname -s)
    user=$(id -un)  # the daemons run as whoever starts them; not root, they run only that user's jobs
    node=$(slurmd -C | head -n 1)  # NodeName=HOST CPUs=.. Boards=.. SocketsPerBoard=.. ... RealMemory=..
    cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $host, state in $dir.
ClusterName=tweetlm-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it starts again (default 120). 5 is the least; the
# credentials it bounds live for the launch of a job step, well under a second here.
AuthInfo=socket=$socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# Look at pending jobs every second, not every 60: a requeued job starts again as soon as it may.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A job asked to stop (scancel, requeue) gets SIGTERM, then SIGKILL this many seconds later.
KillWait=10
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$SLURM_CONF" -c  # -c: no jobs from an earlier cluster in this folder
    slurmd -f "$SLURM_CONF"

    local i state=
    for ((i = 0; i < 300; i++)); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.1
    done
    [ "$state" = idle ] || { show_logs; stop; die "node $host is '$state', not idle, 30 s after starting (logs above)"; }
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    export PATH=$PATH:/usr/sbin
    local slurmctld slurmd munged jobs i
    slurmctld=$(daemon slurmctld) slurmd=$(daemon slurmd) munged=$(daemon munged)
    if [ -n "$slurmctld" ]; then
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        # shellcheck disable=SC2086
        [ -z "$jobs" ] || scancel $jobs || true
        # Until every job has ended, and the slurmstepd of each of its steps (which outlive slurmd, and may end
        # seconds after Slurm calls the job done): a job gets SIGTERM, then SIGKILL KillWait seconds later.
        for ((i = 0; i < 150; i++)); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && [ -z "$(job_steps)" ] && break
            sleep 0.2
        done
        [ -z "$(job_steps)" ] || echo "slurm-local: job steps still running after 30 s: $(job_steps)" >&2
        scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and every slurmd
    fi
    end slurmd "$slurmd"
    end slurmctld "$slurmctld"
    if [ -n "$munged" ]; then
        munged --stop --socket="$dir/munge-socket/socket" >/dev/null 2>&1 || kill "$munged" 2>/dev/null || true
        end munged "$munged"
    fi
    if [ -L "$dir/munge-socket" ]; then
        rm -rf "$(readlink "$dir/munge-socket")" "$dir/munge-socket"
    fi
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop [DIR]" ;;
esac

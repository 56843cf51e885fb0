#!/bin/sh
# Guest side of `cargo xtask bench` (embedded into the initramfs at /opt/bin/ublk-bench by
# xtask/src/initramfs.rs; the host side is xtask/src/bench.rs).
#
# Runs a fixed fio matrix against kernel baselines (null_blk, loop with direct IO) and our ublk
# devices (null, loop in copy / NEED_GET_DATA / USER_COPY mode, qcow2), with 1 and 2 queues; then
# qcow2 served by qemu-nbd through the kernel nbd driver vs our qcow2, and the kernel nbd driver
# (nbd-client) vs our nbd target, both connected to one qemu-nbd server.
# Progress goes to the console; results go to the second serial port (/dev/ttyS1), which the
# host saves to a file, so kernel messages cannot interleave with them:
#   @@RUN group=G queues=Q dev=D job=J round=R rc=N daemon_ticks=T sys_busy=B sys_total=A win_busy=W
#         win_secs=S win_ios=I win_daemon=T [server_ticks=T win_server=T] win_slices=N win_ctxt=N
#         threads_before=TID:COMM:TICKS:SLICES,... threads_after=...@@
#   <fio --output-format=json output>
#   @@END@@
#   @@SKIP group=G queues=Q dev=D reason=...@@
#   @@INFO key=value@@         (cmd.DEV=... is the exact command that set DEV up)
# Parameters (kernel command-line words): UBLK_BENCH_RUNTIME (seconds per fio run),
# UBLK_BENCH_FILTER (comma-separated substrings of "group:dev/qQ/job"), UBLK_BENCH_FILE_MB,
# UBLK_BENCH_REPEAT (rounds of each job, see `rounds`).

RUNTIME=${UBLK_BENCH_RUNTIME:-8}
SERVER_PID=""
FILTER=${UBLK_BENCH_FILTER:-}
FILE_MB=${UBLK_BENCH_FILE_MB:-512}
REPEAT=${UBLK_BENCH_REPEAT:-1}
# The nbd group's server: qemu-nbd (one thread) or nbdkit (file plugin, a thread pool).
NBD_SERVER=${UBLK_BENCH_NBD_SERVER:-qemu-nbd}
ROUND=1
NULL_GB=4
KO=/lib/modules/$(uname -r)
W=/tmp/bench
RAW=$W/raw.img
QCOW=$W/img.qcow2
# qemu-nbd's copy of the qcow2 image (byte for byte the same), so that qemu-nbd and our qcow2
# never have one image open read-write at the same time.
QCOW_NBD=$W/nbd.qcow2
# rublk's copy (with --rublk).
QCOW_RUBLK=$W/rublk.qcow2
NBD_SOCK=$W/nbd.sock
JOBS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32 read-128k-qd8 write-128k-qd8"

# The images (raw, qcow2 and its copies) need several times FILE_MB of tmpfs, more than its
# default half of RAM.
mount -o remount,size=90% /tmp 2>/dev/null
# qemu-nbd --connect puts its socket in /var/lock unless told otherwise.
mkdir -p $W /var/lock
# Results go to the second serial port, or to a file when there is none (e.g. in vm-shell: ttyS1
# then exists but has no UART behind it, type 0).
if [ "$(cat /sys/class/tty/ttyS1/type 2>/dev/null || echo 0)" != 0 ]; then
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    exec 3>/dev/ttyS1
else
    exec 3>$W/results
    echo "bench: no second serial port; results in $W/results"
fi
out() { printf '%s\n' "$*" >&3; }
log() { echo "bench: [$(cut -d' ' -f1 /proc/uptime)] $*"; }

matches() { # name
    [ -z "$FILTER" ] && return 0
    old_ifs=$IFS; IFS=,
    for f in $FILTER; do
        case "$1" in *"$f"*) IFS=$old_ifs; return 0 ;; esac
    done
    IFS=$old_ifs
    return 1
}

# utime+stime of a whole process (all its threads), in clock ticks.
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Per-thread "tid:comm:ticks:slices" for a process, comma-separated (one awk for all threads:
# forks are slow under TCG); slices: the times the thread was switched in (/proc/.../schedstat,
# empty without CONFIG_SCHED_INFO): its wake-ups, a count that host load does not distort.
thread_ticks() {
    awk 'FILENAME ~ /schedstat$/ { split(FILENAME, p, "/"); sl[p[5]] = $3; next }
        { c = $2; gsub(/[()]/, "", c); t[$1] = c ":" $14 + $15; id[++n] = $1 }
        END { for (i = 1; i <= n; i++) printf "%s%s:%s:%s", (i > 1 ? "," : ""), id[i], t[id[i]], sl[id[i]] }' \
        /proc/$1/task/*/schedstat /proc/$1/task/*/stat 2>/dev/null
}
# Timeslices of all threads of a process (see thread_ticks).
proc_slices() { cat /proc/$1/task/*/schedstat 2>/dev/null | awk '{s += $3} END {print s + 0}'; }
# Context switches of the whole guest so far.
guest_ctxt() { awk '/^ctxt/{print $2}' /proc/stat; }
# Busy and total ticks of all CPUs (busy = all but idle and iowait).
sys_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

# CPU figures come from a window inside fio's steady state: from 1.5 s after fio starts, for
# RUNTIME - 1.5 s (fio's own start-up costs most of a second under TCG and would otherwise weigh
# on every figure). Writes "busy_ticks window_seconds ios daemon_ticks" to $W/win: guest busy
# ticks (both CPUs), the IOs the device completed (/sys/block/DEV/stat), the daemon's ticks.
window() { # dev pid [server-pid]
    rm -f $W/win
    [ "$RUNTIME" -ge 3 ] || return 0
    (
        blk=/sys/block/${1#/dev/}/stat
        srv=${3:-}
        sleep 1.5
        set -- "$2" $(sys_ticks) $(cut -d' ' -f1 /proc/uptime) $(awk '{print $1 + $5}' $blk) \
            $([ -n "$2" ] && proc_ticks "$2" || echo 0) $([ -n "$srv" ] && proc_ticks "$srv" || echo 0) \
            $([ -n "$2" ] && proc_slices "$2" || echo 0) $(guest_ctxt)
        sleep $((RUNTIME - 2)).5
        set -- "$@" $(sys_ticks) $(cut -d' ' -f1 /proc/uptime) $(awk '{print $1 + $5}' $blk) \
            $([ -n "$1" ] && proc_ticks "$1" || echo 0) $([ -n "$srv" ] && proc_ticks "$srv" || echo 0) \
            $([ -n "$1" ] && proc_slices "$1" || echo 0) $(guest_ctxt)
        # busy secs ios daemon server daemon-slices guest-ctxt
        echo "$((${10} - $2)) $(awk -v a="$4" -v b="${12}" 'BEGIN{printf "%.2f", b - a}') $((${13} - $5)) $((${14} - $6)) $((${15} - $7)) $((${16} - $8)) $((${17} - $9))" >$W/win
    ) &
    WINDOW_PID=$!
}

# Adds a device with another server's command line and records DEV_name / PID_name. The
# "dev id N: ..." line and the "... daemon pid P ..." line after it (our `ublk add` and rublk
# print the same layout).
UBLK_ADD_OUT=$W/add.out
srv_add() { # name command...
    name=$1; shift
    if ! "$@" >$UBLK_ADD_OUT 2>&1; then
        log "$* failed: $(tr '\n' ' ' <$UBLK_ADD_OUT)"
        return 1
    fi
    id=$(awk '/^dev id/{sub(":", "", $3); print $3; exit}' $UBLK_ADD_OUT)
    pid=$(awk '/daemon pid/{for (i = 1; i < NF; i++) if ($i == "pid") {print $(i + 1); exit}}' $UBLK_ADD_OUT)
    dev=/dev/ublkb$id
    i=0
    while [ ! -b "$dev" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b "$dev" ] || { log "$dev did not appear"; return 1; }
    eval "DEV_$name=$dev PID_$name=$pid"
    log "$name: $dev daemon pid $pid ($(grep -A1 '^dev id' $UBLK_ADD_OUT | tail -n 1 | tr -s '\t ' ' '))"
}
# FIO_CPUS: the CPUs fio runs on with one queue (empty: any).
FIO_CPUS=""
ublk_add() { # name args...
    name=$1; shift
    srv_add "$name" /opt/bin/ublk add "$@"
}
# rublk (the libublk-based server), when `cargo xtask bench --rublk PATH` put it in the guest.
RUBLK=0
if [ -x /opt/bin/rublk ]; then
    RUBLK=1
    out "@@INFO rublk_version=$(/opt/bin/rublk --version 2>&1 | head -n 1)@@"
fi
# Adds a device with another server (rublk, kublk) if `cargo xtask bench --rublk/--kublk` put
# it in the guest; a failure skips that device.
peer_add() { # server group name args...
    peer=$1 group=$2 name=$3; shift 3
    [ -x /opt/bin/$peer ] || return 0
    if srv_add "$name" /opt/bin/$peer add "$@"; then
        out "@@INFO cmd.$name=$peer add $*@@"
    else
        skip "$group" $q "$name" "$peer add $* failed"
    fi
}
rublk_add() { peer_add rublk "$@"; } # group name target args...
# kublk (the kernel selftests' ublk server), when `cargo xtask bench --kublk PATH` put it in the
# guest.
KUBLK=0
[ -x /opt/bin/kublk ] && KUBLK=1
kublk_add() { peer_add kublk "$@"; } # group name args...
# Deletes every ublk device (the other servers' first, with their own tools, so that their
# daemons exit cleanly).
del_all() {
    [ $RUBLK = 1 ] && /opt/bin/rublk del -a >/dev/null 2>&1
    [ $KUBLK = 1 ] && /opt/bin/kublk del -a >/dev/null 2>&1
    /opt/bin/ublk del -a
}

# "comm:allowed CPUs:last CPU" of every thread of the processes given.
thread_cpus() { # pid...
    for p in "$@"; do
        for t in /proc/$p/task/*; do
            printf '%s:%s:%s ' "$(cat $t/comm)" "$(awk '/^Cpus_allowed_list/{print $2}' $t/status)" \
                "$(awk '{print $39}' $t/stat)"
        done 2>/dev/null
    done
}

# One fio run: group queues devname job
run() {
    group=$1 q=$2 name=$3 job=$4
    eval "dev=\$DEV_$name pid=\$PID_$name"
    matches "$group:$name/q$q/$job" || return 0
    if [ -z "$dev" ]; then
        return 0
    fi
    case $job in
        randread-4k-qd1) rw=randread bs=4k qd=1 ;;
        randread-4k-qd32) rw=randread bs=4k qd=32 ;;
        randwrite-4k-qd32) rw=randwrite bs=4k qd=32 ;;
        read-128k-qd8) rw=read bs=128k qd=8 ;;
        write-128k-qd8) rw=write bs=128k qd=8 ;;
    esac
    set -- --name="$job" --filename="$dev" --ioengine=io_uring --direct=1 \
        --clocksource=clock_gettime --lat_percentiles=1 --percentile_list=50:99:99.9 \
        --time_based --runtime="$RUNTIME" --rw=$rw --bs=$bs --iodepth=$qd \
        --norandommap --randrepeat=0 --group_reporting --output-format=json --output=$W/fio.json
    [ -n "$FIO_CPUS" ] && [ "$q" = 1 ] && set -- "$@" --cpus_allowed="$FIO_CPUS"
    if [ "$q" = 2 ]; then
        # One job per vCPU, each submitting to the hardware queue of its CPU; same iodepth per job.
        set -- "$@" --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split
        if [ $rw = read ] || [ $rw = write ]; then
            size=$(($(cat /sys/class/block/${dev#/dev/}/size) * 512 / 2))
            set -- "$@" --size=$size --offset_increment=$size
        fi
    fi
    log "$group q$q $name $job ($dev) round $ROUND/$REPEAT"
    t0=0 t1=0 th0="" th1="" WINDOW_PID="" v0=0 v1=0
    [ -n "$pid" ] && t0=$(proc_ticks $pid) && th0=$(thread_ticks $pid)
    [ -n "$SERVER_PID" ] && v0=$(proc_ticks $SERVER_PID)
    s0=$(sys_ticks)
    window "$dev" "$pid" "$SERVER_PID"
    if [ "$group" = nbd_apart ] && [ "$ROUND" = 1 ] && [ "$job" = randwrite-4k-qd32 ]; then
        # Where every thread may run and last ran, once per device (who took which vCPU).
        (sleep 2; log "$name threads (comm:allowed:last cpu): server $(thread_cpus $SERVER_PID)fio \
$(thread_cpus $(pidof fio))${pid:+daemon $(thread_cpus $pid)}") &
    fi
    /opt/bin/fio "$@" >$W/fio.err 2>&1
    rc=$?
    s1=$(sys_ticks)
    [ -n "$pid" ] && t1=$(proc_ticks $pid) && th1=$(thread_ticks $pid)
    [ -n "$SERVER_PID" ] && v1=$(proc_ticks $SERVER_PID)
    [ -n "$WINDOW_PID" ] && wait $WINDOW_PID
    win=$(cat $W/win 2>/dev/null)
    [ $rc = 0 ] || log "fio failed ($rc): $(tail -n 3 $W/fio.err | tr '\n' ' ')"
    set -- $s0 $s1 $win
    srv=""
    [ -n "$SERVER_PID" ] && srv=" server_ticks=$((v1 - v0)) win_server=${9:-}"
    out "@@RUN group=$group queues=$q dev=$name job=$job round=$ROUND rc=$rc daemon_ticks=$((t1 - t0)) sys_busy=$(($3 - $1)) sys_total=$(($4 - $2)) win_busy=${5:-} win_secs=${6:-} win_ios=${7:-} win_daemon=${8:-}$srv win_slices=${10:-} win_ctxt=${11:-} threads_before=$th0 threads_after=$th1@@"
    cat $W/fio.json >&3
    out "@@END@@"
}

# One job on several devices of a group, REPEAT rounds; every other round runs the devices in
# reverse order, so that no device always runs right after the same one.
rounds() { # group queues job devname...
    rg=$1 rq=$2 rj=$3
    shift 3
    rev=""
    for d in "$@"; do rev="$d $rev"; done
    ROUND=1
    while [ $ROUND -le "$REPEAT" ]; do
        if [ $((ROUND % 2)) = 1 ]; then order="$*"; else order=$rev; fi
        for d in $order; do run "$rg" "$rq" "$d" "$rj"; done
        ROUND=$((ROUND + 1))
    done
    ROUND=1
}

skip() { # group queues devname reason
    out "@@SKIP group=$1 queues=$2 dev=$3 reason=$4@@"
    log "SKIP $1 q$2 $3: $4"
}

null_group() { # queues
    q=$1
    rmmod null_blk 2>/dev/null
    DEV_null_blk="" PID_null_blk=""
    if insmod $KO/null_blk.ko queue_mode=2 submit_queues=$q gb=$NULL_GB; then
        i=0; while [ ! -b /dev/nullb0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        DEV_null_blk=/dev/nullb0
        log "null_blk: $(cat /sys/block/nullb0/queue/nr_requests 2>/dev/null) requests, hw queues (poll queue included): $(ls /sys/block/nullb0/mq | wc -l)"
    else
        skip null $q null_blk "insmod null_blk failed"
    fi
    DEV_ublk_null="" PID_ublk_null="" DEV_ublk_null_c="" PID_ublk_null_c="" DEV_ublk_null_z="" PID_ublk_null_z=""
    DEV_ublk_null_b="" PID_ublk_null_b="" DEV_rublk_null="" PID_rublk_null="" DEV_rublk_null_u="" PID_rublk_null_u=""
    DEV_kublk_null="" PID_kublk_null="" DEV_kublk_null_u="" PID_kublk_null_u=""
    # The null target uses no data: by default it uses user copy, where nothing is copied at
    # all (as in zero copy); --copy forces copy mode (the kernel copies READ data from the
    # daemon's buffer, WRITE data into it).
    ublk_add ublk_null -t null -q $q --size ${NULL_GB}G || skip null $q ublk_null "ublk add failed"
    ublk_add ublk_null_c -t null --copy -q $q --size ${NULL_GB}G || skip null $q ublk_null_c "ublk add --copy failed"
    if [ $ZERO_COPY = 1 ]; then
        ublk_add ublk_null_z -t null -z -q $q --size ${NULL_GB}G || skip null $q ublk_null_z "ublk add -z failed"
    fi
    if [ $BATCH = 1 ]; then
        ublk_add ublk_null_b -t null -b -q $q --size ${NULL_GB}G || skip null $q ublk_null_b "ublk add -b failed"
    fi
    # rublk: its default (copy mode), and with user copy, where its null target copies nothing.
    rublk_add null rublk_null null -q $q
    rublk_add null rublk_null_u null -u -q $q
    # kublk: the same two (copy mode is its default).
    kublk_add null kublk_null -t null -q $q
    kublk_add null kublk_null_u -t null -u -q $q
    for job in $JOBS; do
        rounds null $q $job null_blk ublk_null ublk_null_c ublk_null_z ublk_null_b rublk_null rublk_null_u \
            kublk_null kublk_null_u
    done
    del_all
    rmmod null_blk
}

loop_group() { # queues
    q=$1
    DEV_loop="" PID_loop=""
    if l=$(/opt/bin/losetup --direct-io=on --show -f $RAW); then
        dio=$(cat /sys/block/${l#/dev/}/loop/dio)
        if [ "$dio" = 1 ]; then DEV_loop=$l; else skip loop $q loop "dio=$dio, not direct IO"; fi
        log "loop: $l dio=$dio"
    else
        skip loop $q loop "losetup failed"
    fi
    for v in ublk_loop ublk_loop_g ublk_loop_c ublk_loop_z ublk_loop_b ublk_qcow2 rublk_loop kublk_loop kublk_loop_z; do
        eval "DEV_$v='' PID_$v=''"
    done
    ublk_add ublk_loop -t loop -q $q -f $RAW || skip loop $q ublk_loop "ublk add failed"
    ublk_add ublk_loop_g -t loop -q $q -g -f $RAW || skip loop $q ublk_loop_g "ublk add -g failed"
    ublk_add ublk_loop_c -t loop -q $q --copy -f $RAW || skip loop $q ublk_loop_c "ublk add --copy failed"
    if [ $ZERO_COPY = 1 ]; then
        ublk_add ublk_loop_z -t loop -q $q -z -f $RAW || skip loop $q ublk_loop_z "ublk add -z failed"
    fi
    if [ $BATCH = 1 ]; then
        ublk_add ublk_loop_b -t loop -q $q -b -f $RAW || skip loop $q ublk_loop_b "ublk add -b failed"
    fi
    ublk_add ublk_qcow2 -t qcow2 -q $q -f $QCOW || skip loop $q ublk_qcow2 "ublk add -t qcow2 failed"
    # rublk loop: O_DIRECT on the same file, its default.
    rublk_add loop rublk_loop loop -q $q -f $RAW
    # kublk loop: O_DIRECT on the same file, through its buffers (its default), and with the
    # request pages registered in its io_uring (--auto_zc), like our -z.
    kublk_add loop kublk_loop -t loop -q $q $RAW
    [ $ZERO_COPY = 1 ] && kublk_add loop kublk_loop_z -t loop --auto_zc -q $q $RAW
    for job in $JOBS; do
        rounds loop $q $job loop ublk_loop ublk_loop_g ublk_loop_c ublk_loop_z ublk_loop_b ublk_qcow2 rublk_loop \
            kublk_loop kublk_loop_z
    done
    del_all
    [ -n "$l" ] && /opt/bin/losetup -d $l
}

# Wait until the nbd device has a size (it is connected); false after 10 s.
nbd_ready() { # /dev/nbdN
    i=0
    while [ "$(cat /sys/block/${1#/dev/}/size 2>/dev/null || echo 0)" = 0 ] && [ $i -lt 100 ]; do
        sleep 0.1; i=$((i + 1))
    done
    [ "$(cat /sys/block/${1#/dev/}/size 2>/dev/null || echo 0)" != 0 ]
}

# Why the kernel nbd driver cannot be used, or nothing.
nbd_missing() {
    [ -e /sys/module/nbd ] || { echo "nbd module not loaded (no nbd.ko for $(uname -r)?)"; return; }
    [ -b /dev/nbd0 ] && [ -b /dev/nbd1 ] || { echo "no /dev/nbd0 and /dev/nbd1"; return; }
    [ -x /opt/bin/qemu-nbd ] || echo "qemu-nbd missing from the initramfs"
}

# Wait for a process to exit (at most 10 s).
wait_gone() { # pid
    i=0
    while [ -n "$1" ] && [ -d /proc/$1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
}

# qemu-nbd's cache and AIO options: O_DIRECT (cache=none) with io_uring, else native AIO, else
# threads; tmpfs accepts O_DIRECT from Linux 6.6 on. Probed once on the raw file.
QNBD_OPTS=""
qnbd_opts() {
    [ -n "$QNBD_OPTS" ] && return 0
    for o in "--cache=none --aio=io_uring" "--cache=none --aio=native" "--cache=writeback --aio=threads"; do
        # shellcheck disable=SC2086
        if /opt/bin/qemu-nbd --fork -f raw $o -k $W/probe.sock --pid-file=$W/probe.pid $RAW \
            >$W/probe.out 2>&1; then
            kill "$(cat $W/probe.pid)" 2>/dev/null; wait_gone "$(cat $W/probe.pid)"
            QNBD_OPTS=$o
            out "@@INFO qemu_nbd_opts=$o@@"
            log "qemu-nbd options: $o"
            return 0
        fi
        log "qemu-nbd $o refused: $(tr '\n' ' ' <$W/probe.out)"
    done
    return 1
}

# qcow2 served by qemu-nbd, which connects the kernel nbd driver itself (`--connect`), vs ours.
qcow2_group() { # queues
    q=$1
    DEV_qemu_nbd="" PID_qemu_nbd="" DEV_ublk_qcow2="" PID_ublk_qcow2="" DEV_rublk_qcow2="" PID_rublk_qcow2=""
    why=$(nbd_missing)
    if [ -n "$why" ]; then
        skip qcow2 $q qemu_nbd "$why"
    elif ! qnbd_opts; then
        skip qcow2 $q qemu_nbd "qemu-nbd refused every cache/aio choice"
    else
        set -- /opt/bin/qemu-nbd --connect=/dev/nbd0 -f qcow2 $QNBD_OPTS --pid-file=$W/qnbd.pid $QCOW_NBD
        if "$@" >$W/qnbd.out 2>&1 && nbd_ready /dev/nbd0; then
            DEV_qemu_nbd=/dev/nbd0 PID_qemu_nbd=$(cat $W/qnbd.pid)
            out "@@INFO cmd.qemu_nbd=qemu-nbd --connect=/dev/nbd0 -f qcow2 $QNBD_OPTS IMG.qcow2@@"
            log "qemu_nbd: /dev/nbd0 qemu-nbd pid $PID_qemu_nbd ($*)"
        else
            skip qcow2 $q qemu_nbd "qemu-nbd --connect failed: $(tr '\n' ' ' <$W/qnbd.out)"
        fi
    fi
    ublk_add ublk_qcow2 -t qcow2 -q $q -f $QCOW || skip qcow2 $q ublk_qcow2 "ublk add -t qcow2 failed"
    # rublk qcow2 on a copy of its own; its qcow2 target has a single queue.
    [ $q = 1 ] && rublk_add qcow2 rublk_qcow2 qcow2 -q $q -f $QCOW_RUBLK
    for job in $JOBS; do
        rounds qcow2 $q $job qemu_nbd ublk_qcow2 rublk_qcow2
    done
    del_all
    if [ -n "$DEV_qemu_nbd" ]; then
        /opt/bin/qemu-nbd --disconnect /dev/nbd0 >/dev/null 2>&1
        wait_gone "$PID_qemu_nbd"
    fi
}

# One qemu-nbd server (raw file, Unix socket) and two clients connected at the same time: the
# kernel nbd driver (nbd-client) and ours (`ublk add -t nbd`), with as many connections each as
# queues. (qemu-nbd offers multi-conn when it allows more than one client, and ours then opens
# one connection per queue; nbd-client -C N gives the kernel driver N connections and N hardware
# queues.)
# With "apart" (one queue only), group nbd_apart: the server runs on vCPU 1 and everything on the
# client side on vCPU 0, as with a server on another machine: the clients never share a CPU with
# the server. Two cgroup cpusets hold the two sides (this shell, and so fio and our daemons, in
# one; the server in the other), because io_uring's io-wq workers (qemu-nbd's file IO on tmpfs
# goes through one) take their CPUs from the cpuset, not from the affinity of the thread that
# starts them; and the kernel's unbound workqueues, where kernel nbd
# receives, are restricted to vCPU 0. Its devices are nbd_sa, ublk_nbd_sa and ublk_nbd_z_sa.
CG=/sys/fs/cgroup
nbd_group() { # queues [apart]
    q=$1
    g=nbd sfx="" srv_cg="" wq_mask=""
    if [ "${2:-}" = apart ]; then
        g=nbd_apart sfx=_sa srv_cg=$CG/bench_server FIO_CPUS=0
        wq_mask=$(cat /sys/devices/virtual/workqueue/cpumask 2>/dev/null)
        if ! why=$(apart_setup); then
            skip $g $q nbd$sfx "$why"
            skip $g $q ublk_nbd$sfx "$why"
            [ $ZERO_COPY = 1 ] && skip $g $q ublk_nbd_z$sfx "$why"
            apart_undo "$wq_mask"
            return 0
        fi
        log "apart: this shell in $(cat /proc/$$/cgroup), cpus $(cat $CG/bench_client/cpuset.cpus.effective); server cpus $(cat $srv_cg/cpuset.cpus.effective); unbound workqueues $(cat /sys/devices/virtual/workqueue/cpumask) (was $wq_mask)"
    fi
    for v in nbd ublk_nbd ublk_nbd_t ublk_nbd_b ublk_nbd_z; do eval "DEV_$v$sfx='' PID_$v$sfx=''"; done
    SERVER_PID=""
    nbd_devices $q $g "$sfx" "$srv_cg"
    if [ -n "$sfx" ]; then apart_undo "$wq_mask"; fi
}

# The cpusets and the workqueue mask of group nbd_apart; prints why it failed.
apart_setup() {
    if [ ! -f $CG/cgroup.controllers ]; then
        mount -t cgroup2 none $CG 2>/dev/null || { echo "cannot mount cgroup2 on $CG"; return 1; }
    fi
    grep -qw cpuset $CG/cgroup.controllers || { echo "no cpuset controller"; return 1; }
    echo +cpuset >$CG/cgroup.subtree_control 2>/dev/null || { echo "cannot enable cpuset"; return 1; }
    mkdir -p $CG/bench_client $CG/bench_server
    { echo 0 >$CG/bench_client/cpuset.cpus && echo 1 >$CG/bench_server/cpuset.cpus; } 2>/dev/null ||
        { echo "cannot set the cpusets"; return 1; }
    echo $$ >$CG/bench_client/cgroup.procs 2>/dev/null || { echo "cannot move the shell to vCPU 0"; return 1; }
    echo 1 >/sys/devices/virtual/workqueue/cpumask 2>/dev/null ||
        { echo "cannot restrict the unbound workqueues to vCPU 0"; return 1; }
}

apart_undo() { # saved workqueue cpumask
    [ -f $CG/bench_client/cgroup.procs ] && echo $$ >$CG/cgroup.procs 2>/dev/null
    [ -n "$1" ] && echo "$1" >/sys/devices/virtual/workqueue/cpumask 2>/dev/null
    FIO_CPUS=""
}

# Runs a command in the cgroup DIR (empty: where this shell is).
in_cgroup() { # dir command...
    cg_dir=$1; shift
    if [ -n "$cg_dir" ]; then
        sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg_dir" "$@"
    else
        "$@"
    fi
}

nbd_devices() { # queues group suffix server-cgroup
    q=$1 g=$2 sfx=$3 srv_cg=$4
    why=$(nbd_missing)
    [ -z "$why" ] && [ ! -x /opt/bin/nbd-client ] && why="nbd-client missing from the initramfs"
    [ -z "$why" ] && ! qnbd_opts && why="qemu-nbd refused every cache/aio choice"
    rm -f $NBD_SOCK
    if [ -z "$why" ]; then
        if [ "$NBD_SERVER" = nbdkit ]; then
            # nbdkit's file plugin: a pool of 16 threads per connection (-P: written when ready).
            if in_cgroup "$srv_cg" /opt/bin/nbdkit -U $NBD_SOCK -e bench -P $W/srv.pid file $RAW >$W/srv.out 2>&1; then
                SERVER_PID=$(cat $W/srv.pid)
                out "@@INFO cmd.nbd_server=nbdkit -U SOCK -e bench file RAW@@"
                log "nbd server: nbdkit pid $SERVER_PID"
            else
                why="nbdkit server failed: $(tr '\n' ' ' <$W/srv.out)"
            fi
        # shellcheck disable=SC2086
        elif in_cgroup "$srv_cg" /opt/bin/qemu-nbd --fork -f raw $QNBD_OPTS -k $NBD_SOCK -x bench --shared=16 \
            --pid-file=$W/srv.pid $RAW >$W/srv.out 2>&1; then
            SERVER_PID=$(cat $W/srv.pid)
            out "@@INFO cmd.nbd_server=qemu-nbd --fork -f raw $QNBD_OPTS -k SOCK -x bench --shared=16 RAW@@"
            log "nbd server: qemu-nbd pid $SERVER_PID"
        else
            why="qemu-nbd server failed: $(tr '\n' ' ' <$W/srv.out)"
        fi
    fi
    if [ -n "$why" ]; then
        skip $g $q nbd$sfx "$why"
        skip $g $q ublk_nbd$sfx "$why"
        [ -z "$sfx" ] && skip $g $q ublk_nbd_t "$why"
        [ -n "$sfx" ] && skip $g $q ublk_nbd_c$sfx "$why"
        [ -z "$sfx" ] && [ $BATCH = 1 ] && skip $g $q ublk_nbd_b "$why"
        [ $ZERO_COPY = 1 ] && skip $g $q ublk_nbd_z$sfx "$why"
        return 0
    fi
    if /opt/bin/nbd-client -unix $NBD_SOCK /dev/nbd1 -N bench -C $q >$W/nbdc.out 2>&1 &&
        nbd_ready /dev/nbd1; then
        eval "DEV_nbd$sfx=/dev/nbd1"
        out "@@INFO cmd.nbd=nbd-client -unix SOCK /dev/nbd1 -N bench -C N@@"
        log "nbd: /dev/nbd1 ($(tr '\n' ' ' <$W/nbdc.out)) lbs $(cat /sys/block/nbd1/queue/logical_block_size) nr_requests $(cat /sys/block/nbd1/queue/nr_requests) hw queues $(ls /sys/block/nbd1/mq | wc -l)"
    else
        skip $g $q nbd$sfx "nbd-client failed: $(tr '\n' ' ' <$W/nbdc.out)"
    fi
    if ublk_add ublk_nbd$sfx -t nbd -q $q --uri "nbd+unix:///bench?socket=$NBD_SOCK"; then
        out "@@INFO cmd.ublk_nbd=ublk add -t nbd -q N --uri nbd+unix:///bench?socket=SOCK@@"
        eval "d=\${DEV_ublk_nbd$sfx#/dev/}"
        log "ublk_nbd: lbs $(cat /sys/block/$d/queue/logical_block_size) nr_requests $(cat /sys/block/$d/queue/nr_requests) hw queues $(ls /sys/block/$d/mq | wc -l) connections to the server: $(ls -l /proc/$SERVER_PID/fd 2>/dev/null | grep -c socket) sockets in qemu-nbd"
    else
        skip $g $q ublk_nbd$sfx "ublk add -t nbd failed"
    fi
    # Copy mode (the default is user copy where the kernel has it) only with the server apart;
    # the threaded engine and -b only where the server shares the vCPUs (group nbd).
    if [ -n "$sfx" ]; then
        if ublk_add ublk_nbd_c$sfx -t nbd -q $q --copy --uri "nbd+unix:///bench?socket=$NBD_SOCK"; then
            out "@@INFO cmd.ublk_nbd_c=ublk add -t nbd -q N --copy --uri nbd+unix:///bench?socket=SOCK@@"
        else
            skip $g $q ublk_nbd_c$sfx "ublk add -t nbd --copy failed"
        fi
    else
        if ublk_add ublk_nbd_t -t nbd -q $q --nbd-threads --uri "nbd+unix:///bench?socket=$NBD_SOCK"; then
            out "@@INFO cmd.ublk_nbd_t=ublk add -t nbd -q N --nbd-threads --uri nbd+unix:///bench?socket=SOCK@@"
        else
            skip $g $q ublk_nbd_t "ublk add -t nbd --nbd-threads failed"
        fi
        if [ $BATCH = 1 ]; then
            ublk_add ublk_nbd_b -t nbd -q $q -b --uri "nbd+unix:///bench?socket=$NBD_SOCK" ||
                skip $g $q ublk_nbd_b "ublk add -t nbd -b failed"
        fi
    fi
    if [ $ZERO_COPY = 1 ]; then
        ublk_add ublk_nbd_z$sfx -t nbd -q $q -z --uri "nbd+unix:///bench?socket=$NBD_SOCK" ||
            skip $g $q ublk_nbd_z$sfx "ublk add -t nbd -z failed"
    fi
    for job in $JOBS; do
        if [ -n "$sfx" ]; then
            rounds $g $q $job nbd$sfx ublk_nbd$sfx ublk_nbd_c$sfx ublk_nbd_z$sfx
        else
            rounds $g $q $job nbd ublk_nbd ublk_nbd_t ublk_nbd_b ublk_nbd_z
        fi
    done
    del_all
    eval "[ -n \"\$DEV_nbd$sfx\" ]" && /opt/bin/nbd-client -d /dev/nbd1 >/dev/null 2>&1
    kill "$SERVER_PID" 2>/dev/null
    wait_gone "$SERVER_PID"
    SERVER_PID=""
}

out "@@INFO kernel=$(uname -r)@@"
out "@@INFO runtime=$RUNTIME@@"
out "@@INFO features=$(/opt/bin/ublk features 2>/dev/null | tr '\n' ' ')@@"
# Zero copy (-z) needs UBLK_F_AUTO_BUF_REG (Linux 6.16): without it those devices are not made.
ZERO_COPY=0
/opt/bin/ublk features 2>/dev/null | grep -q AUTO_BUF_REG && ZERO_COPY=1
log "zero copy: $ZERO_COPY"
# Batch io commands (-b) need UBLK_F_BATCH_IO (Linux 7.0).
BATCH=0
/opt/bin/ublk features 2>/dev/null | grep -q BATCH_IO && BATCH=1
log "batch io commands: $BATCH"
out "@@INFO cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(awk '/MemTotal/{print $2}' /proc/meminfo) clk_tck=100@@"
log "kernel $(uname -r), ${RUNTIME}s per run, $REPEAT round(s), filter '$FILTER'"
log "writing ${FILE_MB} MiB raw file and fully allocated qcow2 image on tmpfs"
dd if=/dev/zero of=$RAW bs=1M count=$FILE_MB 2>/dev/null
/opt/bin/qemu-img create -q -f qcow2 -o preallocation=full $QCOW ${FILE_MB}M ||
    log "qemu-img create failed (tmpfs: $(df -k /tmp | tail -n 1))"
/opt/bin/qemu-img check $QCOW | tail -n 2 | sed 's/^/bench: qcow2: /'
cp $QCOW $QCOW_NBD || log "cp $QCOW $QCOW_NBD failed"
if [ $RUBLK = 1 ]; then
    cp $QCOW $QCOW_RUBLK || log "cp $QCOW $QCOW_RUBLK failed"
fi
log "tmpfs usage: $(du -sk $W | cut -f1) KiB"

for q in 1 2; do
    null_group $q
    loop_group $q
    qcow2_group $q
    nbd_group $q
done
nbd_group 1 apart
out "@@DONE@@"
exec 3>&-

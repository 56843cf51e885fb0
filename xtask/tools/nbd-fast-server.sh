# Guest script for `cargo xtask vm-shell`: ours against nbd-client with qemu-nbd on a vCPU of its
# own (the cpusets of bench group nbd_apart), once with qemu-nbd as the bench runs it and once
# with glibc's mmap and trim thresholds raised, so that it stops faulting in a fresh buffer for
# every request (33 minor faults per 128k read) and serves about twice the 128k reads.
# Figures and what they mean: docs/BENCHMARKS-HOWTO.md, "A faster server".
#
#   (sleep 25; cat xtask/tools/nbd-fast-server.sh; sleep 480; echo 'poweroff -f') |
#       cargo xtask vm-shell --kernel 7.3 --no-build > out; grep '^EXP' out
#
# Per run: IOPS, qemu-nbd's share of its vCPU, vCPU 0's busy share and its CPU time per IO
# (fio, the client side and our daemon), and qemu-nbd's minor faults per IO (x100).
export PATH=/opt/bin:$PATH
W=/tmp/x; mkdir -p $W; mount -o remount,size=90% /tmp
CG=/sys/fs/cgroup
mount -t cgroup2 none $CG 2>/dev/null
echo +cpuset >$CG/cgroup.subtree_control
mkdir -p $CG/c $CG/s; echo 0 >$CG/c/cpuset.cpus; echo 1 >$CG/s/cpuset.cpus
echo $$ >$CG/c/cgroup.procs
echo 1 >/sys/devices/virtual/workqueue/cpumask
dd if=/dev/urandom of=$W/raw.img bs=1M count=512 2>/dev/null
busy0() { awk '/^cpu0 /{print $2+$3+$4+$7+$8}' /proc/stat; }
run() { # label device
  s0=$(awk '{print $14+$15}' /proc/$SRV/stat); f0=$(awk '{print $10}' /proc/$SRV/stat); b0=$(busy0)
  fio --name=x --filename=$2 --ioengine=io_uring --direct=1 --clocksource=clock_gettime \
      --time_based --runtime=6 --rw=$RW --bs=$BS --iodepth=$QD --cpus_allowed=0 \
      --output-format=terse --terse-version=3 > $W/f.out 2>&1
  s1=$(awk '{print $14+$15}' /proc/$SRV/stat); f1=$(awk '{print $10}' /proc/$SRV/stat); b1=$(busy0)
  case $RW in *write) i=$(cut -d';' -f49 $W/f.out) ;; *) i=$(cut -d';' -f8 $W/f.out) ;; esac
  echo "EXP $PH $RW-$BS $1 iops=$i server%=$(( (s1-s0)*100/600 )) cpu0%=$(( (b1-b0)*100/600 ))" \
       "cpu0_us_per_io=$(( (b1-b0)*10000/(i*6) )) faults_per_io_x100=$(( (f1-f0)*100/(i*6) ))"
}
start() { # environment for qemu-nbd
  sh -c "echo \$\$ >$CG/s/cgroup.procs && exec env $1 qemu-nbd --fork -f raw --cache=none --aio=io_uring -k $W/s -x bench --shared=16 --pid-file=$W/srv.pid $W/raw.img"
  SRV=$(cat $W/srv.pid)
  nbd-client -unix $W/s /dev/nbd1 -N bench -C 1 >/dev/null 2>&1
  ublk add -t nbd -q 1 --uri "nbd+unix:///bench?socket=$W/s" >/dev/null
  ublk add -t nbd -q 1 --copy --uri "nbd+unix:///bench?socket=$W/s" >/dev/null
  Z=""; ublk add -t nbd -q 1 -z --uri "nbd+unix:///bench?socket=$W/s" >/dev/null 2>&1 && Z=/dev/ublkb2
  sleep 2
}
stop() { ublk del -a; nbd-client -d /dev/nbd1 >/dev/null 2>&1; kill $SRV; sleep 2; }
for PH in bench fast; do
  if [ $PH = bench ]; then start X=1; else
    start "MALLOC_MMAP_THRESHOLD_=16777216 MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_TOP_PAD_=16777216"; fi
  for j in "read 128k 8" "write 128k 8" "randread 4k 32" "randwrite 4k 32"; do
    set -- $j; RW=$1 BS=$2 QD=$3
    for r in 1 2; do
      run nbd-client /dev/nbd1; run ours /dev/ublkb0; run ours--copy /dev/ublkb1
      [ -n "$Z" ] && run ours-z $Z
    done
  done
  stop
done
echo EXP done

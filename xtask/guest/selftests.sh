#!/bin/sh
# The kernel's own ublk selftests (tools/testing/selftests/ublk of Linux 7.3, in
# /opt/ublk-selftests) run with our `ublk` as their server: the scripts call
# $(dirname $0)/kublk, which here is a link to /opt/bin/ublk. Driven by `cargo xtask selftests`.
#
# Each test prints "@@SELFTEST name result detail@@" (result PASS, SKIP or FAIL). Tests that need
# what only kublk has (its stripe and fault_inject targets, options such as --nthreads,
# --per_io_tasks, --auto_zc, integrity, shmem_zc, its own parameter checks) are not run; in the
# ones run, lines that start a device with such a target or option are removed first, and the
# result says how many.
#
# Environment: UBLK_SELFTESTS (space-separated test names, default all below),
# UBLK_SELFTESTS_TIMEOUT (seconds per test, default 300).

D=/opt/ublk-selftests
RUN=/tmp/ublk-selftests
TIMEOUT=${UBLK_SELFTESTS_TIMEOUT:-300}
# The tests run (in the kernel's order).
ALL="generic_07 generic_10 null_01 null_02 null_03 loop_01 loop_02 loop_03 loop_04 loop_05 loop_06
loop_07 part_01 recover_01 recover_02 recover_03 recover_04 stress_01 stress_02 stress_06 stress_07"
TESTS=$(echo "${UBLK_SELFTESTS:-$ALL}" | tr ',' ' ')

# Lines dropped from a test, and why (sed patterns): kublk-only targets and threading options;
# quiesce of a batch io device, which `ublk quiesce` refuses because the kernel fails its
# in-flight IO. kublk's --no_ublk_fixed_fd (it then does not register /dev/ublkcN in its ring)
# has no meaning for us and is dropped from the line, which stays.
DROP='/-t stripe/d; /-t fault_inject/d; /--nthreads/d; /--per_io_tasks/d'
DROP_QUIESCE_BATCH='/ublk_run_quiesce_recover .* -b/d'
DROP_OPTIONS='s/ --no_ublk_fixed_fd//'
# The tests are Linux 7.3's: some start batch io devices (-b) without asking whether the kernel
# has them. Where it does not (6.12), those lines go too, as the tests' own feature checks do
# elsewhere.
if ! /opt/bin/ublk features | grep -q BATCH_IO; then
    DROP="$DROP; / -b /d"
fi

mkdir -p $RUN
cp -a $D/. $RUN/
cd $RUN || exit 1
export TMPDIR=$RUN/work
mkdir -p $TMPDIR
failed=0
for t in $TESTS; do
    src=$D/test_$t.sh
    if [ ! -f "$src" ]; then
        echo "@@SELFTEST $t FAIL no such test in the kernel's selftests@@"
        failed=$((failed + 1))
        continue
    fi
    sed -e "$DROP" -e "$DROP_QUIESCE_BATCH" -e "$DROP_OPTIONS" "$src" >$RUN/test_$t.sh
    chmod +x $RUN/test_$t.sh
    dropped=$(( $(wc -l <"$src") - $(wc -l <$RUN/test_$t.sh) ))
    echo "selftests: $t ($dropped kublk-only line(s) removed)"
    start=$(cut -d' ' -f1 /proc/uptime)
    timeout "$TIMEOUT" bash $RUN/test_$t.sh >$RUN/$t.out 2>&1
    rc=$?
    secs=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.0f", b - a}')
    sed "s/^/  $t| /" $RUN/$t.out
    # Sub-tests run in the background report "[FAIL]" without changing the exit code.
    detail="rc=$rc"
    if [ $rc -eq 124 ] || [ $rc -eq 143 ]; then
        detail="timed out after ${TIMEOUT}s"
    fi
    if grep -q '\[FAIL\]' $RUN/$t.out || { [ $rc -ne 0 ] && [ $rc -ne 4 ]; }; then
        result=FAIL
        failed=$((failed + 1))
    elif [ $rc -eq 4 ]; then
        result=SKIP
    else
        result=PASS
    fi
    echo "@@SELFTEST $t $result $detail, ${secs}s, $dropped line(s) removed@@"
    # Leave no device behind for the next test.
    /opt/bin/ublk del -a >/dev/null 2>&1
done
exit $failed

"""Guest scripts the e2e tests share: fio write + verify, one job per virtqueue (with two
vCPUs and two queues blk-mq maps vCPU i to queue i, so job i pinned to CPU i drives queue i),
and reading its results back from the console."""

from __future__ import annotations

import re

_JOB_RE = re.compile(r"DP-FIO (q\d): \(groupid=\d+, jobs=\d+\): err=\s*(\d+)")


def fio_verify_script(size_mib: int, stride_mib: int, queues: int = 2) -> str:
    """randwrite + crc32c verify of size_mib per job, job i at i * stride_mib; prints DP-MQ (the
    guest's hardware queues), DP-FIO-START, each job's err= line and DP-FIO-RC."""
    jobs = "".join(f"[q{i}]\noffset={i * stride_mib}m\ncpus_allowed={i}\n" for i in range(queues))
    return f"""
cat > /tmp/job.fio <<'EOF'
[global]
filename=/dev/vda
ioengine=libaio
direct=1
iodepth=16
bsrange=4k-64k
size={size_mib}m
rw=randwrite
verify=crc32c
do_verify=1
{jobs}EOF
echo "DP-MQ $(ls /sys/block/vda/mq | wc -l)"
echo DP-FIO-START
fio /tmp/job.fio > /tmp/fio.out 2>&1
rc=$?
grep -E 'err=|issued rwts' /tmp/fio.out | sed 's/^ */DP-FIO /'
[ $rc -eq 0 ] || tail -n 40 /tmp/fio.out
echo "DP-FIO-RC $rc"
exit $rc
"""


def timed_verify_job(runtime: int, size: str, bsrange: str = "4k-128k", iodepth: int = 32,
                     offsets: tuple[str, str] = ("0", "128m")) -> str:
    """A fio job file: randwrite + crc32c verify for `runtime` seconds (time based, fatal on
    the first mismatch), jobs q0 and q1 at `offsets`, pinned to vCPUs 0 and 1."""
    return f"""[global]
filename=/dev/vda
ioengine=libaio
direct=1
iodepth={iodepth}
bsrange={bsrange}
rw=randwrite
verify=crc32c
do_verify=1
verify_fatal=1
verify_state_save=0
time_based=1
runtime={runtime}
size={size}
[q0]
offset={offsets[0]}
cpus_allowed=0
[q1]
offset={offsets[1]}
cpus_allowed=1
"""


def fio_in_background(job: str) -> str:
    """Shell: write `job` to /tmp/job.fio, start fio on it in the background ($fpid, output in
    /tmp/fio.out), wait until the disk has seen a write (30 s at most), echo DP-FIO-RUNNING."""
    return f"""
cat > /tmp/job.fio <<'EOF'
{job}EOF
w0=$(awk '{{print $5}}' /sys/block/vda/stat)
fio /tmp/job.fio > /tmp/fio.out 2>&1 &
fpid=$!
i=0
while [ "$(awk '{{print $5}}' /sys/block/vda/stat)" = "$w0" ] && kill -0 $fpid 2>/dev/null \\
        && [ $i -lt 1500 ]; do
    sleep 0.02
    i=$((i + 1))
done
echo DP-FIO-RUNNING
"""


def fio_job_errors(console: str) -> dict[str, str]:
    """job name -> fio's err= of each job the script reported."""
    return dict(_JOB_RE.findall(console))

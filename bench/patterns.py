"""The paper's comparison (Kim et al., JIEIE 2016: a KVM guest's block write pattern against the
real machine's), in one command: one fio workload, sequential 128k writes and random 4k writes
running together, on the raw disk and on ext4, seen three ways:

* the guest's block layer: the guest kernel's own blktrace of /dev/vda, Q events (what the
  filesystem and fio submitted) and D events (what the block layer dispatched to virtio-blk
  after merging, splitting and plugging), carried out of the guest on a scratch disk;
* the backend: `dataplane serve` recording what it served (blktrace format, Q and C events),
  started and stopped through the server's runtime API around each fio run, inside the
  guest's blktrace (the guest says when on its console and sleeps 2 s for the host to act;
  the guest's trace has nothing but idle time around the recording);
* bare metal: the same job run by fio on this host (O_DIRECT, a preallocated file for "raw",
  a file on the host's ext4 for "ext4") with --write_iolog (fio's own issue log: the host
  refuses blktrace).

    python -m bench.patterns                       # charts into docs/img/patterns/paper/
    python -m bench.patterns --doc docs/patterns.md  # and the tables into that file

Writes, per scenario, `trace plot` charts of the three views side by side (with --label) and a
table of their differences: request count, size mix, merges and splits, reordering,
sequentiality, write bandwidth.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataplane.backend import EnginePool, ServerOptions, VhostUserBlkServer  # noqa: E402
from dataplane.disks import open_disk  # noqa: E402
from dataplane.guest import (  # noqa: E402
    blktrace_start,
    blktrace_stop,
    build_guest,
    make_scratch,
    read_scratch,
    start_guest,
)
from dataplane.replay import Op, open_trace  # noqa: E402
from dataplane.replay.profile import profile_trace  # noqa: E402
from dataplane.replay.recording import event_counts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
DISK_SIZE = 512 * MiB
SCENARIOS = ("raw", "ext4")
DOC_BEGIN = "<!-- bench.patterns: begin (python -m bench.patterns --doc docs/patterns.md) -->"
DOC_END = "<!-- bench.patterns: end -->"


def job_file(target: str, scenario: str, seq_mb: int, rand_ios: int, iolog_dir: str | None = None) -> str:
    """The fio job: a sequential 128k writer and a random 4k writer at the same time. Raw: on
    the device (the sequential one in the first quarter, the random one in the third); ext4:
    a file each."""
    if scenario == "raw":
        seq = f"filename={target}\noffset=0\nsize={seq_mb}m"
        rand = f"filename={target}\noffset={2 * seq_mb}m\nsize={seq_mb}m"
    else:
        seq = f"filename={target}/seq.dat\nsize={seq_mb}m"
        rand = f"filename={target}/rand.dat\nsize={seq_mb}m"
    log = (lambda name: f"write_iolog={iolog_dir}/{name}.iolog\n") if iolog_dir else (lambda name: "")
    return f"""[global]
ioengine=libaio
direct=1
[seq128k]
rw=write
bs=128k
iodepth=4
{seq}
{log("seq128k")}[rand4k]
rw=randwrite
bs=4k
iodepth=8
number_ios={rand_ios}
{rand}
{log("rand4k")}"""


# ---- the guest, through `dataplane serve` recording ----

def guest_script(args: argparse.Namespace) -> str:
    raw = job_file("/dev/vda", "raw", args.seq_mb, args.rand_ios)
    ext4 = job_file("/mnt", "ext4", args.seq_mb, args.rand_ios)
    return f"""set -e
cat > /tmp/raw.fio <<'EOF'
{raw}EOF
cat > /tmp/ext4.fio <<'EOF'
{ext4}EOF
echo "DP-SERIAL $(cat /sys/block/vda/serial)"
{blktrace_start("/tmp/bt-raw")}
echo DP-READY raw; sleep 2
fio /tmp/raw.fio > /tmp/fio-raw.out 2>&1 || {{ tail -n 20 /tmp/fio-raw.out; exit 1; }}
echo DP-DONE raw; sleep 2
{blktrace_stop("/tmp/bt-raw", tar=False)}
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt
fio --create_only=1 /tmp/ext4.fio > /dev/null 2>&1
sync
{blktrace_start("/tmp/bt-ext4")}
echo DP-READY ext4; sleep 2
fio /tmp/ext4.fio > /tmp/fio-ext4.out 2>&1 || {{ tail -n 20 /tmp/fio-ext4.out; exit 1; }}
sync
echo DP-DONE ext4; sleep 2
{blktrace_stop("/tmp/bt-ext4", tar=False)}
umount /mnt
grep -h 'WRITE:' /tmp/fio-raw.out /tmp/fio-ext4.out | sed 's/^ */DP-FIO /'
mkdir -p /tmp/out/raw /tmp/out/ext4
cp /tmp/bt-raw/* /tmp/out/raw/ && cp /tmp/bt-ext4/* /tmp/out/ext4/
tar -cf "$DP_SCRATCH" -C /tmp/out . && sync
"""


def run_guest_views(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Path]]:
    disk_path = work / "guest-disk.img"
    with open(disk_path, "wb") as f:
        f.truncate(DISK_SIZE)
    disk = open_disk(str(disk_path), read_only=False, cache="none", serial="dp-patterns")
    sock = work / "vhost.sock"
    server = VhostUserBlkServer(disk, ServerOptions(socket_path=sock, num_queues=args.queues),
                                EnginePool(poll_ns=0))
    loop = threading.Thread(target=server.serve_forever, name="vhost-server", daemon=True)
    loop.start()
    scratch = make_scratch(work / "scratch.img")
    views: dict[str, dict[str, Path]] = {}
    image = build_guest()
    try:
        handle = start_guest(image, guest_script(args), socket=sock, num_queues=args.queues,
                             scratch=scratch, log_path=work / "console.log")
        with handle:
            for scenario in SCENARIOS:
                if not handle.wait_for_output(f"DP-READY {scenario}", 300):
                    raise RuntimeError(f"the guest never got to {scenario}:\n{handle.output[-3000:]}")
                rec = work / f"backend-{scenario}"
                server.call_in_loop(lambda rec=rec: server.start_recording(rec, "blktrace"))
                if not handle.wait_for_output(f"DP-DONE {scenario}", 600):
                    raise RuntimeError(f"fio on {scenario} did not finish:\n{handle.output[-3000:]}")
                summary = server.call_in_loop(server.stop_recording)
                print(f"  guest {scenario}: the backend recorded {summary['requests']} requests "
                      f"({summary['dropped']} entries dropped)", flush=True)
                views[scenario] = {"backend": rec}
            result = handle.wait(300)
        if result.exit_status != 0:
            raise RuntimeError(f"guest script failed:\n{result.output[-3000:]}")
        for line in result.output.splitlines():
            if line.startswith("DP-FIO "):
                print("  guest fio:", line[7:].strip())
    finally:
        server.stop()
        loop.join(30)
        server.close()
        disk.close()
    files = read_scratch(scratch)
    for name, data in files.items():
        scenario, fname = name.split("/", 1)
        (work / f"guest-{scenario}").mkdir(exist_ok=True)
        (work / f"guest-{scenario}" / fname).write_bytes(data)
    for scenario in SCENARIOS:
        views[scenario]["guest"] = work / f"guest-{scenario}" / "vda"
    return views


# ---- bare metal: fio on this host ----

def run_host_views(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    out = {}
    for scenario in SCENARIOS:
        target_dir = work / f"host-{scenario}"
        target_dir.mkdir()
        if scenario == "raw":
            target = target_dir / "disk.img"
            subprocess.run(["fallocate", "-l", str(DISK_SIZE), str(target)], check=True)
            fio_target = str(target)
        else:
            fio_target = str(target_dir)
        jobs = work / f"host-{scenario}.fio"
        jobs.write_text(job_file(fio_target, scenario, args.seq_mb, args.rand_ios, str(target_dir)))
        if scenario == "ext4":
            subprocess.run(["fio", "--create_only=1", str(jobs)], check=True, capture_output=True)
            for f in target_dir.glob("*.iolog"):
                f.unlink()
        proc = subprocess.run(["fio", str(jobs)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"host fio ({scenario}) failed:\n{proc.stdout[-2000:]}{proc.stderr}")
        for line in proc.stdout.splitlines():
            if "WRITE:" in line:
                print(f"  host fio {scenario}:", line.strip())
        out[scenario] = merge_iologs([target_dir / "seq128k.iolog", target_dir / "rand4k.iolog"],
                                     work / f"bare-{scenario}.iolog")
    return out


def merge_iologs(paths: list[Path], dest: Path) -> Path:
    """fio writes one iolog per job, times from each job's start (they start together): one v3
    iolog of both, in time order, each job's file a stream."""
    lines: list[tuple[int, int, str]] = []
    files: list[str] = []
    for order, path in enumerate(paths):
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "add":
                files.append(parts[1])
            if parts:
                lines.append((int(parts[0]), order, line))
    lines.sort()
    body = [line for _, _, line in lines if not line.split()[2] == "add"]
    head = [f"0 {name} add" for name in files]
    dest.write_text("fio version 3 iolog\n" + "\n".join(head + body) + "\n")
    return dest


# ---- the differences ----

def records_of(path: Path, events: str = "queue") -> np.ndarray:
    return open_trace(path, events=events).read_all()


def metrics(records: np.ndarray, events: dict[str, int] | None) -> dict[str, float | int | str]:
    w = records[records["op"] == Op.WRITE]
    lengths = w["length"].astype(np.int64)
    order = np.argsort(records["time_ns"], kind="stable")
    ordered = records[order]
    writes = ordered[ordered["op"] == Op.WRITE]
    big = writes[writes["length"] >= 64 * 1024]
    # The sequential writer's requests (64k and up): how many land below one written before them
    # (reordering), and how many start where the previous one ended (its run survived).
    reordered = continued = 0.0
    if len(big) > 1:
        start = big["offset"].astype(np.int64)
        end = start + big["length"].astype(np.int64)
        reordered = float(np.mean(start[1:] < np.maximum.accumulate(start)[:-1]))
        continued = float(np.mean(start[1:] == end[:-1]))
    span_s = (int(records["time_ns"].max()) - int(records["time_ns"].min())) / 1e9 if len(records) else 0.0
    out: dict[str, float | int | str] = {
        "requests": len(records), "writes": len(w),
        "flushes": int(np.count_nonzero(records["op"] == Op.FLUSH)),
        "reads": int(np.count_nonzero(records["op"] == Op.READ)),
        "mean_write_kib": float(lengths.mean() / 1024) if len(lengths) else 0.0,
        "writes_4k": int(np.count_nonzero(lengths <= 4096)),
        "writes_4k_128k": int(np.count_nonzero((lengths > 4096) & (lengths < 131072))),
        "writes_128k": int(np.count_nonzero(lengths == 131072)),
        "writes_over_128k": int(np.count_nonzero(lengths > 131072)),
        "reordered": reordered,
        "continued": continued,
        "write_mib_s": float(lengths.sum() / MiB / span_s) if span_s else 0.0,
        "span_s": span_s,
    }
    if events is not None:
        out["merges"] = events.get("M", 0) + events.get("F", 0)
        out["splits"] = events.get("X", 0)
    return out


def profile_numbers(path: Path, events: str) -> tuple[float, str]:
    """Sequential share (per stream), and the mean queue depths (Q->C, D->C) when the trace has
    completions."""
    s = profile_trace(path, events=events).summary()
    depth = s["queue_depth"]
    text = "-"
    if depth:
        text = " / ".join(f"{depth[k]['mean']:.2f}" if k in depth else "-" for k in ("block_layer", "device"))
    return s["sequential"]["share"], text


def compare(views: dict[str, Path]) -> list[tuple[str, dict]]:
    guest_events = event_counts(views["guest"])
    cols = [
        ("guest block layer (Q)", metrics(records_of(views["guest"], "queue"), guest_events),
         profile_numbers(views["guest"], "queue")),
        ("guest dispatch (D)", metrics(records_of(views["guest"], "issue"), None),
         profile_numbers(views["guest"], "issue")),
        ("backend (dataplane)", metrics(records_of(views["backend"]), None),
         profile_numbers(views["backend"], "queue")),
        ("bare metal (host fio)", metrics(records_of(views["bare"]), None),
         profile_numbers(views["bare"], "queue")),
    ]
    out = []
    for name, m, (seq, depth) in cols:
        m["sequential"] = seq
        m["depth"] = depth
        out.append((name, m))
    return out


ROWS = [
    ("requests", "requests (writes / flushes / reads)",
     lambda m: f"{m['requests']} ({m['writes']} / {m['flushes']} / {m['reads']})"),
    ("size", "write sizes: <=4k / 4k-128k / 128k / >128k",
     lambda m: f"{m['writes_4k']} / {m['writes_4k_128k']} / {m['writes_128k']} / {m['writes_over_128k']}"),
    ("mean", "mean write size", lambda m: f"{m['mean_write_kib']:.1f} KiB"),
    ("merges", "merges (M, F) / splits (X)",
     lambda m: f"{m['merges']} / {m['splits']}" if "merges" in m else "-"),
    ("reorder", "128k writer: requests landing below an earlier one (reordered)",
     lambda m: f"{m['reordered']:.1%}"),
    ("run", "128k writer: requests starting where the previous ended", lambda m: f"{m['continued']:.1%}"),
    ("seq", "sequential, all requests (per stream: CPU, queue, fio file)",
     lambda m: f"{m['sequential']:.1%}"),
    ("depth", "mean queue depth (Q->C / D->C)", lambda m: m["depth"]),
    ("bw", "write bandwidth (first to last request)",
     lambda m: f"{m['write_mib_s']:.1f} MiB/s over {m['span_s']:.2f} s"),
]


def table(cols: list[tuple[str, dict]]) -> str:
    head = "| | " + " | ".join(name for name, _ in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    rows = [f"| {label} | " + " | ".join(fmt(m) for _, m in cols) + " |" for _, label, fmt in ROWS]
    return "\n".join([head, sep, *rows])


def plot(views: dict[str, Path], out: Path) -> None:
    cmd = [sys.executable, "-m", "dataplane", "trace", "plot", str(views["guest"]), str(views["backend"]),
           str(views["bare"]), "--label", "guest block layer (blktrace in the guest)",
           "--label", "backend (dataplane serve --record)", "--label", "bare metal (fio on the host)",
           "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs/img/patterns/paper",
                   help="charts go to OUT/raw and OUT/ext4")
    p.add_argument("--doc", type=Path, default=None,
                   help="write the tables into this markdown file, between the bench.patterns markers")
    p.add_argument("--keep", type=Path, default=None, help="keep the traces in this directory")
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--seq-mb", type=int, default=32, help="the sequential writer's MiB")
    p.add_argument("--rand-ios", type=int, default=2000, help="the random writer's requests")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dp-patterns-"))
    started = time.monotonic()
    try:
        print("guest: QEMU (TCG) through dataplane serve, recording; blktrace in the guest", flush=True)
        views = run_guest_views(args, work)
        print("bare metal: fio on this host with --write_iolog", flush=True)
        for scenario, path in run_host_views(args, work).items():
            views[scenario]["bare"] = path
        sections = []
        results = {}
        for scenario in SCENARIOS:
            plot(views[scenario], args.out / scenario)
            cols = compare(views[scenario])
            results[scenario] = {name: m for name, m in cols}
            sections.append((scenario, table(cols)))
            print(f"\n{scenario}:\n{sections[-1][1]}")
        (args.out / "differences.json").write_text(json.dumps(results, indent=2) + "\n")
        if args.doc is not None:
            write_doc(args, sections)
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ndone in {time.monotonic() - started:.0f} s; charts in {args.out}", flush=True)
    return 0


def write_doc(args: argparse.Namespace, sections: list[tuple[str, str]]) -> None:
    rel = args.out.resolve().relative_to(args.doc.resolve().parent)
    parts = [DOC_BEGIN, "",
             f"`python -m bench.patterns --doc {args.doc}` ({args.queues} queues, {args.seq_mb} MiB of "
             f"sequential 128k writes and {args.rand_ios} random 4k writes at once), "
             f"{time.strftime('%Y-%m-%d')}:", ""]
    for scenario, text in sections:
        parts += [f"#### {scenario}", "", text, ""]
        for chart in ("offset_time", "sizes", "iops", "queue_depth", "sequentiality"):
            parts.append(f"![{scenario}: {chart}]({rel}/{scenario}/{chart}.png)")
        parts.append("")
    parts.append(DOC_END)
    doc = args.doc.read_text()
    block = "\n".join(parts)
    if DOC_BEGIN in doc:
        doc = re.sub(re.escape(DOC_BEGIN) + ".*?" + re.escape(DOC_END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    args.doc.write_text(doc)


if __name__ == "__main__":
    sys.exit(main())

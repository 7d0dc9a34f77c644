#!/usr/bin/env python3
"""Write the sample traces in this directory: one synthetic workload per format, from a fixed
seed, so every run writes the same bytes. Run from anywhere:

    python traces/make_samples.py [--out DIR]

The workloads are made up (no real trace is copied); the layouts follow each format's public
description (see README.md). blktrace's binary files are written twice, little- and
big-endian, and blkparse's text is printed from the same events the way blkparse prints them.
bad/ holds one malformed file per format, each broken on a known line or record.
"""

from __future__ import annotations

import argparse
import gzip
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20240601
KIB = 1024
SIZES = [512, 4 * KIB, 4 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 64 * KIB, 128 * KIB]


def io_mix(rng: random.Random, n: int, *, trims: bool = True) -> list[tuple[int, str, int, int]]:
    """n (delta_us, op, offset, length) with op in read/write/trim/flush."""
    out = []
    for _ in range(n):
        r = rng.random()
        op = "read" if r < 0.6 else "write" if r < 0.95 else ("trim" if trims and r < 0.98 else "flush")
        length = rng.choice(SIZES) if op != "trim" else rng.choice([64 * KIB, 1024 * KIB])
        offset = rng.randrange(0, 1 << 30, 4096)
        out.append((rng.randrange(1, 4000), op, offset, length))
    return out


# -- fio iologs --------------------------------------------------------------------------------

def fio_v2(rng: random.Random) -> str:
    files = ["/dev/vda", "/dev/vdb"]
    lines = ["fio version 2 iolog"] + [f"{f} add" for f in files] + [f"{f} open" for f in files]
    wait_ms = 0
    for i, (_, op, offset, length) in enumerate(io_mix(rng, 200)):
        f = files[i % 3 == 2]
        if i % 25 == 24:
            wait_ms += rng.randrange(1, 20)
            lines.append(f"{f} wait {wait_ms} 0")
        if op == "flush":
            lines.append(f"{f} {'sync' if i % 2 else 'datasync'} 0 0")
        else:
            lines.append(f"{f} {op} {offset} {length}")
    lines += [f"{f} close" for f in files]
    return "\n".join(lines) + "\n"


def fio_v3(rng: random.Random) -> str:
    files = ["/dev/vda", "/dev/vdb"]
    t = 3
    lines = ["fio version 3 iolog", f"0 {files[0]} add", f"1 {files[1]} add",
             f"2 {files[0]} open", f"2 {files[1]} open"]
    for i, (delta, op, offset, length) in enumerate(io_mix(rng, 200)):
        t += delta
        f = files[i % 4 == 3]
        lines.append(f"{t} {f} sync 0 0" if op == "flush" else f"{t} {f} {op} {offset} {length}")
    lines += [f"{t + 10} {f} close" for f in files]
    return "\n".join(lines) + "\n"


# -- CSV traces --------------------------------------------------------------------------------

def msr(rng: random.Random) -> str:
    t = 128166372003061629  # a Windows FILETIME in February 2007, like the MSR traces
    lines = []
    for delta, op, offset, length in io_mix(rng, 300, trims=False):
        if op == "flush":
            op = "write"
        t += delta * 10  # us -> 100 ns ticks
        disk = 0 if rng.random() < 0.7 else 1
        lines.append(f"{t},hm,{disk},{op.capitalize()},{offset},{length},{rng.randrange(100, 90000)}")
    return "\n".join(lines) + "\n"


def spc(rng: random.Random) -> str:
    t_us = 0
    lines = []
    for delta, op, offset, length in io_mix(rng, 300, trims=False):
        asu = rng.randrange(0, 3)
        lines.append(f"{asu},{offset // 512},{length},{'r' if op == 'read' else 'w'},"
                     f"{t_us // 1_000_000}.{t_us % 1_000_000:06d}")
        t_us += delta
    return "\n".join(lines) + "\n"


def alibaba(rng: random.Random) -> str:
    t = 1577808000000626  # microseconds, 2020-01-01 in Beijing, like the Alibaba traces
    devices = [12, 407, 955]
    lines = []
    for delta, op, offset, length in io_mix(rng, 300, trims=False):
        t += delta
        lines.append(f"{rng.choice(devices)},{'R' if op == 'read' else 'W'},{offset},{length},{t}")
    return "\n".join(lines) + "\n"


# -- blktrace ----------------------------------------------------------------------------------

MAGIC = 0x65617400 | 0x07
TC = {"READ": 1 << 0, "WRITE": 1 << 1, "FLUSH": 1 << 2, "SYNC": 1 << 3, "QUEUE": 1 << 4,
      "ISSUE": 1 << 6, "COMPLETE": 1 << 7, "FS": 1 << 8, "PC": 1 << 9, "NOTIFY": 1 << 10,
      "AHEAD": 1 << 11, "META": 1 << 12, "DISCARD": 1 << 13, "FUA": 1 << 15}
TA = {"Q": 1, "M": 2, "G": 4, "D": 7, "C": 8, "P": 9, "U": 10, "I": 12}
TA_CAT = {"Q": "QUEUE", "M": "QUEUE", "G": "QUEUE", "D": "ISSUE", "C": "COMPLETE", "P": "QUEUE",
          "U": "QUEUE", "I": "QUEUE"}
DEVICE = (8 << 20) | 16  # 8,16: /dev/sdb
COMMS = {1201: "fio", 388: "jbd2/sdb1-8", 77: "kworker/1:1H", 2050: "sg_inq"}


@dataclass
class Event:
    time: int  # ns
    cpu: int
    pid: int
    act: str  # Q M G I D C P U, or "notify-process" / "notify-message"
    cats: tuple[str, ...] = ()
    sector: int = 0
    nbytes: int = 0
    pdu: bytes = b""
    seq: int = field(default=0)

    @property
    def action(self) -> int:
        if self.act == "notify-process":
            return TC["NOTIFY"] << 16
        if self.act == "notify-message":
            return 2 | TC["NOTIFY"] << 16
        cats = 0
        for c in self.cats + (TA_CAT[self.act],):
            cats |= TC[c]
        return (cats << 16) | TA[self.act]


def blk_events(rng: random.Random) -> list[Event]:
    events: list[Event] = []
    t = 5_000_000_000_000  # the kernel's clock, not zero
    for i, (delta, op, offset, length) in enumerate(io_mix(rng, 150)):
        t += delta * 1000 + rng.randrange(0, 999)
        cpu = rng.randrange(2)
        pid = 1201 if rng.random() < 0.85 else 388
        sector = offset // 512
        if op == "flush":  # an empty REQ_PREFLUSH write, issued as a flush request
            q_cats, d_list = ("WRITE", "FLUSH", "SYNC"), [(("READ", "FLUSH"), 0, 0)]
            sector, length = 0, 0
        elif op == "write" and i % 10 == 7:  # a journal commit: PREFLUSH | FUA write
            q_cats = ("WRITE", "FLUSH", "SYNC", "FUA")
            d_list = [(("READ", "FLUSH"), 0, 0), (("WRITE", "SYNC", "FUA"), sector, length)]
        elif op == "write":
            q_cats = ("WRITE", "SYNC") if i % 3 else ("WRITE",)
            d_list = [(q_cats, sector, length)]
        elif op == "trim":
            q_cats = ("WRITE", "DISCARD")
            d_list = [(q_cats, sector, length)]
        else:
            q_cats = ("READ", "AHEAD") if i % 7 == 0 else ("READ", "META") if i % 11 == 0 else ("READ",)
            d_list = [(q_cats, sector, length)]
        events.append(Event(t, cpu, pid, "Q", q_cats, sector, length))
        if i % 13 == 4 and op == "read":  # merged into the previous request: no G/I/D of its own
            events.append(Event(t + 150, cpu, pid, "M", q_cats, sector, length))
            continue
        events.append(Event(t + 200, cpu, pid, "G", q_cats, sector, length))
        events.append(Event(t + 300, cpu, pid, "I", q_cats, sector, length))
        dt = 900
        for cats, d_sector, d_bytes in d_list:
            events.append(Event(t + dt, cpu, pid, "D", cats, d_sector, d_bytes))
            dt += 400
        done = t + dt + rng.randrange(20_000, 400_000)
        for cats, d_sector, d_bytes in d_list:
            events.append(Event(done, rng.randrange(2), 0, "C", cats, d_sector, d_bytes))
            done += 1000
        if i % 40 == 0:
            events.append(Event(t + 50, cpu, pid, "P"))
            events.append(Event(t + 700, cpu, pid, "U", pdu=struct.pack(">Q", 1)))
    # A SCSI passthrough request, which carries a CDB and no sectors: neither Q nor D counts it.
    cdb = bytes.fromhex("1201000024") + bytes(11)
    events.append(Event(t + 5000, 0, 2050, "D", ("READ", "PC"), 0, 36, pdu=cdb))
    events.sort(key=lambda e: e.time)
    for prev, ev in zip(events, events[1:], strict=False):
        ev.time = max(ev.time, prev.time + 1)  # no ties, so every merge order agrees
    # blktrace logs a pid's name once per CPU before its first event there, and a message.
    out: list[Event] = [Event(events[0].time - 10, 0, 0, "notify-message", pdu=b"sample trace\0")]
    seen = set()
    for ev in events:
        if ev.pid and (ev.cpu, ev.pid) not in seen:
            seen.add((ev.cpu, ev.pid))
            out.append(Event(ev.time, ev.cpu, ev.pid, "notify-process", pdu=COMMS[ev.pid].encode() + b"\0"))
        out.append(ev)
    seqs = {0: 0, 1: 0}
    for ev in out:
        if not ev.act.startswith("notify"):  # the kernel leaves notes' sequence at 0
            seqs[ev.cpu] += 1
            ev.seq = seqs[ev.cpu]
    return out


def blktrace_bytes(events: list[Event], cpu: int, order: str) -> bytes:
    pack = struct.Struct(order + "IIQQIIIIIHH").pack
    return b"".join(pack(MAGIC, ev.seq, ev.time, ev.sector, ev.nbytes, ev.action, ev.pid, DEVICE, ev.cpu,
                         0, len(ev.pdu)) + ev.pdu for ev in events if ev.cpu == cpu)


def rwbs(ev: Event) -> str:
    """blkparse's fill_rwbs."""
    c = set(ev.cats)
    s = "F" if "FLUSH" in c else ""
    s += "D" if "DISCARD" in c else "W" if "WRITE" in c else "R" if ev.nbytes else "N"
    s += "F" if "FUA" in c else ""
    s += "A" if "AHEAD" in c else ""
    s += "S" if "SYNC" in c else ""
    s += "M" if "META" in c else ""
    return s


def dump_pdu(pdu: bytes) -> str:
    """blkparse's dump_pdu: hex bytes, cut after the first zero that only zeroes follow."""
    out = []
    for i, b in enumerate(pdu):
        out.append(f"{b:02x}")
        if not any(pdu[i:]):
            out.append("..")
            break
    return " ".join(out)


def blkparse_text(events: list[Event]) -> str:
    genesis = min(ev.time for ev in events)
    lines = []
    for ev in events:
        if ev.act == "notify-process":
            continue
        t = ev.time - genesis
        act = "m" if ev.act == "notify-message" else ev.act
        flags = rwbs(ev) if act != "m" else "N"
        head = (f"{DEVICE >> 20:3d},{DEVICE & 0xFFFFF:<3d} {ev.cpu:2d} {ev.seq:8d} "
                f"{t // 10**9:5d}.{t % 10**9:09d} {ev.pid:5d} {act:>2s} {flags:>3s} ")
        name = COMMS.get(ev.pid, "swapper/0")
        sectors = ev.nbytes >> 9
        if act == "m":
            tail = ev.pdu.rstrip(b"\0").decode()
        elif act == "C":
            tail = f"{ev.sector} + {sectors} [0]" if sectors else f"{ev.sector} [0]"
        elif "PC" in ev.cats:
            tail = f"{ev.nbytes} ({dump_pdu(ev.pdu)}) [{name}]"
        elif act in "QMGID":
            tail = f"{ev.sector} + {sectors} [{name}]" if sectors else f"[{name}]"
        elif act == "P":
            tail = f"[{name}]"
        else:  # U
            tail = f"[{name}] 1"
        lines.append(head + tail)
    reads = [ev for ev in events if ev.act == "Q" and "WRITE" not in ev.cats and ev.nbytes]
    writes = [ev for ev in events if ev.act == "Q" and "WRITE" in ev.cats and ev.nbytes]
    kib = lambda evs: sum(ev.nbytes for ev in evs) // 1024  # noqa: E731
    lines += [
        "CPU0 (8,16):",
        f" Reads Queued:    {len(reads):6d}, {kib(reads):8d}KiB\t Writes Queued:    {len(writes):6d}, "
        f"{kib(writes):8d}KiB",
        "Total (8,16):",
        f" Reads Queued:    {len(reads):6d}, {kib(reads):8d}KiB\t Writes Queued:    {len(writes):6d}, "
        f"{kib(writes):8d}KiB",
        "",
        "Throughput (R/W): 1234KiB/s / 5678KiB/s",
        f"Events (8,16): {len(events)} entries",
        "Skips: 0 forward (0 -   0.0%)",
    ]
    return "\n".join(lines) + "\n"


# -- malformed samples -------------------------------------------------------------------------

def edit_line(text: str, lineno: int, edit) -> str:
    lines = text.split("\n")
    lines[lineno - 1] = edit(lines[lineno - 1])
    return "\n".join(lines)


def write_bad(out: Path, good: dict[str, bytes]) -> None:
    bad = out / "bad"
    bad.mkdir(exist_ok=True)

    def broken(name: str, source: str, lineno: int, edit) -> None:
        (bad / name).write_text(edit_line(good[source].decode(), lineno, edit))

    broken("fio_v3_unknown_action.iolog", "fio_v3.iolog", 8, lambda _: "4242 /dev/vda frobnicate 0 4096")
    broken("msr_bad_number.csv", "msr_sample.csv", 5, lambda line: line.replace(",hm,", ",hm,x"))
    broken("spc_missing_field.spc", "spc_sample.spc", 3, lambda line: line.rsplit(",", 1)[0])
    broken("alibaba_bad_opcode.csv", "alibaba_sample.csv", 2,
           lambda line: line.replace(",R,", ",X,").replace(",W,", ",X,"))
    text = good["sample.blkparse.txt"].decode()
    q_lines = [i for i, line in enumerate(text.split("\n"), 1) if " Q " in line and " + " in line]
    broken("blkparse_bad_sector.txt", "sample.blkparse.txt", q_lines[2],
           lambda line: line.replace(" + ", " + x"))
    le = bytearray(good["sample_le.blktrace.0"])
    at = 0
    for _ in range(3):  # step over records 1-3 and their payloads
        at += 48 + struct.unpack_from("<H", le, at + 46)[0]
    le[at:at + 4] = b"\xde\xad\xbe\xef"  # record 4's magic
    (bad / "badmagic.blktrace.0").write_bytes(bytes(le))
    (bad / "truncated.blktrace.0").write_bytes(good["sample_le.blktrace.0"][:-20])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "fio_v2.iolog": fio_v2(random.Random(SEED + 1)).encode(),
        "fio_v3.iolog": fio_v3(random.Random(SEED + 2)).encode(),
        "msr_sample.csv": msr(random.Random(SEED + 3)).encode(),
        "spc_sample.spc": spc(random.Random(SEED + 4)).encode(),
        "alibaba_sample.csv": alibaba(random.Random(SEED + 5)).encode(),
    }
    events = blk_events(random.Random(SEED + 6))
    for order, tag in (("<", "le"), (">", "be")):
        for cpu in (0, 1):
            files[f"sample_{tag}.blktrace.{cpu}"] = blktrace_bytes(events, cpu, order)
    files["sample.blkparse.txt"] = blkparse_text(events).encode()
    for name, data in files.items():
        (out / name).write_bytes(data)
    # One gzip'd copy (mtime 0, so the bytes do not change from run to run).
    with open(out / "msr_sample.csv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(files["msr_sample.csv"])
    write_bad(out, files)


if __name__ == "__main__":
    main()

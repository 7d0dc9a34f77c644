"""`dataplane serve` without CPU pinning, for the placement comparison of bench.compare.

`dataplane serve` always pins each I/O thread where its placement plan says; this starts the
same server with an EnginePool that has no placement, so every `dp-vq<i>` thread is left to
the scheduler (what the in-process test backend does).

    python -m bench.unpinned_serve --socket PATH --disk null:1G [--queues N] [--poll-us US]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dataplane.backend import EnginePool, ServerOptions, VhostUserBlkServer, install_signal_handlers
from dataplane.disks import open_disk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unpinned_serve", description=__doc__)
    p.add_argument("--socket", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--cache", choices=["none", "writeback"], default="none")
    p.add_argument("--poll-us", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    disk = open_disk(args.disk, read_only=False, cache=args.cache, serial="bench-unpinned")
    try:
        server = VhostUserBlkServer(disk, ServerOptions(socket_path=Path(args.socket),
                                                        num_queues=args.queues),
                                    EnginePool(poll_ns=args.poll_us * 1000))
    except BaseException:
        disk.close()
        raise
    install_signal_handlers(server)
    try:
        server.serve_forever()
    finally:
        server.close()
        disk.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

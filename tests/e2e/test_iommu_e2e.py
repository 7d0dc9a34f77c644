"""A QEMU 7.2 q35 guest (TCG) whose 2-queue disk sits behind intel-iommu: `dataplane serve`
sees every ring and buffer address as an IOVA and translates it through the IOTLB QEMU fills
on its misses (VIRTIO_F_IOMMU_PLATFORM, BACKEND_REQ, IOTLB_MSG).

What QEMU 7.2 needs under TCG (dataplane.guest.kit.qemu_command(iommu=True)): `-machine q35`,
`-device intel-iommu,intremap=on,device-iotlb=on` before the disk, the disk behind a
`pcie-root-port` with `iommu_platform=on,ats=on`, and `intel_iommu=on` for the guest kernel.
With ATS the guest's default lazy mode makes QEMU send global invalidations of the whole
IOTLB (rings included) every few milliseconds; `iommu.strict=1` makes it one invalidation per
unmapped page instead. Both run fio write+verify on both queues, then the ext4 round trip.
(Lazy mode without ATS would send no invalidation at all: QEMU 7.2 loses them, unsafe for any
vhost-user backend, so it is not what the kit boots.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_backend_e2e import (
    EPILOGUE,
    EXT4_BODY,
    EXT4_CHECKS,
    GUEST_TIMEOUT,
    PRELUDE,
    _finish,
    assert_ext4_round_trip,
    assert_fio_clean,
    assert_queue_stats,
    fio_body,
)

from dataplane.guest import GuestImage, GuestTimeout, run_guest

if TYPE_CHECKING:
    from conftest import Backend

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

# Kernel messages off the console (a DMA fault report must not land inside a check line),
# counted from dmesg instead: the one QEMU causes itself when Linux resets the device (it
# re-reads SeaBIOS's used index through the IOMMU) comes before the script.
IOMMU_BODY = r"""
dmesg -n 1
faults0=$(dmesg | grep -c 'DMAR: \[DMA')
check iommu-on sh -c 'dmesg | grep -q "DMAR: IOMMU enabled"'
check iommu-platform-acked same "$(cut -c34 /sys/block/vda/device/features)" 1
echo "DP-MODE $(dmesg | grep -o 'TLB invalidation policy: [a-z]* mode')"
"""
FAULTS_TAIL = r"""
echo "DP-DMA-FAULTS $(( $(dmesg | grep -c 'DMAR: \[DMA') - faults0 ))"
dmesg | grep 'DMAR: \[DMA' | tail -n 5 | sed 's/^/DP-DMAR /'
"""
_VIOMMU_RE = re.compile(
    r"vIOMMU: (\d+) update\(s\), (\d+) invalidation\(s\) \((\d+) waited for requests in flight\),"
    r" (\d+) refused; (\d+) miss\(es\) sent.*; (\d+) request\(s\) waited for an entry, (\d+) in vain,"
    r" (\d+) fault\(s\)")


@pytest.mark.parametrize("backend", [pytest.param(("file", 2), id="file-q2")], indirect=True)
@pytest.mark.parametrize("mode,packed", [("lazy", False), ("strict", True)],
                         ids=["lazy-split", "strict-packed"])
def test_fio_verify_and_ext4_behind_intel_iommu(guest_image: GuestImage, backend: Backend,
                                                tmp_path: Path, mode: str, packed: bool) -> None:
    n = backend.queues
    body = IOMMU_BODY + fio_body(n, {"rw": "randwrite", "verify": "crc32c", "do_verify": "1",
                                     "verify_fatal": "1", "verify_state_save": "0"}) + EXT4_BODY \
        + FAULTS_TAIL
    try:
        result = run_guest(guest_image, PRELUDE + body + EPILOGUE, socket=backend.socket,
                           num_queues=n, packed=packed, iommu=True, timeout=2 * GUEST_TIMEOUT,
                           kernel_args=["iommu.strict=1"] if mode == "strict" else [],
                           log_path=tmp_path / "console.log")
    except GuestTimeout as exc:
        pytest.fail(f"{exc}\n--- backend log (tail) ---\n{backend.log_tail()}")
    run = _finish(backend, result)
    run.assert_checks(["iommu-on", "iommu-platform-acked", "fio-observed-running",
                       "fio-exit-status", *EXT4_CHECKS])
    assert run.markers("DP-MODE") == [f"DP-MODE TLB invalidation policy: {mode} mode"], run.diag()
    assert_fio_clean(run, n)
    assert_queue_stats(run, n)
    assert_ext4_round_trip(run, backend)

    log = backend.read_log()
    acked = [line for line in log.splitlines() if "features acked:" in line]
    assert "VIRTIO_F_IOMMU_PLATFORM" in acked[-1], f"features: {acked}{run.diag()}"
    assert "back-end channel open" in log, run.diag()
    sessions = [tuple(map(int, m.groups())) for m in _VIOMMU_RE.finditer(log)]
    assert sessions, f"no vIOMMU line{run.diag()}"
    updates, invalidations, drains, refused, misses, waited, in_vain, faults = sessions[-1]
    assert updates > 1000 and misses > 1000, f"the IOTLB was not used: {sessions[-1]}{run.diag()}"
    assert invalidations > 0, f"QEMU sent no invalidation ({mode} mode){run.diag()}"
    assert refused == 0 and in_vain == 0 and faults == 0, f"{sessions[-1]}{run.diag()}"
    assert waited > 0, run.diag()
    # Every miss the backend sends is for a page a request in flight uses: QEMU answers it, the
    # guest sees no DMA fault (a page asked twice could arrive after the guest unmapped it).
    faults = run.markers("DP-DMA-FAULTS")
    assert faults == ["DP-DMA-FAULTS 0"], f"{faults} {run.markers('DP-DMAR')}{run.diag()}"

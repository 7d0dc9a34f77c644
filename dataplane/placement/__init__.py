"""Where I/O threads run: the host's topology read from sysfs (topology), the plan that maps
vCPU → virtqueue → I/O thread → host CPU → hardware queue for one disk (planner), and the
pool of I/O threads many exports share (pool)."""

from .planner import PER_QUEUE, SHARED, Plan, PlanRow, Policy, parse_policy, plan
from .pool import ExportDemand, PoolRow, Slot, ThreadPool
from .topology import (
    MAX_CPUS,
    BlockDevice,
    DeviceInfo,
    HwQueue,
    Topology,
    format_cpulist,
    iopoll_unsupported,
    parse_cpulist,
)

__all__ = [
    "MAX_CPUS",
    "PER_QUEUE",
    "SHARED",
    "BlockDevice",
    "DeviceInfo",
    "ExportDemand",
    "HwQueue",
    "Plan",
    "PlanRow",
    "PoolRow",
    "Policy",
    "Slot",
    "ThreadPool",
    "Topology",
    "format_cpulist",
    "iopoll_unsupported",
    "parse_cpulist",
    "parse_policy",
    "plan",
]

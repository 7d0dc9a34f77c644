"""Where I/O threads run: the host's topology read from sysfs (topology) and the plan that
maps vCPU → virtqueue → I/O thread → host CPU → hardware queue (planner)."""

from .planner import PER_QUEUE, SHARED, Plan, PlanRow, Policy, parse_policy, plan
from .topology import MAX_CPUS, BlockDevice, DeviceInfo, HwQueue, Topology, format_cpulist, parse_cpulist

__all__ = [
    "MAX_CPUS",
    "PER_QUEUE",
    "SHARED",
    "BlockDevice",
    "DeviceInfo",
    "HwQueue",
    "Plan",
    "PlanRow",
    "Policy",
    "Topology",
    "format_cpulist",
    "parse_cpulist",
    "parse_policy",
    "plan",
]

"""The guest side: the Python `Device` frontend that plays the guest against any
vhost-user-blk backend (device, with its socket client and its rings), and `dataplane load`,
the fio-like load generator whose hot path is the C driver threads (load)."""

from .client import InflightBuffer, VhostUserClient
from .device import BlkRequest, Device
from .load import Job, LoadResult, VerifyState
from .vring import GuestMemory, Vring

__all__ = [
    "BlkRequest",
    "Device",
    "GuestMemory",
    "InflightBuffer",
    "Job",
    "LoadResult",
    "VerifyState",
    "VhostUserClient",
    "Vring",
]

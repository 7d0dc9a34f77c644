"""The old import path of the Python frontend, kept working: `from dataplane.frontend import
Device` and the rest now live in the driver room (dataplane.driver.device, .client, .vring)."""

from .driver.client import INFLIGHT_DESC, INFLIGHT_REGION_HEADER, InflightBuffer, VhostUserClient
from .driver.device import (
    DISCARD_RANGE,
    DRIVER_FEATURES,
    INFLIGHT_FEATURE,
    OUTHDR,
    SECTOR,
    WANTED_PROTOCOL_FEATURES,
    BlkRequest,
    Device,
)
from .driver.vring import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestMemory,
    Vring,
)

__all__ = [
    "DESC",
    "DISCARD_RANGE",
    "DRIVER_FEATURES",
    "INFLIGHT_DESC",
    "INFLIGHT_FEATURE",
    "INFLIGHT_REGION_HEADER",
    "OUTHDR",
    "SECTOR",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "WANTED_PROTOCOL_FEATURES",
    "BlkRequest",
    "Device",
    "GuestMemory",
    "InflightBuffer",
    "VhostUserClient",
    "Vring",
]

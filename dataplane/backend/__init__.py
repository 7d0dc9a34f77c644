"""The vhost-user-blk backend's control plane (`dataplane serve`): the server (sockets, the
session's life, statistics endpoints), the per-message handlers of a session (device), and
the I/O threads the C core serves queues on (engines)."""

from .device import VhostUserBlkDevice, device_features
from .engines import EnginePool, set_debug_switches
from .server import ServerOptions, VhostUserBlkServer, install_signal_handlers, prepare_socket_path
from .stats import fetch_stats, stats_socket_path

__all__ = [
    "EnginePool",
    "ServerOptions",
    "VhostUserBlkDevice",
    "VhostUserBlkServer",
    "device_features",
    "fetch_stats",
    "install_signal_handlers",
    "prepare_socket_path",
    "set_debug_switches",
    "stats_socket_path",
]

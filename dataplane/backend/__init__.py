"""The vhost-user-blk backend's control plane (`dataplane serve`): the daemon (its exports,
the management socket and its methods), the server of one export (sockets, the session's
life, statistics endpoints), the per-message handlers of a session (device), the I/O threads
the C core serves queues on (engines), and sockets handed over by systemd (handover)."""

from .daemon import Daemon, DaemonOptions, device_info, plan_pool
from .device import VhostUserBlkDevice, device_features
from .engines import EnginePool, EngineView, set_debug_switches
from .handover import HandedSockets, sd_notify
from .server import ServerOptions, VhostUserBlkServer, install_signal_handlers, prepare_socket_path
from .stats import fetch_stats, stats_socket_path

__all__ = [
    "Daemon",
    "DaemonOptions",
    "EnginePool",
    "EngineView",
    "HandedSockets",
    "ServerOptions",
    "VhostUserBlkDevice",
    "VhostUserBlkServer",
    "device_features",
    "device_info",
    "fetch_stats",
    "install_signal_handlers",
    "plan_pool",
    "prepare_socket_path",
    "sd_notify",
    "set_debug_switches",
    "stats_socket_path",
]

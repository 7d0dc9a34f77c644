"""dataplane: a multi-queue virtio-blk data plane (vhost-user-blk backend) with a C core.

Each virtqueue is served by its own I/O thread and its own io_uring (see docs/design.md).
"""

__version__ = "0.1.0"

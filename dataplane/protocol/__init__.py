"""What both sides of a vhost-user-blk connection agree on: the vhost-user messages and their
payload structs (vhost_user), and virtio-blk's feature bits, request types, status codes and
config space (virtio_blk). The backend and the driver side both import from here; nothing
here imports from them."""

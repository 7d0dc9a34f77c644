"""Exception types, one per class of failure a user can act on."""


class DataplaneError(Exception):
    """Base class for errors this package raises on purpose."""


class ConfigError(DataplaneError):
    """A bad option, file or value: fix the command line or the config file."""


class ProtocolError(DataplaneError):
    """The peer sent something the vhost-user protocol does not allow."""


class DeviceError(DataplaneError):
    """The device (or the C core) refused or failed an operation."""

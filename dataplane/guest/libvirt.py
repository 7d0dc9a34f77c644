"""The libvirt domain XML of a VM whose disk is a dataplane export (`<disk type='vhostuser'>`),
as the libvirt test boots it and the README shows it.

Checked against Debian 12's libvirt 9.0 with QEMU 7.2. What vhost-user needs of the domain:
guest RAM that the backend can map (`<memoryBacking>` memfd, shared), and the disk as a
vhostuser source on the export's UNIX socket with as many queues as the export offers. QEMU
runs as libvirt-qemu (groups libvirt-qemu and kvm): the export's socket must be reachable by
it (`socket_group = "kvm"`, `socket_mode = "0660"`, every directory above it searchable).

The test guest boots its kernel directly, writes its console to a file and powers off when its
script is done (`<features><acpi/>` is needed for that: without it libvirt passes -no-acpi and
the guest cannot power off); a production VM keeps only the memoryBacking and disk parts.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape, quoteattr


def disk_xml(socket: str | Path, queues: int, *, target: str = "vda", reconnect_s: int = 1,
             indent: str = "    ") -> str:
    """The <disk> element for an export on `socket` with `queues` virtqueues. With reconnect,
    QEMU reconnects reconnect_s after the backend went away (a restart loses nothing: the
    backend offers INFLIGHT_SHMFD); but it also retries forever at start-up when it cannot
    connect, so `virsh start` then blocks until `virsh destroy`."""
    if queues < 1:
        raise ValueError(f"queues must be at least 1, not {queues}")
    if not Path(socket).is_absolute():
        raise ValueError(f"the socket must be an absolute path, not {socket}")
    i = indent
    reconnect = (f"\n{i}    <reconnect enabled='yes' timeout='{int(reconnect_s)}'/>\n{i}  "
                 if reconnect_s > 0 else "")
    return (f"{i}<disk type='vhostuser' device='disk'>\n"
            f"{i}  <driver name='qemu' type='raw' queues='{int(queues)}'/>\n"
            f"{i}  <source type='unix' path={quoteattr(str(socket))}>{reconnect}</source>\n"
            f"{i}  <target dev={quoteattr(target)} bus='virtio'/>\n"
            f"{i}</disk>")


MEMORY_BACKING = """  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>"""


def render_domain_xml(name: str, kernel: Path, initrd: Path, cmdline: str, socket: Path, queues: int,
                      memory_mib: int, console_log: Path, *, vcpus: int = 2, reconnect_s: int = 1) -> str:
    """A TCG `<domain type='qemu'>` booting kernel/initrd with cmdline, its one disk (vda) an
    export on socket, its first serial port written to console_log. Powering off, rebooting
    or crashing ends the domain, so "shut off" means the guest is done."""
    if memory_mib < 64:
        raise ValueError(f"memory_mib must be at least 64, not {memory_mib}")
    if vcpus < 1:
        raise ValueError(f"vcpus must be at least 1, not {vcpus}")
    for label, path in (("kernel", kernel), ("initrd", initrd), ("console_log", console_log)):
        if not Path(path).is_absolute():
            raise ValueError(f"{label} must be an absolute path, not {path}")
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>{int(vcpus)}</vcpu>
{MEMORY_BACKING}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{disk_xml(socket, queues, reconnect_s=reconnect_s)}
    <serial type='file'>
      <source path={quoteattr(str(console_log))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

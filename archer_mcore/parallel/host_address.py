"""The address other hosts reach this process's host at, found on this host.

A Slurm job script can only guess where torchrun puts global rank 0 (its c10d
rendezvous does not promise the first node), so what rank 0 advertises to the rollout
servers is resolved by rank 0 itself, in this order:

1. the interface NCCL_SOCKET_IFNAME, else GLOO_SOCKET_IFNAME, names (the network the
   cluster's collectives use): its IPv4 address. NCCL's forms are read: a comma list,
   `=name` (exact), a prefix; `^...` (exclusions) names no interface and is skipped;
2. the source address the kernel would use to reach the first peer (a UDP socket's
   connect sends nothing);
3. this host's name resolved.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Mapping, Sequence

_SIOCGIFADDR = 0x8915  # linux/sockios.h
IFNAME_VARIABLES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


class HostAddressError(RuntimeError):
    """An interface variable names no interface with an IPv4 address here."""


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface `name`, or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _from_ifname(variable: str, value: str) -> str | None:
    """The address the variable's value selects; None for an exclusion list."""
    if value.startswith("^"):
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    present = [n for _, n in socket.if_nameindex()]
    for name in names:
        exact = name.startswith("=")
        wanted = name.lstrip("=")
        for iface in present:
            if iface == wanted or (not exact and iface.startswith(wanted)):
                addr = interface_ipv4(iface)
                if addr:
                    return addr
    raise HostAddressError(
        f"{variable}={value!r} names no interface with an IPv4 address on "
        f"{socket.gethostname()} (interfaces: {', '.join(present)})"
    )


def _route_source(peer_host: str) -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(peer_host), 9))
            return s.getsockname()[0]
    except OSError:
        return None


def this_host_address(peers: Sequence[str] = (), env: Mapping[str, str] | None = None) -> str:
    """This host's address as seen from `peers` (host names or addresses); see the
    module docstring for the order."""
    env = os.environ if env is None else env
    for variable in IFNAME_VARIABLES:
        if env.get(variable):
            addr = _from_ifname(variable, env[variable])
            if addr:
                return addr
    for peer in peers:
        addr = _route_source(peer)
        if addr:
            return addr
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"

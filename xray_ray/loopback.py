"""The loopback rules: what counts as loopback, Ray's multi-host switch, and Serve's replica gRPC binding.

Ray on Linux advertises, and binds to, the machine's network address even for a node on
127.0.0.1 unless its multi-host mode is off when Ray is *imported*; `use_address` decides
that switch for the Ray a command will use, before Ray is imported. Everything a Ray of
ours starts listens on 127.0.0.1; the one listener Ray does not let us choose, a Serve
replica's inter-deployment gRPC server, is rebound by `bind_serve_replicas_to_loopback`.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
MULTI_HOST_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback_host(host: str) -> bool:
    """True for `127.0.0.1`, `::1`, `::ffff:127.0.0.1`, `localhost`; False for `0.0.0.0`, `::` and every other host."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack listener reports loopback
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def is_loopback_address(address: str) -> bool:
    """True for `127.0.0.1:6379`, `http://localhost:8265`, `ray://[::1]:10001`...; False for any other host."""
    return is_loopback_host(urlsplit(address if "://" in address else f"//{address}").hostname or "")


def use_address(address: str | None) -> None:
    """Choose the Ray this process (and its children) will use, before Ray is imported: `address`
    (kept in RAY_ADDRESS), else RAY_ADDRESS, else a new local Ray.

    A local Ray or a head on loopback needs Ray's multi-host mode off, a remote cluster needs it on.
    """
    if address:
        os.environ["RAY_ADDRESS"] = address
    target = os.environ.get("RAY_ADDRESS", "")
    if not target or is_loopback_address(target):
        os.environ[MULTI_HOST_SWITCH] = "0"
    elif os.environ.get(MULTI_HOST_SWITCH) == "0":
        del os.environ[MULTI_HOST_SWITCH]


def bind_serve_replicas_to_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to every interface ("[::]:0";
    token-checked, but reachable from the network). On a Ray whose node is 127.0.0.1, which every Ray
    this project starts is, a replica binds it to loopback instead; on a cluster it stays as Ray makes it.

    The Serve application's module calls this when it is imported, which a replica does before it
    starts that server."""
    import ray
    from ray.serve._private import replica  # the module whose binding is replaced

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "binds_loopback", False):
        return

    def bind_on_loopback_node(server, address: str) -> int:
        if address.startswith("[::]:") and ray.is_initialized() and ray.util.get_node_ip_address() == LOOPBACK:
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    bind_on_loopback_node.binds_loopback = True
    replica.add_port_to_grpc_server = bind_on_loopback_node

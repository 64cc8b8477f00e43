"""Runtime patches that make torchft 0.2.0's servers listen on one address instead of the wildcard.

``--fault-tolerance torchft`` opens servers that the other replicas (other sites, over the internet)
connect to. torchft 0.2.0 binds them to every interface and has no option to choose one; a replica
must expose them only on ``--ft-bind-address``. Applied by :func:`apply_torchft_patches`, called by
:class:`megatron_ppu.sync.torchft_replicas.TorchFTReplicas` before it creates its Manager; nothing
is patched on import, and a torchft other than ``SUPPORTED_TORCHFT`` is refused (the sources below
are matched literally by :func:`patches._rewrite.rewrite_function`, which fails loudly if they
changed).

Call sites (torchft 0.2.0):

* ``torchft/manager.py`` ``Manager.__init__``: ``bind = f"[::]:{port}"`` is the address of the
  ``ManagerServer`` (the Rust server the lighthouse, the replica's own ranks and healing peers talk
  to). Rewritten to :func:`bind_spec` (``--ft-bind-address:port``).
* ``torchft/checkpointing/http_transport.py`` ``HTTPTransport.__init__``: the heal checkpoint server
  is an ``_IPv6HTTPServer`` (``AF_INET6``) on ``("", 0)``, i.e. every IPv4 and IPv6 interface.
  Rewritten to a server of the bind address's family on ``(--ft-bind-address, 0)``
  (:func:`http_server_class`, :func:`bind_address`).
* ``HTTPTransport.address``: advertises ``socket.gethostname()``, which need not resolve to the bind
  address; rewritten to advertise the bind address (:func:`url_host`).

Not covered (no torchft code involved): torch's ``TCPStore`` (the replica's store, whose address
the lighthouse hands to the other replicas for the cross-replica gloo rendezvous) has no
bind-address option and listens on every interface; the README's "Several sites" says to firewall
its port. The gloo pairs themselves are created on a device for the bind address by
``TorchFTReplicas`` (torch's documented ``ProcessGroupGloo.create_device``), not by a patch.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Optional

from ._rewrite import rewrite_function

logger = logging.getLogger(__name__)

SUPPORTED_TORCHFT = "0.2.0"
_BIND: Optional[str] = None


def _check_version() -> None:
    from importlib.metadata import version

    found = version("torchft")
    if found != SUPPORTED_TORCHFT:
        raise RuntimeError(
            f"megatron_ppu's torchft bind patches were written for torchft {SUPPORTED_TORCHFT}, found {found}. "
            f"Install torchft=={SUPPORTED_TORCHFT} (pip install -e . does it)."
        )


def bind_address() -> str:
    """The address the patched servers listen on (``--ft-bind-address``)."""
    assert _BIND is not None, "apply_torchft_patches() sets the bind address first"
    return _BIND


def bind_spec(port: int) -> str:
    """``host:port`` for the ManagerServer (IPv6 in brackets)."""
    return f"{url_host()}:{port}"


def url_host() -> str:
    """The bind address as a URL host (IPv6 in brackets)."""
    ip = ipaddress.ip_address(bind_address())
    return f"[{ip}]" if ip.version == 6 else str(ip)


def http_server_class():
    """torchft's threading HTTP server class with the bind address's address family."""
    from torchft.http import _IPv6HTTPServer

    if ipaddress.ip_address(bind_address()).version == 6:
        return _IPv6HTTPServer

    class _IPv4HTTPServer(_IPv6HTTPServer):
        address_family = socket.AF_INET

    return _IPv4HTTPServer


def apply_torchft_patches(address: str) -> None:
    """Make torchft's manager server and heal checkpoint server listen on ``address`` (an IP of this
    host, not the wildcard) and advertise it. Idempotent for the same address; a process serves one
    replica rank, so a second, different address raises ``RuntimeError``."""
    global _BIND
    ip = ipaddress.ip_address(address)
    assert not ip.is_unspecified, "the config refuses the wildcard (check_bind_address)"
    if _BIND is not None:
        if _BIND != str(ip):
            raise RuntimeError(f"torchft's servers are already bound to {_BIND} in this process; one process "
                               f"serves one replica rank and cannot also bind {ip}.")
        return
    _check_version()
    import torchft.manager as manager_mod
    from torchft.checkpointing import http_transport

    _BIND = str(ip)
    this = sys.modules[__name__]
    manager_mod._ppu_torchft = this  # the name the rewritten sources below refer to
    http_transport._ppu_torchft = this
    rewrite_function(manager_mod.Manager, "__init__",
                     [('bind = f"[::]:{port}"', "bind = _ppu_torchft.bind_spec(port)")], expected=1)
    rewrite_function(http_transport.HTTPTransport, "__init__",
                     [('server_address = ("", 0)', "server_address = (_ppu_torchft.bind_address(), 0)"),
                      ("self._server = _IPv6HTTPServer(server_address, RequestHandler)",
                       "self._server = _ppu_torchft.http_server_class()(server_address, RequestHandler)")],
                     expected=2)
    rewrite_function(http_transport.HTTPTransport, "address",
                     [("http://{socket.gethostname()}:", "http://{_ppu_torchft.url_host()}:")], expected=1)
    logger.info("torchft %s patched: manager and checkpoint servers bound to %s", SUPPORTED_TORCHFT, _BIND)

"""The listening socket of ``phiclip serve``, bound before the server starts so that a port in use is
reported at once, with the fix, instead of as a traceback from inside the web server."""

from __future__ import annotations

import errno
import ipaddress
import socket


class PortInUseError(OSError):
    """The address and port to serve on are taken by another program (``port``: the one asked for)."""

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.errno = errno.EADDRINUSE
        self.port = port


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:  # a host name: what it resolves to first
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise OSError(f"cannot resolve the host {host!r} ({e.strerror or e}); check --host") from None
    return infos[0][0] if infos else socket.AF_INET


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (port 0: a free port, see ``getsockname()``).

    Raises:
        PortInUseError: the port is taken, naming it and the ``--port`` option.
        OSError: another failure to bind (an address not on this machine...), naming the address.
    """
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: rebind after a restart
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"port {port} on {host} is already in use (another server is listening on it); stop it, or choose "
                f"another port with --port (e.g. --port {port + 1 if 0 < port < 65535 else 8001})",
                port,
            ) from None
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


__all__ = ["PortInUseError", "bind_listener"]

"""Bring a :class:`~sounding.sandbox.world.World` to life on loopback addresses.

Every MX host gets its own 127.x.y.z (Linux routes all of 127.0.0.0/8 to ``lo``, so no
configuration is needed); the DNS server gets ``127.x.255.53``. As root the SMTP servers
listen on port 25 and DNS on 53; otherwise (or when asked) on unprivileged ports.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import time
from pathlib import Path
from types import TracebackType

from ..errors import SandboxError
from .dns_server import SandboxDNS
from .log import SessionLog
from .smtp_server import Clock, SMTPPersonalityServer
from .tls import self_signed_context
from .world import World


def _free_port(ip: str, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


class Sandbox:
    """The simulated mail world, running in the current event loop (DNS in threads).

    ``smtp_port``/``dns_port``: ``None`` = 25/53 as root, 2525/5353 otherwise;
    ``0`` = any free port (tests). ``subnet`` is the second octet of 127.x.0.0/16;
    ``None`` picks one at random (so parallel sandboxes do not collide).
    """

    def __init__(self, world: World, *, subnet: int | None = None,
                 smtp_port: int | None = None, dns_port: int | None = None,
                 log_path: str | Path | None = None, keep_log: bool = True,
                 clock: Clock = time.monotonic) -> None:
        world.validate()
        self.world = world
        self.subnet = subnet if subnet is not None else random.randint(100, 250)
        if not 1 <= self.subnet <= 254:
            raise SandboxError("subnet must be between 1 and 254")
        root = hasattr(os, "geteuid") and os.geteuid() == 0
        self.smtp_port = smtp_port if smtp_port is not None else (25 if root else 2525)
        self.dns_port = dns_port if dns_port is not None else (53 if root else 5353)
        self.log = SessionLog(log_path, keep=keep_log)
        self.clock = clock
        self.dns_ip = f"127.{self.subnet}.255.53"
        self.host_ips: dict[str, str] = {}
        self.servers: dict[str, SMTPPersonalityServer] = {}
        self._dns: SandboxDNS | None = None
        self._assign_ips()

    def _assign_ips(self) -> None:
        used = {h.ip for h in self.world.hosts.values() if h.ip}
        n = 0
        for name in sorted(self.world.hosts):
            host = self.world.hosts[name]
            if not host.resolvable:
                continue
            if host.ip:
                self.host_ips[name] = host.ip
                continue
            while True:
                n += 1
                ip = f"127.{self.subnet}.{n // 250}.{n % 250 + 1}"
                if ip not in used:
                    break
            self.host_ips[name] = ip

    # ----------------------------------------------------------------- running
    @property
    def nameserver(self) -> tuple[str, int]:
        """(address, port) of the world's DNS server."""
        return self.dns_ip, self.dns_port

    async def start(self) -> None:
        """Start DNS and every SMTP server; raise :class:`SandboxError` if a bind fails."""
        if self.smtp_port == 0:
            first = next(iter(self.host_ips.values()), "127.0.0.1")
            self.smtp_port = _free_port(first)
        tls = self_signed_context()
        try:
            self._dns = SandboxDNS(self.world, self.host_ips, self.dns_ip, self.dns_port)
            self._dns.start()
            self.dns_port = self._dns.port
            for name, ip in self.host_ips.items():
                srv = SMTPPersonalityServer(self.world.hosts[name], ip, self.smtp_port,
                                            self.world, self.log, clock=self.clock, tls=tls)
                await srv.start()
                self.servers[name] = srv
        except OSError as exc:
            await self.stop()
            hint = ""
            if exc.errno == errno.EACCES:
                hint = " (ports below 1024 need root: pass another port)"
            elif exc.errno == errno.EADDRINUSE:
                hint = " (address in use: another sandbox on this subnet? pick another subnet)"
            raise SandboxError(f"cannot start the sandbox: {exc}{hint}") from exc

    async def stop(self) -> None:
        """Stop everything (idempotent)."""
        await asyncio.gather(*(s.stop() for s in self.servers.values()))
        self.servers.clear()
        if self._dns is not None:
            self._dns.stop()
            self._dns = None
        self.log.close()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # ------------------------------------------------------------------ helpers
    def ip_of(self, host: str) -> str:
        """The loopback address of an MX host."""
        return self.host_ips[host.lower()]

    def server(self, host: str) -> SMTPPersonalityServer:
        """The running server of an MX host (for its shared state)."""
        return self.servers[host.lower()]

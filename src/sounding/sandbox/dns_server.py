"""Authoritative DNS for a sandbox world (dnslib, UDP and TCP, in threads).

It answers MX (and null MX, RFC 7505), A, TXT (SPF, and any name's ``extra_txt``), PTR and a DNSBL zone in the RFC 5782
convention (reversed octets + zone; ``2.0.0.127.<zone>`` is the mandatory test point).
Domains marked ``servfail`` answer SERVFAIL, ``timeout`` never answer, ``nxdomain`` and every
unknown name answer NXDOMAIN.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from typing import Any

from dnslib import AAAA, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSError, DNSLogger, DNSServer

from .world import World


class _Silent(DNSLogger):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data",
                         logf=lambda s: None)


class WorldResolver(BaseResolver):  # type: ignore[misc]
    """Answers queries from a :class:`World` and the host addresses assigned to it."""

    def __init__(self, world: World, host_ips: dict[str, str]) -> None:
        self.world = world
        self.host_ips = host_ips
        self.queries = 0
        self._lock = threading.Lock()
        self.ptr = {ip: name for name, ip in host_ips.items()} | dict(world.ptr)

    def _soa(self, zone: str) -> RR:
        return RR(zone, QTYPE.SOA, ttl=self.world.ttl,
                  rdata=SOA("ns.sandbox.invalid", "hostmaster.sandbox.invalid",
                            (1, 3600, 600, 86400, 60)))

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        with self._lock:
            self.queries += 1
        reply = request.reply()
        reply.header.aa = 1
        q = request.q
        qname = str(q.qname).rstrip(".").lower()
        qtype = QTYPE[q.qtype]
        ttl = self.world.ttl
        w = self.world

        # The DNSBL zone (RFC 5782 §2.1: reversed IPv4 octets under the zone).
        zone = w.dnsbl_zone.lower()
        if qname.endswith("." + zone):
            rev = qname[: -len(zone) - 1].split(".")
            ip = ".".join(reversed(rev))
            listed = w.dnsbl_listed.get(ip)
            if ip == "127.0.0.2":  # RFC 5782 §5 test point
                listed = "127.0.0.2"
            if listed is None:
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(self._soa(zone))
            elif qtype == "A":
                reply.add_answer(RR(q.qname, QTYPE.A, ttl=ttl, rdata=A(listed)))
            elif qtype == "TXT":
                reply.add_answer(RR(q.qname, QTYPE.TXT, ttl=ttl, rdata=TXT(
                    f"Listed in sandbox {zone}; see https://check.spamhaus.org/query/ip/{ip}")))
            return reply

        if qtype == "PTR" and qname.endswith(".in-addr.arpa"):
            ip = ".".join(reversed(qname[: -len(".in-addr.arpa")].split(".")))
            name = self.ptr.get(ip)
            if name:
                reply.add_answer(RR(q.qname, QTYPE.PTR, ttl=ttl, rdata=PTR(name + ".")))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
            return reply

        texts = w.extra_txt.get(qname)
        if texts is not None and not w.domains.get(qname):
            if qtype in ("TXT", "ANY"):
                for t in texts:
                    reply.add_answer(RR(q.qname, QTYPE.TXT, ttl=0, rdata=TXT(t)))
            else:
                reply.add_auth(self._soa(qname))  # NOERROR/NODATA
            return reply

        dom = w.domains.get(qname)
        if dom is not None:
            if dom.dns == "timeout":
                raise DNSError("simulated timeout: no answer")
            if dom.dns == "servfail":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if dom.dns == "nxdomain":
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(self._soa(qname))
                return reply
        host = w.hosts.get(qname)
        if host is not None and dom is None:
            if host.dns == "timeout":
                raise DNSError("simulated timeout: no answer")
            if host.dns == "servfail":
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if host.dns == "nxdomain":
                host = None  # the MX points at a name that does not exist
        extra = w.extra_a.get(qname)
        if dom is None and host is None and extra is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa(qname))
            return reply

        if qtype in ("MX", "ANY") and dom is not None:
            if dom.null_mx:  # RFC 7505 §3: a single MX with preference 0 and root target
                reply.add_answer(RR(q.qname, QTYPE.MX, ttl=ttl, rdata=MX(".", 0)))
            for pref, h in dom.mx:
                reply.add_answer(RR(q.qname, QTYPE.MX, ttl=ttl, rdata=MX(h + ".", pref)))
        if qtype in ("A", "ANY"):
            ips: list[str] = []
            if host is not None and host.has_address and qname in self.host_ips:
                ips.append(self.host_ips[qname])
            ips.extend(extra or ())
            for ip in ips:
                if ipaddress.ip_address(ip).version == 4:
                    reply.add_answer(RR(q.qname, QTYPE.A, ttl=ttl, rdata=A(ip)))
        if qtype == "AAAA":
            for ip in extra or ():
                if ipaddress.ip_address(ip).version == 6:
                    reply.add_answer(RR(q.qname, QTYPE.AAAA, ttl=ttl, rdata=AAAA(ipaddress.ip_address(ip).exploded)))
        if qtype in ("TXT", "ANY") and dom is not None:
            for txt in ([dom.spf] if dom.spf else []) + list(dom.txt):
                reply.add_answer(RR(q.qname, QTYPE.TXT, ttl=ttl, rdata=TXT(txt)))
        if qtype == "NS" and dom is not None:
            reply.add_answer(RR(q.qname, QTYPE.NS, ttl=ttl, rdata=NS("ns.sandbox.invalid.")))
        if not reply.rr:
            reply.add_auth(self._soa(qname))  # NOERROR/NODATA (RFC 2308 §2.2)
        return reply


class SandboxDNS:
    """UDP and TCP DNS servers on one address, each in its own daemon thread."""

    def __init__(self, world: World, host_ips: dict[str, str], address: str, port: int) -> None:
        self.resolver = WorldResolver(world, host_ips)
        self.address = address
        self.port = port
        self._servers: list[DNSServer] = []

    def start(self) -> None:
        """Bind both sockets and start serving."""
        logger = _Silent()
        for tcp in (False, True):
            srv = DNSServer(self.resolver, port=self.port, address=self.address,
                            tcp=tcp, logger=logger)
            if self.port == 0:  # pick the UDP port first, then TCP on the same number
                self.port = srv.server.server_address[1]
            if not tcp:
                # A burst of queries (a wide list resolves thousands of domains at once) must
                # queue, not be dropped: a lost UDP query costs the client a whole timeout.
                with contextlib.suppress(OSError):
                    srv.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            srv.server.daemon_threads = True
            self._servers.append(srv)
            t = threading.Thread(target=srv.server.serve_forever, kwargs={"poll_interval": 0.05},
                                 daemon=True, name=f"sandbox-dns-{'tcp' if tcp else 'udp'}")
            t.start()

    def stop(self) -> None:
        """Stop both servers and close their sockets."""
        for srv in self._servers:
            srv.server.shutdown()
            srv.server.server_close()
        self._servers.clear()

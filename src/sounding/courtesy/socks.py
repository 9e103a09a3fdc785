"""SOCKS5 egress (python-socks) for users whose own port 25 is blocked."""

from __future__ import annotations

import asyncio
from typing import Any

from ..smtp.client import Opener


def socks_opener(url: str) -> Opener:
    """An opener for :func:`~sounding.smtp.client.run_session` that tunnels through ``url``.

    Proxy failures become :class:`OSError`, which the driver reports as a failed connect.
    """
    from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError
    from python_socks.async_.asyncio import Proxy

    async def open_(host: str, port: int, local_addr: Any = None, **kw: Any
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        proxy = Proxy.from_url(url, rdns=False)
        try:
            sock = await proxy.connect(dest_host=host, dest_port=port)
        except (ProxyError, ProxyConnectionError, ProxyTimeoutError) as exc:
            raise OSError(f"SOCKS5 proxy {url.split('@')[-1]}: {exc}") from exc
        return await asyncio.open_connection(sock=sock, **kw)

    return open_

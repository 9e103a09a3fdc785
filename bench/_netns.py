"""Run a benchmark in a network namespace of its own (as root), so its sandbox can take port 25.

``ip netns exec`` bind-mounts ``/etc/netns/NAME/resolv.conf`` over ``/etc/resolv.conf``, so tools
that only know the system resolver ask the sandbox DNS. Only loopback exists in there: nothing
a benchmark does can leave the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def can_use_netns() -> bool:
    """Root and the ``ip`` tool: a namespace of our own is possible."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def rerun_in_netns(script: Path, argv: list[str], dns_ip: str, *, tag: str = "bench") -> int:
    """Run ``script argv`` (plus ``--no-netns``) in a fresh namespace whose resolver is ``dns_ip``;
    return its exit code. The namespace is deleted afterwards."""
    name = f"sounding-{tag}-{os.getpid()}"
    etc = Path("/etc/netns") / name
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {dns_ip}\noptions timeout:2 attempts:2\n")
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, str(script), *argv,
                               "--no-netns"]).returncode
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
        shutil.rmtree(etc, ignore_errors=True)

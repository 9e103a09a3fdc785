"""Memory benchmark: a million addresses streamed through ``sounding verify-list``.

    python bench/memory.py [--addresses 1000000] [--domains 2000]

A zero-latency sandbox world (every MX answers at once) runs in a process of its own
(session log off); ``sounding verify-list`` runs as a child process exactly as a user would
run it, and its peak resident memory is read from ``wait4``'s rusage. Target: < 300 MB.
The list is written to a temporary CSV (an ``id`` and a ``name`` column around the e-mail
column, as real exports have), the output is checked row by row (one per input row, in order).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import serve_world, world_process  # noqa: E402
from bench._worlds import streaming_addresses, streaming_world  # noqa: E402


def _serve(args: argparse.Namespace) -> None:
    serve_world(streaming_world(args.domains), subnet=args.subnet)


def _run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sounding-mem-") as td:
        src, dst = Path(td) / "list.csv", Path(td) / "out.csv"
        with src.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "email", "name"])
            for i, a in enumerate(streaming_addresses(args.addresses, args.domains)):
                w.writerow([i, a, f"Person {i}"])
        print(f"list: {args.addresses:,} addresses over {args.domains} domains, "
              f"{src.stat().st_size / 1e6:.0f} MB CSV", flush=True)
        world_cmd = [sys.executable, __file__, "serve", "--domains", str(args.domains), "--subnet", str(args.subnet)]
        with world_process(world_cmd, stop_timeout=30) as world:
            cmd = [sys.executable, "-m", "sounding", "verify-list", str(src), "-o", str(dst),
                   "--nameserver", f"{world['dns_ip']}:{world['dns_port']}", "--smtp-port", str(world["smtp_port"]),
                   "--allow-private-mx"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            assert proc.stderr is not None
            tail = proc.stderr.read()[-2000:]
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"verify-list failed:\n{tail}")
        rows = 0
        deliverable = 0
        with dst.open(newline="") as fh:
            r = csv.DictReader(fh)
            for i, row in enumerate(r):
                if row["id"] != str(i):
                    raise SystemExit(f"output row {i} is input row {row['id']}: order lost")
                rows += 1
                deliverable += row["status"] == "deliverable"
        peak = ru.ru_maxrss / 1024
        print(tail.strip().splitlines()[-1] if tail.strip() else "")
        print(f"verify-list: {rows:,} rows out of {args.addresses:,} in, {deliverable:,} deliverable; "
              f"{wall:.0f} s wall, {args.addresses / wall:.0f} addresses/s, "
              f"{ru.ru_utime + ru.ru_stime:.0f} CPU s")
        print(f"peak memory of verify-list: {peak:.0f} MB (target < 300 MB)")
        if rows != args.addresses:
            raise SystemExit("rows were lost")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "serve"])
    ap.add_argument("--addresses", type=int, default=1_000_000)
    ap.add_argument("--domains", type=int, default=2000)
    ap.add_argument("--subnet", type=int, default=78)
    args = ap.parse_args()
    _serve(args) if args.mode == "serve" else _run(args)


if __name__ == "__main__":
    main()

"""Throughput benchmark: Sounding against listwash and py3-validate-email on one sandbox world.

    python bench/throughput.py [--domains 300] [--per-domain 10] [--delay 0.04]
                               [--competitor-domains 60] [--no-competitors]

As root it creates a network namespace of its own (``ip netns``) whose ``resolv.conf``
names the sandbox DNS, because the other tools only speak to port 25 through the system
resolver; the sandbox (DNS on 53, every MX on port 25 of its own 127.x.y.z) runs there in
its own process and every tool runs, one after the other, in a child process of its own, so
CPU seconds and peak memory (``wait4`` rusage) are each tool's alone. Conduct figures
(sessions, RCPT round trips, concurrent sessions per MX host, forbidden commands) are read
from the sandbox's session log, i.e. from what the servers saw. Nothing leaves this machine.

The competitors need ``pip install listwash py3-validate-email`` (the ``bench`` extra).
They are slow by design (listwash pauses 0.4 s between RCPTs; py3-validate-email opens a
session per address), so they run on the first ``--competitor-domains`` domains of the
list; Sounding runs on that same subset *and* on the whole list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import (  # noqa: E402
    HELO,
    SENDER,
    add_child_options,
    aligned,
    conduct,
    log_slice,
    serve_world,
    world_process,
)
from bench._netns import can_use_netns, rerun_in_netns  # noqa: E402
from bench._worlds import throughput_world  # noqa: E402


# --------------------------------------------------------------------------- the world
def _serve(args: argparse.Namespace) -> None:
    """Child: run the sandbox until stdin closes."""
    world, _ = throughput_world(args.domains, args.per_domain, delay=args.delay)
    serve_world(world, subnet=args.subnet, smtp_port=args.smtp_port, dns_port=args.dns_port, log=args.log)


# --------------------------------------------------------------------------- clients
def _client(args: argparse.Namespace) -> None:
    """Child: verify the list with one tool; write {address: status} and the wall time."""
    addrs = json.loads(Path(args.list).read_text())
    t0 = time.perf_counter()
    if args.client == "sounding":
        got = asyncio.run(_run_sounding(addrs, args))
    elif args.client == "listwash":
        from listwash import core

        res = core.verify(addrs, helo=HELO, mail_from=SENDER, fresh=True, workers=8,
                          cache_path=str(Path(args.out).with_suffix(".cache.json")))
        m = {"valid": "deliverable", "invalid": "undeliverable", "catch-all": "risky",
             "do_not_mail": "risky", "unknown": "unknown"}
        got = {a: m.get(res.get(a.lower(), {}).get("verdict", "unknown"), "unknown") for a in addrs}
    elif args.client == "validate-email":
        from concurrent.futures import ThreadPoolExecutor

        from validate_email import validate_email

        def one(a: str) -> str:
            r = validate_email(a, check_blacklist=False, check_smtp=True, smtp_helo_host=HELO,
                               smtp_from_address=SENDER, dns_timeout=5, smtp_timeout=10)
            return {True: "deliverable", False: "undeliverable"}.get(r, "unknown")  # type: ignore[arg-type]

        with ThreadPoolExecutor(8) as ex:  # it has no concurrency of its own: give it 8 threads
            got = dict(zip(addrs, ex.map(one, addrs), strict=True))
    else:
        raise SystemExit(f"unknown client {args.client}")
    wall = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps({"wall": wall, "status": got}))


async def _run_sounding(addrs: list[str], args: argparse.Namespace) -> dict[str, str]:
    from sounding.engine import Verifier
    from sounding.settings import Settings

    s = Settings(helo=HELO, mail_from=SENDER, nameservers=((args.dns_ip, args.dns_port),),
                 smtp_port=args.smtp_port, allow_private_mx=True)
    v = Verifier(s)
    return {x.address: x.status.value async for x in v.verify_many(addrs)}


# --------------------------------------------------------------------------- measuring
def _measure(tool: str, addrs: list[tuple[str, str]], world: dict[str, Any], log: Path,
             tmp: Path) -> dict[str, Any]:
    lst, out = tmp / f"{tool}.list.json", tmp / f"{tool}.out.json"
    lst.write_text(json.dumps([a for a, _ in addrs]))
    start = log.stat().st_size
    cmd = [sys.executable, str(Path(__file__).resolve()), "client", "--client", tool, "--list", str(lst),
           "--out", str(out), "--dns-ip", world["dns_ip"], "--dns-port", str(world["dns_port"]),
           "--smtp-port", str(world["smtp_port"])]
    proc = subprocess.Popen(cmd)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed (exit {proc.returncode})")
    time.sleep(0.3)  # let the servers log the last closes
    res = json.loads(out.read_text())
    n = len(addrs)
    truth = dict(addrs)
    agree = sum(res["status"].get(a) == t for a, t in truth.items())
    r = {"tool": tool, "addresses": n, "wall_s": res["wall"], "addr_per_s": n / res["wall"],
         "cpu_s_per_1000": (ru.ru_utime + ru.ru_stime) / n * 1000, "peak_mem_mb": ru.ru_maxrss / 1024,
         "right_status": agree / n, "statuses": dict(Counter(res["status"].values()))}
    r.update(conduct(log_slice(log, start), n))
    return r


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("tool", "{}"), ("addresses", "{}"), ("addr_per_s", "{:.1f}"), ("sessions_per_addr", "{:.3f}"),
            ("rcpt_rtt_per_addr", "{:.3f}"), ("cpu_s_per_1000", "{:.2f}"), ("peak_mem_mb", "{:.0f}"),
            ("max_sessions_per_host", "{}"), ("right_status", "{:.1%}"), ("forbidden", "{}"),
            ("without_quit", "{}")]
    return aligned([[c for c, _ in cols]] + [[f.format(r[c]) for c, f in cols] for r in rows])


def _inside(args: argparse.Namespace) -> None:
    """Start the world, measure every tool, print the figures."""
    root = os.geteuid() == 0
    _, addrs = throughput_world(args.domains, args.per_domain, delay=args.delay)
    with tempfile.TemporaryDirectory(prefix="sounding-bench-") as td:
        tmp = Path(td)
        log = tmp / "sessions.jsonl"
        log.touch()
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--domains", str(args.domains),
               "--per-domain", str(args.per_domain), "--delay", str(args.delay), "--subnet", str(args.subnet),
               "--smtp-port", "25" if root else "2525", "--dns-port", "53" if root else "5353", "--log", str(log)]
        with world_process(cmd, stop_timeout=10) as world:
            n_hosts = args.domains
            print(f"world: {args.domains} domains on {n_hosts} MX hosts, {len(addrs)} addresses, "
                  f"{args.delay * 1000:.0f} ms before every reply, 70% with PIPELINING; "
                  f"DNS {world['dns_ip']}:{world['dns_port']}, SMTP port {world['smtp_port']}", flush=True)
            subset_domains = {f"tp{i:04d}.example" for i in range(args.competitor_domains)}
            subset = [(a, t) for a, t in addrs if a.split("@")[1] in subset_domains]
            rows = [_measure("sounding", addrs, world, log, tmp)]
            print(_table(rows), flush=True)
            if args.competitor_domains and subset:
                rows.append(_measure("sounding", subset, world, log, tmp))
            competitors = []
            if args.no_competitors:
                pass
            elif world["smtp_port"] != 25:
                print("competitors skipped: they need port 25 and the system resolver (run as root)")
            else:
                for tool, mod in (("listwash", "listwash"), ("validate-email", "validate_email")):
                    try:
                        __import__(mod)
                    except ImportError:
                        print(f"{tool} skipped: pip install listwash py3-validate-email")
                        continue
                    print(f"running {tool} on {len(subset)} addresses ...", flush=True)
                    competitors.append(_measure(tool, subset, world, log, tmp))
            rows += competitors
            print()
            print(_table(rows))
            by = {r["tool"]: r for r in rows[1:]} if len(rows) > 1 else {}
            same = rows[1] if len(rows) > 1 else rows[0]
            for c in competitors:
                print(f"Sounding vs {c['tool']} on the same {c['addresses']} addresses: "
                      f"{same['addr_per_s'] / c['addr_per_s']:.1f}x the addresses per second")
            full = rows[0]
            print(f"Sounding on the whole list: {full['addr_per_s']:.0f} addresses/s, "
                  f"{full['sessions_per_addr']:.3f} sessions/address (target <= 0.15), "
                  f"at most {full['max_sessions_per_host']} concurrent sessions per MX host (limit 2)")
            if "listwash" in by:
                print(f"Sounding (whole list) vs listwash: {full['addr_per_s'] / by['listwash']['addr_per_s']:.1f}x "
                      "(target >= 20x)")
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))


def _outside(args: argparse.Namespace) -> None:
    """As root: run :func:`_inside` in a network namespace of our own; else run it here."""
    if args.no_netns or not can_use_netns():
        _inside(args)
        return
    rc = rerun_in_netns(Path(__file__).resolve(), sys.argv[1:], f"127.{args.subnet}.255.53", tag="bench")
    if rc:
        raise SystemExit(rc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "serve", "client"])
    ap.add_argument("--domains", type=int, default=300)
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--delay", type=float, default=0.04)
    ap.add_argument("--competitor-domains", type=int, default=60)
    ap.add_argument("--no-competitors", action="store_true")
    ap.add_argument("--no-netns", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--subnet", type=int, default=77)
    ap.add_argument("--json", help="also write the figures to this file")
    add_child_options(ap)
    args = ap.parse_args()
    if args.mode == "serve":
        _serve(args)
    elif args.mode == "client":
        _client(args)
    else:
        _outside(args)


if __name__ == "__main__":
    main()

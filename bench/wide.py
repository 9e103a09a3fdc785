"""The wide world: many small receivers, Sounding against the round-trip bound (issue 12).

    python bench/wide.py [--domains 1500] [--min-per 1] [--max-per 5] [--delay 0.04]
                         [--loops asyncio,uvloop] [--json FILE] [--profile DIR]

A long-tail list (``--domains`` domains with 1-5 addresses each, every domain on an MX host
of its own that waits ``--delay`` before every reply, 70 % with PIPELINING, 10 % catch-all)
is verified by two clients, each in a child process of its own (CPU and peak memory from
``wait4`` and the child's own clock):

* **ideal**: a minimal asyncio client written for this world only: every domain at once,
  one session per domain (MX and A lookup, greeting, EHLO, ``MAIL`` + ``RCPT``
  postmaster@ + a random local part + the domain's addresses, pipelined where announced,
  lockstep otherwise, ``QUIT``). It has no courtesy limits, no global cap, no evidence, no
  transcript: the time it takes is the bound set by the round trips and the sandbox.
* **sounding**: the ``Verifier`` with its default settings (courtesy included);
* **baseline** (with ``--baseline SRC``): the same, imported from another checkout's ``src/``.

Both run once under the standard asyncio loop and once under uvloop (when installed), in
the same run against the same sandbox. Conduct figures (sessions per address, concurrent
sessions per MX host, QUIT, forbidden commands, session length) come from the sandbox's
session log, i.e. from what the servers saw. As root the bench runs in a network namespace
of its own with the sandbox on ports 25/53; otherwise on 2525/5353. Nothing leaves this
machine. Goal (issue 12): Sounding <= 2.5x the ideal client.

``--profile DIR`` also writes a cProfile of each Sounding run (``pstats`` files) there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
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
from bench._worlds import wide_world  # noqa: E402


# --------------------------------------------------------------------------- the world
def _world(args: argparse.Namespace) -> Any:
    return wide_world(args.domains, args.min_per, args.max_per, delay=args.delay)


def _serve(args: argparse.Namespace) -> None:
    """Child: run the sandbox until stdin closes."""
    world, _ = _world(args)
    serve_world(world, subnet=args.subnet, smtp_port=args.smtp_port, dns_port=args.dns_port, log=args.log)


# --------------------------------------------------------------------------- the ideal client
async def _reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) reply; return its code (0: connection closed)."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            return 0
        if line[3:4] != b"-":
            return int(line[:3])


async def _ideal_domain(domain: str, addrs: list[str], resolver: Any, port: int) -> dict[str, str]:
    """One session for one domain; statuses of its addresses."""
    try:
        mx = await resolver.resolve(domain, "MX", search=False)
        host = min(mx, key=lambda r: r.preference).exchange.to_text().rstrip(".")
        ip = (await resolver.resolve(host, "A", search=False))[0].to_text()
        reader, writer = await asyncio.open_connection(ip, port)
    except Exception:
        return dict.fromkeys(addrs, "unknown")
    codes: list[int] = []
    try:
        if await _reply(reader) != 220:
            return dict.fromkeys(addrs, "unknown")
        writer.write(f"EHLO {HELO}\r\n".encode())
        pipelining = False
        while True:  # EHLO: read the extension lines ourselves
            line = await reader.readline()
            if len(line) < 4:
                return dict.fromkeys(addrs, "unknown")
            pipelining = pipelining or line[4:].strip().upper() == b"PIPELINING"
            if line[3:4] != b"-":
                break
        probe = "".join(random.choices(string.ascii_lowercase + string.digits, k=14))
        rcpts = [f"postmaster@{domain}", f"{probe}@{domain}", *addrs]
        cmds = [f"MAIL FROM:<{SENDER}>\r\n".encode(), *(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)]
        if pipelining:  # RFC 2920: the whole envelope in one flight
            writer.write(b"".join(cmds))
            codes = [await _reply(reader) for _ in cmds]
        else:
            for c in cmds:
                writer.write(c)
                codes.append(await _reply(reader))
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if len(codes) != len(cmds) or codes[0] != 250:
        return dict.fromkeys(addrs, "unknown")
    catch_all = codes[2] == 250
    out = {}
    for a, c in zip(addrs, codes[3:], strict=True):
        out[a] = ("risky" if catch_all else "deliverable") if c == 250 else \
            "undeliverable" if c in (550, 551, 553) else "unknown"
    return out


async def _run_ideal(addrs: list[str], args: argparse.Namespace) -> dict[str, str]:
    import dns.asyncresolver
    import dns.nameserver

    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(args.dns_ip, args.dns_port)]
    r.timeout, r.lifetime = 5.0, 12.0
    by_domain: dict[str, list[str]] = defaultdict(list)
    for a in addrs:
        by_domain[a.rsplit("@", 1)[1].lower()].append(a)
    parts = await asyncio.gather(*(_ideal_domain(d, xs, r, args.smtp_port) for d, xs in by_domain.items()))
    return {a: st for part in parts for a, st in part.items()}


# --------------------------------------------------------------------------- Sounding
async def _run_sounding(addrs: list[str], args: argparse.Namespace) -> dict[str, str]:
    from sounding.engine import Verifier
    from sounding.settings import load_settings

    extra = dict(kv.split("=", 1) for kv in args.set or ())
    s = load_settings(env={}, helo=HELO, mail_from=SENDER, nameservers=f"{args.dns_ip}:{args.dns_port}",
                      smtp_port=args.smtp_port, allow_private_mx=True, **extra)
    v = Verifier(s)
    got = {x.address: x.status.value async for x in v.verify_many(addrs)}
    args.capacity = v.capacity_report() if hasattr(v, "capacity_report") else None
    return got


def _client(args: argparse.Namespace) -> None:
    """Child: verify the list with one client under one loop; write statuses, wall and CPU."""
    addrs = json.loads(Path(args.list).read_text())
    if args.client in ("sounding", "baseline"):
        # imports are not part of the run (a process pays them once, not per list)
        import sounding.engine  # noqa: F401

        with contextlib.suppress(ImportError):  # (an older checkout may not have it)
            import sounding.store.registry  # noqa: F401
        run = _run_sounding
    else:
        run = _run_ideal
    if args.loop == "uvloop":
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
    with runner:
        c0, t0, started = time.process_time(), time.perf_counter(), time.time()
        if prof is not None:
            prof.enable()
        got = runner.run(run(addrs, args))
        if prof is not None:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof is not None:
        prof.dump_stats(args.profile)
    Path(args.out).write_text(json.dumps({"wall": wall, "cpu": cpu, "started": started, "status": got,
                                          "capacity": getattr(args, "capacity", None)}))


# --------------------------------------------------------------------------- measuring
def _timeline(records: list[dict[str, Any]], started: float) -> dict[str, float]:
    """Session lengths and when sessions started (seconds after the client's start)."""
    from sounding.sandbox.log import sessions_from

    sessions = sessions_from(records)
    lengths = [s.end - s.start for s in sessions if s.end is not None]
    starts = sorted(s.start - started for s in sessions)
    if not starts:
        return {"median_session_s": 0.0, "first_session_s": 0.0, "half_started_s": 0.0, "all_started_s": 0.0}
    return {"median_session_s": statistics.median(lengths) if lengths else 0.0, "first_session_s": starts[0],
            "half_started_s": starts[len(starts) // 2], "all_started_s": starts[-1]}


def _measure(client: str, loop: str, addrs: list[tuple[str, str]], world: dict[str, Any], log: Path,
             tmp: Path, profile: str | None, sets: list[str], baseline: str | None = None) -> dict[str, Any]:
    tag = f"{client}-{loop}"
    lst, out = tmp / f"{tag}.list.json", tmp / f"{tag}.out.json"
    lst.write_text(json.dumps([a for a, _ in addrs]))
    time.sleep(0.5)  # let the servers log the previous run's last closes
    start = log.stat().st_size
    cmd = [sys.executable, str(Path(__file__).resolve()), "client", "--client", client, "--loop", loop,
           "--list", str(lst), "--out", str(out), "--dns-ip", world["dns_ip"],
           "--dns-port", str(world["dns_port"]), "--smtp-port", str(world["smtp_port"])]
    if profile:
        cmd += ["--profile", profile]
    for kv in sets if client == "sounding" else ():
        cmd += ["--set", kv]
    if client == "sounding" and os.environ.get("WIDE_PYSPY"):  # sampling profile (py-spy)
        cmd = ["py-spy", "record", "-r", "250", "-f", "raw", "-o", f"{os.environ['WIDE_PYSPY']}-{loop}.txt",
               "--", *cmd]
    env = None
    if client == "baseline":  # the same bench, Sounding imported from another checkout's src/
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([baseline or "", os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tag} failed (exit {os.waitstatus_to_exitcode(status)})")
    time.sleep(0.5)
    res = json.loads(out.read_text())
    n = len(addrs)
    records = log_slice(log, start)
    r = {"client": client, "loop": loop, "addresses": n, "wall_s": res["wall"],
         "cpu_s_per_1000": res["cpu"] / n * 1000, "peak_mem_mb": ru.ru_maxrss / 1024,
         "right_status": sum(res["status"].get(a) == t for a, t in addrs) / n,
         "statuses": dict(Counter(res["status"].values()))}
    r.update(conduct(records, n))
    r.update(_timeline(records, res["started"]))
    if res.get("capacity"):
        r["capacity"] = res["capacity"]
    return r


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("client", "{}"), ("loop", "{}"), ("addresses", "{}"), ("wall_s", "{:.2f}"), ("ratio", "{:.2f}x"),
            ("cpu_s_per_1000", "{:.2f}"), ("peak_mem_mb", "{:.0f}"), ("sessions_per_addr", "{:.3f}"),
            ("max_sessions_per_host", "{}"), ("median_session_s", "{:.2f}"), ("first_session_s", "{:.2f}"),
            ("half_started_s", "{:.2f}"),
            ("all_started_s", "{:.2f}"), ("right_status", "{:.1%}"),
            ("forbidden", "{}"), ("without_quit", "{}"), ("runs", "{}")]
    return aligned([[c for c, _ in cols]] + [[f.format(r.get(c, 0)).replace(" ", "") for c, f in cols]
                                              for r in rows])


def _loops(spec: str) -> list[str]:
    loops = []
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        if name == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                print("uvloop skipped: pip install 'sounding[speed]'")
                continue
        loops.append(name)
    return loops


def _inside(args: argparse.Namespace) -> None:
    root = os.geteuid() == 0
    _, addrs = _world(args)
    loops = _loops(args.loops)
    with tempfile.TemporaryDirectory(prefix="sounding-wide-") as td:
        tmp = Path(td)
        log = tmp / "sessions.jsonl"
        log.touch()
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--domains", str(args.domains),
               "--min-per", str(args.min_per), "--max-per", str(args.max_per), "--delay", str(args.delay),
               "--subnet", str(args.subnet), "--smtp-port", "25" if root else "2525",
               "--dns-port", "53" if root else "5353", "--log", str(log)]
        with world_process(cmd, stop_timeout=10) as world:
            print(f"wide world: {args.domains} domains on {args.domains} MX hosts, {len(addrs)} addresses "
                  f"({args.min_per}-{args.max_per} per domain), {args.delay * 1000:.0f} ms before every reply, "
                  f"70% with PIPELINING; DNS {world['dns_ip']}:{world['dns_port']}, SMTP port {world['smtp_port']}",
                  flush=True)
            rows: list[dict[str, Any]] = []
            clients = [c.strip() for c in args.clients.split(",") if c.strip()]
            if args.baseline:
                clients.append("baseline")
            for loop in loops:
                ideal = None
                best: dict[str, dict[str, Any]] = {}
                for _ in range(max(1, args.repeat)):  # interleaved; the fastest of each is kept
                    for client in ("ideal", "baseline", "sounding"):
                        if client not in clients:
                            continue
                        prof = str(Path(args.profile) / f"sounding-{loop}.pstats") \
                            if args.profile and client == "sounding" else None
                        r = _measure(client, loop, addrs, world, log, tmp, prof, args.set or [], args.baseline)
                        r["runs"] = best.get(client, {}).get("runs", []) + [round(r["wall_s"], 2)]
                        if client not in best or r["wall_s"] < best[client]["wall_s"]:
                            best[client] = r
                        else:
                            best[client]["runs"] = r["runs"]
                ideal = best.get("ideal")
                if ideal is not None:
                    ideal["ratio"] = 1.0
                    rows.append(ideal)
                for client in ("baseline", "sounding"):
                    if client in best:
                        snd = best[client]
                        snd["ratio"] = snd["wall_s"] / ideal["wall_s"] if ideal else 0.0
                        rows.append(snd)
                print(_table(rows[-len(clients):]), flush=True)
            print()
            print(_table(rows))
            by = {(r["client"], r["loop"]): r for r in rows}
            for loop in loops:
                if ("ideal", loop) not in by or ("sounding", loop) not in by:
                    continue
                i, s = by[("ideal", loop)], by[("sounding", loop)]
                print(f"{loop}: ideal {i['wall_s']:.2f} s, Sounding {s['wall_s']:.2f} s = {s['ratio']:.2f}x "
                      f"(goal <= 2.5x); {s['cpu_s_per_1000']:.2f} CPU s per 1,000 addresses, "
                      f"peak {s['peak_mem_mb']:.0f} MB, {s['sessions_per_addr']:.3f} sessions/address, "
                      f"at most {s['max_sessions_per_host']} sessions per host")
                if s.get("capacity"):
                    c = s["capacity"]
                    print(f"  global session cap: {'fixed' if c['fixed'] else 'adaptive'}, ceiling {c['ceiling']}, "
                          f"went {c['lowest']}-{c['highest']}, ended at {c['cap']}; "
                          f"at most {c['peak_sessions']} sessions at once")
            if ("sounding", "asyncio") in by and ("sounding", "uvloop") in by:
                a, u = by[("sounding", "asyncio")], by[("sounding", "uvloop")]
                print(f"Sounding with uvloop: {a['wall_s'] / u['wall_s']:.2f}x the speed of asyncio's loop, "
                      f"{u['cpu_s_per_1000'] / a['cpu_s_per_1000']:.2f}x its CPU")
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "serve", "client"])
    ap.add_argument("--domains", type=int, default=1500)
    ap.add_argument("--min-per", type=int, default=1)
    ap.add_argument("--max-per", type=int, default=5)
    ap.add_argument("--delay", type=float, default=0.04)
    ap.add_argument("--loops", default="asyncio,uvloop", help="comma-separated: asyncio, uvloop")
    ap.add_argument("--clients", default="ideal,sounding", help="comma-separated: ideal, sounding")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each client N times (interleaved) and keep the fastest run: "
                         "the machine may be busy with other work")
    ap.add_argument("--subnet", type=int, default=79)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--profile", help="write a cProfile of each Sounding run into this directory")
    ap.add_argument("--baseline", metavar="SRC",
                    help="also run Sounding imported from SRC (another checkout's src/ directory): "
                         "before and after in one run, under the same load")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a Sounding setting for the run (e.g. concurrency=500); repeatable")
    ap.add_argument("--no-netns", action="store_true", help=argparse.SUPPRESS)
    add_child_options(ap)
    ap.add_argument("--loop", default="asyncio")  # internal: the client's event loop
    args = ap.parse_args()
    if args.mode == "serve":
        _serve(args)
    elif args.mode == "client":
        _client(args)
    elif args.no_netns or not can_use_netns():
        _inside(args)
    else:
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            args_list = [x if x != args.profile else str(Path(args.profile).resolve()) for x in sys.argv[1:]]
        else:
            args_list = sys.argv[1:]
        rc = rerun_in_netns(Path(__file__).resolve(), args_list, f"127.{args.subnet}.255.53", tag="wide")
        if rc:
            raise SystemExit(rc)


if __name__ == "__main__":
    main()

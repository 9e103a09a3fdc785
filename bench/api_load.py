"""API load benchmark: 200 concurrent clients against ``sounding serve`` and the sandbox.

    python bench/api_load.py [--clients 200] [--verifies 5] [--job-size 50] [--domains 400]
                             [--delay 0.01] [--db URL] [--split]
    python bench/api_load.py upload [--upload-mb 50] [--clients 20] [--db URL]

One run, three processes: the sandbox world (``--domains`` domains, each on its own MX that
waits ``--delay`` before every reply), ``sounding serve`` (uvicorn; SQLite in a temporary
directory unless ``--db`` names e.g. PostgreSQL), and this load generator (httpx, asyncio).
Each of the ``--clients`` clients has its own API key.

Phase 1, single verification (the sign-up form case): every client sends ``--verifies``
``POST /v1/verify`` for addresses nobody asked before (no cache), all clients at once;
prints latency p50/p90/p99/max and requests per second.
Phase 2, bulk jobs: every client uploads a list of ``--job-size`` fresh addresses at once and
polls until it is done; prints jobs throughput (addresses verified per second across all
jobs), the job completion time p50/p99 and the polling latency p50/p99 under that load.
Everything is checked against the world's ground truth; errors are counted, never hidden.

``upload`` mode: does anybody wait behind an upload? ``--clients`` clients keep sending
``POST /v1/verify`` (fresh addresses, real SMTP sessions with the sandbox) while one client
uploads (1) a ``--upload-mb`` MB list over its quota of 1,000 rows, (2) an ``--accepted-mb`` MB
list that fits (stored, then cancelled) and (3) a request announcing a ``Content-Length`` over
the limit; prints each upload's answer and time, the /v1/verify latency p50/p99/max during
them and how many took over 2 s, and the service's peak memory (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench._common import big_csv, serve_world, world_process  # noqa: E402
from bench._worlds import throughput_world  # noqa: E402


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _serve_world(args: argparse.Namespace) -> None:
    world, _ = throughput_world(args.domains, args.per_domain, delay=args.delay)
    serve_world(world, subnet=args.subnet)


async def _keys(db: str, n: int) -> list[str]:
    from sounding.store import opened

    async with opened(db) as st:
        return [(await st.create_client(f"load-{i}"))[1] for i in range(n)]


async def _small_key(db: str) -> str:
    from sounding.store import opened

    async with opened(db) as st:
        return (await st.create_client("small", daily_quota=1000))[1]


async def _load(args: argparse.Namespace, base: str, keys: list[str], truth: dict[str, str],
                addrs: list[str]) -> None:
    import httpx

    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients + 10,
                          keepalive_expiry=2.0)  # shorter than the server's keep-alive: no stale reuse
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        # ---------------------------------------------------------------- phase 1
        per = args.verifies
        pool = iter(addrs)
        chunks = [[next(pool) for _ in range(per)] for _ in keys]
        lat: list[float] = []
        wrong = errors = 0

        async def one_client(key: str, todo: list[str]) -> None:
            nonlocal wrong, errors
            for a in todo:
                t0 = time.perf_counter()
                try:
                    r = await http.post("/v1/verify", json={"email": a, "use_cache": False},
                                        headers={"X-API-Key": key})
                except httpx.HTTPError as exc:
                    errors += 1
                    print(f"verify {a}: {exc!r}", flush=True)
                    continue
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                elif r.json()["status"] != truth[a]:
                    wrong += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(k, c) for k, c in zip(keys, chunks, strict=True)))
        wall = time.perf_counter() - t0
        n = len(lat)
        print(f"single verify: {args.clients} clients x {per} = {n} requests in {wall:.1f} s "
              f"({n / wall:.1f} req/s); latency p50 {_pct(lat, 50) * 1000:.0f} ms, "
              f"p90 {_pct(lat, 90) * 1000:.0f} ms, p99 {_pct(lat, 99) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms; {errors} errors, {wrong} wrong statuses", flush=True)

        # ---------------------------------------------------------------- phase 2
        size = args.job_size
        lists = [[next(pool) for _ in range(size)] for _ in keys]
        done_in: list[float] = []
        polls: list[float] = []
        jwrong = jerrors = 0

        async def job_client(key: str, todo: list[str]) -> None:
            nonlocal jerrors
            try:
                await job_client_inner(key, todo)
            except httpx.HTTPError as exc:
                jerrors += 1
                print(f"job client: {exc!r}", flush=True)

        async def job_client_inner(key: str, todo: list[str]) -> None:
            nonlocal jwrong, jerrors
            h = {"X-API-Key": key}
            body = ("email\n" + "\n".join(todo) + "\n").encode()
            t0 = time.perf_counter()
            r = await http.post("/v1/jobs", files={"file": ("list.csv", body)}, headers=h)
            if r.status_code != 202:
                jerrors += 1
                return
            jid = r.json()["id"]
            while True:
                await asyncio.sleep(0.5)
                p0 = time.perf_counter()
                p = await http.get(f"/v1/jobs/{jid}", headers=h)
                polls.append(time.perf_counter() - p0)
                if p.status_code != 200:
                    jerrors += 1
                    return
                if p.json()["state"] not in ("queued", "running"):
                    break
            done_in.append(time.perf_counter() - t0)
            res = await http.get(f"/v1/jobs/{jid}/results", params={"format": "csv"}, headers=h)
            import csv
            import io

            for row in csv.DictReader(io.StringIO(res.text)):
                jwrong += row["status"] != truth[row["email"]]

        t0 = time.perf_counter()
        await asyncio.gather(*(job_client(k, todo) for k, todo in zip(keys, lists, strict=True)))
        wall = time.perf_counter() - t0
        total = size * len(done_in)
        print(f"bulk jobs: {len(done_in)} jobs of {size} addresses from {args.clients} concurrent clients, "
              f"{total} addresses in {wall:.1f} s = {total / wall:.1f} addresses/s "
              f"({len(done_in) / wall * 60:.0f} jobs/min); job done in p50 {_pct(done_in, 50):.1f} s, "
              f"p99 {_pct(done_in, 99):.1f} s; progress poll latency p50 {_pct(polls, 50) * 1000:.0f} ms, "
              f"p99 {_pct(polls, 99) * 1000:.0f} ms; {jerrors} errors, {jwrong} wrong statuses", flush=True)


def _nowhere(i: int) -> str:
    """The big lists' domains: not in the world (NXDOMAIN: an accepted job does not hold the
    world's receivers, which the measured /v1/verify calls use)."""
    return f"bulk{i % 50}.nowhere.example"


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _upload_load(args: argparse.Namespace, base: str, keys: list[str], small_key: str, addrs: list[str],
                       serve_pid: int, td: str) -> None:
    import httpx

    big, ok = Path(td) / "big.csv", Path(td) / "accepted.csv"
    rows = big_csv(big, int(args.upload_mb * 1_000_000), _nowhere)
    ok_rows = big_csv(ok, int(args.accepted_mb * 1_000_000), _nowhere)
    pool = itertools.cycle(addrs)
    stop = asyncio.Event()
    lat: list[float] = []
    errors = 0

    async def verifier(http: httpx.AsyncClient, key: str) -> None:
        nonlocal errors
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/verify", json={"email": next(pool), "use_cache": False},
                                    headers={"X-API-Key": key})
                errors += r.status_code != 200
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        tasks = [asyncio.create_task(verifier(http, k)) for k in keys[1:]]
        await asyncio.sleep(args.quiet)  # the baseline: the same load without an upload
        quiet, lat[:] = list(lat), []
        report = []
        t0 = time.perf_counter()
        with big.open("rb") as fh:
            r = await http.post("/v1/jobs", files={"file": ("big.csv", fh)}, headers={"X-API-Key": small_key})
        report.append(f"{args.upload_mb:g} MB ({rows} rows) over a quota of 1,000: HTTP {r.status_code} in "
                      f"{time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        with ok.open("rb") as fh:
            r = await http.post("/v1/jobs", files={"file": ("accepted.csv", fh)}, headers={"X-API-Key": keys[0]})
        report.append(f"{args.accepted_mb:g} MB ({ok_rows} rows) accepted: HTTP {r.status_code} in "
                      f"{time.perf_counter() - t0:.1f} s")
        if r.status_code == 202:
            await http.delete(f"/v1/jobs/{r.json()['id']}", headers={"X-API-Key": keys[0]})
        port = int(base.rsplit(":", 1)[1])
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {keys[0]}\r\nContent-Type: "
                      f"multipart/form-data; boundary=b\r\nContent-Length: {400 << 20}\r\n\r\n").encode())
        status = (await reader.readline()).decode().strip()
        writer.close()
        report.append(f"400 MB Content-Length: {status!r} in {(time.perf_counter() - t0) * 1000:.0f} ms")
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
    print(f"uploads while {len(keys) - 1} clients verify:", flush=True)
    for line in report:
        print("  " + line, flush=True)
    print(f"  /v1/verify without uploads ({args.quiet:g} s before): {len(quiet)} requests, p50 "
          f"{_pct(quiet, 50) * 1000:.0f} ms, p99 {_pct(quiet, 99) * 1000:.0f} ms, max {max(quiet) * 1000:.0f} ms, "
          f"{sum(x > 2.0 for x in quiet)} over 2 s", flush=True)
    print(f"  /v1/verify during the uploads: {len(lat)} requests, p50 {_pct(lat, 50) * 1000:.0f} ms, "
          f"p99 {_pct(lat, 99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms, "
          f"{sum(x > 2.0 for x in lat)} over 2 s, {errors} errors; serve peak memory {_vm_hwm_mb(serve_pid):.0f} MB",
          flush=True)


def _run(args: argparse.Namespace) -> None:
    import httpx

    _, addr_truth = throughput_world(args.domains, args.per_domain, delay=args.delay)
    truth = dict(addr_truth)
    need = args.clients * (args.verifies + args.job_size) if args.mode == "run" else 0
    addrs = [a for a, _ in addr_truth]
    if need > len(addrs):
        raise SystemExit(f"the world has {len(addrs)} addresses, {need} needed: raise --domains/--per-domain")
    cmd = [sys.executable, __file__, "world", "--domains", str(args.domains), "--per-domain", str(args.per_domain),
           "--delay", str(args.delay), "--subnet", str(args.subnet)]
    with world_process(cmd, stop_timeout=30) as world, tempfile.TemporaryDirectory(prefix="sounding-load-") as td:
        db = args.db or f"sqlite:///{td}/load.db"
        serve = worker = None
        try:
            keys = asyncio.run(_keys(db, args.clients))
            small = asyncio.run(_small_key(db)) if args.mode == "upload" else ""
            port = args.port
            env = {**os.environ, "SOUNDING_STATE_DIR": f"{td}/state", "SOUNDING_DAILY_QUOTA": "100000000"}
            net = ["--nameserver", f"{world['dns_ip']}:{world['dns_port']}", "--smtp-port", str(world["smtp_port"]),
                   "--allow-private-mx"]
            serve = subprocess.Popen([sys.executable, "-m", "sounding", "serve", "--port", str(port), "--db", db,
                                      *net, *(["--no-worker"] if args.split else [])], env=env)
            if args.split:  # jobs in a process of their own: the API's loop only answers HTTP
                worker = subprocess.Popen([sys.executable, "-m", "sounding", "worker", "--db", db, *net], env=env)
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(base + "/openapi.json", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            print(f"world: {args.domains} domains x {args.per_domain} addresses, {args.delay * 1000:.0f} ms per "
                  f"reply; service: {db.split('://')[0]}{', API and worker in two processes' if args.split else ''}; "
                  f"{args.clients} concurrent clients", flush=True)
            if args.mode == "upload":
                asyncio.run(_upload_load(args, base, keys, small, addrs, serve.pid, td))
            else:
                asyncio.run(_load(args, base, keys, truth, addrs))
        finally:
            for proc in (serve, worker):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "world", "upload"])
    ap.add_argument("--upload-mb", type=float, default=50.0, help="upload mode: the refused list's size (MB)")
    ap.add_argument("--quiet", type=float, default=20.0, help="upload mode: seconds of baseline first")
    ap.add_argument("--accepted-mb", type=float, default=5.0, help="upload mode: the accepted list's size (MB)")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--verifies", type=int, default=5)
    ap.add_argument("--job-size", type=int, default=50)
    ap.add_argument("--domains", type=int, default=400)
    ap.add_argument("--per-domain", type=int, default=30)
    ap.add_argument("--delay", type=float, default=0.01)
    ap.add_argument("--subnet", type=int, default=73)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--db", default=None)
    ap.add_argument("--split", action="store_true", help="serve --no-worker plus a sounding worker process")
    args = ap.parse_args()
    _serve_world(args) if args.mode == "world" else _run(args)


if __name__ == "__main__":
    main()

"""Server-rendered pages (Jinja2; no external assets, a little JavaScript for progress).

``/`` the IP usage and abuse policy for mail administrators, ``/opt-out``, ``/lookup`` (our
sessions to an IP or domain), ``/app`` the client dashboard, ``/ops`` the operator's view.
Forms carry a CSRF token bound to a cookie (double submit, HMAC-signed); the opt-out form also
has a honeypot field and a per-address rate limit.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from ..courtesy.exemptions import parse_entry
from ..errors import InputError, SoundingError
from ..settings import default_state_dir
from ..store import QuotaExceeded
from ..store.models import Client, Job
from .api import export, read_limited
from .core import Service

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(include_in_schema=False)

SESSION_COOKIE = "sounding_session"
CSRF_COOKIE = "sounding_csrf"
STATUSES = ("deliverable", "undeliverable", "risky", "unknown", "error")
#: ``error``: rows without an address (empty cell, no e-mail column, unreadable), counted apart
COLOURS = {"deliverable": "#1b7f3b", "undeliverable": "#b3261e", "risky": "#a86400", "unknown": "#5f6368",
           "error": "#6a1b9a"}


def _svc(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


def _secret(request: Request) -> bytes:
    app = request.app
    if not hasattr(app.state, "secret"):
        s = app.state.settings.secret_key
        app.state.secret = s.encode() if s else secrets.token_bytes(32)
    return app.state.secret  # type: ignore[no-any-return]


def _sign(request: Request, text: str) -> str:
    return hmac.new(_secret(request), text.encode(), hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------------ csrf
def _csrf_nonce(request: Request) -> tuple[str, bool]:
    nonce = request.cookies.get(CSRF_COOKIE, "")
    if len(nonce) == 32 and all(c in "0123456789abcdef" for c in nonce):
        return nonce, False
    return secrets.token_hex(16), True


def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
    nonce, fresh = _csrf_nonce(request)
    s = request.app.state.settings
    base = {"request": request, "csrf": _sign(request, "csrf:" + nonce), "operator_name": s.operator_name,
            "operator_email": s.operator_email, "operator_url": s.operator_url, "year": dt.date.today().year}
    resp = templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)
    if fresh:
        resp.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict", max_age=86400 * 7)
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                               "script-src 'self'; form-action 'self'; frame-ancestors 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    return resp


def _csrf_ok(request: Request, token: str) -> bool:
    nonce = request.cookies.get(CSRF_COOKIE, "")
    return bool(nonce) and hmac.compare_digest(_sign(request, "csrf:" + nonce), token or "")


def error_page(request: Request, status: int, detail: str) -> HTMLResponse:
    return render(request, "error.html", {"status": status, "detail": detail}, status)


# ------------------------------------------------------------------------------ login
async def _client(request: Request) -> Client | None:
    raw = request.cookies.get(SESSION_COOKIE, "")
    try:
        cid, exp, sig = raw.split(".")
        if int(exp) < time.time() or not hmac.compare_digest(sig, _sign(request, f"session:{cid}.{exp}")):
            return None
        client_id = int(cid)
    except ValueError:
        return None
    if not 0 < client_id < 2**31:
        return None
    return await _svc(request).store.client(client_id)


def _login_cookie(request: Request, resp: Response, c: Client) -> None:
    exp = int(time.time()) + 12 * 3600
    value = f"{c.id}.{exp}.{_sign(request, f'session:{c.id}.{exp}')}"
    resp.set_cookie(SESSION_COOKIE, value, httponly=True, samesite="strict", max_age=12 * 3600)


# ------------------------------------------------------------------------------ public pages
@router.get("/", response_class=HTMLResponse)
async def policy(request: Request) -> HTMLResponse:
    s = request.app.state.settings
    return render(request, "policy.html", {"helo": s.helo, "mail_from": s.mail_from,
                                           "sources": [x for x in s.source_ips]})


class _RateLimit:
    """At most ``n`` events per ``per`` seconds per key (in memory: one process)."""

    def __init__(self, n: int, per: float) -> None:
        self.n, self.per = n, per
        self.hits: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        q = self.hits[key]
        while q and now - q[0] > self.per:
            q.popleft()
        if len(q) >= self.n:
            return False
        q.append(now)
        if len(self.hits) > 10_000:
            self.hits.pop(next(iter(self.hits)))
        return True


_optout_limit = _RateLimit(5, 600)


@router.get("/opt-out", response_class=HTMLResponse)
async def optout_form(request: Request) -> HTMLResponse:
    return render(request, "optout.html", {"errors": [], "entries": ""})


@router.post("/opt-out", response_class=HTMLResponse)
async def optout_submit(request: Request, entries: Annotated[str, Form(max_length=20_000)] = "",
                        contact: Annotated[str, Form(max_length=300)] = "",
                        website: Annotated[str, Form(max_length=300)] = "",
                        csrf: Annotated[str, Form(max_length=200)] = "") -> HTMLResponse:
    if not _csrf_ok(request, csrf):
        return render(request, "optout.html", {"errors": ["The form expired; please submit it again."],
                                               "entries": entries}, 400)
    ip = request.client.host if request.client else "?"
    if website:  # the honeypot: people do not see this field, robots fill it in
        return render(request, "optout_done.html", {"added": [], "contact": ""})
    if not _optout_limit.allow(ip):
        return render(request, "optout.html", {"errors": ["Too many requests from your address; please try "
                                                          "again in a few minutes or write to us."],
                                               "entries": entries}, 429)
    lines = [x.strip() for x in entries.replace(",", "\n").splitlines() if x.strip()]
    errors, ok = [], []
    if not lines:
        errors.append("Enter at least one domain or IP range.")
    if len(lines) > 50:
        errors.append("At most 50 entries per request; write to us for more.")
    for line in lines[:50]:
        try:
            kind, value = parse_entry(line)
        except InputError as exc:
            errors.append(str(exc))
            continue
        if kind == "cidr":
            net = ipaddress.ip_network(value)
            if net.prefixlen < (16 if net.version == 4 else 32):
                errors.append(f"{value}: ranges larger than a /16 (IPv6: /32) need a word with the operator")
                continue
        elif "." not in value:
            errors.append(f"{value}: enter your domain, not a top-level domain")
            continue
        ok.append((kind, value))
    if errors:
        return render(request, "optout.html", {"errors": errors, "entries": entries}, 400)
    svc = _svc(request)
    added = []
    for kind, value in ok:
        await svc.add_exemption(value, kind, f"web form from {ip}; contact {contact[:200]}".strip(), "web")
        added.append(f"{value} ({'IP range' if kind == 'cidr' else 'domain'})")
    return render(request, "optout_done.html", {"added": added, "contact": contact})


@router.get("/lookup", response_class=HTMLResponse)
async def lookup(request: Request, q: str = "") -> HTMLResponse:
    q = q.strip()[:255]
    error = ""
    sessions: list[dict[str, Any]] = []
    if q:
        valid = True
        try:
            ipaddress.ip_address(q)
        except ValueError:
            try:
                parse_entry(q, "mx")
            except InputError:
                valid = False
        if not valid:
            error = "Enter an IP address or a domain name."
        else:
            for row in await _svc(request).store.lookup(q):
                sessions.append({"time": _utc(row.started), "duration": f"{max(row.ended - row.started, 0):.1f} s",
                                 "source_ip": row.source_ip, "mx_host": row.mx_host, "mx_ip": row.mx_ip,
                                 "commands": row.commands, "outcome": row.outcome, "id": row.id})
    return render(request, "lookup.html", {"q": q, "sessions": sessions, "error": error})


def _utc(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


# ------------------------------------------------------------------------------ client dashboard
@router.get("/app", response_class=HTMLResponse)
async def app_home(request: Request) -> Response:
    c = await _client(request)
    if c is None:
        return render(request, "login.html", {"error": "", "next": "/app"})
    return await _home(request, c)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, api_key: Annotated[str, Form(max_length=200)] = "",
                next: Annotated[str, Form(max_length=20)] = "/app",
                csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    target = next if next in ("/app", "/ops") else "/app"
    if not _csrf_ok(request, csrf):
        return render(request, "login.html", {"error": "The form expired; try again.", "next": target}, 400)
    c = await _svc(request).store.client_by_key(api_key.strip())
    if c is None or (target == "/ops" and not c.operator):
        return render(request, "login.html", {"error": "That key is not valid here.", "next": target}, 401)
    resp = RedirectResponse(target, status_code=303)
    _login_cookie(request, resp, c)
    return resp


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    resp = RedirectResponse("/app", status_code=303)
    if _csrf_ok(request, csrf):
        resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.post("/app/upload", response_class=HTMLResponse)
async def app_upload(request: Request, file: Annotated[UploadFile, File()],
                     csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    c = await _client(request)
    if c is None:
        return RedirectResponse("/app", status_code=303)
    svc = _svc(request)
    if not _csrf_ok(request, csrf):
        return await _home(request, c, "The form expired; please upload again.", 400)
    try:
        data = await read_limited(file, svc.settings.max_upload_bytes)
        job = await svc.submit_job(c, (file.filename or "upload")[:300], data)
    except QuotaExceeded as exc:
        return await _home(request, c, str(exc), 429)
    except SoundingError as exc:
        return await _home(request, c, f"That list cannot be read: {exc}", 400)
    except Exception as exc:  # the API's Problem (too large) and friends
        return await _home(request, c, str(exc), 413)
    return RedirectResponse(f"/app/jobs/{job.id}", status_code=303)


async def _home(request: Request, c: Client, error: str = "", status: int = 200) -> HTMLResponse:
    """The dashboard: the upload form and recent jobs (with an error above them, if any)."""
    svc = _svc(request)
    jobs = [(await svc.store.progress(j)).to_dict() for j in await svc.store.jobs(c.id, limit=20)]
    return render(request, "app_home.html", {"client": c, "jobs": jobs, "error": error}, status)


async def _own_job(request: Request, job_id: str) -> tuple[Client | None, Job | None]:
    c = await _client(request)
    if c is None or len(job_id) > 64:
        return c, None
    return c, await _svc(request).store.job(job_id, client_id=c.id)


@router.get("/app/jobs/{job_id}", response_class=HTMLResponse)
async def app_job(request: Request, job_id: str, status: str = "", q: str = "") -> Response:
    c, job = await _own_job(request, job_id)
    if c is None:
        return RedirectResponse("/app", status_code=303)
    if job is None:
        return error_page(request, 404, "No such job.")
    st = _svc(request).store
    prog = (await st.progress(job)).to_dict()
    rows: list[dict[str, Any]] = []
    shown = 0
    status = status if status in STATUSES else ""
    q = q.strip().lower()[:200]
    if prog["state"] not in ("queued", "running"):
        found, shown = await st.find_rows(job.id, status=status, contains=q, limit=500)
        for r in found:
            res = r.result or {}
            rows.append({"line": r.line, "address": r.address, "status": res.get("status", ""),
                         "reason": res.get("reason", ""), "flags": ", ".join(res.get("flags") or []),
                         "mx": (res.get("evidence") or {}).get("mx_host", ""),
                         "code": (res.get("evidence") or {}).get("code", "")})
    return render(request, "app_job.html", {"client": c, "job": prog, "rows": rows, "shown": shown,
                                            "status": status, "q": q, "chart": chart(prog["by_status"]),
                                            "statuses": STATUSES})


@router.get("/app/jobs/{job_id}/progress.json")
async def app_progress(request: Request, job_id: str) -> Response:
    _c, job = await _own_job(request, job_id)
    if job is None:
        return JSONResponse({"detail": "no such job"}, status_code=404)
    return JSONResponse((await _svc(request).store.progress(job)).to_dict())


@router.get("/app/jobs/{job_id}/results.csv")
async def app_results(request: Request, job_id: str) -> Response:
    _c, job = await _own_job(request, job_id)
    if job is None:
        return error_page(request, 404, "No such job.")
    return StreamingResponse(export(_svc(request).store, job, "csv"), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="sounding-{job.id}.csv"'})


@router.post("/app/jobs/{job_id}/cancel")
async def app_cancel(request: Request, job_id: str, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    _c, job = await _own_job(request, job_id)
    if job is not None and _csrf_ok(request, csrf):
        await _svc(request).store.cancel(job.id)
    return RedirectResponse(f"/app/jobs/{job_id}", status_code=303)


def chart(by_status: dict[str, int]) -> dict[str, Any]:
    """A horizontal bar chart of the status breakdown, as SVG geometry."""
    total = sum(by_status.values()) or 1
    bars = []
    for i, st in enumerate(STATUSES):
        n = by_status.get(st, 0)
        bars.append({"label": st, "n": n, "pct": round(100 * n / total, 1), "y": 10 + i * 34,
                     "w": round(300 * n / total, 1), "colour": COLOURS[st]})
    other = {k: v for k, v in by_status.items() if k not in STATUSES}
    return {"bars": bars, "height": 10 + len(STATUSES) * 34, "other": other,
            "summary": ", ".join(f"{b['label']} {b['n']} ({b['pct']} %)" for b in bars)}


# ------------------------------------------------------------------------------ operator
@router.get("/ops", response_class=HTMLResponse)
async def ops(request: Request) -> Response:
    c = await _client(request)
    if c is None or not c.operator:
        return render(request, "login.html", {"error": "" if c is None else "Operators only.", "next": "/ops"},
                      200 if c is None else 403)
    svc = _svc(request)
    pool = svc.verifier.pool
    now = time.time()
    pairs = []
    for (src, rcv), _st in sorted(pool.pairs.items()):
        cur = pool.state(src, rcv)
        pairs.append({"source": src, "receiver": rcv, "state": cur.rep.value, "until": _utc(cur.until),
                      "detail": cur.detail[:160]})
    listed = []
    for key, text in sorted(pool.listed.items()):
        urls = [w for w in text.split() if w.startswith("http")]
        listed.append({"source": key, "text": text, "urls": urls})
    paused = [{"receiver": r, "until": _utc(u), "why": why[:200]} for r, (u, why) in sorted(pool.paused.items())
              if u > now]
    sources = [{"key": x.key, "healthy": x.key not in pool.listed} for x in pool.sources]
    recent = await svc.store.recent_sessions(now - 3600)
    counts = [[0, 0] for _ in range(12)]
    for t, n in recent:
        i = min(11, max(0, int((t - (now - 3600)) // 300)))
        counts[i][0] += 1
        counts[i][1] += n
    buckets = [{"start": _utc(now - 3600 + i * 300)[11:16], "sessions": c[0], "rcpts": c[1]}
               for i, c in enumerate(counts)]
    changes = []
    try:
        from ..courtesy.canaries import CanaryBook

        book = CanaryBook(None)
        stored = await svc.store.get_kv("canaries")  # `sounding canaries ... --db` keeps them here
        if stored is not None:
            book.load_dict(stored)
        else:
            state = Path(svc.settings.state_dir) if svc.settings.state_dir else default_state_dir()
            book = CanaryBook(state / "canaries.json")
        for cn in book.items.values():
            for ch in cn.changes[-5:]:
                changes.append({"time": _utc(ch["t"]), "address": cn.address, "change": ch["change"]})
    except SoundingError:
        pass
    exemptions = await svc.store.exemptions()
    return render(request, "ops.html", {
        "client": c, "sources": sources, "pairs": pairs, "listed": listed, "paused": paused,
        "exemptions": exemptions, "changes": changes, "buckets": buckets,
        "conduct": svc.verifier.stats.as_dict(), "in_flight": svc.dispatcher.in_flight,
        "utc": _utc})

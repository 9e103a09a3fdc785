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
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from ..courtesy.exemptions import parse_entry, proof_name, proof_text
from ..courtesy.optout import Decision
from ..errors import InputError, SoundingError
from ..glossary import legend, reason_meaning, statuses
from ..settings import default_state_dir
from ..store import QuotaExceeded
from ..store.models import Client, Job, JobRow
from ..verdict import Reason
from .api import EXPORT_MEDIA, export_response
from .core import Service
from .transcripts import mask_local_parts, pair_commands, parse_stored
from .uploads import BadUpload, TooLarge, receive_upload

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals["reason_meaning"] = reason_meaning
router = APIRouter(include_in_schema=False)

SESSION_COOKIE = "sounding_session"
CSRF_COOKIE = "sounding_csrf"


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
    svc = _svc(request)
    for line in lines[:50]:
        try:
            kind, value = parse_entry(line)
        except InputError as exc:
            errors.append(str(exc))
            continue
        a = svc.optout.assess(kind, value)  # refusals first (public suffix, huge range)
        if a.decision is Decision.REFUSED:
            errors.append(a.reason)
            continue
        ok.append((kind, value))
    if errors:
        return render(request, "optout.html", {"errors": errors, "entries": entries}, 400)
    results = []
    for kind, value in ok:
        a, row = await svc.request_optout(value, kind, contact=contact[:200],
                                          note=f"web form from {ip}; contact {contact[:200]}".strip())
        results.append(_entry_view(a.value, a.kind, row, a.reason))
    return render(request, "optout_done.html", {"results": results, "contact": contact})


def _entry_view(value: str, kind: str, row: Any, reason: str = "") -> dict[str, Any]:
    """What the requester is told about one entry (and, when pending, how to prove control)."""
    label = {"cidr": "IP range", "mx": "mail server"}.get(kind, "domain")
    if row is None:
        return {"value": value, "label": label, "state": "refused", "reason": reason}
    view = {"id": row.id, "value": row.value, "label": label, "state": row.state, "proof": row.proof,
            "why": row.why, "reason": reason}
    if row.state == "pending" and row.token:
        view["txt_name"] = proof_name(row.kind, row.value)
        view["txt_text"] = proof_text(row.token)
        view["token"] = row.token
    return view


@router.post("/opt-out/check", response_class=HTMLResponse)
async def optout_check(request: Request, entry: Annotated[int, Form()] = 0,
                       token: Annotated[str, Form(max_length=100)] = "",
                       csrf: Annotated[str, Form(max_length=200)] = "") -> HTMLResponse:
    """The requester of a pending entry asks us to look for their TXT record now."""
    if not _csrf_ok(request, csrf):
        return error_page(request, 400, "The form expired; please go back and try again.")
    ip = request.client.host if request.client else "?"
    if not _check_limit.allow(ip):
        return error_page(request, 429, "Too many checks from your address; please wait a minute.")
    svc = _svc(request)
    row = await svc.store.exemption(entry) if 0 < entry < 2**31 else None
    if row is None or not row.token or not hmac.compare_digest(row.token, token):
        return error_page(request, 404, "No such pending opt-out.")
    await svc.check_proofs(row.id)
    row = await svc.store.exemption(row.id)
    return render(request, "optout_done.html", {"results": [_entry_view(row.value, row.kind, row)] if row else [],
                                                "contact": "", "checked": True})


@router.get("/opt-out/status", response_class=HTMLResponse)
async def optout_status(request: Request, value: str = "") -> HTMLResponse:
    """Is this domain, MX host or range opted out, and how was it proved?"""
    value = value.strip()[:300]
    found: list[dict[str, Any]] = []
    error = ""
    if value:
        try:
            kind, norm = parse_entry(value)
        except InputError as exc:
            error = str(exc)
        else:
            st = _svc(request).store
            for k in ((kind, "mx") if kind == "domain" else (kind,)):
                row = await st.find_exemption(k, norm)
                if row is not None:
                    v = _entry_view(row.value, row.kind, row)
                    v.pop("token", None)
                    v.pop("txt_text", None)  # the token is the requester's, not the public's
                    found.append(v)
    return render(request, "optout_status.html", {"value": value, "found": found, "error": error})


_check_limit = _RateLimit(10, 60)


_lookup_limit = _RateLimit(30, 60)
LOOKUP_PAGE = 50
_HOST = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))+$")


def lookup_query(q: str, psl: Any) -> tuple[str, str]:
    """``(kind, value)`` for an exact IP address (``ip``), an MX host or mail domain
    (``name``) or a range no wider than /24 (IPv6: /48) (``cidr``); InputError otherwise —
    patterns, bare top-level domains and public suffixes list nothing."""
    q = q.strip().lower().rstrip(".")
    if not q or len(q) > 253 or not q.isprintable() or any(c.isspace() for c in q):
        raise InputError("Enter an IP address, a range (/24 or narrower) or a domain name.")
    try:
        return "ip", str(ipaddress.ip_address(q))
    except ValueError:
        pass
    if "/" in q:
        try:
            net = ipaddress.ip_network(q, strict=False)
        except ValueError:
            raise InputError("That is not an IP range.") from None
        if net.prefixlen < (24 if net.version == 4 else 48):
            raise InputError("Ranges wider than a /24 (IPv6: /48) are not looked up; enter a narrower one.")
        return "cidr", str(net)
    try:
        name = q.encode("idna").decode("ascii")
    except UnicodeError:
        raise InputError("That is not a domain name.") from None
    if not _HOST.match(name):
        raise InputError("Enter an exact domain or mail server name (no wildcards).")
    if psl.is_public(name):
        raise InputError(f"{name} is a public suffix, not a domain: enter your own domain.")
    return "name", name


@router.get("/lookup", response_class=HTMLResponse)
async def lookup(request: Request, q: str = "", page: int = 1) -> HTMLResponse:
    q = q.strip()[:255]
    page = max(1, min(page, 10_000))
    error = ""
    sessions: list[dict[str, Any]] = []
    total = 0
    if q:
        ip = request.client.host if request.client else "?"
        svc = _svc(request)
        try:
            kind, value = lookup_query(q, svc.optout.psl)
        except InputError as exc:
            error = str(exc)
        else:
            if not _lookup_limit.allow(ip):
                return render(request, "lookup.html", {"q": q, "sessions": [], "error": "Too many look-ups from "
                              "your address; please wait a minute.", "total": 0, "page": 1, "pages": 1}, 429)
            rows, total = await svc.store.lookup(kind, value, offset=(page - 1) * LOOKUP_PAGE, limit=LOOKUP_PAGE)
            for row in rows:
                lines = parse_stored(svc.store.transcript_text(row))
                sessions.append({"time": _utc(row.started), "duration": f"{max(row.ended - row.started, 0):.1f} s",
                                 "source_ip": row.source_ip, "mx_host": row.mx_host, "mx_ip": row.mx_ip,
                                 "commands": pair_commands(lines) if lines else row.commands,
                                 "outcome": row.outcome, "id": row.id})
    pages = max(1, -(-total // LOOKUP_PAGE))
    return render(request, "lookup.html", {"q": q, "sessions": sessions, "error": error, "total": total,
                                           "page": page, "pages": pages}, 400 if error else 200)


def _utc(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


# ------------------------------------------------------------------------------ client dashboard
@router.get("/app", response_class=HTMLResponse)
async def app_home(request: Request) -> Response:
    c = await _client(request)
    if c is None:
        return render(request, "login.html", {"error": "", "next": "/app"})
    deleted = request.query_params.get("deleted", "")[:100]
    return await _home(request, c, notice=f"Deleted {deleted}." if deleted else "")


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
async def app_upload(request: Request) -> Response:
    """The dashboard's upload: streamed and parsed off the event loop like the API's."""
    c = await _client(request)
    if c is None:
        return RedirectResponse("/app", status_code=303)
    svc = _svc(request)
    try:
        up = await receive_upload(request, svc.settings.max_upload_bytes)
    except TooLarge as exc:
        return await _home(request, c, f"That list is too large: {exc}.", 413)
    except BadUpload as exc:
        return await _home(request, c, f"That upload cannot be read: {exc}", 400)
    try:
        if not _csrf_ok(request, up.fields.get("csrf", "")[:200]):
            return await _home(request, c, "The form expired; please upload again.", 400)
        job = await svc.submit_upload(c, up)
    except QuotaExceeded as exc:
        return await _home(request, c, str(exc), 429)
    except SoundingError as exc:
        return await _home(request, c, f"That list cannot be read: {exc}", 400)
    finally:
        up.discard()
    return RedirectResponse(f"/app/jobs/{job.id}", status_code=303)


async def _home(request: Request, c: Client, error: str = "", status: int = 200, notice: str = "") -> HTMLResponse:
    """The dashboard: the upload form and the client's jobs (with an error above them, if any)."""
    svc = _svc(request)
    jobs = []
    for j in await svc.store.jobs(c.id, limit=100):
        d = (await svc.store.progress(j)).to_dict()
        d["created"] = _utc(j.created_at)[:16] + " UTC"
        d["eta_text"] = human_seconds(d["eta_seconds"])
        d["active"] = d["state"] in ("queued", "running")
        jobs.append(d)
    return render(request, "app_home.html", {"client": c, "jobs": jobs, "error": error, "notice": notice}, status)


async def _own_job(request: Request, job_id: str) -> tuple[Client | None, Job | None]:
    c = await _client(request)
    if c is None or len(job_id) > 64:
        return c, None
    return c, await _svc(request).store.job(job_id, client_id=c.id)


def human_seconds(t: float | None) -> str:
    """A duration as people say it: '45 s', '12 min', '3 h 5 min', '2 d 4 h'."""
    if t is None:
        return ""
    t = max(0.0, float(t))
    if t < 90:
        return f"{max(1, round(t))} s"
    if t < 90 * 60:
        return f"{round(t / 60)} min"
    if t < 48 * 3600:
        h, m = divmod(round(t / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(round(t / 3600), 24)
    return f"{d} d {h} h" if h else f"{d} d"


def _retry_at(checked_at: str, retry_after: float | None) -> str:
    if retry_after is None:
        return ""
    try:
        base = dt.datetime.fromisoformat(checked_at)
    except (TypeError, ValueError):
        return f"after {human_seconds(retry_after)}"
    at = (base + dt.timedelta(seconds=retry_after)).astimezone(dt.UTC)
    return f"after {human_seconds(retry_after)} ({at.strftime('%Y-%m-%d %H:%M UTC')})"


def _row_view(r: JobRow) -> dict[str, Any]:
    """One result row with its evidence, ready for the template."""
    res = r.result or {}
    ev = res.get("evidence") or {}
    code = ev.get("code")
    reply = " ".join(str(x) for x in (code, ev.get("enhanced")) if x)
    evidence = [(label, str(ev[key])) for key, label in _EVIDENCE if ev.get(key) not in (None, "")]
    if res.get("retry_after") is not None:
        evidence.append(("Retry", _retry_at(res.get("checked_at") or "", res["retry_after"])))
    if res.get("suggestion"):
        evidence.append(("Did you mean", res["suggestion"]))
    if r.read_error:
        evidence.append(("Input problem", r.read_error))
    if res.get("checked_at"):
        evidence.append(("Checked", res["checked_at"].replace("T", " ").replace("+00:00", " UTC")))
    return {"line": r.line, "address": r.address, "status": res.get("status") or ("" if r.done_at else "pending"),
            "reason": res.get("reason", ""), "flags": ", ".join(res.get("flags") or []), "reply": reply,
            "evidence": evidence, "transcript": ev.get("transcript_id") or "", "delist": ev.get("delist_url") or ""}


_EVIDENCE = (("mx_host", "Mail server"), ("mx_ip", "Server IP"), ("source_ip", "Our source IP"),
             ("code", "Reply code"), ("enhanced", "Enhanced code"), ("text", "Reply text"),
             ("detail", "Detail"), ("decided_by", "Decided by"), ("blocklist", "Blocklist"),
             ("transcript_id", "Transcript id"))
FORMATS = (("csv", "CSV"), ("jsonl", "JSON lines"), ("xlsx", "Excel (.xlsx)"))
PAGE = 500  # result rows per page


def _filters(status: str, reason: str, q: str) -> tuple[str, str, str]:
    """The job page's filters, each reduced to a known value or ''."""
    status = status if status in (*statuses(), "pending") else ""
    reason = reason if reason in {r.value for r in Reason} else ""
    return status, reason, q.strip().lower()[:200]


@router.get("/app/jobs/{job_id}", response_class=HTMLResponse)
async def app_job(request: Request, job_id: str, status: str = "", reason: str = "", q: str = "",
                  after: int = -1) -> Response:
    c, job = await _own_job(request, job_id)
    if c is None:
        return RedirectResponse("/app", status_code=303)
    if job is None:
        return error_page(request, 404, "No such job.")
    st = _svc(request).store
    prog = (await st.progress(job)).to_dict()
    status, reason, q = _filters(status, reason, q)
    after = max(-1, min(after, 2**31 - 1))
    found, shown = await st.find_rows(job.id, status=status, reason=reason, contains=q, limit=PAGE, after=after)
    rows = [_row_view(r) for r in found]
    query = urlencode({k: v for k, v in (("status", status), ("reason", reason), ("q", q)) if v})
    base = f"/app/jobs/{job.id}?" + (f"{query}&" if query else "")
    pages = {"first": base.rstrip("?&") if after >= 0 else "",
             "next": f"{base}after={found[-1].idx}" if len(found) == PAGE else ""}
    exports = [{"fmt": f, "label": label, "url": f"/app/jobs/{job.id}/results.{f}" + (f"?{query}" if query else "")}
               for f, label in FORMATS]
    status_legend, reason_legend = legend()
    return render(request, "app_job.html", {
        "client": c, "job": prog, "rows": rows, "shown": shown, "status": status, "reason": reason, "q": q,
        "filtered": bool(query), "pages": pages, "chart": chart(prog["by_status"]), "statuses": statuses(),
        "reasons": [r.value for r in Reason], "exports": exports, "eta": human_seconds(prog["eta_seconds"]),
        "status_legend": status_legend, "reason_legend": reason_legend,
        "active": prog["state"] in ("queued", "running")})


@router.get("/app/jobs/{job_id}/progress.json")
async def app_progress(request: Request, job_id: str) -> Response:
    _c, job = await _own_job(request, job_id)
    if job is None:
        return JSONResponse({"detail": "no such job"}, status_code=404)
    d = (await _svc(request).store.progress(job)).to_dict()
    d["eta_text"] = human_seconds(d["eta_seconds"])
    d["chart"] = chart(d["by_status"])["bars"]
    return JSONResponse(d)


@router.get("/app/jobs/{job_id}/results.{fmt}")
async def app_results(request: Request, job_id: str, fmt: str, status: str = "", reason: str = "",
                      q: str = "") -> Response:
    _c, job = await _own_job(request, job_id)
    if job is None or fmt not in EXPORT_MEDIA:
        return error_page(request, 404, "No such job." if job is None else "No such format.")
    status, reason, q = _filters(status, reason, q)
    return export_response(_svc(request).store, job, fmt, status=status, reason=reason, contains=q)


@router.get("/app/jobs/{job_id}/sessions/{session_id}", response_class=HTMLResponse)
async def app_transcript(request: Request, job_id: str, session_id: str) -> Response:
    """The transcript of a session held for one of the client's jobs (recipients masked)."""
    c, job = await _own_job(request, job_id)
    if c is None:
        return RedirectResponse("/app", status_code=303)
    row = await _svc(request).store.session_log(session_id[:64]) if job is not None else None
    if job is None or row is None or job.id not in row.job_ids.split():
        return error_page(request, 404, "No such session for this job.")
    return render(request, "app_transcript.html", {
        "job": job, "s": row, "started": _utc(row.started), "duration": f"{max(row.ended - row.started, 0):.2f} s",
        "lines": transcript_lines(_svc(request).store.transcript_text(row), _svc(request).settings.mail_from)})




def transcript_lines(text: str, keep: str = "") -> list[tuple[str, str, str]]:
    """A stored transcript as (seconds since the first line, direction, text) rows, with every
    address's local part masked (but ``keep``, our own sender): a session may carry other
    clients' recipients, and servers echo recipients in their replies."""
    out: list[tuple[str, str, str]] = []
    sender = re.compile(re.escape(keep), re.I) if keep else None

    def mask(line: str) -> str:
        if sender is not None:
            line = sender.sub("\0", line)
        return mask_local_parts(line).replace("\0", keep)

    t0: float | None = None
    for line in text.splitlines():
        t_text, _, rest = line.partition(" ")
        direction, _, body = rest.partition(" ")
        try:
            t = float(t_text)
        except ValueError:
            out.append(("", "", mask(line)))
            continue
        t0 = t if t0 is None else t0
        out.append((f"{t - t0:.3f}", direction, mask(body)))
    return out


@router.post("/app/jobs/{job_id}/cancel")
async def app_cancel(request: Request, job_id: str, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    _c, job = await _own_job(request, job_id)
    if job is not None and _csrf_ok(request, csrf):
        await _svc(request).store.cancel(job.id)
    return RedirectResponse(f"/app/jobs/{job_id}", status_code=303)


@router.post("/app/jobs/{job_id}/delete")
async def app_delete(request: Request, job_id: str, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Delete a job and its rows (a running job is cancelled first).  CSRF-protected."""
    c, job = await _own_job(request, job_id)
    if c is None:
        return RedirectResponse("/app", status_code=303)
    if job is None:
        return error_page(request, 404, "No such job.")
    if not _csrf_ok(request, csrf):
        return await _home(request, c, "The form expired; please try again.", 400)
    st = _svc(request).store
    await st.cancel(job.id)
    await st.delete_job(job.id)
    return RedirectResponse("/app?deleted=" + quote(job.filename[:100]), status_code=303)


COLOURS = {"deliverable": "#1b7f3b", "undeliverable": "#b3261e", "risky": "#8a5300", "unknown": "#5f6368",
           "error": "#6a1b9a"}


def chart(by_status: dict[str, int], scale: float = 200) -> dict[str, Any]:
    """A horizontal bar chart of the status breakdown, as SVG geometry (every status; the
    longest possible bar is ``scale`` units)."""
    total = sum(by_status.values()) or 1
    names = [*statuses(), *sorted(k for k in by_status if k not in statuses())]
    bars = []
    for i, st in enumerate(names):
        n = by_status.get(st, 0)
        bars.append({"label": st, "n": n, "pct": round(100 * n / total, 1), "y": 10 + i * 34,
                     "w": round(scale * n / total, 1), "colour": COLOURS.get(st, "#5f6368")})
    return {"bars": bars, "height": 10 + len(names) * 34,
            "summary": ", ".join(f"{b['label']} {b['n']} ({b['pct']} %)" for b in bars)}


# ------------------------------------------------------------------------------ operator
@router.get("/ops", response_class=HTMLResponse)
async def ops(request: Request, window: str = "24h") -> Response:
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
        pairs.append({"source": src, "receiver": rcv, "state": cur.rep.value,
                      "until": _utc(cur.until) if cur.rep.value != "healthy" else "—",
                      "blocks": len(cur.blocks), "detail": cur.detail[:160]})
    listed = []
    for key, text in sorted(pool.listed.items()):
        urls = [w for w in text.split() if w.startswith("http")]
        listed.append({"source": key, "text": text, "urls": urls})
    paused = [{"receiver": r, "until": _utc(u), "why": why[:200]} for r, (u, why) in sorted(pool.paused.items())
              if u > now]
    sources = [{"key": x.key, "healthy": x.key not in pool.listed} for x in pool.sources]
    window = window if window in WINDOWS else "24h"
    width, n = WINDOWS[window]
    since = (now // width + 1) * width - width * n  # whole buckets, the last one holds "now"
    buckets = await svc.store.throughput(since, width, n)
    charts = [timeline(buckets, field, label, colour, window) for field, label, colour in (
        ("sessions", "Sessions", "#0b57d0"), ("rcpts", "RCPTs", "#1b7f3b"), ("blocked", "Blocked sessions", "#b3261e"))]
    table = [{"start": _bucket_label(b.start, width), "sessions": b.sessions, "rcpts": b.rcpts, "blocked": b.blocked}
             for b in buckets]
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
        "exemptions": exemptions, "changes": changes, "buckets": table, "charts": charts, "window": window,
        "windows": list(WINDOWS), "audit": await svc.store.audit_log(30),
        "notice": request.query_params.get("done", "")[:300],
        "conduct": svc.verifier.stats.as_dict(), "in_flight": svc.dispatcher.in_flight,
        "utc": _utc})


@router.post("/ops/exemptions/{exemption_id}/{action}")
async def ops_exemption(request: Request, exemption_id: int, action: str,
                        csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Approve a pending opt-out or remove an entry (operators; CSRF-checked)."""
    c = await _client(request)
    if c is None or not c.operator:
        return error_page(request, 403, "Operators only.")
    if not _csrf_ok(request, csrf):
        return error_page(request, 400, "The form expired; go back to /ops and try again.")
    if action not in ("approve", "remove") or not 0 < exemption_id < 2**31:
        return error_page(request, 404, "No such action.")
    svc = _svc(request)
    row = await svc.store.exemption(exemption_id)
    ok = await (svc.approve_exemption(exemption_id, c.name) if action == "approve"
                else svc.remove_exemption(exemption_id))
    if not ok or row is None:
        return error_page(request, 404, "No such exemption.")
    await svc.store.audit(c.name, f"opt-out {action}", f"{row.kind} {row.value}", row.note[:300])
    return RedirectResponse("/ops?done=" + quote(f"{'Approved' if action == 'approve' else 'Removed'} {row.value}."),
                            status_code=303)


#: chart windows: bucket width (s) and number of buckets
WINDOWS = {"1h": (300.0, 12), "24h": (3600.0, 24), "7d": (6 * 3600.0, 28)}


def _bucket_label(t: float, width: float) -> str:
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    return d.strftime("%m-%d %H:%M") if width >= 6 * 3600 else d.strftime("%H:%M")


def _nice(n: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, 100 ... at least ``n``: a readable axis maximum."""
    top = 1
    while top < n:
        top = top * 5 // 2 if str(top)[0] == "2" else top * 2
    return top


def timeline(buckets: list[Any], field: str, label: str, colour: str, window: str) -> dict[str, Any]:
    """A bar chart of one throughput series as SVG geometry (drawn by the template): bars,
    a y axis from 0 to a round maximum, three time labels, and a text summary for
    assistive technology."""
    W, H, left, top, bottom = 480, 180, 50, 14, 30
    pw, ph = W - left - 8, H - top - bottom
    values = [int(getattr(b, field)) for b in buckets]
    ymax = _nice(max(values, default=0) or 1)
    bw = pw / max(len(values), 1)
    bars = []
    for i, v in enumerate(values):
        h = round(ph * v / ymax, 2)
        bars.append({"x": round(left + i * bw + 0.5, 2), "w": round(max(bw - 1.5, 1), 2), "y": round(top + ph - h, 2),
                     "h": h, "v": v, "t": _bucket_label(buckets[i].start, buckets[i].width)})
    levels = (0, ymax // 2, ymax) if ymax % 2 == 0 else (0, ymax)  # whole numbers only
    ticks = [{"y": round(top + ph - ph * v / ymax, 2), "v": v} for v in levels]
    xl = [] if not buckets else [
        {"x": left, "anchor": "start", "t": bars[0]["t"]},
        {"x": round(left + pw / 2, 2), "anchor": "middle", "t": bars[len(bars) // 2]["t"]},
        {"x": left + pw, "anchor": "end", "t": "now"}]
    total = sum(values)
    peak = max(range(len(values)), key=lambda i: values[i]) if values else 0
    summary = (f"{label}, last {window}: {total} in all" +
               (f", at most {values[peak]} per bucket (from {bars[peak]['t']} UTC)" if total else ", none"))
    return {"id": field, "label": label, "colour": colour, "bars": bars, "ticks": ticks, "xlabels": xl,
            "W": W, "H": H, "left": left, "right": W - 8, "base": top + ph, "total": total, "summary": summary}


async def _operator(request: Request, csrf: str) -> tuple[Client | None, Response | None]:
    c = await _client(request)
    if c is None or not c.operator:
        return None, error_page(request, 403, "Operators only.")
    if not _csrf_ok(request, csrf):
        return None, error_page(request, 400, "The form expired; go back to /ops and try again.")
    return c, None


@router.post("/ops/receivers/unpause")
async def ops_unpause(request: Request, receiver: Annotated[str, Form(max_length=300)] = "",
                      csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Lift a receiver's pause (operators; CSRF-checked; audit-logged)."""
    c, refused = await _operator(request, csrf)
    if c is None:
        return refused or error_page(request, 403, "Operators only.")
    if not await _svc(request).operator_action(c.name, "unpause", receiver):
        return error_page(request, 404, f"{receiver} is not paused.")
    return RedirectResponse("/ops?done=" + quote(f"Unpaused {receiver}."), status_code=303)


@router.post("/ops/quarantine/clear")
async def ops_clear(request: Request, source: Annotated[str, Form(max_length=300)] = "",
                    receiver: Annotated[str, Form(max_length=300)] = "",
                    csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    """End a source's quarantine (or ban) for a receiver (operators; CSRF-checked; audit-logged)."""
    c, refused = await _operator(request, csrf)
    if c is None:
        return refused or error_page(request, 403, "Operators only.")
    if not await _svc(request).operator_action(c.name, "clear", receiver, source):
        return error_page(request, 404, f"{source} is not quarantined for {receiver}.")
    return RedirectResponse("/ops?done=" + quote(f"Cleared {source} for {receiver}."), status_code=303)

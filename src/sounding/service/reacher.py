"""A drop-in for Reacher users: ``POST /v0/check_email`` with Reacher's request and response.

Reacher (reacherhq/check-if-email-exists) is a widely used open-source verifier; scripts and
integrations written against its ``/v0/check_email`` can point at Sounding unchanged.  The
shapes follow Reacher's published OpenAPI description (``backend/openapi.json``:
``CheckEmailRequest``, ``CheckEmailOutput``) and its core types (``core/src``).

Request fields and what happens to them:

* ``to_email`` -- verified, through the same verifier, cache and limits as ``/v1/verify``.
* ``from_email``, ``hello_name`` -- ignored: the envelope sender and the HELO name are the
  operator's (its FQDN with matching reverse DNS, its policy page); a caller choosing them
  would make our sessions unidentifiable.  Listed in the ``X-Sounding-Ignored`` header.
* ``proxy`` -- refused (422): our sessions come only from the operator's own addresses, the
  ones the public policy page names; a caller's proxy would hide who is asking.
* ``smtp_port`` -- 25 (Reacher's default: the MX port) or the port this service is configured
  for; any other (465, 587: submission ports, which answer about authenticated senders) is
  refused (422).
* ``gmail_verif_method``, ``hotmailb2b_verif_method``, ``hotmailb2c_verif_method``,
  ``yahoo_verif_method``, ``check_gravatar``, and anything else -- ignored: we ask over SMTP
  only, and never third-party web services.

``is_reachable`` from our verdict (Reacher's rule: role and disposable accounts are risky)::

    deliverable    -> safe     (risky when the address is a role or disposable account)
    risky          -> risky    (catch-all, accept-all, mailbox full, disposable)
    undeliverable  -> invalid  (bad syntax, no such domain, null MX, no such mailbox, disabled)
    unknown        -> unknown  (timeouts, blocks, greylisting past the wait, opted out ...)
    error          -> invalid  (not an address at all, e.g. empty)

Our own verdict rides along under ``sounding`` (status, reason, evidence, retry_after).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ..address import Flag, parse_address
from ..dns import MxResult, MxStatus
from ..errors import AddressError
from ..store import QuotaExceeded
from ..store.models import Client
from ..verdict import Reason, Status, Verdict

_FIELD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: request fields that are accepted and have no effect (see the module docstring)
IGNORED = ("from_email", "hello_name", "gmail_verif_method", "hotmailb2b_verif_method",
           "hotmailb2c_verif_method", "yahoo_verif_method", "check_gravatar")


class CheckEmailInputProxy(BaseModel):
    """Reacher's proxy object (refused: see the module docstring)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None


class CheckEmailRequest(BaseModel):
    """Reacher's ``CheckEmailRequest``: only ``to_email`` is required."""

    model_config = ConfigDict(extra="allow")

    to_email: str = Field(..., max_length=1000, description="The address to check.")
    from_email: str | None = Field(None, description="Ignored: the envelope sender is the operator's.")
    hello_name: str | None = Field(None, description="Ignored: the HELO name is the operator's FQDN.")
    proxy: CheckEmailInputProxy | None = Field(
        None, description="Refused: sessions come only from the operator's own addresses.")
    smtp_port: int | None = Field(None, description="Only the port this service uses (normally 25).")
    gmail_verif_method: Any = Field(None, description="Ignored: always SMTP.")
    hotmailb2b_verif_method: Any = Field(None, description="Ignored: always SMTP.")
    hotmailb2c_verif_method: Any = Field(None, description="Ignored: always SMTP.")
    yahoo_verif_method: Any = Field(None, description="Ignored: always SMTP.")
    check_gravatar: bool | None = Field(None, description="Ignored: no third-party lookups.")


# ------------------------------------------------------------------------------ mapping (pure)
def is_reachable(v: Verdict) -> str:
    """Our status as Reacher's ``is_reachable`` (see the module docstring)."""
    if v.status is Status.DELIVERABLE:
        return "risky" if {Flag.ROLE.value, Flag.DISPOSABLE.value} & set(v.flags) else "safe"
    return {Status.RISKY: "risky", Status.UNDELIVERABLE: "invalid", Status.UNKNOWN: "unknown",
            Status.ERROR: "invalid"}[v.status]


_NO_SMTP = {Reason.SYNTAX, Reason.NO_DOMAIN, Reason.NULL_MX, Reason.NO_MX, Reason.NO_MX_ADDRESS,
            Reason.DISPOSABLE, Reason.IP_LITERAL}


def smtp_details(v: Verdict) -> dict[str, Any]:
    """Reacher's ``SmtpDetails``, or a ``CoreError`` when SMTP gave no answer (unknown)."""
    if v.status is Status.UNKNOWN and v.reason not in _NO_SMTP:
        kind = {Reason.TIMEOUT: "Timeout", Reason.CONNECT_FAILED: "IOError",
                Reason.CONNECTION_LOST: "IOError"}.get(v.reason, "SmtpError")
        e = v.evidence
        said = f"{e.code} {e.enhanced or ''} {e.text or ''}".replace("  ", " ").strip() if e.code else ""
        detail = said or e.detail or ""
        return {"type": kind, "message": f"{v.reason.value}" + (f": {detail}" if detail else "")}
    asked = v.status is not Status.ERROR and v.reason not in _NO_SMTP
    full = v.reason is Reason.MAILBOX_FULL
    return {
        "can_connect_smtp": asked,
        "has_full_inbox": full,
        "is_catch_all": v.reason in (Reason.CATCH_ALL, Reason.ACCEPT_ALL),
        "is_deliverable": asked and (v.status is Status.DELIVERABLE or v.reason in (
            Reason.CATCH_ALL, Reason.ACCEPT_ALL, Reason.CATCH_ALL_UNKNOWN)),
        "is_disabled": v.reason is Reason.MAILBOX_DISABLED,
    }


def mx_details(mx: MxResult | None, v: Verdict) -> dict[str, Any]:
    """Reacher's ``MxDetails`` (host names as FQDNs with the trailing dot), or a ``CoreError``."""
    if mx is None:
        if v.reason is Reason.EXEMPT:
            return {"type": "Skipped", "message": "the domain opted out of verification: not looked up"}
        return {"accepts_mail": False, "records": []}
    if mx.status is MxStatus.OK:
        return {"accepts_mail": True, "records": [h.name.rstrip(".") + "." for h in mx.hosts]}
    if mx.status in (MxStatus.NO_DOMAIN, MxStatus.NULL_MX, MxStatus.NO_MAIL_HOST):
        return {"accepts_mail": False, "records": []}
    return {"type": "ResolveError", "message": f"{mx.status.value}: {mx.detail or 'no usable MX'}"}


def syntax_details(address: str) -> dict[str, Any]:
    """Reacher's ``SyntaxDetails`` (with the core type's ``address``, ``normalized_email``
    and ``suggestion``)."""
    try:
        p = parse_address(address)
    except AddressError:
        return {"address": None, "domain": "", "is_valid_syntax": False, "username": "",
                "normalized_email": None, "suggestion": None}
    return {"address": p.normalized, "domain": p.domain, "is_valid_syntax": True, "username": p.local,
            "normalized_email": p.normalized, "suggestion": p.suggestion}


def misc_details(v: Verdict) -> dict[str, Any]:
    """Reacher's ``MiscDetails``: B2C is our ``free`` (free-mail provider) flag."""
    return {"is_disposable": Flag.DISPOSABLE.value in v.flags, "is_role_account": Flag.ROLE.value in v.flags,
            "is_b2c": Flag.FREE.value in v.flags, "gravatar_url": None, "haveibeenpwned": None}


def check_email_output(address: str, v: Verdict, mx: MxResult | None, *, started: float, ended: float,
                       server_name: str, sounding: dict[str, Any]) -> dict[str, Any]:
    """The whole ``CheckEmailOutput``."""
    def ts(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()

    took = max(0.0, ended - started)
    return {
        "input": address,
        "is_reachable": is_reachable(v),
        "misc": misc_details(v),
        "mx": mx_details(mx, v),
        "smtp": smtp_details(v),
        "syntax": syntax_details(address),
        "debug": {"start_time": ts(started), "end_time": ts(ended),
                  "duration": {"secs": int(took), "nanos": int((took % 1) * 1e9)},
                  "server_name": server_name, "smtp": {"verif_method": {"type": "Smtp"}}},
        "sounding": sounding,
    }


# ------------------------------------------------------------------------------ the route
async def reacher_client(request: Request,
                         x_reacher_secret: Annotated[str | None, Header(
                             description="Reacher's header: your API key works here too.")] = None,
                         authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Client:
    """The caller: an API key in ``X-API-Key`` (as for /v1), ``Authorization: Bearer KEY``, or
    the way Reacher clients send it -- ``x-reacher-secret: KEY`` or ``Authorization: KEY``."""
    from .api import Problem, client, svc

    plain = authorization.strip() if authorization and " " not in authorization.strip() else None
    token = x_reacher_secret or plain
    if token and not request.headers.get("x-api-key"):
        c = await svc(request).store.client_by_key(token)
        if c is None:
            raise Problem(401, "Unauthorized", "unknown API key")
        return c
    return await client(request, request.headers.get("x-api-key"), _bearer_of(authorization))


ReacherClientDep = Annotated[Client, Depends(reacher_client)]


def router() -> APIRouter:
    """``POST /v0/check_email`` (mounted under ``/v0``)."""
    from .api import Problem, _problems, svc, verdict_out

    r = APIRouter(tags=["Reacher-compatible"])

    @r.post("/check_email", responses=_problems(401, 422, 429),
            summary="Verify one address, answered in Reacher's shape (a drop-in for /v0/check_email)",
            description=__doc__ or "")
    async def check_email(body: CheckEmailRequest, request: Request, response: Response,
                          c: ReacherClientDep) -> dict[str, Any]:
        service = svc(request)
        s = service.settings
        if body.proxy is not None:
            raise Problem(422, "Proxy refused", "our sessions come only from this service's own addresses, "
                          "the ones its policy page names; a proxy would hide who is asking. Send the request "
                          "without 'proxy'.")
        if body.smtp_port is not None and body.smtp_port not in (25, s.smtp_port):  # 25: "the MX port"
            raise Problem(422, "SMTP port refused", f"only port {s.smtp_port} is used: mail exchangers answer "
                          "RCPT there; 465 and 587 are submission ports for authenticated senders.")
        sent = body.model_dump(exclude_unset=True)
        ignored = [k for k in (*IGNORED, *(body.model_extra or {})) if sent.get(k) is not None]
        named = [k for k in ignored if _FIELD_NAME.fullmatch(k)][:20]  # a header carries plain names only
        if len(named) < len(ignored):
            named.append(f"{len(ignored) - len(named)} other fields")
        if named:
            response.headers["X-Sounding-Ignored"] = ", ".join(named)
        try:
            await service.store.charge(c, 1, s.daily_quota)
        except QuotaExceeded as exc:
            raise Problem(429, "Quota exceeded", str(exc)) from exc
        started = time.time()
        v, cached = await service.verify_one(body.to_email, use_cache=True)
        mx: MxResult | None = None
        if v.reason is not Reason.EXEMPT and v.status is not Status.ERROR and v.reason is not Reason.SYNTAX:
            try:
                mx = await service.verifier.resolver.resolve(parse_address(body.to_email).domain)
            except AddressError:  # pragma: no cover - the verdict would be syntax
                mx = None
        return check_email_output(body.to_email, v, mx, started=started, ended=time.time(),
                                  server_name=s.helo, sounding=verdict_out(v, cached))

    return r


def _bearer_of(authorization: str | None) -> Any:
    from fastapi.security import HTTPAuthorizationCredentials

    if authorization and authorization.lower().startswith("bearer "):
        return HTTPAuthorizationCredentials(scheme="Bearer", credentials=authorization[7:].strip())
    return None

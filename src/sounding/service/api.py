"""The HTTP API (FastAPI; OpenAPI at ``/docs``) and the application factory.

Errors are RFC 9457 problem details (``application/problem+json``).  Clients authenticate with
an API key in ``X-API-Key`` (or ``Authorization: Bearer``); each sees only its own jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..courtesy.exemptions import Kind
from ..errors import InputError, SoundingError
from ..listio import ResultWriter, Row, XlsxResultWriter
from ..settings import Settings
from ..store import QuotaExceeded, Store
from ..store.models import Client, Job
from ..verdict import Evidence, Reason, Status, Verdict
from .core import Service
from .uploads import BadUpload, TooLarge, UploadLimit, receive_upload

PROBLEM = "application/problem+json"


class Problem(Exception):
    """An error answered as problem+json."""

    def __init__(self, status: int, title: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem_response(status: int, title: str, detail: str = "", instance: str = "", **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail or title}
    if instance:
        body["instance"] = instance
    body.update(extra)
    headers = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


# ------------------------------------------------------------------------------ models
class VerifyRequest(BaseModel):
    email: str = Field(..., max_length=1000, description="The address to verify.")
    use_cache: bool = Field(True, description="Reuse a recent verdict for this address.")


class VerdictOut(BaseModel):
    address: str
    normalized: str | None = None
    status: Literal["deliverable", "undeliverable", "risky", "unknown", "error"]
    reason: str
    flags: list[str]
    suggestion: str | None = None
    retry_after: float | None = None
    checked_at: str
    evidence: Evidence  # the verdict's own dataclass: one definition of the fields
    cached: bool = False


class JobOut(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "cancelled", "failed"]
    filename: str
    total: int
    unique_addresses: int
    done: int
    percent: float
    by_status: dict[str, int]
    #: rows without an address (status ``error``: empty cell, no e-mail column, unreadable
    #: row), counted apart from the addresses; also in ``by_status["error"]``
    input_errors: int = 0
    eta_seconds: float | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None


class JobList(BaseModel):
    jobs: list[JobOut]


class ExemptionIn(BaseModel):
    value: str = Field(..., min_length=1, max_length=300, description="Domain, MX host name or CIDR range.")
    kind: Literal["domain", "mx", "cidr"] | None = None
    note: str = Field("", max_length=2000)


class ExemptionOut(BaseModel):
    id: int
    kind: str
    value: str
    note: str
    source: str
    added: float
    state: Literal["active", "pending"] = Field(description="active: honoured; pending: waits for proof")
    proof: str = Field(description="How an active entry was proved (DNS TXT record, operator, ...)")
    why: str = Field("", description="Why a pending entry waits (a shared provider)")


# ------------------------------------------------------------------------------ app
def create_app(settings: Settings | None = None, *, store: Store | None = None, worker: bool = True,
               service: Service | None = None) -> FastAPI:
    """The whole service (API + pages).  Opens the store and starts the worker on startup."""
    s = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = store or await Store.open(s.store_url)
        svc = service or Service(s, st, worker=worker)
        await svc.start()
        app.state.store, app.state.service, app.state.settings = st, svc, s
        try:
            yield
        finally:
            await svc.stop()
            if store is None:
                await st.close()

    app = FastAPI(title="Sounding", version="1", lifespan=lifespan,
                  description="E-mail address verification over SMTP: connect, EHLO, MAIL FROM, RCPT TO, "
                              "QUIT — never a message.",
                  docs_url=None, redoc_url=None)  # served below from bundled assets, not a CDN
    app.state.settings = s
    app.add_middleware(UploadLimit, limit=lambda: s.max_upload_bytes)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, request.url.path, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith(("/v1/", "/v0/")) or exc.status_code in (404, 405) and \
                "text/html" not in request.headers.get("accept", ""):
            return problem_response(exc.status_code, str(exc.detail), instance=request.url.path)
        from .web import error_page

        return error_page(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return problem_response(422, "Invalid request", "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}"
                                                                   for e in errors)[:1000],
                                request.url.path, errors=errors)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        return problem_response(500, "Internal error", "the error was logged", request.url.path)

    app.include_router(_api_router(), prefix="/v1")
    from . import reacher

    app.include_router(reacher.router(), prefix="/v0")
    from pathlib import Path

    from fastapi.staticfiles import StaticFiles

    from .web import router as web_router

    app.include_router(web_router)
    app.mount("/static", StaticFiles(directory=str(Path(__file__).resolve().parent / "static")), name="static")
    _docs_routes(app)
    return app


VENDOR = "/static/vendor"


def _docs_routes(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` and ReDoc at ``/redoc``, from the copies in ``static/vendor``
    (see its README for versions and licences): they work offline and fetch nothing from
    elsewhere (no CDN, no web fonts, no online spec validator)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse

    oauth2 = "/docs/oauth2-redirect"

    def offline(resp: HTMLResponse) -> HTMLResponse:
        # The browser itself enforces "this machine only": ReDoc 2 shows a logo from its CDN
        # and Swagger UI can call an online validator; the policy stops both before any
        # request leaves. Inline script/style: both UIs are started by an inline snippet.
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; "
            "font-src 'self' data:; frame-ancestors 'none'")
        return resp

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return offline(get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} — API (Swagger UI)",
            swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png", oauth2_redirect_url=oauth2,
            swagger_ui_parameters={"validatorUrl": None}))

    @app.get(oauth2, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return offline(get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} — API (ReDoc)",
            redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png", with_google_fonts=False))


_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Your API key.")
_bearer = HTTPBearer(auto_error=False)


def svc(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


async def client(request: Request, key: Annotated[str | None, Depends(_key_header)] = None,
                 bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> Client:
    token = key or (bearer.credentials if bearer else None)
    if not token:
        raise Problem(401, "Unauthorized", "send your API key in the X-API-Key header")
    c = await svc(request).store.client_by_key(token)
    if c is None:
        raise Problem(401, "Unauthorized", "unknown API key")
    return c


async def operator(c: Annotated[Client, Depends(client)]) -> Client:
    if not c.operator:
        raise Problem(403, "Forbidden", "operators only")
    return c


ClientDep = Annotated[Client, Depends(client)]
OperatorDep = Annotated[Client, Depends(operator)]


async def _job_of(request: Request, job_id: str, c: Client) -> Job:
    if len(job_id) > 64:
        raise Problem(404, "Not Found", "no such job")
    job = await svc(request).store.job(job_id, client_id=c.id)
    if job is None:  # another client's job is indistinguishable from a missing one
        raise Problem(404, "Not Found", "no such job")
    return job


def verdict_out(v: Verdict, cached: bool = False) -> dict[str, Any]:
    d = v.to_dict()
    d["cached"] = cached
    return d


EXPORT_MEDIA = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson",
                "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


async def export(store: Store, job: Job, fmt: str, *, status: str = "", reason: str = "",
                 contains: str = "") -> AsyncIterator[bytes]:
    """Results in input order (only the rows matching ``status``/``reason``/``contains``, if
    given) as CSV, JSON lines or XLSX; cells a spreadsheet would run as formulas are defused."""
    rows = store.rows(job.id, status=status, reason=reason, contains=contains)
    if fmt == "xlsx":
        async for chunk in _export_xlsx(job, rows):
            yield chunk
        return
    out = io.StringIO()
    w = ResultWriter(out, fmt, job.header, jsonl_input=job.fmt == "jsonl")
    async for r in rows:
        v = Verdict.from_dict(r.result) if r.result else None
        w.write(Row(r.line, list(r.cells), r.address, r.read_error), v)
        if out.tell() > 1 << 16:
            yield out.getvalue().encode("utf-8")
            out.seek(0)
            out.truncate()
    yield out.getvalue().encode("utf-8")


async def _export_xlsx(job: Job, rows: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    # A workbook is a zip whose directory comes last: it cannot be streamed as it is built.
    # openpyxl's write-only sheet spools rows to disk; the CPU work runs in a thread, in
    # batches, so the event loop keeps serving while a large list is written.
    w = XlsxResultWriter(job.header, jsonl_input=job.fmt == "jsonl")
    batch: list[tuple[Row, Verdict | None]] = []

    def flush(items: list[tuple[Row, Verdict | None]]) -> None:
        for row, v in items:
            w.write(row, v)

    async for r in rows:
        batch.append((Row(r.line, list(r.cells), r.address, r.read_error),
                      Verdict.from_dict(r.result) if r.result else None))
        if len(batch) >= 1000:
            await asyncio.to_thread(flush, batch)
            batch = []
    await asyncio.to_thread(flush, batch)
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as buf:
        await asyncio.to_thread(w.save, buf)
        buf.seek(0)
        while chunk := await asyncio.to_thread(buf.read, 1 << 16):
            yield chunk


def export_response(store: Store, job: Job, fmt: str, *, status: str = "", reason: str = "",
                    contains: str = "") -> StreamingResponse:
    """The download of a job's (filtered) results, named after the job and the filter."""
    parts = [f"sounding-{job.id}", *(x for x in (status, reason) if x)]
    name = "-".join(parts) + f".{fmt}"
    return StreamingResponse(export(store, job, fmt, status=status, reason=reason, contains=contains),
                             media_type=EXPORT_MEDIA[fmt],
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _api_router() -> Any:
    from fastapi import APIRouter

    r = APIRouter(tags=["v1"])
    err = _problems(401, 422)

    @r.post("/verify", response_model=VerdictOut, responses=_problems(401, 422, 429),
            summary="Verify one address (synchronous; the sign-up form case)")
    async def verify(body: VerifyRequest, request: Request, c: ClientDep) -> dict[str, Any]:
        service = svc(request)
        try:
            await service.store.charge(c, 1, service.settings.daily_quota)
        except QuotaExceeded as exc:
            raise Problem(429, "Quota exceeded", str(exc)) from exc
        v, cached = await service.verify_one(body.email, use_cache=body.use_cache)
        return verdict_out(v, cached)

    @r.post("/jobs", response_model=JobOut, status_code=202, responses=_problems(400, 401, 413, 422, 429),
            summary="Upload a list (CSV with any columns, or JSON lines)", openapi_extra=_UPLOAD_BODY)
    async def create_job(request: Request, c: ClientDep) -> dict[str, Any]:
        """The body is streamed (never held in memory) and parsed in a worker thread; a list
        larger than the limit is refused while it arrives (413), one with more rows than the
        day's quota before it is parsed (429)."""
        service = svc(request)
        try:
            up = await receive_upload(request, service.settings.max_upload_bytes)
        except TooLarge as exc:
            raise Problem(413, "Upload too large", f"the limit is {exc.limit} bytes") from exc
        except BadUpload as exc:
            raise Problem(422, "Invalid request", str(exc)) from exc
        try:
            column = up.fields.get("column") or None
            if column is not None and len(column) > 200:
                raise Problem(422, "Invalid request", "column: at most 200 characters")
            job = await service.submit_upload(c, up, column=column)
        except QuotaExceeded as exc:
            raise Problem(429, "Quota exceeded", str(exc)) from exc
        except (InputError, SoundingError) as exc:
            raise Problem(400, "Unreadable list", str(exc)) from exc
        finally:
            up.discard()
        return (await service.store.progress(job)).to_dict()

    @r.get("/jobs", response_model=JobList, responses=err, summary="Your jobs, newest first")
    async def list_jobs(request: Request, c: ClientDep) -> dict[str, Any]:
        st = svc(request).store
        return {"jobs": [(await st.progress(j)).to_dict() for j in await st.jobs(c.id)]}

    @r.get("/jobs/{job_id}", response_model=JobOut, responses=_problems(401, 422, 404),
           summary="A job's progress (counts by status, ETA)")
    async def get_job(job_id: str, request: Request, c: ClientDep) -> dict[str, Any]:
        job = await _job_of(request, job_id, c)
        return (await svc(request).store.progress(job)).to_dict()

    @r.get("/jobs/{job_id}/results", responses={**_problems(401, 422, 404),
                                                200: {"content": {m.split(";")[0]: {} for m in EXPORT_MEDIA.values()}}},
           summary="Results in input order, every input column kept (optionally only some rows)",
           response_class=Response)
    async def results(job_id: str, request: Request, c: ClientDep,
                      format: Annotated[Literal["csv", "jsonl", "xlsx"], Query(
                          description="csv, JSON lines, or an Excel workbook")] = "csv",
                      status: Annotated[Status | None, Query(description="only rows with this status")] = None,
                      reason: Annotated[Reason | None, Query(description="only rows with this reason")] = None,
                      q: Annotated[str, Query(max_length=200, description="only addresses containing this "
                                                                           "text (case-insensitive)")] = "",
                      ) -> Response:
        job = await _job_of(request, job_id, c)
        return export_response(svc(request).store, job, format, status=status.value if status else "",
                               reason=reason.value if reason else "", contains=q.strip().lower())

    @r.delete("/jobs/{job_id}", status_code=204, responses=_problems(401, 422, 404),
              summary="Cancel a running job; delete a finished one", response_class=Response)
    async def delete_job(job_id: str, request: Request, c: ClientDep) -> Response:
        job = await _job_of(request, job_id, c)
        st = svc(request).store
        if not await st.cancel(job.id):
            await st.delete_job(job.id)
        return Response(status_code=204)

    @r.get("/exemptions", response_model=list[ExemptionOut], responses=_problems(401, 422, 403),
           summary="The opt-out registry (operators)")
    async def list_exemptions(request: Request, _: OperatorDep) -> list[dict[str, Any]]:
        return [_ex(e) for e in await svc(request).store.exemptions()]

    @r.post("/exemptions", response_model=ExemptionOut, status_code=201, responses=_problems(401, 422, 403),
            summary="Opt a domain, MX host or IP range out (effective at once)")
    async def add_exemption(body: ExemptionIn, request: Request, _: OperatorDep) -> dict[str, Any]:
        kind: Kind | None = body.kind
        try:
            row = await svc(request).add_exemption(body.value, kind, body.note, "api")
        except InputError as exc:
            raise Problem(422, "Invalid exemption", str(exc)) from exc
        return _ex(row)

    @r.post("/exemptions/{exemption_id}/approve", response_model=ExemptionOut,
            responses=_problems(401, 422, 403, 404), summary="Approve a pending opt-out (effective at once)")
    async def approve_exemption(exemption_id: int, request: Request, op: OperatorDep) -> dict[str, Any]:
        service = svc(request)
        if not -(2**31) <= exemption_id < 2**31 or not await service.approve_exemption(exemption_id, op.name):
            raise Problem(404, "Not Found", "no such exemption")
        row = await service.store.exemption(exemption_id)
        if row is None:
            raise Problem(404, "Not Found", "no such exemption")
        return _ex(row)

    @r.delete("/exemptions/{exemption_id}", status_code=204, responses=_problems(401, 422, 403, 404),
              summary="Remove an opt-out entry", response_class=Response)
    async def delete_exemption(exemption_id: int, request: Request, _: OperatorDep) -> Response:
        if not -(2**31) <= exemption_id < 2**31 or not await svc(request).remove_exemption(exemption_id):
            raise Problem(404, "Not Found", "no such exemption")
        return Response(status_code=204)

    return r


_PROBLEM_SCHEMA = {"type": "object", "required": ["title", "status"], "properties": {
    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
    "detail": {"type": "string"}, "instance": {"type": "string"}}}
_TITLES = {400: "unreadable input", 401: "missing or unknown API key", 403: "operators only",
           404: "not found (or another client's)", 413: "upload too large", 422: "invalid request",
           429: "quota exceeded"}


_UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "CSV or JSON-lines list."},
        "column": {"type": "string", "maxLength": 200,
                   "description": "The e-mail column's header (default: found by name or content)."}}}}}}}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for problem+json error answers (RFC 9457)."""
    return {c: {"description": _TITLES[c], "content": {PROBLEM: {"schema": _PROBLEM_SCHEMA}}} for c in codes}


def _ex(e: Any) -> dict[str, Any]:
    return {"id": e.id, "kind": e.kind, "value": e.value, "note": e.note, "source": e.source, "added": e.added,
            "state": e.state if e.state in ("active", "pending") else "pending", "proof": e.proof, "why": e.why}

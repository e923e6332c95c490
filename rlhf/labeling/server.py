"""The labeling web app: a JSON API (FastAPI) and the static page in ``static/``.

One server serves one project. Every ``/api`` call needs a bearer token
issued by ``rlhf label add-labeler`` (401 without a valid one); admin calls
need an admin token and labeling calls a labeler token (403 otherwise).

Defences, each for a named threat:

- request bodies are capped (413) before they are parsed: a client cannot
  make the server buffer unbounded input;
- bodies are validated by pydantic in strict mode with unknown fields
  rejected; a 422 names the offending field. Ids must fit a 32-bit column
  and free text must be printable, so bad input never reaches the database
  as an overflow or an unstorable character (which would be a 500);
- DNS rebinding (a web page that makes the browser call a server on this
  machine under the attacker's domain name): a server bound to a loopback
  address answers only to loopback Host names and those it was told (400);
- API answers are ``Cache-Control: no-store`` (they carry labels and
  prompts); a ``token=`` in a logged URL is redacted from the access log;
- model text, reasons and names go out only as JSON and the page inserts
  them with ``textContent``; a Content-Security-Policy without inline
  scripts is the second line against HTML/script injection;
- SQL goes through SQLAlchemy with bound parameters; no request value is
  ever used in a file path.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint
# annotations at runtime, and the dependencies are closures it could not
# resolve from strings.
import contextlib
import gc
import ipaddress
import logging
import pathlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhf.errors import BadInput
from rlhf.labeling import stats as stats_mod
from rlhf.labeling.schema import MAX_RANKED, Strength
from rlhf.labeling.store import (POOL_SIZE, Conflict, InvalidLabel, LabelerInfo, NotFound, PairFull, ProjectInfo,
                                 Store, Submission)

log = logging.getLogger(__name__)

STATIC_DIR = resources.files("rlhf.labeling") / "static"
DEFAULT_MAX_BODY_BYTES = 64 * 1024  # a label with a 2,000-character reason is < 10 kB
# Ids are INTEGER columns: 32-bit on PostgreSQL (64 on SQLite). A larger one
# names no row anyway, and sent to the database it would be an overflow (500).
MAX_ID = 2**31 - 1
# Host names a loopback-bound server answers to, besides its bind address.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Control characters but tab and newline, and unpaired surrogates (JSON's
# "\ud800" decodes to one): PostgreSQL cannot store NUL in text, no encoder
# can write a lone surrogate, and the rest only garble logs and terminals.
UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# Threads running the endpoints (blocking database calls) in one server process.
# Fewer than anyio's default 40: the work holds the GIL or waits on the one
# label writer, so more threads only queue inside the process (and would need
# more database connections; the label writer and a spare take the other two).
REQUEST_THREADS = POOL_SIZE - 2
# API answers hold prompts, responses and labels: never kept by a browser or proxy cache.
API_HEADERS = [(b"cache-control", b"no-store")]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` makes the server reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def host_name(header: str) -> str:
    """The name in a Host header (or a configured host): no port, no IPv6
    brackets, lower case, no final dot."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


def allowed_hosts_for(bind_host: str, extra: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The Host names a server bound to ``bind_host`` answers to; None: any.

    Bound to a loopback address: the loopback names, the bind address and
    ``extra`` (e.g. the name a TLS proxy on this machine forwards). Bound to
    another address: any, unless ``extra`` names some (the names it is
    reached by are not known here). ``"*"`` in ``extra`` allows any.
    """
    if "*" in extra or (not extra and not is_loopback(bind_host)):
        return None
    return tuple(dict.fromkeys(host_name(h) for h in (*LOOPBACK_NAMES, bind_host, *extra)))


class GuardMiddleware:
    """Caps request bodies (413), checks the Host header (400) and adds
    security headers to every response (and ``no-store`` to API answers).

    A pure ASGI middleware rather than ``BaseHTTPMiddleware``: it sees the
    body as it streams in, so a chunked upload without Content-Length is cut
    off too, and it costs almost nothing per request.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, allowed_hosts: Sequence[str] | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else frozenset(host_name(h) for h in allowed_hosts)

    def _host_refused(self, scope: Scope) -> str | None:
        """Why this request's Host header is not one we answer to, or None."""
        if self.allowed_hosts is None:
            return None
        raw = dict(scope["headers"]).get(b"host")
        if raw is None:
            return "missing Host header"
        header = raw.decode("latin-1")
        if host_name(header) in self.allowed_hosts:
            return None
        return (f"Host {header!r} is not served here (expected one of: {', '.join(sorted(self.allowed_hosts))}); "
                "to allow another name, start the server with --allowed-host NAME")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = rejected = False
        extra_headers = SECURITY_HEADERS + (API_HEADERS if scope["path"].startswith("/api/") else [])

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # we already answered 413; whatever the app says after that is dropped
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": list(message.get("headers", [])) + extra_headers}
            await send(message)

        refused = self._host_refused(scope)
        if refused is not None:
            await JSONResponse({"detail": refused}, status_code=400)(scope, receive, send_with_headers)
            return

        async def reject() -> None:
            nonlocal rejected
            response = JSONResponse({"detail": f"request body larger than {self.max_body_bytes} bytes"},
                                    status_code=413)
            if not started:
                await response(scope, receive, send_with_headers)
            rejected = True

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await reject()
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Answer now and tell the app the client went away, so it stops reading.
                    await reject()
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited_receive, send_with_headers)


# ---------------------------------------------------------------- request / response bodies


class LabelIn(BaseModel):
    """One label. ``client_id`` is generated by the client once per label and
    re-sent unchanged on retries, which is what makes submission idempotent."""

    model_config = ConfigDict(extra="forbid", strict=True)
    client_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    pair_id: int = Field(ge=1, le=MAX_ID)
    choice: Literal["A", "B", "tie", "skip", "rank"]
    # With choice "rank" (ranking items): the item's response indices, best first; the
    # store checks it is a permutation of the item's responses (422 naming this field).
    ranking: list[Annotated[int, Field(ge=0, lt=MAX_RANKED)]] | None = Field(None, max_length=MAX_RANKED)
    # After choice: their validators read it.
    strength: Strength | None = Field(None, description="with A or B: how much better it is (optional)")
    both_bad: bool = Field(False, description="neither response is acceptable (with A, B or tie: which is "
                                              "less bad)")
    reason: str = Field("", max_length=2000)
    supersedes: int | None = Field(None, ge=1, le=MAX_ID,
                                   description="id of your current label on this pair, to revise it")
    duration_ms: int | None = Field(None, ge=0, le=86_400_000, description="time spent on the pair")

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str) -> str:
        bad = UNPRINTABLE.search(value)
        if bad:
            raise ValueError(f"character U+{ord(bad.group()):04X} at position {bad.start()} is not allowed "
                             "(no control characters other than newline and tab)")
        return value

    @field_validator("ranking")
    @classmethod
    def _ranking_needs_rank(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if value is not None and info.data.get("choice") != "rank":
            raise ValueError(f"only with choice 'rank', not {info.data.get('choice')!r}")
        return value

    @field_validator("strength")
    @classmethod
    def _strength_needs_a_side(cls, value: str | None, info: ValidationInfo) -> str | None:
        choice = info.data.get("choice")
        if value is not None and choice not in ("A", "B"):
            raise ValueError(f"only with choice 'A' or 'B' (how much better the chosen side is), not {choice!r}")
        return value

    @field_validator("both_bad")
    @classmethod
    def _both_bad_needs_a_judgement(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("choice") == "skip":
            raise ValueError("not with choice 'skip' (a skip passes no judgement; send A, B or tie with it)")
        return value


class LabelOut(BaseModel):
    label_id: int
    revision: int
    replayed: bool
    next: dict[str, Any] | None = None  # with ?next=true: what GET /api/next would return


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors without the submitted values (no need to echo input back)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()]


def _pair_json(view) -> dict[str, Any]:
    out = {"id": view.id, "prompt": view.prompt, "response_a": view.response_a, "response_b": view.response_b}
    if view.responses is not None:  # a ranking item: order these K responses
        out["responses"] = view.responses
    if view.kind != "text":  # image pairs: the responses are PNG data URIs, drawn as images
        out["kind"] = view.kind
    return out


def _label_json(row) -> dict[str, Any]:
    out = {"label_id": row.id, "pair_id": row.pair_id, "choice": row.choice, "strength": row.strength,
           "both_bad": row.both_bad, "reason": row.reason, "revision": row.revision, "created_at": row.created_at}
    if row.ranking is not None:
        out["ranking"] = list(row.ranking)
    return out


def _invalid(e: InvalidLabel) -> JSONResponse:
    """A label that does not fit its item, as a 422 shaped like a validation error."""
    return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}],
                         "error": f"body.{e.field}: {e.message}"}, status_code=422)


def create_app(store: Store, project: ProjectInfo, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               allowed_hosts: Sequence[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The ASGI app for one project of ``store``, answering to the Host names
    ``allowed_hosts`` (None: any; see :func:`allowed_hosts_for`)."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # The limiter belongs to the running event loop: set it once that loop runs.
        anyio.to_thread.current_default_thread_limiter().total_tokens = REQUEST_THREADS
        yield

    app = FastAPI(title=f"rlhf labeling: {project.name}", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    bearer = HTTPBearer(auto_error=False)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        first = errors[0] if errors else {"loc": ["body"], "msg": "invalid"}
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse({"detail": errors, "error": f"{where}: {first['msg']}"}, status_code=422)

    def caller(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> LabelerInfo:
        who = store.authenticate(creds.credentials) if creds is not None else None
        if who is None or who.project_id != project.id:
            raise HTTPException(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})
        return who

    # The role checks are `async def`: FastAPI sends each sync dependency on its
    # own trip through the thread pool, and a check without I/O needs none (under
    # load each trip queues again for the event loop and the GIL).
    async def labeler(who: Annotated[LabelerInfo, Depends(caller)]) -> LabelerInfo:
        if who.role != "labeler":
            raise HTTPException(403, "this call needs a labeler token")
        return who

    async def admin(who: Annotated[LabelerInfo, Depends(caller)]) -> LabelerInfo:
        if who.role != "admin":
            raise HTTPException(403, "this call needs an admin token")
        return who

    app.include_router(_labeler_api(store, project, caller, labeler))
    app.include_router(_admin_api(store, project, admin))
    _page(app)
    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)
    return app


def _labeler_api(store: Store, project: ProjectInfo, caller: Callable[..., LabelerInfo],
                 labeler: Callable[..., Awaitable[LabelerInfo]]) -> APIRouter:
    """The labelers' routes (``caller``: any valid token of the project;
    ``labeler``: a labeler's). Plain `def` endpoints: FastAPI runs them in its
    thread pool, which is what the blocking database calls need."""
    router = APIRouter()

    @router.get("/api/me")
    def me(who: Annotated[LabelerInfo, Depends(caller)]) -> dict[str, Any]:
        cfg = store.project_by_id(project.id).config
        out = {"name": who.name, "role": who.role, "project": project.name, "guidelines": cfg.guidelines,
               "overlap": cfg.overlap}
        if who.role == "labeler":
            out["progress"] = store.progress(who)
        return out

    @router.get("/api/next")
    def next_pair(who: Annotated[LabelerInfo, Depends(labeler)]) -> dict[str, Any]:
        view = store.next_pair(who)
        return {"pair": None if view is None else _pair_json(view), "progress": store.progress(who)}

    @router.post("/api/labels", status_code=201, response_model=LabelOut, response_model_exclude_none=True)
    def submit(body: LabelIn, who: Annotated[LabelerInfo, Depends(labeler)],
               next: Annotated[bool, Query(description="also hand out the next pair, in the same commit")] = False
               ) -> Any:
        try:
            sub = body.model_dump()
            if sub["ranking"] is not None:
                sub["ranking"] = tuple(sub["ranking"])
            if next:
                result, view, progress = store.submit_and_next(who, Submission(**sub))
            else:
                result = store.submit(who, Submission(**sub))[0]
        except InvalidLabel as e:
            return _invalid(e)
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        except PairFull as e:
            # A code the page acts on: it moves on to the next pair instead of offering a retry.
            return JSONResponse({"detail": str(e), "code": "pair_full"}, status_code=409)
        except Conflict as e:
            raise HTTPException(409, str(e)) from None
        out = LabelOut(**result._asdict())
        if next:
            out.next = {"pair": None if view is None else _pair_json(view), "progress": progress}
        # A replay is not a new resource: 200, so clients and logs can tell.
        return JSONResponse(out.model_dump(exclude_none=True), status_code=200) if result.replayed else out

    @router.get("/api/history")
    def history(who: Annotated[LabelerInfo, Depends(labeler)],
                limit: Annotated[int, Query(ge=1, le=200)] = 20) -> dict[str, Any]:
        return {"labels": [_label_json(r) for r in store.history(who, limit)]}

    @router.get("/api/pairs/{pair_id}")
    def pair(pair_id: Annotated[int, Path(ge=1, le=MAX_ID)],
             who: Annotated[LabelerInfo, Depends(labeler)]) -> dict[str, Any]:
        try:
            view, current = store.pair_for(who, pair_id)
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        except Conflict as e:
            raise HTTPException(403, str(e)) from None
        return {"pair": _pair_json(view), "label": None if current is None else _label_json(current)}

    return router


def _admin_api(store: Store, project: ProjectInfo, admin: Callable[..., Awaitable[LabelerInfo]]) -> APIRouter:
    """The admins' routes (``admin``: an admin's token of the project)."""
    router = APIRouter()

    @router.get("/api/admin/stats")
    def admin_stats(_who: Annotated[LabelerInfo, Depends(admin)]) -> dict[str, Any]:
        return stats_mod.compute(store, store.project_by_id(project.id))

    return router


def _page(app: FastAPI) -> None:
    """The page (one HTML file for labelers and admins), its static files and the health check."""

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {"ok": True, "time": time.time()}

    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    @app.get("/admin", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(index), media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")


# A query parameter whose name ends in "token", up to the next separator.
TOKEN_IN_QUERY = re.compile(r"([?&;][^=&;#\s]*token=)[^&;#\s]*", re.IGNORECASE)


def redact_tokens(text: str) -> str:
    """``text`` (a URL, a log line) with every ``...token=VALUE`` query value hidden."""
    return TOKEN_IN_QUERY.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Hides token values in the URLs of uvicorn's access log. The page
    never puts a token in a URL it requests (the header carries it; a
    sign-in link keeps it in the fragment, which browsers do not send), but
    a hand-typed ``/?token=...`` would otherwise be written to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        return True


def _filter_once(logger_name: str, kind: type[logging.Filter]) -> None:
    """Put a ``kind`` filter on the logger unless it has one: the functions that
    add them can run more than once in a process (tests, restarts)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def _uvicorn_config(app: FastAPI, access_log: bool, **kw):
    """uvicorn's config for ``app``, its access log (when on) redacting tokens."""
    import uvicorn

    # Config() sets up uvicorn's loggers; the filter goes on after, so that setup cannot drop it.
    config = uvicorn.Config(app, access_log=access_log, log_level="info" if access_log else "warning",
                            server_header=False, **kw)
    _filter_once("uvicorn.access", RedactTokens)
    return config


def listen_socket(host: str, port: int) -> "socket.socket":
    """A socket bound to ``host:port`` for uvicorn to serve on. Bound here, not
    by uvicorn, so that a taken port or a bad address is one BadInput (exit
    code 2) rather than uvicorn's log line and exit code 3. ``rlhf label
    serve`` also binds once (and closes) before it touches the database."""
    import socket

    if not 0 <= port < 65536:  # 0: any free port (tests and embedding code; the CLI asks for 1-65535)
        raise BadInput(f"--port {port}: expected 0-65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BadInput(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                       "pick another port") from None
    return sock


def _freeze_startup_heap() -> None:
    """Leave what a server process imported and built before serving out of
    every later garbage collection (``gc.freeze``). A full collection walks
    every tracked object, holding the GIL: with the ~123,000 that FastAPI,
    SQLAlchemy and pydantic leave after startup each took ~55 ms under load, a
    stall for every request in flight; frozen, it walks only what was made
    since (~13,000 objects, 3 ms). Server processes only: frozen objects are
    never collected, which a long test process would not want."""
    gc.collect()
    gc.freeze()


def serve(store: Store, project: ProjectInfo, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, access_log: bool = False,
          allowed_hosts: Sequence[str] = ()) -> None:
    """Run the app with uvicorn in this process until interrupted (``--workers 1``;
    see :func:`serve_workers` for more). ``allowed_hosts``: more Host names to
    answer to (see :func:`allowed_hosts_for`)."""
    import uvicorn

    app = create_app(store, project, max_body_bytes, allowed_hosts_for(host, allowed_hosts))
    sock = listen_socket(host, port)
    _freeze_startup_heap()
    server = uvicorn.Server(_uvicorn_config(app, access_log, host=host, port=port, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    finally:
        sock.close()
    if not server.started:
        raise BadInput(f"serve {host}:{port}: the server did not start (uvicorn's message is above)")


# ---------------------------------------------------------------- several worker processes

# How `serve_workers` hands its settings to the worker processes: uvicorn starts
# each worker with the `spawn` method and builds the app there from an import
# string (a factory taking no arguments), so the settings travel in the
# environment, which spawned processes inherit. The database URL may hold a
# password; it is on the command line already, which is more visible than this.
WORKER_SETTINGS_ENV = "RLHF_LABEL_SERVE_SETTINGS"


def _worker_log_config() -> dict[str, Any]:
    """uvicorn's logging config with each line naming the worker process (its
    pid): with several workers, which one answered a request or failed."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = formatter["fmt"].replace("%(levelprefix)s", "%(levelprefix)s [%(process)d]", 1)
    return config


def app_from_env() -> FastAPI:
    """The app of one worker process of :func:`serve_workers`: its own Store (a
    connection pool cannot cross processes) on the database and project the
    parent process already checked, from :data:`WORKER_SETTINGS_ENV`.

    If it cannot be built (the database cannot be opened here, say), the
    reason goes to the parent through the settings' ``failure_file`` and the
    worker exits with uvicorn's startup-failure code, which makes uvicorn stop
    every worker instead of restarting this one in a loop; the parent then
    reports the reason (see :func:`_worker_failure`).
    """
    import json
    import os

    settings = json.loads(os.environ[WORKER_SETTINGS_ENV])
    # uvicorn set up this process's logging afresh: the token filter goes on here.
    _filter_once("uvicorn.access", RedactTokens)
    try:
        store = Store.open(settings["db"], shared=True)
        try:
            project = store.project_by_id(settings["project_id"])
        except BaseException:
            store.close()
            raise
    except Exception as e:  # noqa: BLE001 - any failure here must stop the server, not loop
        _report_failure(settings.get("failure_file"), e)
        from uvicorn.config import STARTUP_FAILURE

        raise SystemExit(STARTUP_FAILURE) from None
    hosts = settings["allowed_hosts"]
    app = create_app(store, project, settings["max_body_bytes"], None if hosts is None else tuple(hosts))
    _freeze_startup_heap()
    return app


def _report_failure(path: str | None, error: Exception) -> None:
    """Leave a worker's startup failure for the parent (see :func:`_worker_failure`):
    written to a private file and renamed into place, so the parent never reads
    half a message even when several workers fail at once."""
    import json
    import os

    bad_input = isinstance(error, BadInput)
    message = str(error) if bad_input else f"{type(error).__name__}: {' '.join(str(error).split())}"
    if path is None:  # not started by serve_workers: the log is all there is
        log.error("worker failed to start: %s", message)
        return
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"bad_input": bad_input, "message": message}, f)
    os.replace(tmp, path)


class _DropStartupFailureLine(logging.Filter):
    """Drops the supervisor's "Child process [PID] failed to start, stopping
    the parent process" log line: :func:`serve_workers` reports the failure
    itself, with its reason, as the command's one error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to start, stopping the parent" not in record.getMessage()


def _worker_failure(path: pathlib.Path, failed: bool) -> Exception | None:
    """What :func:`serve_workers` raises after its workers stopped: BadInput
    (exit code 2) for a reason the user can fix, as the worker reported it;
    RunFailed (exit code 1) for any other failure to start; None when the
    server stopped because it was told to (Ctrl-C, SIGTERM)."""
    import json

    from rlhf.errors import RunFailed

    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if report is None:
        return RunFailed("serve: a worker process failed to start (its log is above)") if failed else None
    if report["bad_input"]:
        return BadInput(f"serve: a worker process could not start: {report['message']}")
    return RunFailed(f"serve: a worker process failed to start: {report['message']}")


def serve_workers(db: str, project: ProjectInfo, workers: int, host: str = "127.0.0.1", port: int = 8000,
                  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, access_log: bool = False,
                  allowed_hosts: Sequence[str] = ()) -> None:
    """Run ``workers`` server processes on one socket, all on the database
    ``db`` (a URL, password included), until interrupted.

    uvicorn's multi-process supervisor does the process management on the
    socket bound here: it starts the workers, replaces one that dies and stops
    them all on Ctrl-C or SIGTERM. A worker that cannot start stops them all
    too, and this raises: BadInput (exit code 2) when the reason is the
    user's to fix (the database cannot be opened there, say), else RunFailed
    (exit code 1); a taken port is a BadInput before any worker starts. Each
    worker opens its own Store; nothing
    that decides about pairs or labels is kept in a process (see the module
    docstring of ``store``): every such decision is one database transaction,
    serialised across processes by the database's locks.
    """
    import json
    import os
    import shutil
    import tempfile

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    hosts = allowed_hosts_for(host, allowed_hosts)
    report_dir = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-serve-"))
    failure_file = report_dir / "worker-failure.json"
    os.environ[WORKER_SETTINGS_ENV] = json.dumps({
        "db": db, "project_id": project.id, "max_body_bytes": max_body_bytes,
        "allowed_hosts": None if hosts is None else list(hosts), "failure_file": str(failure_file)})
    try:
        sock = listen_socket(host, port)
        config = uvicorn.Config(f"{__name__}:app_from_env", factory=True, workers=workers, host=host, port=port,
                                access_log=access_log, log_level="info" if access_log else "warning",
                                log_config=_worker_log_config(), server_header=False, timeout_graceful_shutdown=5)
        # uvicorn.run's own multi-process path, kept by hand to see how it ended: a
        # worker that fails to start makes the supervisor stop them all (a worker
        # that dies later is replaced), and uvicorn.run would then return as if
        # told to stop.
        # Its "failed to start, stopping" line would repeat what the error below says.
        _filter_once("uvicorn.error", _DropStartupFailureLine)
        supervisor = Multiprocess(config, sockets=[sock])
        try:
            supervisor.run()
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
        error = _worker_failure(failure_file, failed)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
    if error is not None:
        raise error


class Running:
    """The app served by uvicorn on a background thread (see :func:`running`)."""

    def __init__(self, server, thread, url: str):
        self.server, self.thread, self.url = server, thread, url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def running(store: Store, project: ProjectInfo, host: str = "127.0.0.1", port: int = 0,
            access_log: bool = False) -> Running:
    """Serve ``project`` on a background thread of this process, e.g. while a
    recipe's collect stage waits for labels; ``port=0`` picks a free port.
    Returns once the server accepts connections; ``stop()`` shuts it down."""
    import threading

    import uvicorn

    sock = listen_socket(host, port)
    app = create_app(store, project, allowed_hosts=allowed_hosts_for(host))
    server = uvicorn.Server(_uvicorn_config(app, access_log, timeout_graceful_shutdown=2))
    # uvicorn installs no signal handlers off the main thread: Ctrl-C stays the caller's.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="label-server")
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the labeling server did not start")
        time.sleep(0.02)
    bound = sock.getsockname()[1]
    return Running(server, thread, f"http://{host if ':' not in host else f'[{host}]'}:{bound}")

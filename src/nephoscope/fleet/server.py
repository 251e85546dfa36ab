"""The central server's HTTP API (FastAPI): sensors push scans, operators and tenants read, the dashboard is static.

Every endpoint takes a bearer token and checks its scope: operator (everything), tenant (only its own
VMs; another tenant's VM is 404, as if it did not exist), sensor (push for its own host, and the KB).
The OpenAPI spec is at /openapi.json. The dashboard (/) is plain HTML+JS that talks only to this API.
"""


import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from nephoscope.fleet.db import RISKS, FleetError, FleetStore, LastOperatorError, Principal
from nephoscope.fleet.snapshots import SnapshotCache, SnapshotError

STATIC = Path(__file__).with_name("static")
API = "/api/v1"
MAX_DIGESTS = 4096
MAX_ID = 2**31 - 1  # ids are PostgreSQL `integer`: a larger one names nothing (and must not reach the driver)
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: refused here rather than failing in the driver
VmId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
ScanId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
TokenId = Annotated[int, PathParam(ge=1, le=MAX_ID)]


class ScanPush(BaseModel):
    """One scan a sensor pushes: the scan document of `nephoscope scan --json`, its observations and report."""

    idempotency_key: str = Field(min_length=8, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    host: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    vm: str = Field(min_length=1, max_length=300, pattern=NO_NUL)
    started: float
    finished: float
    document: dict[str, Any]


MAX_RECORDS = 2000
MAX_TOKEN_LIFE_S = 10 * 366 * 86400
Record = dict[str, Any]


class ResponsePush(BaseModel):
    """A VM's response state a sensor pushes: its filters in force, its filter audit rows and its notices.

    Records are as the host's `filters list`, `filters audit` and `notices list` give them (JSON); pushing
    the same state again changes nothing (audit rows and notices are keyed by their host-side id)."""

    host: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    vm: str = Field(min_length=1, max_length=300, pattern=NO_NUL)
    filters: list[Record] = Field(default_factory=list, max_length=MAX_RECORDS)
    audit: list[Record] = Field(default_factory=list, max_length=MAX_RECORDS)
    notices: list[Record] = Field(default_factory=list, max_length=MAX_RECORDS)


class PushResult(BaseModel):
    """The stored scan's id, whether this push created it (False: a retry), and the VM's high-risk flag."""

    scan_id: int
    created: bool
    high_risk: bool


class TenantIn(BaseModel):
    """A tenant to create."""

    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)


class TokenIn(BaseModel):
    """A token to issue: its scope and, for tenant/sensor scopes, the tenant id or host name it is bound to."""

    scope: str = Field(pattern="^(operator|tenant|sensor)$")
    tenant_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    host: str | None = Field(default=None, min_length=1, max_length=200, pattern=NO_NUL)
    label: str = Field(default="", max_length=200, pattern=NO_NUL)
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_TOKEN_LIFE_S,
                                       description="seconds until the token is refused (401); none: never")


class TokenIssued(BaseModel):
    """An issued token: its id (to list or revoke it), its secret (shown this once) and its expiry or null."""

    id: int
    token: str
    expires: float | None


class TokenOut(BaseModel):
    """A token as operators list it: never its secret. Times are Unix times; `last_used` is to the minute."""

    id: int
    scope: str
    tenant_id: int | None
    tenant: str | None
    host_id: int | None
    host: str | None
    label: str
    created: float
    expires: float | None
    state: str = Field(pattern="^(active|expired|revoked)$")
    revoked_at: float | None
    revoked_by: str | None = Field(description="who revoked it: `token ID (label)` or `cli USER@HOST`")
    forced: bool = Field(description="revoked with force (it was the last active operator token)")
    issued_by: str | None
    last_used: float | None


class TokenEvent(BaseModel):
    """One audited token change: issued or revoked, when, by whom (`actor_token_id` null: the CLI)."""

    id: int
    token_id: int
    at: float
    action: str
    actor_token_id: int | None
    actor: str
    forced: bool


class VmPatch(BaseModel):
    """What an operator may change on a VM: its tenant and its high-risk flag (sensors trap those)."""

    tenant_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    high_risk: bool | None = None


class VmOut(BaseModel):
    """A VM with its latest risk counts. A tenant's copy names no host: `host` is null."""

    id: int
    name: str
    host: str | None = Field(description="the host running the VM; null when a tenant token reads")
    tenant: str | None
    high_risk: bool
    latest_scan_id: int | None
    risk: dict[str, Any]


class VmDetail(VmOut):
    """A VM with its latest scan (with its document, a tenant's copy for a tenant token), or null."""

    latest: dict[str, Any] | None


class GroupCounts(BaseModel):
    """How many VMs a group has, and how many of them have each risk."""

    vms: int
    running_vulnerable: int
    malicious_unknown: int
    unverifiable: int


class Overview(BaseModel):
    """VM counts by risk per host and per tenant; a tenant gets no per-host breakdown (`by_host` null)."""

    view: str = Field(pattern="^(operator|tenant)$")
    vms: int
    by_host: dict[str, GroupCounts] | None
    by_tenant: dict[str, GroupCounts]
    totals: dict[str, int]


class LookupIn(BaseModel):
    """Page digests (hex SHA-256 of 4 KiB executable pages) to identify against the central KB."""

    digests: list[Annotated[str, Field(pattern="^[0-9a-f]{64}$")]] = Field(max_length=MAX_DIGESTS)


def unprocessable(msg: str) -> HTTPException:
    """Return a 422 whose body has the shape the OpenAPI spec declares for 422 (FastAPI's HTTPValidationError)."""
    return HTTPException(422, [{"loc": ["body"], "msg": msg, "type": "value_error"}])


def create_app(store: FleetStore, kb_path: Path | None = None, vulns_path: Path | None = None) -> FastAPI:
    """Return the API and dashboard over `store`; `kb_path` and `vulns_path` are the code-page and
    vulnerability DBs served to sensors."""
    app = FastAPI(title="nephoscope fleet", version="1", description=__doc__)
    app.state.store = store
    vulns = SnapshotCache(vulns_path) if vulns_path is not None else None

    def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        scheme, _, secret = (authorization or "").partition(" ")
        who = store.find_principal(secret.strip()) if scheme.lower() == "bearer" and secret.strip() else None
        if who is None:
            raise HTTPException(401, "a valid, unexpired bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def scoped(*scopes: str) -> Any:
        def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
            if who.scope not in scopes:
                raise HTTPException(403, f"this endpoint needs a {' or '.join(scopes)} token")
            return who
        return check

    Reader = Annotated[Principal, Depends(scoped("operator", "tenant"))]
    Operator = Annotated[Principal, Depends(scoped("operator"))]
    Sensor = Annotated[Principal, Depends(scoped("sensor"))]
    KbReader = Annotated[Principal, Depends(scoped("operator", "sensor"))]

    def found(value: Any, what: str) -> Any:
        if value is None:
            raise HTTPException(404, f"no such {what}")
        return value

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Say the server runs (no token needed, no data)."""
        return {"status": "ok"}

    @app.post(f"{API}/scans", status_code=201, response_model=PushResult)
    def push_scan(push: ScanPush, who: Sensor, response: Response) -> PushResult:
        """Store a sensor's scan (idempotent per key: a retry returns the first push's id with 200)."""
        if who.host_id is None or store.host_name(who.host_id) != push.host:
            raise HTTPException(403, "a sensor token pushes only for its own host")
        try:
            scan_id, created, high_risk = store.ingest(who.host_id, dict(push))  # fields as they are: no deep copy
        except (FleetError, ValueError, TypeError, AttributeError) as exc:
            raise unprocessable(f"the scan document does not fit: {exc}") from exc
        if not created:
            response.status_code = 200
        return PushResult(scan_id=scan_id, created=created, high_risk=high_risk)

    @app.post(f"{API}/response", status_code=200)
    def push_response(push: ResponsePush, who: Sensor) -> dict[str, int]:
        """Store a VM's filters in force, filter changes and notices as its host has them (idempotent)."""
        if who.host_id is None or store.host_name(who.host_id) != push.host:
            raise HTTPException(403, "a sensor token pushes only for its own host")
        try:
            vm_id = store.ingest_response(who.host_id, push.model_dump())
        except (FleetError, ValueError, TypeError, AttributeError) as exc:
            raise unprocessable(f"the response records do not fit: {exc}") from exc
        return {"vm_id": vm_id, "filters": len(push.filters), "audit": len(push.audit), "notices": len(push.notices)}

    @app.get(f"{API}/overview", response_model=Overview)
    def overview(who: Reader) -> dict[str, Any]:
        """Return VM counts by risk per host and per tenant (a tenant: only its own VMs, and no per-host counts)."""
        return store.overview(who)

    @app.get(f"{API}/vms", response_model=list[VmOut], responses={403: {"description": "a tenant filtering by host"}})
    def list_vms(who: Reader, host: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
                 tenant: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
                 risk: Annotated[str | None, Query(pattern="^(" + "|".join(RISKS) + ")$")] = None
                 ) -> list[dict[str, Any]]:
        """Return the VMs the token may see, with their latest risk counts (a tenant's name no host and
        may not filter by host: 403)."""
        try:
            return store.list_vms(who, host, tenant, risk)
        except FleetError as exc:
            raise HTTPException(403, str(exc)) from exc

    @app.get(f"{API}/vms/{{vm_id}}", response_model=VmDetail)
    def get_vm(vm_id: VmId, who: Reader) -> dict[str, Any]:
        """Return one VM with its latest scan document (404 when unknown or another tenant's)."""
        return found(store.get_vm(who, vm_id), "VM")  # type: ignore[no-any-return]

    @app.get(f"{API}/vms/{{vm_id}}/scans")
    def vm_scans(vm_id: VmId, who: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict[str, Any]]:
        """Return a VM's scans, newest first (without their documents; a tenant's without idempotency keys)."""
        return found(store.vm_scans(who, vm_id, limit), "VM")  # type: ignore[no-any-return]

    @app.get(f"{API}/vms/{{vm_id}}/findings")
    def vm_findings(vm_id: VmId, who: Reader) -> list[dict[str, Any]]:
        """Return a VM's findings over time, newest first."""
        return found(store.vm_findings(who, vm_id), "VM")  # type: ignore[no-any-return]

    @app.get(f"{API}/vms/{{vm_id}}/notices")
    def vm_notices(vm_id: VmId, who: Reader) -> dict[str, Any]:
        """Return a VM's filters in force, filter changes (newest first) and notices with their delivery status.

        `recorded` is False until the VM's sensor has reported them once. A tenant reads the CVE, what a
        filter does and does not stop and when it changed, never the host's rules, tap device or operators."""
        return found(store.vm_response(who, vm_id), "VM")  # type: ignore[no-any-return]

    @app.get(f"{API}/scans/{{scan_id}}")
    def get_scan(scan_id: ScanId, who: Reader) -> dict[str, Any]:
        """Return one scan with its document (404 when unknown or another tenant's)."""
        return found(store.get_scan(who, scan_id), "scan")  # type: ignore[no-any-return]

    @app.patch(f"{API}/vms/{{vm_id}}", status_code=204)
    def patch_vm(vm_id: VmId, patch: VmPatch, _who: Operator) -> Response:
        """Assign a VM to a tenant or flag it high-risk (operator only)."""
        if patch.tenant_id is not None and not store.tenant_exists(patch.tenant_id):
            raise HTTPException(404, "no such tenant")
        found(store.set_vm(vm_id, tenant_id=patch.tenant_id, high_risk=patch.high_risk) or None, "VM")
        return Response(status_code=204)

    @app.post(f"{API}/tenants", status_code=201)
    def add_tenant(tenant: TenantIn, _who: Operator) -> dict[str, int]:
        """Create a tenant (operator only); an existing name returns its id."""
        return {"id": store.add_tenant(tenant.name)}

    @app.post(f"{API}/tokens", status_code=201, response_model=TokenIssued)
    def add_token(token: TokenIn, who: Operator) -> TokenIssued:
        """Issue a token (operator only), expiring after `expires_in_s` if given; the secret is shown once."""
        host_id = store.add_host(token.host) if token.scope == "sensor" and token.host else None
        if token.scope == "tenant" and (token.tenant_id is None or not store.tenant_exists(token.tenant_id)):
            raise HTTPException(404, "no such tenant")
        try:
            expires = time.time() + token.expires_in_s if token.expires_in_s is not None else None
            token_id, secret = store.issue(token.scope, tenant_id=token.tenant_id, host_id=host_id,
                                           label=token.label, expires=expires, by=who)
            return TokenIssued(id=token_id, token=secret, expires=expires)
        except FleetError as exc:
            raise unprocessable(str(exc)) from exc

    @app.get(f"{API}/tokens", response_model=list[TokenOut])
    def list_tokens(_who: Operator) -> list[dict[str, Any]]:
        """List every token (operator only): scope, binding, label, times, state, who issued and revoked it; never
        a secret."""
        return store.list_tokens()

    @app.get(f"{API}/tokens/audit", response_model=list[TokenEvent])
    def token_audit(_who: Operator, limit: Annotated[int, Query(ge=1, le=10000)] = 500) -> list[dict[str, Any]]:
        """Return the audit of token changes (issued, revoked: when, by whom), newest first (operator only)."""
        return store.token_audit(limit)

    @app.post(f"{API}/tokens/{{token_id}}/revoke", response_model=TokenOut,
              responses={404: {"description": "no such token"},
                         409: {"description": "the last active operator token (pass force=true)"}})
    def revoke_token(token_id: TokenId, who: Operator, force: bool = False) -> dict[str, Any]:
        """Revoke a token (operator only): from now on it gets 401 everywhere. Revoking again changes nothing;
        the last active operator token is refused (409) unless `force=true`."""
        try:
            return found(store.revoke_token(token_id, by=who, force=force), "token")  # type: ignore[no-any-return]
        except LastOperatorError as exc:
            raise HTTPException(409, f"{exc} (force=true)") from exc

    def kb_file() -> Path:
        if kb_path is None or not kb_path.is_file():
            raise HTTPException(404, "this server has no code-page knowledge base")
        return kb_path

    @app.get(f"{API}/kb/snapshot", response_class=FileResponse, responses={304: {"description": "not modified"}})
    def kb_snapshot(request: Request, _who: KbReader) -> Response:
        """Download the central code-page DB (SQLite); send If-None-Match with the last ETag to skip it."""
        path = kb_file()
        stat = path.stat()
        etag = '"' + hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32] + '"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return FileResponse(path, media_type="application/vnd.sqlite3", headers={"ETag": etag})

    @app.get(f"{API}/kb/vulns", response_class=FileResponse, responses={304: {"description": "not modified"}})
    def vulns_snapshot(request: Request, _who: KbReader) -> Response:
        """Download the central vulnerability DB (SQLite, a consistent copy); If-None-Match with the ETag skips it."""
        try:
            snap = vulns.find() if vulns is not None else None
        except SnapshotError as exc:
            raise HTTPException(503, str(exc)) from exc
        if snap is None:
            raise HTTPException(404, "this server has no vulnerability DB")
        if request.headers.get("if-none-match") == snap.etag:
            return Response(status_code=304, headers={"ETag": snap.etag})
        return FileResponse(snap.path, media_type="application/vnd.sqlite3", headers={"ETag": snap.etag})

    @app.post(f"{API}/kb/lookup")
    def kb_lookup(query: LookupIn, _who: KbReader) -> dict[str, list[dict[str, Any]]]:
        """Return, per page digest, the packaged files and offsets where the central KB knows it."""
        from nephoscope.knowledge.binaries import CodePageDB

        db = CodePageDB.open(kb_file())
        try:
            hits = db.lookup_digests([bytes.fromhex(d) for d in query.digests])
        finally:
            db.close()
        return {d: [{"path": h.path, "package": h.package, "version": h.version, "arch": h.arch,
                     "file_offset": h.file_offset, "sha256": h.sha256} for h in found_hits]
                for d, found_hits in zip(query.digests, hits, strict=True)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

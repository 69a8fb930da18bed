"""The aggregator service: FastAPI on uvicorn with TLS, durable rounds, validation before acceptance.

Durability model (``<run>/server/``):

* an accepted update *is* its file ``updates/<r>/<site>.safetensors``: the upload is streamed to a
  temporary file in the same folder, validated, fsynced and renamed into place before the 200 goes out,
  so the rename is the commit point and a restart rebuilds the open round by scanning that folder;
* closing round ``r`` writes the strategy's server state (``strategy/round_<r+1>.safetensors``), then
  the next global model (``global/round_<r+1>.safetensors``, with ``ModelMeta``), then ``state.json``;
  a restart that finds the global model of the next round rolls forward, one that finds the round
  mid-aggregation aggregates it again from the same stored updates;
* ``audit.jsonl`` records every request (site, round, outcome, reason).

Round ``r`` trains from ``global/round_<r>.safetensors`` (``round_0`` is the initial model, built from the
config with a fixed seed) and ends by publishing ``round_<r+1>``; after ``rounds`` rounds the service
keeps answering status and model requests but accepts no updates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from safetensors import safe_open
from starlette.requests import ClientDisconnect

from federation.audit import AuditLog
from federation.provision import load_token_hashes, provision_paths, verify_token
from federation.strategies import Strategy, UpdateInfo, build_strategy
from federation.wire import (
    UPDATE_META_KEY,
    TensorSpec,
    WireError,
    atomic_write_bytes,
    atomic_write_json,
    check_finite_and_norm,
    check_specs,
    encode_state,
    fsync_dir,
    fsync_file,
    read_header,
    sha256_file,
    spec_of,
)
from pipeline.checkpoint import ModelMeta, read_model_file, save_model
from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import FedpathError

log = logging.getLogger(__name__)


class Rejection(Exception):
    """A refused request: HTTP status, a short machine code and a one-line reason. Changes no state."""

    def __init__(self, status: int, code: str, reason: str, *, round: int | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.round = status, code, reason, round


@dataclass(frozen=True)
class ServerPaths:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def endpoint(self) -> Path:
        return self.root / "endpoint.json"

    def updates(self, r: int) -> Path:
        return self.root / "updates" / str(r)

    def update(self, r: int, site: str) -> Path:
        return self.updates(r) / f"{site}.safetensors"

    def global_model(self, r: int) -> Path:
        return self.root / "global" / f"round_{r}.safetensors"

    def strategy_state(self, r: int) -> Path:
        return self.root / "strategy" / f"round_{r}.safetensors"


def server_paths(cfg: ExperimentConfig) -> ServerPaths:
    return ServerPaths(cfg.run_dir / "server")


def initial_model_state(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model: the config's network initialised with ``federation.seed``."""
    from pipeline.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.federation.seed)
        net = build_model(cfg.model)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _parse_update_meta(metadata: dict[str, str], what: str) -> dict[str, Any]:
    raw = metadata.get(UPDATE_META_KEY)
    if raw is None:
        raise WireError(f"{what}: no '{UPDATE_META_KEY}' metadata in the safetensors header")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise WireError(f"{what}: '{UPDATE_META_KEY}' metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise WireError(f"{what}: '{UPDATE_META_KEY}' metadata is not an object")
    site, rnd, n_tiles, eps = meta.get("site"), meta.get("round"), meta.get("n_tiles"), meta.get("epsilon")
    if not isinstance(site, str) or not site:
        raise WireError(f"{what}: metadata 'site' missing")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise WireError(f"{what}: metadata 'round' must be a non-negative integer (got {rnd!r})")
    if not isinstance(n_tiles, int) or isinstance(n_tiles, bool) or n_tiles < 1:
        raise WireError(f"{what}: metadata 'n_tiles' must be a positive integer (got {n_tiles!r})")
    # inf is legitimate (DP-SGD without noise: no guarantee); NaN and negatives are not
    if eps is not None and (not isinstance(eps, int | float) or math.isnan(eps) or eps < 0):
        raise WireError(
            f"{what}: metadata 'epsilon' must be a non-negative number, inf or null (got {eps!r})"
        )
    meta.setdefault("update_id", "")
    if not isinstance(meta["update_id"], str):
        raise WireError(f"{what}: metadata 'update_id' must be a string")
    return meta


class Aggregator:
    """The federation's durable state machine, independent of HTTP (the app is a thin layer on it)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.fed = cfg.federation
        self.paths = server_paths(cfg)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.tokens = load_token_hashes(provision_paths(cfg).tokens)
        self.sites = sorted(self.tokens)
        if self.fed.min_sites > len(self.sites):
            raise FedpathError(
                f"federation.min_sites={self.fed.min_sites} exceeds the {len(self.sites)} provisioned sites"
            )
        self.audit = AuditLog(self.paths.audit)
        self.strategy: Strategy = build_strategy(self.fed, len(self.sites))
        self.max_body = int(self.fed.max_body_mb * 1024 * 1024)
        self._lock = threading.RLock()
        self._closing = threading.Lock()
        self.resume_close = False
        self._recover()

    # -- persistence ---------------------------------------------------------------------------------
    def _write_state(self) -> None:
        atomic_write_json(
            self.paths.state,
            {
                "version": 1,
                "round": self.round,
                "phase": self.phase,
                "opened_at": self.opened_at,
                "rounds": self.fed.rounds,
                "strategy": self.strategy.describe(),
                "accepted": [self._ack(u) for u in self.accepted.values()],
                "history": self.history,
                "central_privacy": self.strategy.privacy_report(),
            },
        )

    def _save_global(self, r: int, state: dict[str, torch.Tensor]) -> Path:
        meta = ModelMeta(
            model=self.cfg.model,
            tile_size=self.cfg.tiling.tile_size,
            target_mpp=self.cfg.tiling.target_mpp,
            source="global",
            round=r,
            extra={"strategy": self.strategy.describe()},
        )
        path = save_model(self.paths.global_model(r), state, meta)
        fsync_file(path)
        fsync_dir(path.parent)
        return path

    def _save_strategy(self, r: int) -> None:
        tensors, meta = self.strategy.state_dict()
        data = encode_state(tensors, {"fedpath_strategy": json.dumps(meta, default=str)})
        atomic_write_bytes(self.paths.strategy_state(r), data)

    def _load_strategy(self, r: int) -> None:
        path = self.paths.strategy_state(r)
        if not path.is_file():
            return
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fedpath_strategy", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        self.strategy.load_state_dict(tensors, meta)

    def _scan_round(self, r: int) -> dict[str, UpdateInfo]:
        """Rebuild a round's accepted updates from its folder (the folder is the source of truth)."""
        folder = self.paths.updates(r)
        out: dict[str, UpdateInfo] = {}
        if not folder.is_dir():
            return out
        for tmp in folder.glob(".incoming-*"):
            tmp.unlink(missing_ok=True)  # an upload that was never acknowledged
        for path in sorted(folder.glob("*.safetensors")):
            header = read_header(path)
            meta = _parse_update_meta(header.metadata, str(path))
            norm = check_finite_and_norm(path, list(header.specs))
            out[meta["site"]] = self._info(meta, path, sha256_file(path), norm, r)
        return out

    @staticmethod
    def _info(meta: dict[str, Any], path: Path, sha: str, norm: float, target_round: int) -> UpdateInfo:
        return UpdateInfo(
            site=meta["site"],
            round=target_round,
            n_tiles=int(meta["n_tiles"]),
            epsilon=None if meta.get("epsilon") is None else float(meta["epsilon"]),
            path=path,
            sha256=sha,
            update_id=meta.get("update_id", ""),
            norm=norm,
            late_from=None if meta["round"] == target_round else int(meta["round"]),
        )

    def _recover(self) -> None:
        p = self.paths
        state: dict[str, Any] = {}
        if p.state.is_file():
            state = json.loads(p.state.read_text())
        self.round = int(state.get("round", 0))
        self.phase = str(state.get("phase", "open"))
        self.opened_at = float(state.get("opened_at", time.time()))
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        if not p.global_model(0).is_file():
            self._save_global(0, initial_model_state(self.cfg))
            log.info("aggregator: initial global model %s", p.global_model(0))
        self._load_strategy(self.round)
        # roll forward a close whose global model was written but whose state.json was not
        while p.global_model(self.round + 1).is_file() and self.round < self.fed.rounds:
            r = self.round
            self._load_strategy(r + 1)
            done = self._scan_round(r)
            self.history.append(self._history_entry(r, done, recovered=True))
            self.round, self.opened_at = r + 1, time.time()
            self.phase = "finished" if self.round >= self.fed.rounds else "open"
        if self.round >= self.fed.rounds:
            self.phase = "finished"
        self.global_state, _ = read_model_file(p.global_model(self.round))
        self.spec: dict[str, TensorSpec] = spec_of(self.global_state)
        self.accepted: dict[str, UpdateInfo] = (
            {} if self.phase == "finished" else self._scan_round(self.round)
        )
        if self.phase == "aggregating":
            # killed mid-aggregation: aggregate the same stored updates again
            self.phase, self.resume_close = "open", True
        self._write_state()
        log.info(
            "aggregator: round %d (%s), %d update(s) on disk, strategy %s",
            self.round,
            self.phase,
            len(self.accepted),
            self.strategy.describe(),
        )

    # -- queries -------------------------------------------------------------------------------------
    def check_auth(self, site: str | None, token: str | None) -> str:
        if not site:
            raise Rejection(401, "no_site", "missing X-Fedpath-Site header")
        if not token:
            raise Rejection(401, "no_token", f"site {site!r}: missing bearer token")
        if site not in self.tokens:
            raise Rejection(403, "unknown_site", f"site {site!r} is not provisioned for this federation")
        if not verify_token(self.tokens, site, token):
            raise Rejection(401, "bad_token", f"site {site!r}: invalid token")
        return site

    def deadline(self) -> float:
        return self.opened_at + self.fed.round_deadline_s

    def status(self, site: str | None = None) -> dict[str, Any]:
        with self._lock:
            fit = self.strategy.configure_fit(self.round)
            return {
                "round": self.round,
                "phase": self.phase,
                "rounds": self.fed.rounds,
                "k": self.fed.min_sites,
                "n": len(self.sites),
                "sites_reported": sorted(self.accepted),
                "submitted": site in self.accepted if site else None,
                "opened_at": self.opened_at,
                "deadline": self.deadline(),
                "close_policy": self.fed.close_policy,
                "global_round": self.round,
                "strategy": self.strategy.describe(),
                "fit": {"proximal_mu": fit.proximal_mu, **fit.extra},
                "central_privacy": self.strategy.privacy_report(),
            }

    def model_path(self, r: int | None) -> tuple[int, Path]:
        with self._lock:
            r = self.round if r is None else r
            if r < 0 or r > self.round:
                raise Rejection(404, "no_model", f"no global model for round {r} (latest is {self.round})")
            return r, self.paths.global_model(r)

    @staticmethod
    def _ack(u: UpdateInfo) -> dict[str, Any]:
        return {
            "status": "accepted",
            "site": u.site,
            "round": u.round,
            "update_round": u.late_from if u.late_from is not None else u.round,
            "sha256": u.sha256,
            "update_id": u.update_id,
        }

    # -- uploads -------------------------------------------------------------------------------------
    def incoming_path(self) -> Path:
        folder = self.paths.updates(self.round)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".incoming-{uuid.uuid4().hex}"

    def _existing(self, site: str, update_round: int) -> UpdateInfo | None:
        """An already accepted update of ``site`` computed for ``update_round`` (maybe counted later)."""
        if update_round == self.round and site in self.accepted:
            return self.accepted[site]
        u = self.accepted.get(site)
        if u is not None and u.late_from == update_round:
            return u
        path = self.paths.update(update_round, site)
        if update_round < self.round and path.is_file():
            header = read_header(path)
            meta = _parse_update_meta(header.metadata, str(path))
            return self._info(meta, path, sha256_file(path), 0.0, update_round)
        return None

    def _target_round(self, site: str, update_round: int) -> int:
        """Which round an update for ``update_round`` counts in, or a 409 saying why none."""
        if self.phase == "finished":
            raise Rejection(
                409, "finished", f"the federation finished after {self.fed.rounds} rounds", round=update_round
            )
        if update_round > self.round:
            raise Rejection(
                409,
                "not_open",
                f"round {update_round} is not open yet (open: {self.round})",
                round=update_round,
            )
        if update_round == self.round:
            if self.phase != "open":
                raise Rejection(
                    409, "closed", f"round {update_round} is closed and aggregating", round=update_round
                )
            return update_round
        if self.fed.late_updates == "next_round" and self.phase == "open" and site not in self.accepted:
            return self.round
        raise Rejection(
            409,
            "closed",
            f"round {update_round} is closed (late update; open: {self.round})",
            round=update_round,
        )

    def submit(self, site: str, tmp: Path, sha: str) -> tuple[dict[str, Any], bool]:
        """Validate a fully received upload and commit it; returns (ack, whether it was a duplicate)."""
        try:
            try:
                header = read_header(tmp)
                meta = _parse_update_meta(header.metadata, "update")
            except WireError as exc:
                raise Rejection(422, "malformed", str(exc)) from None
            r_upd = int(meta["round"])
            if meta["site"] != site:
                raise Rejection(
                    403,
                    "site_mismatch",
                    f"update metadata names site {meta['site']!r}, token is {site!r}",
                    round=r_upd,
                )
            with self._lock:
                prior = self._existing(site, r_upd)
                if prior is not None:
                    if prior.sha256 == sha:
                        return self._ack(prior), True
                    raise Rejection(
                        409,
                        "conflict",
                        f"site {site!r} already submitted a different update for round {r_upd}",
                        round=r_upd,
                    )
                self._target_round(site, r_upd)
            try:
                check_specs(header.specs, self.spec, "update")
                norm = check_finite_and_norm(tmp, list(header.specs))
            except WireError as exc:
                raise Rejection(422, "invalid", str(exc).replace(str(tmp), "update"), round=r_upd) from None
            if self.fed.max_update_norm is not None and norm > self.fed.max_update_norm:
                raise Rejection(
                    422,
                    "norm",
                    f"update L2 norm {norm:.4g} exceeds federation.max_update_norm={self.fed.max_update_norm}",
                    round=r_upd,
                )
            fsync_file(tmp)  # the slow part of the commit, outside the lock
            with self._lock:  # the round may have moved on while we validated
                prior = self._existing(site, r_upd)
                if prior is not None:
                    if prior.sha256 == sha:
                        return self._ack(prior), True
                    raise Rejection(
                        409,
                        "conflict",
                        f"site {site!r} already submitted a different update for round {r_upd}",
                        round=r_upd,
                    )
                target = self._target_round(site, r_upd)
                final = self.paths.update(target, site)
                final.parent.mkdir(parents=True, exist_ok=True)
                if tmp.parent != final.parent:
                    moved = final.parent / tmp.name
                    os.replace(tmp, moved)
                    tmp = moved
                os.replace(tmp, final)
                fsync_dir(final.parent)
                info = self._info(meta, final, sha, norm, target)
                self.accepted[site] = info
                self._write_state()
                return self._ack(info), False
        finally:
            tmp.unlink(missing_ok=True)

    # -- rounds --------------------------------------------------------------------------------------
    def should_close(self, now: float | None = None) -> bool:
        with self._lock:
            if self.phase != "open":
                return False
            m = len(self.accepted)
            if self.resume_close and m > 0:
                return True
            if m >= len(self.sites):
                return True
            if m >= self.fed.min_sites:
                return self.fed.close_policy == "min_sites" or (now or time.time()) >= self.deadline()
            return False

    def _history_entry(self, r: int, updates: dict[str, UpdateInfo], **extra: Any) -> dict[str, Any]:
        return {
            "round": r,
            "sites": sorted(updates),
            "n_tiles": {s: u.n_tiles for s, u in sorted(updates.items())},
            "epsilon": {s: u.epsilon for s, u in sorted(updates.items())},
            "late": {s: u.late_from for s, u in sorted(updates.items()) if u.late_from is not None},
            "closed_at": time.time(),
            "global_model": str(self.paths.global_model(r + 1)),
            **extra,
        }

    def close_round(self) -> bool:
        """Aggregate the open round and publish the next global model; False if nothing to do."""
        if not self._closing.acquire(blocking=False):
            return False
        try:
            with self._lock:
                if self.phase != "open" or not self.accepted:
                    return False
                r = self.round
                updates = [self.accepted[s] for s in sorted(self.accepted)]
                self.phase = "aggregating"
                self._write_state()
            t0 = time.perf_counter()
            try:
                new_state = self.strategy.aggregate(self.global_state, updates, r)
            except Exception as exc:  # keep the round open; the stored updates are untouched
                log.exception("aggregator: aggregation of round %d failed", r)
                with self._lock:
                    self.phase = "open"
                    self._write_state()
                self.audit.record(
                    action="aggregate", site=None, round=r, outcome="error", status=500, reason=str(exc)
                )
                return False
            self._save_strategy(r + 1)
            path = self._save_global(r + 1, new_state)
            seconds = time.perf_counter() - t0
            with self._lock:
                self.history.append(
                    self._history_entry(r, dict(self.accepted), aggregate_s=round(seconds, 4))
                )
                self.global_state = new_state
                self.round, self.opened_at, self.accepted, self.resume_close = r + 1, time.time(), {}, False
                self.phase = "finished" if self.round >= self.fed.rounds else "open"
                self._write_state()
            self.audit.record(
                action="aggregate",
                site=None,
                round=r,
                outcome="published",
                status=200,
                reason=f"{len(updates)} update(s) -> {path.name}",
                seconds=seconds,
            )
            log.info("aggregator: round %d closed with %d update(s) -> %s", r, len(updates), path)
            return True
        finally:
            self._closing.release()


# -- HTTP layer --------------------------------------------------------------------------------------
def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def create_app(agg: Aggregator, *, tick_s: float = 0.25) -> FastAPI:
    """The FastAPI app over an :class:`Aggregator` (status, model download, update upload, health)."""

    async def close_if_due() -> None:
        # the aggregator's lock may be held by a commit in a worker thread: never wait on it in the loop
        if await asyncio.to_thread(agg.should_close):
            await asyncio.to_thread(agg.close_round)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                try:
                    await close_if_due()
                except Exception:  # never let the deadline watcher die
                    log.exception("aggregator: round watcher")
                await asyncio.sleep(tick_s)

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(title="fedpath aggregator", lifespan=lifespan)

    @app.exception_handler(Rejection)
    async def _rejected(request: Request, exc: Rejection) -> JSONResponse:
        await asyncio.to_thread(
            agg.audit.record,
            action=f"{request.method} {request.url.path}",
            site=request.headers.get("x-fedpath-site"),
            round=exc.round,
            outcome="rejected",
            status=exc.status,
            reason=exc.reason,
            code=exc.code,
        )
        return JSONResponse({"detail": exc.reason, "code": exc.code}, status_code=exc.status)

    def auth(request: Request) -> str:
        return agg.check_auth(request.headers.get("x-fedpath-site"), _bearer(request))

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "round": agg.round, "phase": agg.phase}

    @app.get("/v1/status")
    async def status(request: Request) -> dict[str, Any]:
        site = auth(request)
        st = await asyncio.to_thread(agg.status, site)
        await asyncio.to_thread(
            agg.audit.record, action="status", site=site, round=st["round"], outcome="ok", status=200
        )
        return st

    @app.get("/v1/model")
    async def model(request: Request, round: int | None = Query(None, ge=0)) -> FileResponse:  # noqa: A002
        site = auth(request)
        r, path = await asyncio.to_thread(agg.model_path, round)
        await asyncio.to_thread(
            agg.audit.record, action="model", site=site, round=r, outcome="ok", status=200
        )
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Fedpath-Round": str(r)})

    @app.post("/v1/update")
    async def update(request: Request) -> JSONResponse:
        site = auth(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > agg.max_body:
            raise Rejection(
                413,
                "too_large",
                f"body of {declared} bytes exceeds federation.max_body_mb={agg.fed.max_body_mb}",
            )
        tmp = agg.incoming_path()
        h = hashlib.sha256()
        size = 0
        t0 = time.perf_counter()
        try:
            with open(tmp, "wb") as f:

                def sink(chunk: bytes) -> None:
                    h.update(chunk)
                    f.write(chunk)

                async for chunk in request.stream():
                    size += len(chunk)
                    if size > agg.max_body:
                        raise Rejection(
                            413, "too_large", f"body exceeds federation.max_body_mb={agg.fed.max_body_mb}"
                        )
                    # hashing and disk writes run beside the event loop, which keeps decrypting TLS
                    await asyncio.to_thread(sink, chunk)
            if size == 0:
                raise Rejection(422, "malformed", "empty body: expected a safetensors update")
            t1 = time.perf_counter()
            ack, duplicate = await asyncio.to_thread(agg.submit, site, tmp, h.hexdigest())
            t2 = time.perf_counter()
        except ClientDisconnect:
            raise Rejection(400, "incomplete", "connection closed before the body was complete") from None
        finally:
            tmp.unlink(missing_ok=True)
        await asyncio.to_thread(
            agg.audit.record,
            action="update",
            site=site,
            round=ack["round"],
            outcome="duplicate" if duplicate else "accepted",
            status=200,
            reason="same update already accepted" if duplicate else "",
            sha256=ack["sha256"],
            bytes=size,
            receive_s=round(t1 - t0, 4),
            commit_s=round(t2 - t1, 4),
        )
        if not duplicate:
            asyncio.get_running_loop().create_task(close_if_due())
        return JSONResponse(ack)

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(cfg: ExperimentConfig) -> None:
    """Serve until interrupted; the bound URL is written to ``server/endpoint.json`` (port 0: ephemeral)."""
    import uvicorn

    agg = Aggregator(cfg)
    fed = cfg.federation
    prov = provision_paths(cfg)
    if fed.tls and not (prov.server_cert.is_file() and prov.server_key.is_file()):
        raise FedpathError(f"{prov.root}: no server certificate; run `fedpath provision` first")
    sock = _bind(fed.host, fed.port)
    port = sock.getsockname()[1]
    host = "127.0.0.1" if fed.host in ("0.0.0.0", "") else fed.host
    url = f"{'https' if fed.tls else 'http'}://{host}:{port}"
    atomic_write_json(agg.paths.endpoint, {"url": url, "pid": os.getpid(), "tls": fed.tls})
    log.info("aggregator: listening on %s (round %d, %s)", url, agg.round, agg.phase)
    config = uvicorn.Config(
        create_app(agg),
        ssl_certfile=str(prov.server_cert) if fed.tls else None,
        ssl_keyfile=str(prov.server_key) if fed.tls else None,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    """``python -m federation.server --config C [--set k=v ...]`` (the same as ``fedpath serve``)."""
    ap = argparse.ArgumentParser(prog="python -m federation.server")
    ap.add_argument("--config", "-c", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_server(load_config(args.config, args.overrides))
    except FedpathError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()

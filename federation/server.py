"""The aggregator service: FastAPI on uvicorn with TLS, durable rounds, validation before acceptance.

Durability model (``<run>/server/``):

* an accepted update *is* its file ``updates/<r>/<site>.safetensors``: the upload is streamed to a
  temporary file in the same folder, validated, fsynced and renamed into place before the 200 goes out,
  so the rename is the commit point and a restart rebuilds the open round by scanning that folder;
* closing round ``r`` writes the strategy's server state (``strategy/round_<r+1>.safetensors``), then
  the next global model (``global/round_<r+1>.safetensors``, with ``ModelMeta``), then ``state.json``;
  a restart that finds the global model of the next round rolls forward, one that finds the round
  mid-aggregation aggregates it again from the same stored updates;
* ``audit.jsonl`` records every authenticated request (site, round, outcome, reason); failed
  authentications are rate-limited per client address and summarised once per window instead of
  one fsynced line each (see :class:`UnauthGuard`);
* ``serve.lock`` is held (``flock``) by the one ``fedpath serve`` that owns the folder;
* a full or failing disk never leaves a round stuck: an upload that cannot be stored is answered 507 and
  not stored; a publish that fails is retried (with backoff) and reported in ``/v1/status``.

Nothing a site reports is trusted: its name must be a provisioned, valid name; ``n_tiles`` (the FedAvg
weight) is bounded by ``federation.max_n_tiles``; the update's L2 norm by ``federation.max_update_norm``
(default: ``max_update_rms * sqrt(parameters)``); the body by ``federation.max_body_mb`` (default: the
model's size plus a header allowance).

Round ``r`` trains from ``global/round_<r>.safetensors`` (``round_0`` is the initial model, built from the
config with a fixed seed) and ends by publishing ``round_<r+1>``; after ``rounds`` rounds the service
keeps answering status and model requests but accepts no updates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import h11
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from safetensors import safe_open
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedcore.layout import RunLayout, ServerLayout
from federation.audit import AuditLog
from federation.payloads import PayloadSpec, RoundStatus, UpdateMeta
from federation.provision import load_token_hashes, provision_paths, verify_token
from federation.strategies import (
    Accumulator,
    PublishView,
    ServerContext,
    Strategy,
    UpdateInfo,
    build_strategy,
)
from federation.wire import (
    DTYPE_SIZES,
    TensorSpec,
    WireError,
    atomic_write_bytes,
    atomic_write_json,
    check_finite_and_norm,
    encode_state,
    fsync_dir,
    fsync_file,
    read_header,
    sha256_file,
    spec_of,
    state_digest,
)
from pipeline.checkpoint import ModelMeta, read_model_file, save_model
from pipeline.config import ConfigError, ExperimentConfig, is_site_name, load_config
from pipeline.errors import FedpathError

log = logging.getLogger(__name__)


class Rejection(Exception):
    """A refused request: HTTP status, a short machine code and a one-line reason. Changes no state."""

    def __init__(
        self,
        status: int,
        code: str,
        reason: str,
        *,
        round: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.round = status, code, reason, round
        self.headers = headers


#: the one answer to every failed authentication: it does not say which part was wrong, so it does not
#: reveal which site names exist
UNAUTHORIZED = "missing or invalid credentials (X-Fedpath-Site and Authorization: Bearer)"
#: bytes of safetensors header allowed on top of the tensors' data (JSON entries and update metadata)
HEADER_ALLOWANCE = 64 * 1024
HEADER_PER_TENSOR = 512


#: answers of /v1/model/task kept in memory (each one model's size)
_TASK_CACHE = 4
_CLASSES_RE = re.compile("[0-9]{1,9}")


def parse_classes(raw: str | None, max_classes: int) -> int:
    """A site's class count from the query string: a whole number in ``[1, max_classes]``, else a 422."""
    if raw is None:
        raise Rejection(422, "bad_classes", f"classes: missing; ask with ?classes=N (1 to {max_classes})")
    if _CLASSES_RE.fullmatch(raw) is None or not 1 <= int(raw) <= max_classes:
        raise Rejection(
            422,
            "bad_classes",
            f"classes: must be a whole number from 1 to {max_classes} (federation.max_classes), got {raw[:20]!r}",
        )
    return int(raw)


#: the aggregator's folder; every path is named by :class:`fedcore.layout.ServerLayout`
ServerPaths = ServerLayout


def server_paths(cfg: ExperimentConfig) -> ServerLayout:
    return RunLayout(cfg.run_dir).server


def initial_model_state(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model: ``federation.initial_model`` (e.g. the server's θ_pre) when set, else the
    config's network initialised with ``federation.seed``."""
    from pipeline.models import build_model

    if cfg.federation.initial_model is not None:
        path = cfg.federation.initial_model
        state, meta = read_model_file(path)
        if meta.model != cfg.model:
            raise FedpathError(f"{path}: federation.initial_model was built for another network than model:")
        return state

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.federation.seed)
        net = build_model(cfg.model)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _parse_update_meta(metadata: dict[str, str], what: str, max_n_tiles: int | None) -> UpdateMeta:
    """The update's typed metadata, checked; ``max_n_tiles`` None: stored before (lenient on the bound)."""
    return UpdateMeta.from_header(metadata, what, max_n_tiles)


def model_nbytes(spec: dict[str, TensorSpec]) -> int:
    """Bytes of tensor data in a state dict of these specs (what an update's data section must be)."""
    return sum(DTYPE_SIZES[t.dtype] * math.prod(t.shape) for t in spec.values())


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def acquire_run_lock(paths: ServerPaths) -> IO[str]:
    """Hold ``server/serve.lock`` exclusively for this process's life, or refuse naming the holder's PID."""
    paths.root.mkdir(parents=True, exist_ok=True)
    f = open(paths.lock, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FedpathError(
            f"{paths.lock}: another `fedpath serve` (PID {holder}) already serves this run directory"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


_PHASES = ("open", "aggregating", "finished")


def _read_state_file(path: Path) -> dict[str, Any]:
    """``state.json`` checked field by field; a corrupt one is a one-line error saying how to rebuild it."""
    if not path.is_file():
        return {}
    how = (
        "restore it, or run `fedpath serve --rebuild-state` to rebuild it from the updates and global models"
    )
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedpathError(f"{path}: corrupt server state ({type(exc).__name__}); {how}") from None
    if not isinstance(state, dict):
        raise FedpathError(f"{path}: corrupt server state (not a JSON object); {how}")
    checks = {
        "round": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "phase": lambda v: v in _PHASES,
        "opened_at": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        "history": lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
    }
    for key, ok in checks.items():
        if key in state and not ok(state[key]):
            raise FedpathError(f"{path}: corrupt server state (field '{key}'); {how}")
    return state


class Aggregator:
    """The federation's durable state machine, independent of HTTP (the app is a thin layer on it)."""

    def __init__(self, cfg: ExperimentConfig, *, rebuild_state: bool = False) -> None:
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
        self._lock = threading.RLock()
        self._closing = threading.Lock()
        self.resume_close = False
        self.state_dirty = False  # state.json could not be written; retried by the round watcher
        self.close_error: str | None = None  # why the last close/publish attempt failed
        self.close_failures = 0
        self._retry_at = 0.0
        self.storage_errors = 0
        #: the running sum of the open version's accepted updates (streaming strategies); derived state,
        #: rebuilt from the update files after a restart
        self._acc: Accumulator | None = None
        self._acc_lock = threading.Lock()
        #: the last few answers of /v1/model/task, keyed by (version, classes); built one at a time
        self._task_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._task_lock = threading.Lock()
        self._recover(rebuild_state)

    def _bind_strategy(self, strategy: Strategy) -> Strategy:
        """Give the strategy its server context; derive the payload declaration it expects."""
        strategy.bind(
            ServerContext(
                model_builder=self._build_model,
                server_manifest=self.fed.server_manifest,
                server_store=self.paths.data_store if self.paths.data_store.exists() else None,
                update_path=self.paths.update,
                server_val_store=self.paths.val_store if self.paths.val_store.exists() else None,
                global_spec=dict(self.spec),
                model=self.cfg.model,
            )
        )
        self.payload_spec: PayloadSpec = strategy.upload_spec(self.spec, self.max_norm)
        return strategy

    def _build_model(self) -> torch.nn.Module:
        from pipeline.models import build_model

        return build_model(self.cfg.model)

    def _set_limits(self) -> None:
        """Bounds derived from the model: update norm and body size (unless the config sets them)."""
        n_params = sum(
            math.prod(t.shape) for t in self.spec.values() if t.dtype in ("F64", "F32", "F16", "BF16")
        )
        self.max_norm = float(
            self.fed.max_update_norm
            if self.fed.max_update_norm is not None
            else self.fed.max_update_rms * math.sqrt(max(n_params, 1))
        )
        if self.fed.max_body_mb is not None:
            self.max_body = int(self.fed.max_body_mb * 1024 * 1024)
        else:
            self.max_body = (
                8 + model_nbytes(self.spec) + HEADER_ALLOWANCE + HEADER_PER_TENSOR * len(self.spec)
            )

    # -- persistence ---------------------------------------------------------------------------------
    def _try_write_state(self) -> bool:
        """Write state.json; on a storage error keep serving (the update files are the truth) and retry later."""
        try:
            self._write_state()
        except OSError as exc:
            self.state_dirty = True
            self.storage_errors += 1
            log.error("aggregator: could not write %s (%s); will retry", self.paths.state, exc.strerror)
            return False
        self.state_dirty = False
        return True

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

    def _save_global(
        self, r: int, state: dict[str, torch.Tensor], updates: list[UpdateInfo] | None = None
    ) -> Path:
        """Publish version ``r``; its header records the updates it contains and their staleness."""
        contains = [
            {"site": u.site, "update_id": u.update_id, "sha256": u.sha256, "based_on": u.based_on,
             "staleness": u.staleness, "kind": u.kind}
            for u in updates or []
        ]
        meta = ModelMeta(
            model=self.cfg.model,
            tile_size=self.cfg.tiling.tile_size,
            target_mpp=self.cfg.tiling.target_mpp,
            source="global",
            round=r,
            extra={"strategy": self.strategy.describe(), "version": r, "updates": contains},
        )
        path = save_model(self.paths.global_model(r), state, meta)
        fsync_file(path)
        fsync_dir(path.parent)
        return path

    def _save_download(self, r: int, strategy: Strategy) -> None:
        """The compressed form of version ``r`` (its delta from ``r - 1``), if the strategy has one."""
        payload = strategy.download_payload()
        if payload is None:
            return
        atomic_write_bytes(
            self.paths.global_delta(r),
            encode_state(
                payload,
                {
                    "fedpath_delta": json.dumps(
                        {"base": r - 1, "version": r, "digest": state_digest(self._published)}
                    )
                },
            ),
        )

    def _save_strategy(self, r: int) -> None:
        tensors, meta = self.strategy.state_dict()
        data = encode_state(tensors, {"fedpath_strategy": json.dumps(meta, default=str)})
        atomic_write_bytes(self.paths.strategy_state(r), data)

    def _fresh_strategy(self, r: int) -> Strategy:
        """The strategy with its server state as it was when round ``r`` opened (durable, keyed by round).

        Every close of round ``r`` starts from this, so a close retried after a failed publish cannot
        advance FedAdam's moments or the central-DP accountant twice.
        """
        self.strategy = self._bind_strategy(build_strategy(self.fed, len(self.sites)))
        self._load_strategy(r)
        return self.strategy

    def _load_strategy(self, r: int) -> None:
        path = self.paths.strategy_state(r)
        if not path.is_file():
            return
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fedpath_strategy", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        self.strategy.load_state_dict(tensors, meta)

    def _scan_round(self, r: int, *, open_round: bool = True) -> dict[str, UpdateInfo]:
        """Rebuild a round's accepted updates from its folder (the folder is the source of truth).

        For the open round every file is checked as an upload would be; one that fails (written by an
        older version, or by hand) is moved to ``quarantine/`` with a log line, never counted. For a
        closed round (history only) files are read as they are.
        """
        folder = self.paths.updates(r)
        out: dict[str, UpdateInfo] = {}
        if not folder.is_dir():
            return out
        for tmp in folder.glob(".incoming-*"):
            tmp.unlink(missing_ok=True)  # an upload that was never acknowledged
        for path in sorted(folder.glob("*.safetensors")):
            try:
                if path.stem not in self.tokens:
                    raise WireError(f"{path.name}: not a provisioned site's update")
                header = read_header(path)
                meta = _parse_update_meta(
                    header.metadata, path.name, self.fed.max_n_tiles if open_round else None
                )
                if meta.site != path.stem:
                    raise WireError(f"{path.name}: metadata names site {meta.site!r}")
                norm = 0.0
                if open_round:
                    norm = self._check_payload(path, header.specs, meta, path.name)
                    if norm > self.max_norm:
                        raise WireError(
                            f"{path.name}: L2 norm {norm:.4g} exceeds the bound {self.max_norm:.4g}"
                        )
            except (WireError, OSError) as exc:
                if not open_round:
                    log.warning("aggregator: round %d history skips %s (%s)", r, path.name, exc)
                    continue
                dest = self.paths.quarantine(r, path.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
                log.warning("aggregator: %s is not a usable update (%s); moved to %s", path, exc, dest)
                continue
            out[meta.site] = self._info(meta, path, sha256_file(path), norm, r)
        return out

    @staticmethod
    def _info(meta: UpdateMeta, path: Path, sha: str, norm: float, target_round: int) -> UpdateInfo:
        return UpdateInfo(
            site=meta.site,
            round=target_round,
            n_tiles=meta.n_tiles,
            epsilon=meta.epsilon,
            path=path,
            sha256=sha,
            update_id=meta.update_id,
            norm=norm,
            late_from=None if meta.round == target_round else meta.round,
            kind=meta.kind,
        )

    def _check_payload(self, path: Path, specs: dict[str, TensorSpec], meta: UpdateMeta, what: str) -> float:
        """Check an upload against the strategy's declared payload; return the L2 norm of its delta.

        Names, dtypes, shapes and ranks first (header only), then finiteness and value bounds of what was
        sent, then the norm of what it decodes to (the same tensors for a full delta).
        """
        spec = self.payload_spec
        if meta.kind != spec.kind:
            raise WireError(f"{what}: payload kind {meta.kind!r}, the strategy expects {spec.kind!r}")
        spec.validate(specs, what)
        raw_norm = check_finite_and_norm(path, list(specs), what, max_abs=spec.max_abs)
        if spec.kind == "full_delta":
            return raw_norm
        info = self._info(meta, path, "", 0.0, meta.round)
        sq = 0.0
        for _, t in self.strategy.iter_delta(info, self.float_names):
            flat = t.reshape(-1).to(torch.float32)
            sq += float(torch.dot(flat, flat))
        if not math.isfinite(sq):
            raise WireError(f"{what}: decoded update is not finite")
        return math.sqrt(sq)

    def _recover(self, rebuild_state: bool = False) -> None:
        p = self.paths
        if rebuild_state and p.state.exists():
            aside = p.corrupt_state(int(time.time()))
            os.replace(p.state, aside)  # kept for inspection; the state is rebuilt from the files on disk
            log.warning("aggregator: moved %s to %s; rebuilding the state from disk", p.state, aside)
        state = _read_state_file(p.state)
        self.round = int(state.get("round", 0))
        self.phase = str(state.get("phase", "open"))
        self.opened_at = float(state.get("opened_at", time.time()))
        self.history: list[dict[str, Any]] = list(state.get("history", []))
        if not p.global_model(0).is_file():
            self._save_global(0, initial_model_state(self.cfg))
            log.info("aggregator: initial global model %s", p.global_model(0))
        if not p.global_model(self.round).is_file():
            raise FedpathError(
                f"{p.state}: names round {self.round} but {p.global_model(self.round)} is missing; "
                "run `fedpath serve --rebuild-state` to rebuild the state from the files on disk"
            )
        g0, _ = read_model_file(p.global_model(0))
        self.spec: dict[str, TensorSpec] = spec_of(g0)
        self.float_names = [k for k, t in self.spec.items() if t.dtype in ("F64", "F32", "F16", "BF16")]
        self._set_limits()
        self._bind_strategy(self.strategy)
        self._load_strategy(self.round)
        # roll forward a close whose global model was written but whose state.json was not
        while p.global_model(self.round + 1).is_file() and self.round < self.fed.rounds:
            r = self.round
            self._load_strategy(r + 1)
            done = self._scan_round(r, open_round=False)
            self._record_history(self._history_entry(r, done, recovered=True))
            self.round, self.opened_at = r + 1, time.time()
            self.phase = "finished" if self.round >= self.fed.rounds else "open"
        if self.round >= self.fed.rounds:
            self.phase = "finished"
        self.global_state, _ = read_model_file(p.global_model(self.round))
        self.accepted: dict[str, UpdateInfo] = (
            {} if self.phase == "finished" else self._scan_round(self.round)
        )
        if self.phase == "aggregating":
            # killed mid-aggregation: aggregate the same stored updates again
            self.phase, self.resume_close = "open", True
        for u in sorted(self.accepted.values(), key=lambda u: u.site):
            self.on_update(u)  # the running sum is derived state: rebuilt from the update files
        self._write_state()
        log.info(
            "aggregator: round %d (%s), %d update(s) on disk, strategy %s",
            self.round,
            self.phase,
            len(self.accepted),
            self.strategy.describe(),
        )

    def _record_history(self, entry: dict[str, Any]) -> None:
        """One history entry per round: a retried close or a roll-forward replaces, never duplicates."""
        self.history = [h for h in self.history if h.get("round") != entry["round"]] + [entry]

    # -- queries -------------------------------------------------------------------------------------
    def auth_failure(self, site: str | None, token: str | None) -> str | None:
        """Why these credentials fail (for the audit only; clients all get :data:`UNAUTHORIZED`), or None."""
        if not site:
            return "no_site"
        if not token:
            return "no_token"
        if not is_site_name(site) or site not in self.tokens:
            return "unknown_site"
        if not verify_token(self.tokens, site, token):
            return "bad_token"
        return None

    def deadline(self) -> float:
        return self.opened_at + self.fed.round_deadline_s

    def status(self, site: str | None = None) -> dict[str, Any]:
        """The typed :class:`RoundStatus` of the open version, as JSON (the fit config is per site)."""
        with self._lock:
            return RoundStatus(
                round=self.round,
                phase=self.phase,  # type: ignore[arg-type]
                rounds=self.fed.rounds,
                k=self.fed.min_sites,
                n=len(self.sites),
                sites_reported=sorted(self.accepted),
                submitted=site in self.accepted if site else None,
                opened_at=self.opened_at,
                deadline=self.deadline(),
                close_policy=self.fed.close_policy,
                global_round=self.round,
                version=self.round,
                strategy=self.strategy.describe(),
                payload=self.payload_spec.kind,
                fit=self.strategy.configure_fit(self.round, site),
                central_privacy=self.strategy.privacy_report(),
                publish_error=self.close_error,
                publish_failures=self.close_failures,
                state_saved=not self.state_dirty,
                limits={
                    "max_body_bytes": self.max_body,
                    "max_update_norm": self.max_norm,
                    "max_n_tiles": self.fed.max_n_tiles,
                },
            ).model_dump(mode="json")

    def model_path(self, r: int | None, form: str = "full") -> tuple[int, Path]:
        """Version ``r`` as a full model, or (``form="delta"``) as its compressed delta from ``r - 1``."""
        with self._lock:
            r = self.round if r is None else r
            if r < 0 or r > self.round:
                raise Rejection(404, "no_model", f"no global model for round {r} (latest is {self.round})")
            if form == "delta":
                path = self.paths.global_delta(r)
                if not path.is_file():
                    raise Rejection(404, "no_delta", f"no compressed delta for version {r}; ask for the full model")
                return r, path
            return r, self.paths.global_model(r)

    def task_model(self, classes: int, r: int) -> tuple[int, bytes]:
        """Version ``r`` (the base model: 0) with a fresh head for ``classes`` classes, as safetensors bytes.

        The head is :func:`pipeline.transfer.fresh_head`: a function of the architecture and ``classes``
        alone, so every site asking for N classes gets the same one. ``classes`` is bounded by
        ``federation.max_classes`` (checked by the caller); one answer is built at a time and the last
        few are kept, so no sequence of requests makes the server hold more than a few models.
        """
        from pipeline.transfer import fresh_head

        r, path = self.model_path(r)
        with self._task_lock:
            key = (r, classes)
            hit = self._task_cache.get(key)
            if hit is not None:
                self._task_cache.move_to_end(key)
                return r, hit
            state, meta = read_model_file(path)
            head = fresh_head(self.cfg.model, classes)
            missing = [k for k in head if k not in state]
            if missing:
                raise Rejection(500, "no_head", f"version {r} has no tensor {missing[0]!r} of the head")
            out = {k: head.get(k, v) for k, v in state.items()}
            task_meta = ModelMeta(
                model=meta.model.model_copy(update={"out_channels": classes}),
                tile_size=meta.tile_size,
                target_mpp=meta.target_mpp,
                source="task",
                round=r,
                extra={
                    "version": r,
                    "classes": classes,
                    "head": sorted(head),
                    "head_init": "fresh: PyTorch's default per layer, seeded by the architecture and class count",
                },
            )
            body = encode_state(out, task_meta.to_header())
            self._task_cache[key] = body
            while len(self._task_cache) > _TASK_CACHE:
                self._task_cache.popitem(last=False)
            return r, body

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
        """An already accepted update of ``site`` computed for ``update_round``, wherever it was counted.

        A late update (``late_updates: next_round``) is stored in the round that was open when it came,
        so every closed round from ``update_round`` on is looked at: a re-send after that round closed
        is the same update again, never a new one for the open round.
        """
        if update_round == self.round and site in self.accepted:
            return self.accepted[site]
        u = self.accepted.get(site)
        if u is not None and u.late_from == update_round:
            return u
        for r in range(update_round, self.round):
            path = self.paths.update(r, site)
            if not path.is_file():
                continue
            try:
                meta = _parse_update_meta(read_header(path, path.name).metadata, path.name, None)
            except WireError:
                continue
            if meta.round == update_round:
                return self._info(meta, path, sha256_file(path), 0.0, r)
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
        refusal = self.strategy.admit(site, self.round)
        if refusal is not None:
            raise Rejection(409, "refused_by_strategy", refusal, round=update_round)
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
                header = read_header(tmp, "update")
                meta = _parse_update_meta(header.metadata, "update", self.fed.max_n_tiles)
            except WireError as exc:
                raise Rejection(422, "malformed", str(exc)) from None
            r_upd = meta.round
            if meta.site != site:
                raise Rejection(
                    403,
                    "site_mismatch",
                    f"update metadata names site {meta.site!r}, token is {site!r}",
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
                norm = self._check_payload(tmp, header.specs, meta, "update")
            except WireError as exc:
                raise Rejection(422, "invalid", str(exc), round=r_upd) from None
            if norm > self.max_norm:
                raise Rejection(
                    422,
                    "norm",
                    f"update L2 norm {norm:.4g} exceeds the bound federation.max_update_norm={self.max_norm:.4g}",
                    round=r_upd,
                )
            try:
                fsync_file(tmp)  # the slow part of the commit, outside the lock
            except OSError as exc:
                raise self._storage_rejection(exc, r_upd) from None
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
                try:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    if tmp.parent != final.parent:
                        moved = final.parent / tmp.name
                        os.replace(tmp, moved)
                        tmp = moved
                    os.replace(tmp, final)  # the commit point: from here on the update is accepted
                except OSError as exc:
                    raise self._storage_rejection(exc, r_upd) from None
                info = self._info(meta, final, sha, norm, target)
                self.accepted[site] = info
                try:
                    fsync_dir(final.parent)
                except OSError as exc:
                    self.storage_errors += 1
                    log.error("aggregator: fsync of %s failed (%s)", final.parent, exc.strerror)
                self._try_write_state()  # derived from the folder; a failure is retried, the answer stands
                ack = self._ack(info)
            self.on_update(info)  # streaming: fold it into the open version's running sum now
            return ack, False
        finally:
            tmp.unlink(missing_ok=True)

    def _storage_rejection(self, exc: OSError, r: int | None = None) -> Rejection:
        """507 for an update the server could not store: nothing of it was kept, a retry may succeed."""
        self.storage_errors += 1
        log.error("aggregator: storage error while receiving an update (%s)", exc.strerror or exc)
        return Rejection(
            507,
            "storage",
            "the server could not store the update (storage full or failing); nothing was stored, retry later",
            round=r,
            headers={"Retry-After": "5"},
        )

    # -- versions ------------------------------------------------------------------------------------
    def on_update(self, info: UpdateInfo) -> None:
        """Fold an accepted update into the open version's running sum (streaming strategies only).

        Memory stays one model whatever the number of sites; a failure here only costs speed: the close
        recomputes the average from the stored files when the sum does not hold exactly its updates.
        """
        if not self.strategy.streaming:
            return
        with self._acc_lock:
            if self._acc is None or self._acc.round != info.round:
                self._acc = self.strategy.new_accumulator(self.global_state, info.round)
            if any(u.site == info.site for u in self._acc.updates):
                return
            try:
                self.strategy.on_update(self._acc, info)
            except (WireError, OSError, ValueError) as exc:
                log.error("aggregator: could not fold %s into the running sum (%s)", info.path, exc)
                self._acc = None

    def should_close(self, now: float | None = None) -> bool:
        with self._lock:
            if self.phase != "open" or time.monotonic() < self._retry_at:
                return False
            return self.strategy.should_publish(
                PublishView(
                    accepted=len(self.accepted),
                    n_sites=len(self.sites),
                    min_sites=self.fed.min_sites,
                    close_policy=self.fed.close_policy,
                    deadline_passed=(now or time.time()) >= self.deadline(),
                    resume=self.resume_close,
                )
            )

    def _history_entry(self, r: int, updates: dict[str, UpdateInfo], **extra: Any) -> dict[str, Any]:
        return {
            "round": r,
            "sites": sorted(updates),
            "n_tiles": {s: u.n_tiles for s, u in sorted(updates.items())},
            "epsilon": {s: u.epsilon for s, u in sorted(updates.items())},
            "late": {s: u.late_from for s, u in sorted(updates.items()) if u.late_from is not None},
            "version": r + 1,
            "staleness": {s: u.staleness for s, u in sorted(updates.items())},
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
                self._try_write_state()
            t0 = time.perf_counter()
            try:
                with self._acc_lock:  # waits for an update still being folded in
                    acc = self._acc
                strategy = self._fresh_strategy(r)
                new_state = strategy.aggregate(self.global_state, updates, r, accumulated=acc)
                self._save_strategy(r + 1)
                path = self._save_global(r + 1, new_state, updates)
                self._published = new_state
                self._save_download(r + 1, strategy)
            except Exception as exc:  # keep the round open; the stored updates are untouched; retry later
                what = (
                    f"storage error ({exc.strerror or exc})"
                    if isinstance(exc, OSError)
                    else type(exc).__name__
                )
                log.error("aggregator: closing round %d failed (%s); will retry", r, exc)
                with self._lock:
                    self.close_failures += 1
                    self.close_error = f"publishing round {r + 1} failed: {what}"
                    self._retry_at = time.monotonic() + min(5.0, 0.25 * 2**self.close_failures)
                    self.phase, self.resume_close = "open", True
                    self._try_write_state()
                self.audit.record(
                    action="aggregate",
                    site=None,
                    round=r,
                    outcome="error",
                    status=500,
                    reason=self.close_error,
                )
                return False
            seconds = time.perf_counter() - t0
            with self._lock:
                self._record_history(
                    self._history_entry(r, dict(self.accepted), aggregate_s=round(seconds, 4))
                )
                self.global_state = new_state
                self.round, self.opened_at, self.accepted, self.resume_close = r + 1, time.time(), {}, False
                with self._acc_lock:
                    self._acc = None
                self.phase = "finished" if self.round >= self.fed.rounds else "open"
                self.close_error, self.close_failures, self._retry_at = None, 0, 0.0
                self._try_write_state()
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
#: bytes of an upload's body buffered before they are hashed and written in one worker-thread call
_SINK_BATCH = 1 << 20


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _clip(text: object, n: int = 64) -> str | None:
    """A client-supplied string as it may appear in the audit: bounded, never the whole thing."""
    return None if text is None else str(text)[:n]


class UnauthGuard:
    """Bounds what failed authentications cost: a token bucket per client address, and audit by counting.

    The first failure of an address in a window is written to the audit log (clipped); the others are
    counted and written as one summary line when the window ends, so a flood of strangers costs a few
    lines per window instead of one fsynced line per request. Addresses past their allowance get 429.
    All methods run on the event loop thread.
    """

    def __init__(
        self, burst: int, per_s: float, window_s: float, max_addresses: int = 4096, max_lines: int = 32
    ) -> None:
        self.burst, self.per_s, self.window_s = float(burst), float(per_s), float(window_s)
        self.max_addresses, self.max_lines = max_addresses, max_lines
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._new_window(time.monotonic())

    def _new_window(self, now: float) -> None:
        self.window_start = now
        self.count = 0
        self.limited = 0
        self.causes: Counter[str] = Counter()
        self.addresses: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.logged: set[str] = set()

    def allow(self, addr: str, now: float | None = None) -> bool:
        """Take one failure from ``addr``'s allowance; False when it has none left (answer 429)."""
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.pop(addr, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_s)
        ok = tokens >= 1.0
        self.buckets[addr] = (tokens - 1.0 if ok else tokens, now)
        while len(self.buckets) > self.max_addresses:
            self.buckets.popitem(last=False)
        return ok

    def note(
        self, addr: str, site: str | None, cause: str, action: str, limited: bool
    ) -> dict[str, Any] | None:
        """Count one failure; returns the audit line to write if it is the first of ``addr`` this window."""
        self.count += 1
        self.limited += int(limited)
        self.causes[cause] += 1
        for counter, key in ((self.addresses, addr), (self.sites, _clip(site) or "")):
            if key in counter or len(counter) < 256:
                counter[key] += 1
        if addr in self.logged or len(self.logged) >= self.max_lines:
            return None
        self.logged.add(addr)
        return {
            "action": _clip(action, 80),
            "site": _clip(site),
            "round": None,
            "outcome": "unauthenticated",
            "status": 429 if limited else 401,
            "reason": cause,
            "client": addr,
        }

    def flush(self, now: float | None = None, force: bool = False) -> dict[str, Any] | None:
        """The summary line of a finished window (None if nothing happened or the window is running)."""
        now = time.monotonic() if now is None else now
        if not force and now - self.window_start < self.window_s:
            return None
        out = None
        if self.count:
            out = {
                "action": "unauthenticated",
                "site": None,
                "round": None,
                "outcome": "summary",
                "status": 401,
                "reason": f"{self.count} failed authentication(s), {self.limited} rate-limited",
                "count": self.count,
                "rate_limited": self.limited,
                "window_s": round(now - self.window_start, 3),
                "causes": dict(self.causes),
                "addresses": dict(self.addresses.most_common(20)),
                "sites": dict(self.sites.most_common(20)),
            }
        self._new_window(now)
        return out


def timed_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head timeout (uvicorn has none: slowloris keeps sockets)."""

    class TimedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time

    return TimedH11Protocol


def create_app(agg: Aggregator, *, tick_s: float = 0.25) -> FastAPI:
    """The FastAPI app over an :class:`Aggregator` (status, model download, the base model with a fresh head
    for a site's class count, update upload, health)."""
    fed = agg.fed
    guard = UnauthGuard(fed.unauth_burst, fed.unauth_per_s, fed.audit_unauth_window_s)
    uploads = {"active": 0}
    scrub = sorted({str(agg.paths.root), str(agg.paths.root.resolve()), str(agg.cfg.run_dir)}, key=len)[::-1]

    def clean(reason: str) -> str:
        """A reason as a client sees it: never a server path."""
        for root in scrub:
            reason = reason.replace(root, "<server>")
        return reason.replace(".incoming-", "upload-")[:500]

    async def audit(**entry: Any) -> None:
        await asyncio.to_thread(agg.audit.record, **entry)

    async def close_if_due() -> None:
        # the aggregator's lock may be held by a commit in a worker thread: never wait on it in the loop
        if await asyncio.to_thread(agg.should_close):
            await asyncio.to_thread(agg.close_round)

    async def housekeeping() -> None:
        summary = guard.flush()
        if summary is not None:
            await audit(**summary)
        if agg.state_dirty:
            await asyncio.to_thread(lambda: agg._try_write_state())
        await close_if_due()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def ticker() -> None:
            while True:
                try:
                    await housekeeping()
                except Exception:  # never let the deadline watcher die
                    log.exception("aggregator: round watcher")
                await asyncio.sleep(tick_s)

        task = asyncio.create_task(ticker())
        try:
            yield
        finally:
            task.cancel()
            summary = guard.flush(force=True)
            if summary is not None:
                agg.audit.record(**summary)

    docs = fed.api_docs
    app = FastAPI(
        title="fedpath aggregator",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )

    @app.exception_handler(Rejection)
    async def _rejected(request: Request, exc: Rejection) -> JSONResponse:
        reason = clean(exc.reason)
        if exc.code not in ("unauthorized", "rate_limited"):  # those are counted by the guard
            await audit(
                action=f"{request.method} {request.url.path}"[:80],
                site=_clip(request.headers.get("x-fedpath-site")),
                round=exc.round,
                outcome="rejected",
                status=exc.status,
                reason=reason,
                code=exc.code,
            )
        return JSONResponse({"detail": reason, "code": exc.code}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse(
            {"detail": f"{field}: {first.get('msg', 'invalid')}", "code": "bad_request"}, status_code=422
        )

    async def auth(request: Request) -> str:
        site, token = request.headers.get("x-fedpath-site"), _bearer(request)
        cause = agg.auth_failure(site, token)
        if cause is None:
            return str(site)
        addr = request.client.host if request.client else "unknown"
        limited = not guard.allow(addr)
        line = guard.note(addr, site, cause, f"{request.method} {request.url.path}", limited)
        if line is not None:
            await audit(**line)
        if limited:
            raise Rejection(
                429,
                "rate_limited",
                "too many failed authentications; slow down",
                headers={"Retry-After": str(max(1, math.ceil(1 / fed.unauth_per_s)))},
            )
        raise Rejection(401, "unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "round": agg.round, "phase": agg.phase}

    @app.get("/v1/status")
    async def status(request: Request) -> dict[str, Any]:
        site = await auth(request)
        st = await asyncio.to_thread(agg.status, site)
        await audit(action="status", site=site, round=st["round"], outcome="ok", status=200)
        return st

    @app.get("/v1/model")
    async def model(
        request: Request,
        round: int | None = Query(None, ge=0, lt=2**31),  # noqa: A002
        form: str = Query("full", pattern="^(full|delta)$"),
    ) -> FileResponse:
        site = await auth(request)
        r, path = await asyncio.to_thread(agg.model_path, round, form)
        await audit(action="model", site=site, round=r, outcome="ok", status=200)
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Fedpath-Round": str(r)})

    @app.get("/v1/model/task")
    async def task_model(
        request: Request,
        classes: str | None = Query(None),
        round: int = Query(0, ge=0, lt=2**31),  # noqa: A002
    ) -> Response:
        """The base model (version ``round``, default 0) with a fresh head for the site's class count."""
        site = await auth(request)
        n = parse_classes(classes, fed.max_classes)
        r, body = await asyncio.to_thread(agg.task_model, n, round)
        await audit(action="task_model", site=site, round=r, outcome="ok", status=200, reason=f"classes={n}")
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"X-Fedpath-Round": str(r), "X-Fedpath-Classes": str(n)},
        )

    async def receive(request: Request, tmp: Path, h: Any) -> int:
        """Stream the body to ``tmp`` with size, idle and total-time bounds; returns its size."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + fed.upload_timeout_s
        size = 0
        stream = request.stream().__aiter__()
        pending: list[bytes] = []
        pending_n = 0
        try:
            with open(tmp, "wb") as f:

                def sink(chunks: list[bytes]) -> None:
                    for chunk in chunks:
                        h.update(chunk)
                        f.write(chunk)

                while True:
                    wait = min(fed.body_idle_timeout_s, deadline - loop.time())
                    if wait <= 0:
                        raise Rejection(408, "timeout", "upload exceeded federation.upload_timeout_s")
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), wait)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        raise Rejection(
                            408, "timeout", f"no body data for {wait:.0f} s; upload dropped"
                        ) from None
                    size += len(chunk)
                    if size > agg.max_body:
                        raise Rejection(
                            413, "too_large", f"body exceeds the upload limit of {agg.max_body} bytes"
                        )
                    # hashing and disk writes run beside the event loop, which keeps decrypting TLS; chunks
                    # (at most 256 KiB from the TLS transport) go to the thread in batches of _SINK_BATCH
                    # bytes, so the thread hand-off is not paid tens of thousands of times per round
                    pending.append(chunk)
                    pending_n += len(chunk)
                    if pending_n >= _SINK_BATCH:
                        batch, pending, pending_n = pending, [], 0
                        await asyncio.to_thread(sink, batch)
                if pending:
                    await asyncio.to_thread(sink, pending)
        except OSError as exc:  # opening, writing or closing (flushing) the temporary file
            raise agg._storage_rejection(exc) from None
        return size

    @app.post("/v1/update")
    async def update(request: Request) -> JSONResponse:
        site = await auth(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > agg.max_body:
            raise Rejection(
                413,
                "too_large",
                f"body of {declared[:20]} bytes exceeds the upload limit of {agg.max_body} bytes",
            )
        if uploads["active"] >= fed.max_concurrent_uploads:
            raise Rejection(
                503, "busy", "too many uploads in progress; retry later", headers={"Retry-After": "1"}
            )
        uploads["active"] += 1
        tmp: Path | None = None
        try:
            try:
                tmp = await asyncio.to_thread(agg.incoming_path)
            except OSError as exc:
                raise agg._storage_rejection(exc) from None
            h = hashlib.sha256()
            t0 = time.perf_counter()
            size = await receive(request, tmp, h)
            if size == 0:
                raise Rejection(422, "malformed", "empty body: expected a safetensors update")
            t1 = time.perf_counter()
            ack, duplicate = await asyncio.to_thread(agg.submit, site, tmp, h.hexdigest())
            t2 = time.perf_counter()
        except ClientDisconnect:
            raise Rejection(400, "incomplete", "connection closed before the body was complete") from None
        finally:
            uploads["active"] -= 1
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        await audit(
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
    """The listening socket. ``IPPROTO_TCP`` explicitly: asyncio sets TCP_NODELAY on accepted sockets only
    when their protocol says TCP, and without it every response waits ~40 ms for a delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_bind(cfg: ExperimentConfig) -> None:
    """Refuse to serve without TLS on a non-loopback address unless ``federation.insecure`` says so."""
    fed = cfg.federation
    if not fed.tls and not is_loopback(fed.host) and not fed.insecure:
        raise FedpathError(
            f"federation.tls is off and federation.host={fed.host!r} is not a loopback address: site tokens "
            "would cross the network in clear; enable TLS, bind 127.0.0.1, or pass --insecure"
        )


def run_server(cfg: ExperimentConfig, *, rebuild_state: bool = False) -> None:
    """Serve until interrupted; the bound URL is written to ``server/endpoint.json`` (port 0: ephemeral)."""
    import uvicorn

    fed = cfg.federation
    check_bind(cfg)
    prov = provision_paths(cfg)
    if fed.tls and not (prov.server_cert.is_file() and prov.server_key.is_file()):
        raise FedpathError(f"{prov.root}: no server certificate; run `fedpath provision` first")
    paths = server_paths(cfg)
    lock = acquire_run_lock(paths)  # before anything in the folder is read or written
    try:
        agg = Aggregator(cfg, rebuild_state=rebuild_state)
    except OSError as exc:
        raise FedpathError(f"{paths.root}: cannot prepare the server state ({exc.strerror or exc})") from None
    sock = _bind(fed.host, fed.port)
    port = sock.getsockname()[1]
    host = "127.0.0.1" if fed.host in ("0.0.0.0", "") else fed.host
    url = f"{'https' if fed.tls else 'http'}://{host}:{port}"
    atomic_write_json(agg.paths.endpoint, {"url": url, "pid": os.getpid(), "tls": fed.tls})
    log.info("aggregator: listening on %s (round %d, %s)", url, agg.round, agg.phase)
    config = uvicorn.Config(
        create_app(agg),
        http=timed_h11(fed.header_timeout_s),
        ssl_certfile=str(prov.server_cert) if fed.tls else None,
        ssl_keyfile=str(prov.server_key) if fed.tls else None,
        log_level="warning",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=max(1, int(fed.keep_alive_s)),
        limit_concurrency=fed.max_connections,
        server_header=False,
        date_header=False,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        lock.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m federation.server --config C [--set k=v ...]`` (the same as ``fedpath serve``)."""
    ap = argparse.ArgumentParser(prog="python -m federation.server")
    ap.add_argument("--config", "-c", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--insecure", action="store_true", help="allow serving without TLS on a non-loopback host"
    )
    ap.add_argument("--rebuild-state", action="store_true", help="rebuild state.json from the files on disk")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["federation.insecure=true"] if args.insecure else [])
    try:
        run_server(load_config(args.config, overrides), rebuild_state=args.rebuild_state)
    except (FedpathError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()

"""A site's federation batch job: pull the round's global model, train locally, push the update, exit.

The job is stateless apart from ``<run>/sites/<site>/rounds/<r>/``, which makes it safe to kill and
re-run at any point:

* the server already holds this site's update for the open round -> nothing to do (exit 0);
* ``update.safetensors`` exists locally (trained, maybe not uploaded) -> upload it again; the server
  answers a byte-identical re-send with the same acknowledgement, so nothing is trained or counted twice;
* otherwise train from the downloaded global model, save the update (after recording any update-level
  DP spend in the ledger), then upload with retries and write ``done.json``;
* a 4xx refusal of the upload is final: the saved update is renamed ``update.refused.safetensors``,
  ``refused.json`` keeps the server's reason, and this and every later run of the job for that round
  exits 2 with that reason instead of re-sending it (delete ``refused.json`` to train the round again).

Tokens never travel over plain HTTP to another machine: an ``http://`` URL is refused unless its host is
loopback or ``federation.insecure`` (``--insecure``) is set.

The aggregator is trusted only through the provisioned CA (``provision/ca.pem``); weights are read with
:func:`federation.wire.decode_state` (header checked, never unpickled).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch
from pydantic import ValidationError

from fedcore.layout import RunLayout
from federation.ledger import UpdateLedger
from federation.payloads import RoundStatus, UpdateMeta
from federation.provision import provision_paths, read_site_token
from federation.server import is_loopback
from federation.site import uploaded_rounds
from federation.strategies import ServerContext, Strategy, build_strategy
from federation.wire import (
    WireError,
    atomic_write_bytes,
    atomic_write_json,
    decode_state,
    encode_state,
    parse_header,
    spec_of,
)
from pipeline.checkpoint import ModelMeta, strip_wrappers
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: 409 codes after which waiting helps (the round will open); others are final
_RETRY_CODES = {"not_open"}
#: 4xx answers about the transfer, not the update (a stalled body, too many failures): retried like 5xx
_TRANSIENT_4XX = {408, 429}


class ServerRefused(FedpathError):
    """The aggregator answered 4xx; carries the status and the server's machine code."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def server_url(cfg: ExperimentConfig) -> str:
    """``federation.server_url``, else the local aggregator's ``server/endpoint.json``, else host:port."""
    fed = cfg.federation
    if fed.server_url:
        return fed.server_url.rstrip("/")
    endpoint = RunLayout(cfg.run_dir).server.endpoint
    if fed.port == 0 and endpoint.is_file():
        return str(json.loads(endpoint.read_text())["url"]).rstrip("/")
    return f"{'https' if fed.tls else 'http'}://{fed.host}:{fed.port}"


@dataclass
class SiteClient:
    """HTTP client of one site: bearer token, CA-pinned TLS, retries on transport errors and 5xx."""

    url: str
    site: str
    token: str
    ca_cert: Path | None
    retries: int = 5
    timeout_s: float = 300.0
    backoff_s: float = 0.5
    insecure: bool = False

    def __post_init__(self) -> None:
        verify: ssl.SSLContext | bool = True
        if not self.url.startswith("https://"):
            host = httpx.URL(self.url).host
            if not self.insecure and not is_loopback(host):
                raise FedpathError(
                    f"{self.url}: refusing to send site {self.site!r}'s token over plain HTTP to {host!r}; "
                    "use https://, or pass --insecure (federation.insecure) to allow it"
                )
            if not is_loopback(host):
                log.warning("site %s: sending the token over plain HTTP to %s (--insecure)", self.site, host)
        if self.url.startswith("https://"):
            if self.ca_cert is None or not Path(self.ca_cert).is_file():
                raise FedpathError(f"{self.ca_cert}: CA certificate not found (needed to trust {self.url})")
            verify = ssl.create_default_context(cafile=str(self.ca_cert))
        self.http = httpx.Client(
            base_url=self.url,
            verify=verify,
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            headers={"Authorization": f"Bearer {self.token}", "X-Fedpath-Site": self.site},
        )
        #: payload bytes of model downloads and update uploads (the bodies on the wire)
        self.bytes_down = 0
        self.bytes_up = 0
        self.last_delta_digest: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SiteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                last = exc
            else:
                if resp.status_code < 400:
                    return resp
                if resp.status_code < 500 and resp.status_code not in _TRANSIENT_4XX:
                    try:
                        body = resp.json()
                    except ValueError:
                        body = {"detail": resp.text[:200], "code": ""}
                    raise ServerRefused(
                        f"{self.url}{path}: {resp.status_code} {body.get('detail')}",
                        resp.status_code,
                        str(body.get("code", "")),
                    )
                last = FedpathError(f"{self.url}{path}: server answered {resp.status_code}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise FedpathError(f"{self.url}{path}: failed after {self.retries + 1} attempts ({last})")

    def status(self) -> RoundStatus:
        data = self._request("GET", "/v1/status").json()
        try:
            return RoundStatus.model_validate(data)
        except ValidationError as err:
            raise FedpathError(f"{self.url}/v1/status: unexpected answer ({err.errors()[0]['loc']})") from None

    def wait_open(self, timeout_s: float, poll_s: float = 0.5) -> RoundStatus:
        """Status once the current round accepts updates (or the federation finished)."""
        end = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if st.phase in ("open", "finished"):
                return st
            if time.monotonic() > end:
                raise FedpathError(f"{self.url}: round {st.round} did not open within {timeout_s:.0f} s")
            time.sleep(poll_s)

    def download_model(self, round_index: int) -> tuple[dict[str, torch.Tensor], ModelMeta]:
        resp = self._request("GET", "/v1/model", params={"round": round_index})
        self.bytes_down += len(resp.content)
        got = int(resp.headers.get("x-fedpath-round", -1))
        if got != round_index:
            raise FedpathError(f"{self.url}/v1/model: asked for round {round_index}, got round {got}")
        state, header = decode_state(resp.content, f"global model round {round_index}")
        return state, ModelMeta.from_header(header, f"global model round {round_index}")

    def download_task_model(
        self, classes: int, round_index: int = 0
    ) -> tuple[dict[str, torch.Tensor], ModelMeta]:
        """Version ``round_index`` (default 0, the base model) with a fresh head for ``classes`` classes."""
        resp = self._request("GET", "/v1/model/task", params={"classes": classes, "round": round_index})
        self.bytes_down += len(resp.content)
        what = f"task model ({classes} classes, version {round_index})"
        state, header = decode_state(resp.content, what)
        meta = ModelMeta.from_header(header, what)
        if meta.round != round_index or meta.model.out_channels != classes:
            raise FedpathError(
                f"{self.url}/v1/model/task: asked for {what}, got {meta.model.out_channels} classes of "
                f"version {meta.round}"
            )
        return state, meta

    def download_delta(self, round_index: int) -> dict[str, torch.Tensor] | None:
        """Version ``round_index`` as its compressed delta from the previous one; None if not offered."""
        try:
            resp = self._request("GET", "/v1/model", params={"round": round_index, "form": "delta"})
        except ServerRefused as exc:
            if exc.status == 404:
                return None
            raise
        self.bytes_down += len(resp.content)
        state, meta = decode_state(resp.content, f"global delta version {round_index}")
        try:
            info = json.loads(meta["fedpath_delta"])
            if int(info["version"]) != round_index:
                raise ValueError("version")
        except (KeyError, ValueError, TypeError):
            raise FedpathError(f"{self.url}/v1/model: delta of version {round_index} has bad metadata") from None
        self.last_delta_digest = str(info.get("digest")) if info.get("digest") else None
        return state

    def upload(self, body: bytes) -> dict[str, Any]:
        self.bytes_up += len(body)
        return self._request(
            "POST", "/v1/update", content=body, headers={"Content-Type": "application/octet-stream"}
        ).json()


def client_for(cfg: ExperimentConfig, site: str) -> SiteClient:
    fed = cfg.federation
    cfg.site(site)  # a site that is not in the config is an error here, not a 403 later
    return SiteClient(
        url=server_url(cfg),
        site=site,
        token=read_site_token(cfg, site),
        ca_cert=fed.ca_cert or provision_paths(cfg).ca_cert,
        retries=fed.upload_retries,
        insecure=fed.insecure,
    )


# -- update-level DP ledger ---------------------------------------------------------------------------
def update_ledger_path(cfg: ExperimentConfig, site: str) -> Path:
    return RunLayout(cfg.run_dir).site(site).update_privacy


def record_update_privacy(
    cfg: ExperimentConfig, site: str, strategy: Strategy, round_index: int, entry: dict[str, Any]
) -> dict[str, Any]:
    """Record the update-level Gaussian release of ``round_index`` in the site's ledger; return it.

    Re-recording a round (a re-run job) replaces its entry rather than spending twice.
    """

    def epsilon_of(participations: int) -> tuple[float, float]:
        got = strategy.update_epsilon(participations)
        if got is None:
            raise FedpathError(f"strategy {strategy.describe()} reports update privacy but has no accountant")
        return got

    return UpdateLedger.load(update_ledger_path(cfg, site), site).record(round_index, entry, epsilon_of)


# -- the batch job ------------------------------------------------------------------------------------
def compute_delta(
    local: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``local - global`` with the global model's names, shapes and dtypes (float32 for a float model)."""
    local = strip_wrappers(local)
    missing = [k for k in global_state if k not in local]
    if missing:
        raise FedpathError(f"local training result: tensor {missing[0]!r} of the global model is missing")
    out: dict[str, torch.Tensor] = {}
    for k, g in global_state.items():
        loc = local[k].detach().to("cpu")
        if tuple(loc.shape) != tuple(g.shape):
            raise FedpathError(
                f"local training result: tensor {k!r} has shape {list(loc.shape)}, global {list(g.shape)}"
            )
        if g.is_floating_point():
            out[k] = (loc.to(torch.float64) - g.to(torch.float64)).to(g.dtype)
        else:
            out[k] = torch.zeros_like(g)  # integer buffers are not averaged
    return out


def _own_update(path: Path, site: str, r: int) -> bytes | None:
    """A locally saved update of this round, if complete and really this round's."""
    if not path.is_file():
        return None
    body = path.read_bytes()
    try:
        header = parse_header(body[: 8 + 16 * 1024 * 1024], len(body), str(path))
        meta = UpdateMeta.from_header(header.metadata, str(path))
    except WireError:
        log.warning("%s: unreadable saved update, retraining", path)
        return None
    return body if meta.site == site and meta.round == r else None


def _refusal_error(site: str, r: int, refused: Path) -> ServerRefused:
    """The one-line error of a refused update (exit 2), from its ``refused.json``."""
    try:
        info = json.loads(refused.read_text())
        status, code, reason = int(info["status"]), str(info["code"]), str(info["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        status, code, reason = 400, "", "(unreadable)"
    return ServerRefused(
        f"site {site}: round {r}: the server refused this site's update ({status} {code}): {reason}; "
        f"not re-sending it (see {refused}; delete it to train the round again)",
        status,
        code,
    )


def run_site_round(cfg: ExperimentConfig, site: str, strategy: Strategy | None = None) -> dict[str, Any]:
    """One site's job for the open round; returns (and writes to rounds/<r>/done.json) what happened."""
    fed = cfg.federation
    strategy = strategy or build_strategy(fed, len(cfg.sites))
    layout = RunLayout(cfg.run_dir).site(site)
    with client_for(cfg, site) as client:
        st = client.wait_open(fed.wait_timeout_s)
        if st.phase == "finished":
            log.info("site %s: federation finished after %d rounds; nothing to do", site, st.rounds)
            return {"site": site, "round": st.round, "outcome": "finished"}
        r = st.round
        job = layout.round(r)
        job.mkdir(parents=True, exist_ok=True)
        done = layout.done(r)
        if st.submitted:
            log.info("site %s: round %d already submitted; not training again", site, r)
            if not done.is_file():
                atomic_write_json(done, {"site": site, "round": r, "outcome": "already_submitted"})
            return {"site": site, "round": r, "outcome": "already_submitted"}
        uploaded = uploaded_rounds(layout, r)
        if strategy.site_algorithm().contributed_enough(cfg, site, uploaded):  # one-shot methods
            log.info("site %s: sent its updates (rounds %s); nothing to do", site, uploaded)
            return {"site": site, "round": r, "outcome": "contributed", "contributed_round": uploaded[0]}
        update_file = layout.update(r)
        refused = layout.refused(r)
        if refused.is_file():
            raise _refusal_error(site, r, refused)
        body = _own_update(update_file, site, r)
        trained = False
        if body is None:
            t0 = time.perf_counter()
            algo = strategy.site_algorithm()
            global_state = algo.fetch_global(client, cfg, site, r)
            spec = spec_of(global_state)
            strategy.bind(ServerContext(global_spec=spec, model=cfg.model))
            fit = st.fit
            result = algo.train(cfg, site, r, global_state, fit)
            delta = compute_delta(result.state, global_state)
            cu = strategy.client_update(delta, site=site, round_index=r)
            payload = algo.encode_update(strategy, cfg, site, r, cu.delta, fit)
            extra: dict[str, Any] = {
                "steps": result.steps,
                "sample_delta": result.delta,
                "sample_unit": cfg.train.privacy.unit if result.epsilon is not None else None,
                "epsilon_slide": result.epsilon_slide,
                "noise_multiplier": result.noise_multiplier,
                "sample_rate": result.sample_rate,
                "proximal_mu": fit.proximal_mu,
                "strategy": strategy.describe(),
            }
            if cu.privacy is not None:
                ledger = record_update_privacy(cfg, site, strategy, r, cu.privacy)
                extra["update_epsilon"] = ledger["epsilon"]
                extra["update_delta"] = ledger["delta"]
            meta = UpdateMeta(
                site=site,
                round=r,
                n_tiles=int(result.n_train_tiles),
                epsilon=None if result.epsilon is None else float(result.epsilon),
                update_id=uuid.uuid4().hex,
                kind=st.payload,
                extra=extra,
            )
            body = encode_state(payload, meta.to_header())
            atomic_write_bytes(update_file, body)  # before upload: a killed job re-sends, never retrains
            atomic_write_json(
                layout.train_json(r),
                {
                    "metrics": result.metrics,
                    "epsilon": result.epsilon,
                    "n_train_tiles": result.n_train_tiles,
                    "seconds": time.perf_counter() - t0,
                    "bytes_down": client.bytes_down,
                    "bytes_up": len(body),
                    "payload": st.payload,
                }
                | {k: v for k, v in extra.items() if k != "strategy"}
                | result.extra,
            )
            trained = True
        else:
            log.info("site %s: re-sending the saved update of round %d", site, r)
        try:
            ack = client.upload(body)
        except ServerRefused as exc:
            if exc.code in _RETRY_CODES:
                raise
            # final: never re-send this update; keep it (renamed) for the site engineer to inspect
            if update_file.is_file():
                update_file.replace(layout.refused_update(r))
            atomic_write_json(
                refused,
                {"site": site, "round": r, "status": exc.status, "code": exc.code, "reason": str(exc)},
            )
            raise _refusal_error(site, r, refused) from None
        out = {
            "site": site,
            "round": r,
            "outcome": "uploaded",
            "trained": trained,
            "ack": ack,
            "bytes_up": client.bytes_up,
            "bytes_down": client.bytes_down,
        }
        atomic_write_json(done, out)
        log.info("site %s: round %d update accepted (%s)", site, r, ack["sha256"][:12])
        return out

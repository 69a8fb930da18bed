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
from typing import Any

import httpx
import torch

from federation.provision import provision_paths, read_site_token
from federation.server import is_loopback
from federation.strategies import LocalUpdateDP, Strategy, build_strategy
from federation.wire import (
    UPDATE_META_KEY,
    WireError,
    atomic_write_bytes,
    atomic_write_json,
    decode_state,
    encode_state,
    parse_header,
    update_metadata,
)
from pipeline.checkpoint import ModelMeta, strip_wrappers
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError

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
    endpoint = cfg.run_dir / "server" / "endpoint.json"
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

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status").json()

    def wait_open(self, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """Status once the current round accepts updates (or the federation finished)."""
        end = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if st["phase"] in ("open", "finished"):
                return st
            if time.monotonic() > end:
                raise FedpathError(f"{self.url}: round {st['round']} did not open within {timeout_s:.0f} s")
            time.sleep(poll_s)

    def download_model(self, round_index: int) -> tuple[dict[str, torch.Tensor], ModelMeta]:
        resp = self._request("GET", "/v1/model", params={"round": round_index})
        got = int(resp.headers.get("x-fedpath-round", -1))
        if got != round_index:
            raise FedpathError(f"{self.url}/v1/model: asked for round {round_index}, got round {got}")
        state, header = decode_state(resp.content, f"global model round {round_index}")
        return state, ModelMeta.from_header(header, f"global model round {round_index}")

    def upload(self, body: bytes) -> dict[str, Any]:
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
    return cfg.site_dir(site) / "update_privacy.json"


def record_update_privacy(
    cfg: ExperimentConfig, site: str, strategy: LocalUpdateDP, round_index: int, entry: dict[str, Any]
) -> dict[str, Any]:
    """Append the update-level Gaussian release of ``round_index`` to the site's ledger; return ε so far.

    Re-recording a round (a re-run job) replaces its entry rather than spending twice.
    """
    path = update_ledger_path(cfg, site)
    data: dict[str, Any] = {"site": site, "unit": "site", "entries": []}
    if path.is_file():
        data = json.loads(path.read_text())
    entries = [e for e in data["entries"] if e["round"] != round_index]
    participations = len(entries) + 1
    eps = strategy.epsilon(participations)
    entries.append(entry | {"round": round_index, "participations": participations, "epsilon": eps})
    data["entries"] = sorted(entries, key=lambda e: e["round"])
    data["epsilon"] = eps
    data["delta"] = strategy.delta
    data["unit"] = "site"
    data["noise_source"] = entry.get("noise_source")
    data["accountant"] = (
        "rdp (opacus.accountants.analysis.rdp), one Gaussian per round, q=1, sensitivity 2C (replacement)"
    )
    atomic_write_json(path, data)
    return data


# -- the batch job ------------------------------------------------------------------------------------
def _round_dir(cfg: ExperimentConfig, site: str, r: int) -> Path:
    return cfg.site_dir(site) / "rounds" / str(r)


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


def _train(cfg: ExperimentConfig, site: str, r: int, global_state: dict[str, torch.Tensor], mu: float) -> Any:
    """Local DP training from the global model (FedProx: with the proximal term towards it)."""
    from pipeline.train import train_local

    return train_local(
        cfg,
        [site],
        cfg.run_dir,
        init_state={k: v.clone() for k, v in global_state.items()},
        round_index=r,
        proximal_ref=global_state if mu > 0 else None,
        proximal_mu=mu,
        job_id=f"round-{r}",
        progress=False,
    )


def _own_update(path: Path, site: str, r: int) -> bytes | None:
    """A locally saved update of this round, if complete and really this round's."""
    if not path.is_file():
        return None
    body = path.read_bytes()
    try:
        header = parse_header(body[: 8 + 16 * 1024 * 1024], len(body), str(path))
        meta = json.loads(header.metadata[UPDATE_META_KEY])
    except (WireError, KeyError, json.JSONDecodeError):
        log.warning("%s: unreadable saved update, retraining", path)
        return None
    return body if meta.get("site") == site and meta.get("round") == r else None


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
    with client_for(cfg, site) as client:
        st = client.wait_open(fed.wait_timeout_s)
        if st["phase"] == "finished":
            log.info("site %s: federation finished after %d rounds; nothing to do", site, st["rounds"])
            return {"site": site, "round": st["round"], "outcome": "finished"}
        r = int(st["round"])
        job = _round_dir(cfg, site, r)
        job.mkdir(parents=True, exist_ok=True)
        done = job / "done.json"
        if st["submitted"]:
            log.info("site %s: round %d already submitted; not training again", site, r)
            if not done.is_file():
                atomic_write_json(done, {"site": site, "round": r, "outcome": "already_submitted"})
            return {"site": site, "round": r, "outcome": "already_submitted"}
        update_file = job / "update.safetensors"
        refused = job / "refused.json"
        if refused.is_file():
            raise _refusal_error(site, r, refused)
        body = _own_update(update_file, site, r)
        trained = False
        if body is None:
            t0 = time.perf_counter()
            global_state, gmeta = client.download_model(r)
            if gmeta.model != cfg.model:
                raise FedpathError(
                    f"global model round {r}: its model config differs from this site's config"
                )
            mu = float(st.get("fit", {}).get("proximal_mu", 0.0))
            result = _train(cfg, site, r, global_state, mu)
            delta = compute_delta(result.state, global_state)
            cu = strategy.client_update(delta, site=site, round_index=r)
            extra: dict[str, Any] = {
                "steps": int(getattr(result, "steps", 0)),
                "sample_delta": getattr(result, "delta", None),
                "sample_unit": cfg.train.privacy.unit if getattr(result, "epsilon", None) is not None else None,
                "epsilon_slide": getattr(result, "epsilon_slide", None),
                "noise_multiplier": getattr(result, "noise_multiplier", None),
                "sample_rate": getattr(result, "sample_rate", None),
                "proximal_mu": mu,
                "strategy": strategy.describe(),
            }
            if cu.privacy is not None and isinstance(strategy, LocalUpdateDP):
                ledger = record_update_privacy(cfg, site, strategy, r, cu.privacy)
                extra["update_epsilon"] = ledger["epsilon"]
                extra["update_delta"] = ledger["delta"]
            meta = update_metadata(
                site=site,
                round=r,
                n_tiles=int(result.n_train_tiles),
                epsilon=None if result.epsilon is None else float(result.epsilon),
                update_id=uuid.uuid4().hex,
                extra=extra,
            )
            body = encode_state(cu.delta, meta)
            atomic_write_bytes(update_file, body)  # before upload: a killed job re-sends, never retrains
            atomic_write_json(
                job / "train.json",
                {
                    "metrics": getattr(result, "metrics", {}),
                    "epsilon": result.epsilon,
                    "n_train_tiles": result.n_train_tiles,
                    "seconds": time.perf_counter() - t0,
                }
                | {k: v for k, v in extra.items() if k != "strategy"},
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
                update_file.replace(job / "update.refused.safetensors")
            atomic_write_json(
                refused,
                {"site": site, "round": r, "status": exc.status, "code": exc.code, "reason": str(exc)},
            )
            raise _refusal_error(site, r, refused) from None
        out = {"site": site, "round": r, "outcome": "uploaded", "trained": trained, "ack": ack}
        atomic_write_json(done, out)
        log.info("site %s: round %d update accepted (%s)", site, r, ack["sha256"][:12])
        return out

"""Helpers shared by the federation tests: a tiny federation config, update bodies, a live aggregator."""

from __future__ import annotations

import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

from federation.client import SiteClient
from federation.provision import run_provision
from federation.server import server_paths
from federation.wire import encode_state, update_metadata
from fedpath.simulate import AggregatorProcess
from pipeline.checkpoint import read_model_file
from pipeline.config import ExperimentConfig, load_config

TINY_MODEL = {"name": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "groups": 2}


def write_config(tmp_path: Path, sites: list[str], **federation: Any) -> Path:
    """A run config under ``tmp_path`` with a tiny UNet and the given federation settings."""
    fed: dict[str, Any] = {"rounds": 2, "min_sites": len(sites), "port": 0, "round_deadline_s": 3600.0}
    fed.update(federation)
    data = {
        "name": "fedtest",
        "run_dir": str(tmp_path / "run"),
        "sites": [{"name": s, "manifest": str(tmp_path / f"{s}.csv")} for s in sites],
        "model": TINY_MODEL,
        "tiling": {"tile_size": 32},
        "federation": fed,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def random_delta(like: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float32) * scale for k, v in like.items()}


def update_body(
    delta: dict[str, torch.Tensor], site: str, round_index: int, n_tiles: int, epsilon: float | None = 1.0
) -> bytes:
    return encode_state(
        delta,
        update_metadata(
            site=site, round=round_index, n_tiles=n_tiles, epsilon=epsilon, update_id=uuid.uuid4().hex
        ),
    )


class Fed:
    """A provisioned run with its aggregator process and one real client per site."""

    def __init__(self, tmp: Path, sites: list[str], **fed: Any) -> None:
        self.config_path = write_config(tmp, sites, **fed)
        self.cfg: ExperimentConfig = load_config(self.config_path)
        self.prov = run_provision(self.cfg)
        self.paths = server_paths(self.cfg)
        self.proc = AggregatorProcess(self.cfg, self.config_path, tmp / "server.log")
        self.url = self.proc.start()
        self.opened0 = float(json.loads(self.paths.state.read_text())["opened_at"])
        self.clients = {s: self.client(s) for s in sites}
        self.global0, _ = read_model_file(self.paths.global_model(0))

    def token(self, site: str) -> str:
        return self.prov.site_token(site).read_text().strip()

    def client(self, site: str, token: str | None = None) -> SiteClient:
        return SiteClient(self.url, site, token or self.token(site), self.prov.ca_cert, retries=0)

    def raw(
        self, site: str | None, token: str | None, body: Any, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return self.request("POST", "/v1/update", site, token, body, headers)

    def request(
        self,
        method: str,
        path: str,
        site: str | None,
        token: str | None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """One request with exactly these credentials (None: header absent) on a fresh connection."""
        h = dict(headers or {})
        if site is not None:
            h["X-Fedpath-Site"] = site
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        with httpx.Client(verify=self.ssl_context(), timeout=60) as c:
            return c.request(method, f"{self.url}{path}", content=body, headers=h, params=params)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.prov.ca_cert))

    def state(self) -> dict[str, Any]:
        return json.loads(self.paths.state.read_text())

    def snapshot(self) -> dict[str, Any]:
        """The durable state: state.json plus every file under updates/ and global/ with its size."""
        files = {
            str(p.relative_to(self.paths.root)): p.stat().st_size
            for sub in ("updates", "global", "strategy")
            for p in sorted((self.paths.root / sub).rglob("*"))
            if p.is_file()
        }
        return {"state": json.loads(self.paths.state.read_text()), "files": files}

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.paths.audit.read_text().splitlines()]

    def wait_round(self, r: int, timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = json.loads(self.paths.state.read_text())
            if st["round"] >= r and st["phase"] in ("open", "finished"):
                return st
            time.sleep(0.1)
        raise AssertionError(f"round {r} never opened")

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.proc.stop()

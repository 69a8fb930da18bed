"""A whole federation on one machine, with the deployment's code path.

The real aggregator runs as its own process (``python -m federation.server``) on loopback with TLS and
an ephemeral port; every site round is its own ``fedpath site-round`` process, as a Slurm job would be.
The frozen config of the run is written to ``<run>/simulate/config.yaml`` so that every process sees
exactly the same settings, including ``--set`` overrides given to ``fedpath simulate``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from federation.provision import provision_paths, run_provision
from federation.server import server_paths
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError
from pipeline.statement import write_statement
from pipeline.summary import update_summary

log = logging.getLogger(__name__)


def _ensure_stores(cfg: ExperimentConfig) -> None:
    missing = [s.name for s in cfg.sites if not cfg.store_path(s.name).exists()]
    if not missing:
        return
    try:
        from wsi.tiling import run_tile_site
    except ImportError:
        raise FedpathError(
            f"{cfg.store_path(missing[0])}: no tile store; run `fedpath tile` first (wsi.tiling unavailable)"
        ) from None
    for name in missing:
        s = cfg.site(name)
        run_tile_site(
            manifest=s.manifest,
            data_root=cfg.resolved_data_root(),
            store=cfg.store_path(name),
            tiling=cfg.tiling,
            site=name,
            run_dir=cfg.run_dir,
            scheduler=cfg.tiling.scheduler,
            workers=cfg.tiling.workers,
        )


def freeze_config(cfg: ExperimentConfig, path: Path) -> Path:
    """Write the resolved config as YAML (what every subprocess loads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


class AggregatorProcess:
    """The aggregator as a child process; knows its URL once it is listening."""

    def __init__(self, cfg: ExperimentConfig, config_path: Path, log_path: Path) -> None:
        self.cfg = cfg
        self.paths = server_paths(cfg)
        self.config_path = config_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(
        self, timeout_s: float = 120.0, args: list[str] | None = None, env: dict[str, str] | None = None
    ) -> str:
        """Start the process (``args``: extra server flags, ``env``: its environment) and wait until it serves."""
        self.paths.endpoint.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "federation.server", "--config", str(self.config_path), *(args or [])],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise FedpathError(
                    f"aggregator exited with {self.proc.returncode} ({tail[0][:300]}); see {self.log_path}"
                )
            if self.paths.endpoint.is_file():
                ep = json.loads(self.paths.endpoint.read_text())
                if ep.get("pid") == self.proc.pid:
                    self.url = ep["url"]
                    try:
                        self.health()
                        return self.url
                    except httpx.HTTPError:
                        pass
            time.sleep(0.2)
        raise FedpathError(f"aggregator did not come up within {timeout_s:.0f} s; see {self.log_path}")

    def health(self) -> dict[str, Any]:
        verify: ssl.SSLContext | bool = True
        if self.url.startswith("https"):
            verify = ssl.create_default_context(cafile=str(provision_paths(self.cfg).ca_cert))
        r = httpx.get(f"{self.url}/v1/health", verify=verify, timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _site_cmd(config_path: Path, site: str, url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "site-round",
        "--config",
        str(config_path),
        "--site",
        site,
        "--set",
        f"federation.server_url={url}",
    ]


def run_site_jobs(
    cfg: ExperimentConfig, config_path: Path, url: str, round_index: int, sites: list[str]
) -> dict[str, int]:
    """Run one ``site-round`` process per site, at most ``parallel_sites`` at a time; exit codes."""
    fed = cfg.federation
    pending = list(sites)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    codes: dict[str, int] = {}
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while pending or running:
        while pending and len(running) < fed.parallel_sites:
            site = pending.pop(0)
            log_path = cfg.site_dir(site) / "rounds" / str(round_index) / "job.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(
                    _site_cmd(config_path, site, url), stdout=logf, stderr=subprocess.STDOUT, env=env
                )
            running[site] = (proc, time.monotonic())
        for site, (proc, started) in list(running.items()):
            rc = proc.poll()
            if rc is None and time.monotonic() - started > fed.site_timeout_s:
                proc.kill()
                rc = proc.wait()
            if rc is not None:
                codes[site] = rc
                del running[site]
                if rc != 0:
                    log.warning("site %s round %d: job exited %d (see its job.log)", site, round_index, rc)
        time.sleep(0.2)
    return codes


def run_simulation(cfg: ExperimentConfig) -> dict[str, Any]:
    """Provision, start the aggregator, run every round's site jobs, write summary.json['federation']."""
    t0 = time.perf_counter()
    if not cfg.sites:
        raise FedpathError("config: `sites` is empty; nothing to federate")
    fed = cfg.federation.model_copy(update={"port": 0, "server_url": None})
    cfg = cfg.model_copy(update={"federation": fed})
    prov = provision_paths(cfg)
    if not prov.tokens.is_file() or any(not prov.site_token(s.name).is_file() for s in cfg.sites):
        run_provision(cfg)
    _ensure_stores(cfg)
    sim_dir = cfg.run_dir / "simulate"
    config_path = freeze_config(cfg, sim_dir / "config.yaml")
    agg = AggregatorProcess(cfg, config_path, server_paths(cfg).root / "server.log")
    url = agg.start()
    jobs: list[dict[str, Any]] = []
    try:
        while True:
            h = agg.health()
            if h["phase"] == "finished":
                break
            r = int(h["round"])
            log.info("simulate: round %d of %d", r, fed.rounds)
            codes = run_site_jobs(cfg, config_path, url, r, [s.name for s in cfg.sites])
            jobs.append({"round": r, "exit_codes": codes})
            end = time.monotonic() + fed.round_deadline_s + 60
            while True:
                h = agg.health()
                if h["phase"] == "finished" or int(h["round"]) > r:
                    break
                if agg.proc is not None and agg.proc.poll() is not None:
                    raise FedpathError(f"aggregator died during round {r}; see {agg.log_path}")
                if time.monotonic() > end:
                    raise FedpathError(
                        f"round {r} did not close (site exit codes {codes}); see {agg.log_path}"
                    )
                time.sleep(0.2)
    finally:
        agg.stop()
    summary = federation_summary(cfg, jobs, time.perf_counter() - t0)
    summary["privacy"] = write_statement(cfg.run_dir)  # privacy_statement.json, ε with δ and unit
    update_summary(cfg.run_dir, "federation", summary)
    update_summary(cfg.run_dir, "privacy", summary["privacy"])
    return summary


def federation_summary(cfg: ExperimentConfig, jobs: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """What the run's summary records: rounds, sites per round, ε per site, wall time, model paths."""
    paths = server_paths(cfg)
    state = json.loads(paths.state.read_text())
    # from the sites' own ledgers (what a site reports to the server is not trusted), ε with δ and unit
    eps_sample: dict[str, dict[str, Any] | None] = {}
    for s in cfg.sites:
        p = cfg.site_dir(s.name) / "privacy.json"
        d = json.loads(p.read_text()) if p.is_file() else None
        eps_sample[s.name] = None if d is None else {"epsilon": d["epsilon"], "delta": d["delta"], "unit": d["unit"]}
    eps_update: dict[str, dict[str, Any] | None] = {}
    for s in cfg.sites:
        p = cfg.site_dir(s.name) / "update_privacy.json"
        u = json.loads(p.read_text()) if p.is_file() else None
        eps_update[s.name] = None if u is None else {"epsilon": u["epsilon"], "delta": u["delta"], "unit": "site"}
    return {
        "strategy": state["strategy"],
        "rounds": len(state["history"]),
        "planned_rounds": cfg.federation.rounds,
        "sites_per_round": {str(h["round"]): h["sites"] for h in state["history"]},
        "epsilon_sample_level": eps_sample,
        "epsilon_update_level": eps_update,
        "central_privacy": state.get("central_privacy"),
        "wall_s": round(wall_s, 2),
        "global_models": [str(paths.global_model(r)) for r in range(len(state["history"]) + 1)],
        "jobs": jobs,
    }

"""A whole federation on one machine, with the deployment's code path.

The real aggregator runs as its own process (``python -m federation.server``) on loopback with TLS and
an ephemeral port. Every site round is the deployment's batch job, ``fedpath site-round``, with the same
arguments, on-disk state and exit status, run in one of two ways (``fedpath.simulate_workers``):

* ``warm`` (default): one worker process per site, forked from a fork server that has imported torch,
  MONAI, Opacus and fedpath once. Each job is the same call a ``fedpath site-round`` process makes
  (:func:`fedpath.cli.run` on the same argv), its output appended to the same ``job.log``. A worker keeps
  nothing between jobs but its imports and library caches: every job reloads its config, token, store,
  ledger and model, and makes its own CSPRNG (never before a fork: workers never fork). A worker that
  dies mid-job is replaced, and the job is re-run at once as a fresh process (``cold``), which resumes
  from the job's saved state, so nothing is trained or spent twice.
* ``cold``: every job is a fresh ``python -m fedpath.cli site-round`` process, as a Slurm job would be.

The frozen config of the run is written to ``<run>/simulate/config.yaml`` so that every job sees
exactly the same settings, including ``--set`` overrides given to ``fedpath simulate``.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import ssl
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import httpx
import yaml

from fedcore.layout import RunLayout
from fedcore.summary import update_summary
from federation.provision import provision_paths, run_provision
from federation.server import server_paths
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError
from pipeline.statement import write_statement
from pipeline.tiles import tile_sites

log = logging.getLogger(__name__)


def _ensure_stores(cfg: ExperimentConfig) -> None:
    """Tile the sites that have no store yet (a site whose store exists keeps it as it is)."""
    tile_sites(cfg, cfg.resolved_data_root(), "simulate", missing_only=True)


def frozen_config_path(run_dir: Path) -> Path:
    """Where a simulation freezes its resolved config (read by every job, and by the experiment to tell
    which settings a variant directory was trained with)."""
    return run_dir / "simulate" / "config.yaml"


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
        self._http: httpx.Client | None = None
        self._http_url = ""

    def start(
        self, timeout_s: float = 120.0, args: list[str] | None = None, env: dict[str, str] | None = None
    ) -> str:
        """Start the process (``args``: extra server flags, ``env``: its environment) and wait until it serves."""
        self.launch(args, env)
        return self.wait_ready(timeout_s)

    def launch(self, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """Start the process and return at once (:meth:`wait_ready` waits until it serves)."""
        self.paths.endpoint.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "federation.server", "--config", str(self.config_path), *(args or [])],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout_s: float = 120.0) -> str:
        """The URL once the launched process serves; an error with its log's last line if it exits."""
        assert self.proc is not None, "launch() first"
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
                        self.health(retries=0)
                        return self.url
                    except httpx.HTTPError:
                        pass
            time.sleep(0.05)
        raise FedpathError(f"aggregator did not come up within {timeout_s:.0f} s; see {self.log_path}")

    def health(self, retries: int = 5) -> dict[str, Any]:
        """``/v1/health`` over one kept-alive connection (not a TLS handshake per poll). A connection the
        server dropped or a poll it answered late (it may be busy closing a round, e.g. distilling) is
        retried on a fresh connection, ``retries`` times with a growing pause, while the process lives."""
        for attempt in range(retries + 1):
            if self._http is None or self._http_url != self.url:
                if self._http is not None:
                    self._http.close()
                verify: ssl.SSLContext | bool = True
                if self.url.startswith("https"):
                    verify = ssl.create_default_context(cafile=str(provision_paths(self.cfg).ca_cert))
                self._http, self._http_url = httpx.Client(verify=verify, timeout=10), self.url
            try:
                r = self._http.get(f"{self.url}/v1/health")
            except httpx.TransportError:
                self._http.close()
                self._http = None
                if attempt == retries or (self.proc is not None and self.proc.poll() is not None):
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            r.raise_for_status()
            return r.json()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def site_round_argv(config_path: Path, site: str, url: str) -> list[str]:
    """The arguments of one site's round job: ``fedpath site-round`` with the frozen config."""
    return ["site-round", "--config", str(config_path), "--site", site, "--set", f"federation.server_url={url}"]


def _site_cmd(config_path: Path, site: str, url: str) -> list[str]:
    return [sys.executable, "-m", "fedpath.cli", *site_round_argv(config_path, site, url)]


def _job_env() -> dict[str, str]:
    """A site job's environment: the caller's, one OpenMP thread unless set (``train.threads`` sets torch's)."""
    return os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


# -- warm site workers ------------------------------------------------------------------------------
#: what the fork server imports once, before it forks any worker (imports only: no torch op runs there,
#: so no OpenMP pool exists at a fork, and no noise source is ever created before one)
PRELOAD = [
    "numpy",
    "torch",
    "torch._dynamo",  # imported by every torch.optim optimizer's constructor: 0.9 s per worker otherwise
    "monai.networks.nets",
    "monai.losses",
    "opacus",
    "opacus.utils.batch_memory_manager",
    "httpx",
    "rich.progress",
    "fedpath.cli",
    "pipeline.train",
    "pipeline.statement",
    "federation.client",
]


def _reseed() -> None:
    """A worker forked from the fork server starts with its RNG states: give it its own. (No DP draw comes
    from these: each job seeds torch from its config and makes its own CSPRNG from OS entropy.)"""
    import random

    import numpy as np
    import torch

    random.seed(os.urandom(32))
    np.random.seed(int.from_bytes(os.urandom(4), "little"))  # noqa: NPY002 - the legacy global state itself
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def run_job_logged(argv: list[str], log_path: Path) -> int:
    """``fedpath <argv>`` in this process, stdout and stderr appended to ``log_path``; its exit status
    (an unexpected exception: its traceback in the log, 1, as a process would exit)."""
    from fedpath.cli import run

    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        with open(log_path, "ab", buffering=0) as logf:
            os.dup2(logf.fileno(), 1)
            os.dup2(logf.fileno(), 2)
            try:
                rc = run(argv)
            except BaseException:  # noqa: BLE001 - the job's crash is its exit status, as in its own process
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return rc


def _worker_main(conn: Connection, site: str) -> None:
    """A warm site worker: runs each job it is sent (``(argv, log path)``), answers its exit status; stops
    on ``None`` or when the simulation's end of the pipe closes."""
    _reseed()
    # logging as a fresh process has it (a preloaded library may have configured the root logger, which
    # would turn the CLI's basicConfig into a no-op and drop the job's INFO lines from its log)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.WARNING)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        argv, log_path = msg
        conn.send(run_job_logged(list(argv), Path(log_path)))


@contextlib.contextmanager
def _no_main_import() -> Iterator[None]:
    """A worker runs fedpath's job, never the parent's ``__main__`` (a script, ``<stdin>``): multiprocessing
    skips re-importing a main module named ``__main__``, so name it that while a worker starts."""
    main = sys.modules.get("__main__")
    old = getattr(main, "__spec__", None)
    if main is not None:
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        if main is not None:
            main.__spec__ = old


@contextlib.contextmanager
def _environ(**env: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SiteWorker:
    """One site's warm worker process (forked from the fork server) and its end of the job pipe."""

    def __init__(self, ctx: Any, site: str) -> None:
        self.site = site
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, site), name=f"fedpath-site-{site}")
        # the fork server (started by the first worker) gets a cold job's OpenMP setting
        with _environ(OMP_NUM_THREADS=_job_env()["OMP_NUM_THREADS"]), _no_main_import():
            self.proc.start()
        child.close()

    def alive(self) -> bool:
        return bool(self.proc.is_alive())

    def kill(self) -> int:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()
        return int(self.proc.exitcode if self.proc.exitcode is not None else -signal.SIGKILL)

    def stop(self, timeout_s: float = 10.0) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            log.warning("site %s: warm worker did not stop within %.0f s; killing it", self.site, timeout_s)
        self.kill()


class WarmWorkers:
    """One warm worker per site, started before the aggregator serves so that the fork server's imports
    overlap the aggregator's start-up; a dead worker is replaced when its site's next job starts."""

    def __init__(self, sites: list[str]) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)  # used when this starts the fork server
        self.workers: dict[str, SiteWorker] = {}
        for site in sites:
            self.get(site)

    def get(self, site: str) -> SiteWorker:
        w = self.workers.get(site)
        if w is None or not w.alive():
            if w is not None:
                w.kill()
            w = self.workers[site] = SiteWorker(self.ctx, site)
        return w

    def discard(self, site: str) -> None:
        w = self.workers.pop(site, None)
        if w is not None:
            w.kill()

    def close(self) -> None:
        for site in list(self.workers):
            self.workers.pop(site).stop()


# -- running one round's jobs -------------------------------------------------------------------------
class WorkerDied(Exception):
    """A warm worker ended without answering (killed, out of memory, a crash in native code)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(f"warm worker exited with {exitcode}")
        self.exitcode = exitcode


class _Job(Protocol):
    mode: str
    started: float

    def poll(self) -> int | None: ...

    def kill(self) -> int: ...

    def waitables(self) -> list[Any]: ...


class _ColdJob:
    mode = "cold"

    def __init__(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedpath.cli", *argv], stdout=logf, stderr=subprocess.STDOUT, env=_job_env()
            )
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> int:
        self.proc.kill()
        return self.proc.wait()

    def waitables(self) -> list[Any]:
        return []


class _WarmJob:
    mode = "warm"

    def __init__(self, worker: SiteWorker, argv: list[str], log_path: Path) -> None:
        self.worker = worker
        self.started = time.monotonic()
        worker.conn.send((argv, str(log_path)))

    def poll(self) -> int | None:
        w = self.worker
        if w.conn.poll():
            try:
                return int(w.conn.recv())
            except (EOFError, OSError):
                pass
        elif w.alive():
            return None
        w.proc.join(5)
        raise WorkerDied(w.proc.exitcode)

    def kill(self) -> int:
        return self.worker.kill()

    def waitables(self) -> list[Any]:
        return [self.worker.conn, self.worker.proc.sentinel]


def run_site_jobs(
    cfg: ExperimentConfig,
    config_path: Path,
    url: str,
    round_index: int,
    sites: list[str],
    workers: WarmWorkers | None = None,
    fallbacks: list[dict[str, Any]] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, int]:
    """Run one ``site-round`` job per site, at most ``parallel_sites`` at a time; their exit codes.

    With ``workers``, each job runs in its site's warm worker; a worker that dies mid-job is discarded and
    the job re-run as a fresh process (it resumes from its saved state), noted in ``fallbacks``."""
    fed = cfg.federation
    pending = list(sites)
    running: dict[str, _Job] = {}
    codes: dict[str, int] = {}
    first_start: dict[str, float] = {}

    def log_path(site: str) -> Path:
        p = RunLayout(cfg.run_dir).site(site).job_log(round_index)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    while pending or running:
        while pending and len(running) < fed.parallel_sites:
            site = pending.pop(0)
            argv = site_round_argv(config_path, site, url)
            first_start[site] = time.monotonic()
            running[site] = (
                _WarmJob(workers.get(site), argv, log_path(site)) if workers else _ColdJob(argv, log_path(site))
            )
        waitables = [w for job in running.values() for w in job.waitables()]
        cold = any(job.mode == "cold" for job in running.values())
        if waitables:  # wake as soon as a warm job answers or its worker dies
            multiprocessing.connection.wait(waitables, timeout=0.05 if cold else 0.5)
        else:
            time.sleep(0.05)
        for site, job in list(running.items()):
            try:
                rc = job.poll()
            except WorkerDied as exc:
                assert workers is not None
                workers.discard(site)
                log.warning(
                    "site %s round %d: the warm worker died mid-job (exit %s); re-running the job as a fresh "
                    "process, which resumes from its saved state",
                    site,
                    round_index,
                    exc.exitcode,
                )
                if fallbacks is not None:
                    fallbacks.append({"site": site, "round": round_index, "worker_exit": exc.exitcode})
                with open(log_path(site), "ab") as f:
                    f.write(f"\n[simulate] warm worker died (exit {exc.exitcode}); re-running as a fresh process\n".encode())
                running[site] = _ColdJob(site_round_argv(config_path, site, url), log_path(site))
                continue
            if rc is None and time.monotonic() - job.started > fed.site_timeout_s:
                rc = job.kill()
                if workers is not None and job.mode == "warm":
                    workers.discard(site)
            if rc is not None:
                codes[site] = rc
                del running[site]
                if seconds is not None:
                    seconds[site] = round(time.monotonic() - first_start[site], 3)
                if rc != 0:
                    log.warning("site %s round %d: job exited %d (see its job.log)", site, round_index, rc)
    return codes


def site_job_threads(cfg: ExperimentConfig) -> int | None:
    """Torch threads of one site job: ``train.threads`` shared between the ``parallel_sites`` jobs that run at
    once (at least one each), so that they do not oversubscribe the cores. Unset stays unset (one OpenMP thread
    per job, `_job_env`)."""
    threads = cfg.train.threads
    return None if threads is None else max(1, threads // cfg.federation.parallel_sites)


def run_simulation(cfg: ExperimentConfig) -> dict[str, Any]:
    """Provision, start the aggregator, run every round's site jobs, write summary.json['federation']."""
    t0 = time.perf_counter()
    if not cfg.sites:
        raise FedpathError("config: `sites` is empty; nothing to federate")
    fed = cfg.federation.model_copy(update={"port": 0, "server_url": None})
    cfg = cfg.model_copy(update={"federation": fed, "train": cfg.train.model_copy(update={"threads": site_job_threads(cfg)})})
    prov = provision_paths(cfg)
    if not prov.tokens.is_file() or any(not prov.site_token(s.name).is_file() for s in cfg.sites):
        run_provision(cfg)
    _ensure_stores(cfg)
    config_path = freeze_config(cfg, frozen_config_path(cfg.run_dir))
    agg = AggregatorProcess(cfg, config_path, server_paths(cfg).log)
    agg.launch()
    workers: WarmWorkers | None = None
    fallbacks: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    try:
        if fed.simulate_workers == "warm":  # the fork server imports while the aggregator starts
            workers = WarmWorkers([s.name for s in cfg.sites])
        url = agg.wait_ready()
        while True:
            h = agg.health()
            if h["phase"] == "finished":
                break
            r = int(h["round"])
            log.info("simulate: round %d of %d", r, fed.rounds)
            secs: dict[str, float] = {}
            codes = run_site_jobs(cfg, config_path, url, r, [s.name for s in cfg.sites], workers, fallbacks, secs)
            jobs.append({"round": r, "exit_codes": codes, "seconds": secs})
            failed = {s: c for s, c in codes.items() if c != 0}
            if failed and len(codes) - len(failed) < fed.min_sites:  # nobody else will upload: fail now
                h = agg.health()
                if h["phase"] != "finished" and int(h["round"]) == r:
                    raise FedpathError(
                        f"round {r} cannot close: site job(s) {failed} failed and fewer than "
                        f"federation.min_sites={fed.min_sites} uploaded; see each site's rounds/{r}/job.log"
                    )
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
                time.sleep(0.05)
    finally:
        if workers is not None:
            workers.close()
        agg.stop()
    summary = federation_summary(cfg, jobs, time.perf_counter() - t0)
    summary["site_jobs"] = {"workers": fed.simulate_workers, "fallbacks": fallbacks}
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
        p = RunLayout(cfg.run_dir).site(s.name).privacy
        d = json.loads(p.read_text()) if p.is_file() else None
        eps_sample[s.name] = None if d is None else {"epsilon": d["epsilon"], "delta": d["delta"], "unit": d["unit"]}
    eps_update: dict[str, dict[str, Any] | None] = {}
    for s in cfg.sites:
        p = RunLayout(cfg.run_dir).site(s.name).update_privacy
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

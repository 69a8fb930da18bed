"""Federation end to end over real data: MoNuSeg and GBM40 sites tiled from the data root, trained with
DP-SGD by ``pipeline.train.train_local``, each site job its own process, the aggregator a TLS process.

Small enough for CI: two sites, a few slides each, 64 px tiles at 1 µm/px, a tiny UNet, two optimiser
steps per round, two rounds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from federation.strategies import LocalUpdateDP
from pipeline.config import ExperimentConfig, load_config
from pipeline.tiles import tile_sites
from wsi.manifest import subset_manifest

pytestmark = pytest.mark.realdata

SITES = {"monuseg_kidney_bladder": "monuseg_kidney_bladder.csv", "gbm40_emory": "gbm40.csv"}


def _config(tmp: Path, data_root: Path, repo_root: Path, run: str, **federation: Any) -> Path:
    sites = []
    for name, manifest in SITES.items():
        m = subset_manifest(repo_root / "data_manifests" / manifest, tmp / manifest, {"train": 3, "val": 1})
        sites.append({"name": name, "manifest": str(m)})
    fed = {
        "strategy": "fedprox",
        "proximal_mu": 0.01,
        "rounds": 2,
        "min_sites": 2,
        "port": 0,
        "round_deadline_s": 600,
        "parallel_sites": 2,
        "upload_retries": 0,
        "update_dp": {"mode": "local", "clip_norm": 5.0, "noise_multiplier": 0.05, "delta": 1e-5},
    }
    fed.update(federation)
    data = {
        "name": "fed-realdata",
        "run_dir": str(tmp / run),
        "data_root": str(data_root),
        "sites": sites,
        "tiling": {"target_mpp": 1.0, "tile_size": 64, "min_tissue_fraction": 0.0},
        "model": {"name": "unet", "channels": [8, 16], "strides": [2], "num_res_units": 0, "groups": 4},
        "train": {
            "batch_size": 4,
            "physical_batch_size": 4,
            "max_steps": 2,
            "threads": 1,
            "privacy": {
                "enabled": True,
                "target_epsilon": None,
                "noise_multiplier": 1.0,
                "budget_epsilon": "unlimited",
                "max_grad_norm": 1.0,
            },
        },
        "federation": fed,
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, data_root: Path, repo_root: Path) -> tuple[Path, Path]:
    """Tile both sites once into a template run directory."""
    tmp = tmp_path_factory.mktemp("fedreal")
    cfg = load_config(_config(tmp, data_root, repo_root, "template"))
    tile_sites(cfg, data_root, "test")
    return tmp, cfg.run_dir


def _fresh_run(
    stores: tuple[Path, Path], data_root: Path, repo_root: Path, run: str, **fed: Any
) -> ExperimentConfig:
    tmp, template = stores
    cfg = load_config(_config(tmp, data_root, repo_root, run, **fed))
    for s in cfg.sites:
        shutil.copytree(template / "sites" / s.name / "store.zarr", cfg.store_path(s.name))
    return cfg


@pytest.mark.parametrize("workers", ["warm", "cold"])
def test_two_round_simulated_federation_over_real_sites(
    stores: tuple[Path, Path], data_root: Path, repo_root: Path, workers: str
) -> None:
    """Warm per-site workers and a fresh process per job give the same outputs: every update accepted,
    done.json, the ledgers, the privacy statement."""
    from fedcore.summary import read_summary
    from fedpath.simulate import run_simulation
    from pipeline.checkpoint import load_model, read_model_file

    cfg = _fresh_run(stores, data_root, repo_root, f"sim_{workers}", simulate_workers=workers)
    summary = run_simulation(cfg)
    assert summary["rounds"] == 2
    assert summary["site_jobs"] == {"workers": workers, "fallbacks": []}
    assert all(set(j["exit_codes"].values()) == {0} for j in summary["jobs"])
    assert summary == read_summary(cfg.run_dir)["federation"]
    for r in ("0", "1"):
        assert sorted(summary["sites_per_round"][r]) == sorted(SITES)
    server = cfg.run_dir / "server"
    g0, _ = read_model_file(server / "global" / "round_0.safetensors")
    net, meta = load_model(server / "global" / "round_2.safetensors")
    assert meta.round == 2 and meta.source == "global"
    g2 = net.state_dict()
    assert any(not torch.equal(g0[k], g2[k]) for k in g0)  # the sites' training moved the model
    for site in SITES:
        for r in (0, 1):
            done = json.loads((cfg.site_dir(site) / "rounds" / str(r) / "done.json").read_text())
            assert done["outcome"] == "uploaded" and done["ack"]["round"] == r
            stored = server / "updates" / str(r) / f"{site}.safetensors"
            assert (
                stored.read_bytes()
                == (cfg.site_dir(site) / "rounds" / str(r) / "update.safetensors").read_bytes()
            )
        # update-level DP: two releases, each recorded once, ε from the Gaussian-mechanism accountant
        ledger = json.loads((cfg.site_dir(site) / "update_privacy.json").read_text())
        dp = LocalUpdateDP.__new__(LocalUpdateDP)
        dp.noise_multiplier, dp.delta = 0.05, 1e-5
        assert [e["round"] for e in ledger["entries"]] == [0, 1]
        assert ledger["epsilon"] == pytest.approx(LocalUpdateDP.epsilon(dp, 2))
        assert summary["epsilon_update_level"][site] == {"epsilon": ledger["epsilon"], "delta": 1e-5, "unit": "site"}
        # sample-level ledger: one entry per round's job, each spending its steps once
        sample_ledger = json.loads((cfg.site_dir(site) / "privacy.json").read_text())
        assert [(e["job"], e["steps"], e["complete"]) for e in sample_ledger["entries"]] == [
            ("round-0", 2, True),
            ("round-1", 2, True),
        ]
        log0 = (cfg.site_dir(site) / "rounds" / "0" / "job.log").read_text()
        assert f"site {site}: round 0: uploaded" in log0 and "per tile" in log0  # the CLI's own output
        assert f"site {site}: round 0 update accepted" in log0  # and the job's log lines
        sample = summary["epsilon_sample_level"][site]
        assert sample["epsilon"] > 0 and sample["unit"] == "tile" and 0 < sample["delta"] < 1
        # the run's privacy statement composes both, each with δ and unit, noise from the CSPRNG
        st = json.loads((cfg.run_dir / "privacy_statement.json").read_text())["sites"][site]
        assert [m["level"] for m in st["mechanisms"]] == ["sample", "update"]
        assert all("os.urandom" in m["noise_source"] for m in st["mechanisms"])
        tile = st["against_aggregator"]["tile"]
        assert tile["epsilon"] == pytest.approx(sample["epsilon"] + ledger["epsilon"])
        assert tile["delta"] == pytest.approx(sample["delta"] + 1e-5) and "per tile" in tile["text"]
        assert st["against_aggregator"]["site"]["epsilon"] == pytest.approx(ledger["epsilon"])
    audit = [json.loads(x) for x in (server / "audit.jsonl").read_text().splitlines()]
    assert sum(1 for e in audit if e["outcome"] == "accepted") == 4


@pytest.mark.slow  # two more trainings and an aggregator start: ~25 s idle, over a minute on a busy machine
def test_site_job_rerun_never_trains_twice_nor_double_submits(
    stores: tuple[Path, Path], data_root: Path, repo_root: Path
) -> None:
    """Re-running a finished job does nothing; a job killed after training re-sends, never retrains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from federation.client import run_site_round
    from federation.provision import run_provision
    from fedpath.simulate import AggregatorProcess, freeze_config

    cfg = _fresh_run(stores, data_root, repo_root, "rerun", rounds=1)
    run_provision(cfg)
    frozen = freeze_config(cfg, cfg.run_dir / "frozen.yaml")
    agg = AggregatorProcess(cfg, frozen, cfg.run_dir / "server.log")
    url = agg.start()
    assert agg.proc is not None
    site_a, site_b = list(SITES)
    live = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"server_url": url})})
    try:
        first = run_site_round(live, site_a)
        assert first["outcome"] == "uploaded" and first["trained"]
        train_json = cfg.site_dir(site_a) / "rounds" / "0" / "train.json"
        stamp = train_json.stat().st_mtime_ns
        again = run_site_round(live, site_a)
        assert again["outcome"] == "already_submitted"
        assert train_json.stat().st_mtime_ns == stamp  # not trained a second time

        # site b's job: freeze the aggregator once b has downloaded the model, so the upload cannot
        # happen; SIGKILL the job as soon as its update is saved (trained, never acknowledged)
        audit = cfg.run_dir / "server" / "audit.jsonl"
        job_dir = cfg.site_dir(site_b) / "rounds" / "0"
        cmd = [
            sys.executable,
            "-m",
            "fedpath.cli",
            "site-round",
            "--config",
            str(frozen),
            "--site",
            site_b,
            "--set",
            f"federation.server_url={url}",
        ]
        job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 900  # training on a loaded 2-core machine can take minutes
        while not any(
            json.loads(x).get("action") == "model" and json.loads(x).get("site") == site_b
            for x in audit.read_text().splitlines()
        ):
            assert job.poll() is None and time.monotonic() < end, "site b job ended before downloading"
            time.sleep(0.05)
        os.kill(agg.proc.pid, signal.SIGSTOP)
        try:
            while not (job_dir / "update.safetensors").exists():
                assert job.poll() is None and time.monotonic() < end, "site b job ended before saving"
                time.sleep(0.05)
            time.sleep(0.5)
            job.kill()
            job.wait()
        finally:
            os.kill(agg.proc.pid, signal.SIGCONT)
        saved = (job_dir / "update.safetensors").read_bytes()
        assert not (job_dir / "done.json").exists()
        resumed = run_site_round(live, site_b)
        assert resumed["outcome"] == "uploaded" and resumed["trained"] is False  # re-sent, not retrained
        server_copy = cfg.run_dir / "server" / "updates" / "0" / f"{site_b}.safetensors"
        assert server_copy.read_bytes() == saved
        ledger = json.loads((cfg.site_dir(site_b) / "update_privacy.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [0]  # the update-level ε was spent once

        end = time.monotonic() + 60
        while json.loads((cfg.run_dir / "server" / "state.json").read_text())["phase"] != "finished":
            assert time.monotonic() < end
            time.sleep(0.1)
        assert run_site_round(live, site_a)["outcome"] == "finished"
    finally:
        agg.stop()


def test_warm_worker_rerun_and_death_mid_job(stores: tuple[Path, Path], data_root: Path, repo_root: Path) -> None:
    """In a warm worker, a re-run of a finished job neither trains nor spends again; a one-line refusal
    exits 2 as the process would; a worker SIGKILLed mid-job is replaced and the job re-run as a fresh
    process, which finishes the round without spending ε twice."""
    import os
    import signal
    import threading
    import time

    from federation.provision import run_provision
    from fedpath.simulate import AggregatorProcess, WarmWorkers, freeze_config, run_site_jobs

    cfg = _fresh_run(stores, data_root, repo_root, "warm", rounds=1, parallel_sites=1)
    run_provision(cfg)
    frozen = freeze_config(cfg, cfg.run_dir / "frozen.yaml")
    agg = AggregatorProcess(cfg, frozen, cfg.run_dir / "server.log")
    url = agg.start()
    assert agg.proc is not None
    site_a, site_b = list(SITES)
    workers = WarmWorkers([site_a, site_b])
    try:
        pid_a = workers.workers[site_a].proc.pid
        assert run_site_jobs(cfg, frozen, url, 0, [site_a], workers) == {site_a: 0}
        job_a = cfg.site_dir(site_a) / "rounds" / "0"
        done = json.loads((job_a / "done.json").read_text())
        assert done["outcome"] == "uploaded" and done["trained"] is True
        stamp = (job_a / "train.json").stat().st_mtime_ns
        ledger_a = (cfg.site_dir(site_a) / "privacy.json").read_text()
        # the same job again, in the same (warm) process: already submitted, nothing trained or spent
        assert run_site_jobs(cfg, frozen, url, 0, [site_a], workers) == {site_a: 0}
        assert workers.workers[site_a].proc.pid == pid_a
        assert (job_a / "train.json").stat().st_mtime_ns == stamp
        assert (cfg.site_dir(site_a) / "privacy.json").read_text() == ledger_a
        assert "round 0: already_submitted" in (job_a / "job.log").read_text()
        # bad input: the CLI's one-line error and exit 2, from the warm worker as from a process
        bad = cfg.model_copy(update={"sites": [*cfg.sites, cfg.sites[0].model_copy(update={"name": "nosuchsite"})]})
        assert run_site_jobs(bad, frozen, url, 0, ["nosuchsite"], workers) == {"nosuchsite": 2}
        assert "error:" in (bad.site_dir("nosuchsite") / "rounds" / "0" / "job.log").read_text()

        # site b: freeze the aggregator once b's job has downloaded the model, SIGKILL b's worker mid-job
        audit = cfg.run_dir / "server" / "audit.jsonl"
        out: dict[str, Any] = {}
        fallbacks: list[dict[str, Any]] = []
        th = threading.Thread(
            target=lambda: out.update(run_site_jobs(cfg, frozen, url, 0, [site_b], workers, fallbacks))
        )
        th.start()
        pid_b = workers.workers[site_b].proc.pid
        end = time.monotonic() + 600
        while not any(
            json.loads(x).get("action") == "model" and json.loads(x).get("site") == site_b
            for x in audit.read_text().splitlines()
        ):
            assert th.is_alive() and time.monotonic() < end, "site b's job ended before downloading"
            time.sleep(0.02)
        os.kill(agg.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.3)
            os.kill(pid_b, signal.SIGKILL)
            time.sleep(0.3)
        finally:
            os.kill(agg.proc.pid, signal.SIGCONT)
        th.join(600)
        assert not th.is_alive()
        assert out == {site_b: 0}
        assert fallbacks == [{"site": site_b, "round": 0, "worker_exit": -signal.SIGKILL}]
        job_b = cfg.site_dir(site_b) / "rounds" / "0"
        assert json.loads((job_b / "done.json").read_text())["outcome"] == "uploaded"
        assert "warm worker died" in (job_b / "job.log").read_text()
        entries = json.loads((cfg.site_dir(site_b) / "privacy.json").read_text())["entries"]
        assert [(e["job"], e["steps"]) for e in entries] == [("round-0", 2)]  # spent once
        updates = json.loads((cfg.site_dir(site_b) / "update_privacy.json").read_text())["entries"]
        assert [e["round"] for e in updates] == [0]
        server_copy = cfg.run_dir / "server" / "updates" / "0" / f"{site_b}.safetensors"
        assert server_copy.read_bytes() == (job_b / "update.safetensors").read_bytes()
        # the next job of site b gets a fresh warm worker
        assert workers.get(site_b).proc.pid != pid_b
        end = time.monotonic() + 60
        while json.loads((cfg.run_dir / "server" / "state.json").read_text())["phase"] != "finished":
            assert time.monotonic() < end
            time.sleep(0.1)
    finally:
        workers.close()
        agg.stop()


def test_health_poll_reconnects_when_the_server_drops_its_kept_alive_connection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The simulation polls /v1/health over one kept-alive connection while a round closes; a server busy
    closing it (e.g. distilling) may drop that connection. The poll reconnects instead of ending the run."""
    import http.server
    import json as _json
    import socket
    import threading

    from fedpath.simulate import AggregatorProcess

    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            served.append(self.path)
            if len(served) == 2:  # the second poll: the connection dies without an answer
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            body = _json.dumps({"phase": "open", "round": len(served)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        agg = AggregatorProcess(ExperimentConfig.model_validate({"run_dir": str(tmp_path)}), tmp_path / "c.yaml", tmp_path / "l")
        agg.url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert agg.health()["round"] == 1
        assert agg.health()["round"] == 3  # the dropped poll was retried on a fresh connection
        assert served == ["/v1/health"] * 3
        with pytest.raises(httpx.TransportError):  # without retries the drop is an error, as before
            agg.url = "http://127.0.0.1:9"  # nothing listens there
            agg.health(retries=0)
    finally:
        srv.shutdown()
        agg.stop()

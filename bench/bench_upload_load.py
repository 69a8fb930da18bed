"""Benchmark: sustained upload load on the hardened aggregator, 20 sites, the default model size.

Each site is a thread with its own long-lived httpx client (TLS, loopback). For ``--rounds`` rounds,
every site uploads its update as soon as the round opens; the round closes when all have reported and
the next one opens. Measured in one run:

* ``uploads_per_s``: all uploads divided by the wall time from the first upload to the last round's
  published model (aggregation and publishing between rounds included: this is the sustained rate);
* ``p99_ms``: the 99th percentile of one upload's latency (request sent to acknowledgement);
* the aggregator's peak RSS (psutil, sampled every 10 ms).

The peer, measured in the same run: writing the same bytes as plain files, one after another, with
the durability the aggregator gives (write, fsync, rename, fsync the directory). Printed as ratios:
aggregator uploads/s over peer writes/s, aggregator p99 over peer p99, and the aggregator's RSS growth
over one round's bytes (what holding a round's updates in memory would cost). One upload's p99 is also
compared with writing a whole round's files one after another: the 20 uploads of a round arrive at
once, so the last is stored no sooner than that.

Usage: ``python bench/bench_upload_load.py [--sites 20] [--rounds 5] [--smoke] [--out PATH]``; JSON to
``bench/out/upload_load.json``. ``--smoke``: 3 sites, 2 rounds, a tiny UNet: checks that the bench works
(CI runs it; no timing means anything there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_federation import SMOKE_MODEL, RssSampler  # noqa: E402
from federation.provision import run_provision  # noqa: E402
from federation.server import server_paths  # noqa: E402
from federation.wire import encode_state, fsync_dir, update_metadata  # noqa: E402
from fedpath.simulate import AggregatorProcess  # noqa: E402
from pipeline.checkpoint import read_model_file  # noqa: E402
from pipeline.config import ModelConfig, load_config  # noqa: E402


def _bodies(global_state: dict[str, Any], sites: list[str], rounds: int) -> dict[tuple[str, int], bytes]:
    import torch

    out = {}
    for r in range(rounds):
        for i, s in enumerate(sites):
            g = torch.Generator().manual_seed(1000 * r + i)
            delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in global_state.items()}
            meta = update_metadata(site=s, round=r, n_tiles=10 + i, epsilon=None, update_id=f"b{r}-{i}")
            out[(s, r)] = encode_state(delta, meta)
    return out


def run_load(work: Path, n_sites: int, rounds: int, model: dict[str, Any] | None = None) -> dict[str, Any]:
    sites = [f"s{i:02d}" for i in range(n_sites)]
    cfg_data = {
        "name": "loadbench",
        "run_dir": str(work / "run"),
        "sites": [{"name": s, "manifest": "unused.csv"} for s in sites],
        "model": model or ModelConfig().model_dump(mode="json"),  # the default model
        "federation": {"rounds": rounds, "min_sites": n_sites, "port": 0},  # default limits
    }
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data))
    cfg = load_config(cfg_path)
    prov = run_provision(cfg)
    agg = AggregatorProcess(cfg, cfg_path, work / "server.log")
    url = agg.start()
    paths = server_paths(cfg)
    try:
        g0, _ = read_model_file(paths.global_model(0))
        bodies = _bodies(g0, sites, rounds)
        ctx = ssl.create_default_context(cafile=str(prov.ca_cert))
        clients = {
            s: httpx.Client(
                base_url=url,
                verify=ctx,
                timeout=300,
                headers={
                    "Authorization": f"Bearer {prov.site_token(s).read_text().strip()}",
                    "X-Fedpath-Site": s,
                },
            )
            for s in sites
        }
        for c in clients.values():  # TLS handshakes before the clock starts, as long-lived clients would
            c.get("/v1/health").raise_for_status()
        assert agg.proc is not None
        sampler = RssSampler(agg.proc.pid)
        sampler.start()
        opened = [threading.Event() for _ in range(rounds + 1)]
        opened[0].set()
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def site_job(s: str) -> None:
            for r in range(rounds):
                opened[r].wait()
                t = time.perf_counter()
                resp = clients[s].post("/v1/update", content=bodies[(s, r)])
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    if resp.status_code != 200:
                        errors.append(f"{s} r{r}: {resp.status_code} {resp.text[:200]}")

        threads = [threading.Thread(target=site_job, args=(s,)) for s in sites]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        r_seen = 0
        while r_seen < rounds:
            st = json.loads(paths.state.read_text())
            while r_seen < st["round"] and paths.global_model(r_seen + 1).is_file():
                r_seen += 1
                opened[r_seen].set()
            if errors:
                raise RuntimeError(f"uploads refused: {errors[:3]}")
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        for t in threads:
            t.join()
        peak = sampler.stop()
        for c in clients.values():
            c.close()
        size = len(next(iter(bodies.values())))
        lat = np.array(latencies)
        return {
            "sites": n_sites,
            "rounds": rounds,
            "params": sum(v.numel() for v in g0.values()),
            "update_bytes": size,
            "uploads": len(latencies),
            "wall_s": wall,
            "uploads_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "rss_baseline_mb": sampler.baseline / 2**20,
            "rss_peak_mb": peak / 2**20,
            "bodies": list(bodies.values()),
        }
    finally:
        agg.stop()


def file_peer(work: Path, bodies: list[bytes]) -> dict[str, float]:
    """The same bytes written as files with the aggregator's durability: write, fsync, rename, fsync dir."""
    out = work / "peer"
    out.mkdir()
    lat = []
    t0 = time.perf_counter()
    for i, b in enumerate(bodies):
        t = time.perf_counter()
        tmp, final = out / f".incoming-{i}", out / f"u{i}.safetensors"
        with open(tmp, "wb") as f:
            f.write(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(out)
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {
        "writes_per_s": len(bodies) / wall,
        "mean_ms": wall / len(bodies) * 1e3,
        "p99_ms": float(np.percentile(np.array(lat), 99) * 1e3),
        "p50_ms": float(np.percentile(np.array(lat), 50) * 1e3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--smoke", action="store_true", help="3 sites, 2 rounds, a tiny UNet: checks the bench works, no timing meaning"
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "out" / "upload_load.json", help="JSON report"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.sites, args.rounds = 3, 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="loadbench-") as tmp:
        work = Path(tmp)
        res = run_load(work, args.sites, args.rounds, SMOKE_MODEL if args.smoke else None)
        bodies = res.pop("bodies")
        peer = file_peer(work, bodies)
    rss_growth = res["rss_peak_mb"] - res["rss_baseline_mb"]
    round_mb = args.sites * res["update_bytes"] / 2**20
    ratios = {
        "uploads_per_s_vs_file_writes": res["uploads_per_s"] / peer["writes_per_s"],
        "p99_vs_file_write_p99": res["p99_ms"] / peer["p99_ms"],
        # a round's uploads arrive together: the last cannot be stored before a whole round written in turn
        "p99_vs_round_written_in_turn": res["p99_ms"] / (args.sites * peer["mean_ms"]),
        "rss_growth_vs_round_bytes": rss_growth / round_mb,
    }
    print(f"fedpath upload load benchmark: {platform.node()}, {psutil.cpu_count()} cores, TLS loopback")
    print(
        f"{'smoke model' if args.smoke else 'default model'}: {res['params'] / 1e6:.2f} M parameters, "
        f"{res['update_bytes'] / 2**20:.2f} MiB per update; "
        f"{args.sites} sites x {args.rounds} rounds = {res['uploads']} uploads in {res['wall_s']:.2f} s"
    )
    print(
        f"aggregator: {res['uploads_per_s']:.1f} uploads/s sustained, p50 {res['p50_ms']:.1f} ms, "
        f"p99 {res['p99_ms']:.1f} ms, RSS {res['rss_baseline_mb']:.0f} -> {res['rss_peak_mb']:.0f} MiB"
    )
    print(
        f"plain file write (write+fsync+rename+fsync dir): {peer['writes_per_s']:.1f} writes/s, "
        f"p50 {peer['p50_ms']:.1f} ms, p99 {peer['p99_ms']:.1f} ms"
    )
    print(
        f"ratios: uploads/s {ratios['uploads_per_s_vs_file_writes']:.2f}x file writes/s; "
        f"p99 {ratios['p99_vs_file_write_p99']:.1f}x file-write p99, "
        f"{ratios['p99_vs_round_written_in_turn']:.2f}x one round ({args.sites} files) written in turn; "
        f"RSS growth {ratios['rss_growth_vs_round_bytes']:.2f}x one round's bytes ({round_mb:.0f} MiB)"
    )
    report = {"aggregator": res, "peer": peer, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

"""Benchmark: N sites upload an 8M-parameter update at once to one aggregator (loopback, TLS).

Measured in one run:

* ``agg_s``: wall time from the first upload starting until the aggregator has published the next
  global model (``server/global/round_1.safetensors`` and state.json at round 1), for 20 sites;
* the floor: writing the same N update files to disk in one process and averaging them with numpy
  (``floor_s``, with fsync as the aggregator does before acknowledging; ``floor_nosync_s`` without);
* the ratio ``agg_s / floor_s`` (issue 19's target: <= 1.3 at 100 sites) and the aggregator's peak RSS
  (psutil, sampled every 10 ms) for 5 and for 20 sites: the aggregate is streamed, so it must not grow
  with the number of sites;
* ``close s``: the server's own time to publish once the round closes (``aggregate_s``). Updates are
  folded into a running sum as they arrive (``Strategy.on_update``), so the close only divides, applies
  and writes one model, whatever the number of sites.

Sites are threads with their own httpx client in this process (their bodies are serialised before the
clock starts). Usage: ``python bench/bench_federation.py [--sites 5 20] [--repeats 1] [--smoke] [--out PATH]``.
JSON goes to ``bench/out/federation.json``. ``--smoke``: 2 and 3 sites with a tiny UNet, checks that the
bench works (CI runs it; no timing means anything there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
from safetensors.numpy import load_file as np_load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from federation.provision import run_provision  # noqa: E402
from federation.server import server_paths  # noqa: E402
from federation.wire import encode_state, update_metadata  # noqa: E402
from fedpath.simulate import AggregatorProcess  # noqa: E402
from pipeline.checkpoint import read_model_file  # noqa: E402
from pipeline.config import load_config  # noqa: E402

MODEL = {"name": "unet", "channels": [36, 72, 144, 288, 576], "strides": [2, 2, 2, 2], "num_res_units": 2}
SMOKE_MODEL = {"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


class RssSampler(threading.Thread):
    """Samples a process's resident set size until stopped; keeps the peak."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.baseline = self.proc.memory_info().rss
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def _bodies(global_state: dict[str, Any], n_sites: int) -> list[bytes]:
    import torch

    out = []
    for i in range(n_sites):
        g = torch.Generator().manual_seed(i)
        delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in global_state.items()}
        meta = update_metadata(site=f"s{i:02d}", round=0, n_tiles=10 + i, epsilon=None, update_id=f"bench{i}")
        out.append(encode_state(delta, meta))
    return out


def run_aggregator(
    work: Path,
    n_sites: int,
    bodies: list[bytes] | None = None,
    model: dict[str, Any] | None = None,
    tls: bool = True,
) -> dict[str, Any]:
    """One round with ``n_sites`` concurrent uploads; returns timings and the aggregator's memory.
    ``tls=False``: plain HTTP on loopback (what a deployment behind a TLS-terminating proxy runs)."""
    sites = [f"s{i:02d}" for i in range(n_sites)]
    cfg_data = {
        "name": f"bench{n_sites}",
        "run_dir": str(work / "run"),
        "sites": [{"name": s, "manifest": "unused.csv"} for s in sites],
        "model": model or MODEL,
        "federation": {
            "rounds": 1, "min_sites": n_sites, "port": 0, "tls": tls, "max_body_mb": 256, "max_concurrent_uploads": max(32, n_sites)
        },
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
        n_params = sum(v.numel() for v in g0.values())
        bodies = bodies[:n_sites] if bodies is not None else _bodies(g0, n_sites)
        ctx = ssl.create_default_context(cafile=str(prov.ca_cert))
        clients = [
            httpx.Client(
                base_url=url,
                verify=ctx,
                timeout=300,
                headers={
                    "Authorization": f"Bearer {prov.site_token(s).read_text().strip()}",
                    "X-Fedpath-Site": s,
                },
            )
            for s in sites
        ]
        for c in clients:  # TLS handshakes before the clock starts, as long-lived site clients would
            c.get("/v1/health").raise_for_status()
        assert agg.proc is not None
        sampler = RssSampler(agg.proc.pid)
        sampler.start()
        barrier = threading.Barrier(n_sites + 1)
        errors: list[str] = []

        def upload(i: int) -> None:
            barrier.wait()
            r = clients[i].post("/v1/update", content=bodies[i])
            if r.status_code != 200:
                errors.append(f"{sites[i]}: {r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(n_sites)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        t_uploaded = time.perf_counter() - t0
        while True:
            st = json.loads(paths.state.read_text())
            if st["round"] >= 1 and paths.global_model(1).is_file():
                break
            if errors:
                raise RuntimeError(f"uploads refused: {errors[:3]}")
            time.sleep(0.002)
        agg_s = time.perf_counter() - t0
        peak = sampler.stop()
        for c in clients:
            c.close()
        audit = [json.loads(x) for x in paths.audit.read_text().splitlines()]
        ups = [e for e in audit if e.get("outcome") == "accepted"]
        return {
            "server_receive_s_max": max(e["receive_s"] for e in ups),
            "server_commit_s_mean": sum(e["commit_s"] for e in ups) / len(ups),
            "sites": n_sites,
            "params": n_params,
            "update_mb": len(bodies[0]) / 2**20,
            "agg_s": agg_s,
            "uploads_done_s": t_uploaded,
            "aggregate_s": st["history"][0].get("aggregate_s"),
            "rss_baseline_mb": sampler.baseline / 2**20,
            "rss_peak_mb": peak / 2**20,
            "bodies": bodies,
        }
    finally:
        agg.stop()


def floor(work: Path, bodies: list[bytes], fsync: bool) -> float:
    """Write the same update files in one process, then average them with numpy (n_tiles weights)."""
    out = work / f"floor_{int(fsync)}"
    out.mkdir()
    t0 = time.perf_counter()
    paths = []
    for i, b in enumerate(bodies):
        p = out / f"s{i:02d}.safetensors"
        with open(p, "wb") as f:
            f.write(b)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        paths.append(p)
    weights = np.array([10 + i for i in range(len(bodies))], dtype=np.float64)
    weights /= weights.sum()
    acc: dict[str, np.ndarray] = {}
    for w, p in zip(weights, paths, strict=True):
        for k, v in np_load_file(str(p)).items():
            if k in acc:
                acc[k] += np.float32(w) * v
            else:
                acc[k] = np.float32(w) * v
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out)
    return elapsed


def per_update_costs(body: bytes, work: Path, names: list[str], reps: int = 5) -> dict[str, float]:
    """Milliseconds per update of each step the aggregator takes beyond the floor's write and read (best of
    ``reps``, one thread): the profile behind the ratio. The floor writes, fsyncs and averages; the
    aggregator also receives (TLS, HTTP), hashes (sha256, for idempotent retries and the audit trail),
    validates (finite, norm) and folds the update into the running sum."""
    import hashlib

    import torch
    from safetensors import safe_open

    from federation.wire import check_finite_and_norm

    p = work / "one.safetensors"
    out: dict[str, float] = {}

    def best(fn: Any) -> float:
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        return 1e3 * min(t)

    def write(sync: bool) -> None:
        with open(p, "wb") as f:
            f.write(body)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    out["sha256_ms"] = best(lambda: hashlib.sha256(body).digest())
    out["write_ms"] = best(lambda: write(False))
    out["write_fsync_ms"] = best(lambda: write(True))
    out["validate_ms"] = best(lambda: check_finite_and_norm(p, names))
    with safe_open(str(p), framework="pt") as f:
        acc = {k: torch.zeros_like(f.get_tensor(k), dtype=torch.float32) for k in names}

    def fold() -> None:
        with safe_open(str(p), framework="pt") as f:
            for k in names:
                acc[k].add_(f.get_tensor(k).to(torch.float32), alpha=0.5)

    out["fold_ms"] = best(fold)
    p.unlink()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--smoke", action="store_true", help="2 and 3 sites, a tiny UNet: checks the bench works, no timing meaning"
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "out" / "federation.json", help="JSON report"
    )
    ap.add_argument(
        "--plain", action="store_true", help="also run each size without TLS (the TLS share of the ratio)"
    )
    args = ap.parse_args(argv)
    model = SMOKE_MODEL if args.smoke else MODEL
    if args.smoke:
        args.sites, args.repeats = [2, 3], 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: list[dict[str, Any]] = []
    bodies: list[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="fedbench-") as tmp:
        for n in sorted(args.sites):
            for rep in range(args.repeats):
                work = Path(tmp) / f"n{n}_{rep}"
                work.mkdir()
                res = run_aggregator(work, n, bodies if bodies is not None and len(bodies) >= n else None, model)
                bodies = res.pop("bodies")
                res["floor_s"] = floor(work, bodies[:n], fsync=True)
                res["floor_nosync_s"] = floor(work, bodies[:n], fsync=False)
                res["ratio"] = res["agg_s"] / res["floor_s"]
                res["ratio_vs_nosync"] = res["agg_s"] / res["floor_nosync_s"]
                if args.plain:
                    (work / "plain").mkdir()
                    plain = run_aggregator(work / "plain", n, bodies, model, tls=False)
                    plain.pop("bodies")
                    res["agg_plain_s"] = plain["agg_s"]
                    res["ratio_plain"] = plain["agg_s"] / res["floor_s"]
                results.append(res)
                shutil.rmtree(work / "run", ignore_errors=True)
        assert bodies is not None
        from safetensors import safe_open

        (Path(tmp) / "probe.safetensors").write_bytes(bodies[0])
        with safe_open(str(Path(tmp) / "probe.safetensors"), framework="pt") as f:
            names = list(f.keys())
        costs = per_update_costs(bodies[0], Path(tmp), names)
    print(f"fedpath federation benchmark: {platform.node()}, {psutil.cpu_count()} cores, TLS loopback")
    print(
        f"model: UNet {model['channels']}, {results[0]['params'] / 1e6:.2f} M parameters, "
        f"{results[0]['update_mb']:.1f} MiB per update"
    )
    hdr = f"{'sites':>5} {'publish s':>10} {'floor s':>8} {'ratio':>6} {'floor(no fsync) s':>18} {'ratio':>6} {'RSS base MiB':>13} {'RSS peak MiB':>13} {'close s':>8}"
    print(hdr)
    for r in results:
        print(
            f"{r['sites']:>5} {r['agg_s']:>10.2f} {r['floor_s']:>8.2f} {r['ratio']:>6.2f} "
            f"{r['floor_nosync_s']:>18.2f} {r['ratio_vs_nosync']:>6.2f} {r['rss_baseline_mb']:>13.0f} {r['rss_peak_mb']:>13.0f}"
            f" {r['aggregate_s'] or float('nan'):>8.3f}"
        )
    by_n = {r["sites"]: r for r in results}
    if len(by_n) >= 2:
        lo, hi = min(by_n), max(by_n)
        growth = by_n[hi]["rss_peak_mb"] - by_n[lo]["rss_peak_mb"]
        per_update = by_n[hi]["update_mb"]
        print(
            f"peak RSS {lo} -> {hi} sites: {growth:+.0f} MiB "
            f"(holding the extra {hi - lo} updates would need {(hi - lo) * per_update:.0f} MiB)"
        )
    if any("agg_plain_s" in r for r in results):
        for r in results:
            print(
                f"{r['sites']:>5} sites without TLS: publish {r['agg_plain_s']:.2f} s, "
                f"ratio to the floor {r['ratio_plain']:.2f} (with TLS {r['ratio']:.2f})"
            )
    n_max = max(r["sites"] for r in results)
    extra_ms = costs["sha256_ms"] + costs["validate_ms"] + costs["fold_ms"]
    print(
        "per update, one thread (ms): "
        + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in costs.items())
        + f"; beyond the floor's write+fsync+read: sha256 + validate + fold = {extra_ms:.1f} ms "
        f"= {extra_ms * n_max / 1e3:.2f} s of CPU at {n_max} sites"
    )
    report = {"model": model, "results": results, "per_update_ms": costs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

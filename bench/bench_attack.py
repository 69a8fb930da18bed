"""Benchmark of the gradient-inversion attacks on real MoNuSeg tiles and the configured network.

Prints, at the attack tile size on the machine's cores (2 in CI):
* seconds per reconstruction of each attack (Inverting Gradients, DLG, multi-step), and the per-iteration
  cost against the floor measured in the same run: one plain forward+backward of the victim (the cheapest
  thing an iteration could cost; gradient matching needs a double backward on top);
* mean SSIM of Inverting Gradients undefended and under DP-SGD at each ε (σ from Opacus for the
  default federation's accounting), next to the prior baseline (the dataset-mean image).

Writes bench/out/bench_attack.json (``--out``) and bench/out/bench_attack_grid.png next to it (true tiles,
the prior, the reconstructions per ε). ``--smoke``: 6 MoNuSeg images, one target, a few iterations of each
attack, ε in {none, 8}: checks that the bench works (CI runs it; no timing or SSIM means anything there).
Usage: python bench/bench_attack.py [--targets 4 --iterations 600 --threads 2] [--smoke] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from federation.attack.common import DPSGD, observed_gradient, segmentation_loss  # noqa: E402
from federation.attack.dlg import DLGSettings, dlg_attack  # noqa: E402
from federation.attack.inverting import InversionSettings, invert_gradients  # noqa: E402
from federation.attack.metrics import ssim  # noqa: E402
from federation.attack.multistep import LocalTraining, invert_update, local_update  # noqa: E402
from federation.attack.sweep import DPParams, _grid_png, pick_targets, target_model  # noqa: E402
from federation.attack.tiles import load_monuseg_tiles  # noqa: E402
from pipeline.config import ExperimentConfig  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--data-root", type=Path, default=Path(os.environ.get("FEDPATH_DATA_ROOT", "../shared/data"))
    )
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--restarts", type=int, default=None)
    ap.add_argument("--epsilons", default="none,32,8,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--smoke", action="store_true",
        help="6 images, 1 target, a few iterations, eps none and 8: checks the bench works, no meaning",
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "out" / "bench_attack.json",
        help="JSON report; the PNG grid goes next to it (<stem>_grid.png)",
    )
    args = ap.parse_args(argv)
    cfg = ExperimentConfig()
    a = cfg.attack
    # the smoke run: enough tiles for a sampling rate below 1 (train.batch_size 16), every phase tiny
    max_images, floor_reps, dlg_iters, local_steps = None, 20, a.dlg_iterations, a.local_steps
    if args.smoke:
        args.targets, args.iterations, args.restarts, args.epsilons, args.threads = 1, 4, 1, "none,8", 1
        max_images, floor_reps, dlg_iters, local_steps = 6, 2, 2, 2
    torch.set_num_threads(args.threads)

    iters = args.iterations or a.iterations
    restarts = args.restarts or a.restarts
    pool = load_monuseg_tiles(
        args.data_root, a.tile_size, cfg.tiling.target_mpp, per_image=4, max_images=max_images, seed=a.seed
    )
    prior = pool.images.mean(0)
    tgt = pick_targets(pool, args.targets, a.seed)
    model, source = target_model(cfg)
    loss_fn = segmentation_loss(a.loss)
    settings = InversionSettings.from_config(a, iterations=iters, restarts=restarts)

    # the floor: one plain forward + backward of the victim at this tile size
    x0, m0 = pool.images[tgt[:1]], pool.masks[tgt[:1]]
    for _ in range(3):
        observed_gradient(model, x0, m0, loss_fn)
    t = time.perf_counter()
    reps = floor_reps
    for _ in range(reps):
        observed_gradient(model, x0, m0, loss_fn)
    floor = (time.perf_counter() - t) / reps

    # accounting as the default federation would: q = batch / pool tiles, planned steps, delta 1/(10 N)
    n = len(pool)
    q = cfg.train.batch_size / n
    dpp = DPParams(
        q,
        int(np.ceil(cfg.train.epochs / q)) * cfg.federation.rounds,
        1 / (10 * n),
        1.0,
        cfg.train.privacy.accountant,
        "bench",
    )
    eps_list = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    out: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "tile_size": a.tile_size,
        "target_mpp": cfg.tiling.target_mpp,
        "model": source,
        "params": sum(p.numel() for p in model.parameters()),
        "iterations": iters,
        "restarts": restarts,
        "targets": len(tgt),
        "floor_forward_backward_s": floor,
        "accounting": {"sample_rate": q, "steps": dpp.steps, "delta": dpp.delta},
        "inverting_gradients": {},
    }
    print(f"attack bench: {a.tile_size}px tiles, {out['params']} params ({source}), {out['threads']} threads")
    print(f"floor: one forward+backward {floor * 1e3:.1f} ms")
    gen = torch.Generator().manual_seed(0)
    grid: list[tuple[str, torch.Tensor]] = [
        ("true", pool.images[tgt]),
        ("prior", prior.expand(len(tgt), -1, -1, -1)),
    ]
    for eps in eps_list:
        sigma = dpp.sigma(eps)
        dp = DPSGD(1.0, sigma) if eps is not None else None
        ss, ps, secs = [], [], []
        recs: list[torch.Tensor] = []
        for j, i in enumerate(tgt):
            x, m = pool.images[[i]], pool.masks[[i]]
            g = observed_gradient(model, x, m, loss_fn, dp, gen)
            settings.seed = j
            rec = invert_gradients(model, g, x.shape, loss_fn, settings, masks=m, prior=prior)
            ss.append(ssim(rec.images[0], x[0]))
            recs.append(rec.images[0])
            ps.append(ssim(prior, x[0]))
            secs.append(rec.seconds)
        key = "none" if eps is None else f"{eps:g}"
        grid.append(("IG, no DP" if eps is None else f"IG, eps={key}", torch.stack(recs)))
        per_iter = float(np.mean(secs)) / (iters * restarts)
        out["inverting_gradients"][key] = {
            "sigma": sigma,
            "mean_ssim": float(np.mean(ss)),
            "ssim": ss,
            "mean_prior_ssim": float(np.mean(ps)),
            "seconds_per_reconstruction": float(np.mean(secs)),
            "iteration_vs_floor": per_iter / floor,
        }
        print(
            f"IG ε={key:>4} σ={sigma:6.3f}: mean SSIM {np.mean(ss):.3f} (prior {np.mean(ps):.3f}), "
            f"{np.mean(secs):.1f} s/reconstruction, one iteration = {per_iter / floor:.1f}x the floor"
        )

    # DLG and multi-step, undefended, timing and SSIM
    dlg_s, dlg_t, ms_s, ms_t = [], [], [], []
    for j, i in enumerate(tgt[:2]):
        x, m = pool.images[[i]], pool.masks[[i]]
        g = observed_gradient(model, x, m, loss_fn)
        rec = dlg_attack(model, g, x.shape, loss_fn, DLGSettings(iterations=dlg_iters, seed=j), masks=m)
        dlg_s.append(ssim(rec.images[0], x[0]))
        dlg_t.append(rec.seconds)
        sched = LocalTraining(steps=local_steps, batch_size=1, lr=cfg.train.lr, optimizer="sgd")
        upd = local_update(model, x, m, loss_fn, sched)
        settings.seed = j
        rec = invert_update(model, upd, 1, x.shape[1:], loss_fn, sched, settings, masks=m, prior=prior)
        ms_s.append(ssim(rec.images[0], x[0]))
        ms_t.append(rec.seconds)
    out["dlg"] = {
        "mean_ssim": float(np.mean(dlg_s)),
        "seconds_per_reconstruction": float(np.mean(dlg_t)),
        "iterations": dlg_iters,
    }
    out["multistep"] = {
        "mean_ssim": float(np.mean(ms_s)),
        "seconds_per_reconstruction": float(np.mean(ms_t)),
        "local_steps": local_steps,
        "optimizer": "sgd",
    }
    print(
        f"DLG (L-BFGS, {dlg_iters} it): mean SSIM {np.mean(dlg_s):.3f}, {np.mean(dlg_t):.1f} s/reconstruction"
    )
    print(
        f"multi-step ({local_steps} SGD steps): mean SSIM {np.mean(ms_s):.3f}, {np.mean(ms_t):.1f} s/reconstruction"
    )
    und = out["inverting_gradients"].get("none", {}).get("mean_ssim")
    if und is not None:
        print(
            f"undefended worst case: mean SSIM {und:.3f} -> 0.5 target {'MET' if und >= 0.5 else 'NOT met'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _grid_png(args.out.with_name(args.out.stem + "_grid.png"), grid)
    args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

"""Real-data quality check (not CI): MoNuSeg split by slide, non-DP UNet vs DP-SGD at ε = 8.

The three MoNuSeg "hospital" manifests (data_manifests/monuseg_*.csv, 30 images, their train/val/test
split by slide) are tiled at 0.5 µm/px and pooled; a UNet is trained without DP and then with DP-SGD
(target ε over the run, PRV accountant, δ = 1/(10 n)) for the same number of steps, and both are scored on
the validation slides (Dice, Jaccard, pixel accuracy; mean over slides). Prints a markdown table and
writes it with the raw figures to <run>/eval_monuseg.json.

    FEDPATH_DATA_ROOT=../shared/data .venv/bin/python scripts/eval_monuseg.py --steps 600 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ExperimentConfig  # noqa: E402
from pipeline.train import train_local  # noqa: E402
from wsi.config import TilingConfig  # noqa: E402
from wsi.tiling import run_tile_site  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SITES = ["monuseg_breast_gi", "monuseg_kidney_bladder", "monuseg_lung_prostate"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--data-root",
        type=Path,
        default=Path(os.environ.get("FEDPATH_DATA_ROOT", REPO.parent / "shared" / "data")),
    )
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "eval_monuseg")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", default="16,32,64,128")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tiling = TilingConfig(target_mpp=0.5, tile_size=args.tile, overlap=0)
    rows = {}
    for variant, privacy in (
        ("no DP", {"enabled": False}),
        (
            f"DP-SGD eps={args.epsilon:g}",
            {"enabled": True, "target_epsilon": args.epsilon, "accountant": "prv", "max_grad_norm": 1.0},
        ),
    ):
        run = args.run / variant.replace(" ", "_").replace("=", "")
        for s in SITES:
            run_tile_site(
                manifest=REPO / "data_manifests" / f"{s}.csv",
                data_root=args.data_root,
                store=run / "sites" / s / "store.zarr",
                tiling=tiling,
                site=s,
                run_dir=None,
                workers=1,
            )
        cfg = ExperimentConfig.model_validate(
            {
                "run_dir": str(run),
                "model": {
                    "name": "unet",
                    "channels": [int(c) for c in args.channels.split(",")],
                    "strides": [2] * (len(args.channels.split(",")) - 1),
                },
                "train": {
                    "batch_size": args.batch,
                    "physical_batch_size": args.batch,
                    "lr": args.lr,
                    "threads": args.threads,
                    "checkpoint_every": 100,
                    "privacy": privacy,
                },
            }
        )
        t0 = time.perf_counter()
        res = train_local(cfg, SITES, run, max_steps=args.steps, job_id="eval")
        rows[variant] = {
            "seconds": time.perf_counter() - t0,
            "steps": res.steps,
            "epsilon": res.epsilon,
            "delta": res.delta,
            "noise_multiplier": res.noise_multiplier,
            "n_train_tiles": res.n_train_tiles,
            **{k: res.metrics.get(k) for k in ("val_dice", "val_jaccard", "val_pixel_accuracy")},
        }
    lines = [
        "| variant | steps | val Dice | val Jaccard | val pixel acc. | ε (δ) | σ | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({r['delta']:.1e})"
        sig = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        lines.append(
            f"| {name} | {r['steps']} | {r['val_dice']:.3f} | {r['val_jaccard']:.3f} | "
            f"{r['val_pixel_accuracy']:.3f} | {eps} | {sig} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(
        f"tile {args.tile}px at 0.5 um/px, batch {args.batch}, {args.threads} threads, {rows[next(iter(rows))]['n_train_tiles']} training tiles"
    )
    print(table)
    args.run.mkdir(parents=True, exist_ok=True)
    (args.run / "eval_monuseg.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table}, indent=2
        )
    )


if __name__ == "__main__":
    main()

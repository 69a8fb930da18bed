"""DP-SGD throughput: images/s without DP and with DP-SGD (Opacus), on the same model, tiles and batch.

Paths compared in one run, interleaved round-robin so a busy machine slows them alike:
  * ``no_dp``            plain training step (forward, backward, Adam);
  * ``dp_opacus_hooks``  Opacus 1.6 default: GradSampleModule hooks with Opacus' own im2col Conv2d code;
  * ``dp_fedpath_torch_rng``  fedpath's path before issue 13: the same hooks, with per-sample gradients of
                         Conv2d and ConvTranspose2d as one grouped-convolution backward
                         (``pipeline.models.register_fast_grad_samplers``), and autograd's summed conv
                         weight gradients, which DP-SGD discards, not computed (``per_sample_only``); noise
                         from torch's (seedable, replayable) Mersenne Twister through Opacus' engine;
  * ``dp_fedpath``       the path fedpath trains with now: the same, built by ``pipeline.dpsgd.make_private``,
                         noise from the per-job CSPRNG (``pipeline.dprandom.SecureRandom``: AES-256-CTR keyed
                         by os.urandom, four float64 Box-Muller normals per coordinate). The line
                         "secure noise vs torch RNG" is their ratio (target >= 0.9).
  * ``dp_opacus_ghost``  Opacus' fast gradient clipping (``grad_sample_mode="ghost"``): per-layer norms in
                         the hooks (ghost norms for Linear; Conv2d/ConvTranspose2d have no norm sampler in
                         Opacus 1.6, so their per-sample gradients are instantiated, with fedpath's grouped
                         code, only for their norms), then a second backward of the loss reweighted by the
                         clip factors gives the clipped sum; noise from torch's RNG. Mixed ghost/per-sample
                         by layer is what Opacus does here: ghost where it has a norm sampler.
  * ``dp_fedpath_unfused`` ``dp_fedpath`` with Opacus' clip and accumulate (``make_private(fused=False)``,
                         the path before issue 19); ``dp_fedpath`` computes each parameter's clipped sum as
                         one matrix-vector product.
  * ``*_cl``             the same path with channels-last weights and inputs (``no_dp_cl``, ``dp_fedpath_cl``).
  * ``*_nchw``           the same path with every layer in NCHW, without ``channels_last_tiny_convs`` (the
                         network's 3-channel convolutions in channels-last, which ``build_model`` does); the
                         line "tiny convs channels-last" is the ratio.
Each DP step is a full DP-SGD step: per-sample gradients, clipping, Gaussian noise, Adam. Reported: the
best-of-N wall time and process CPU time per step (CPU time is robust to other processes sharing the
cores), images/s, the ratio to no-DP, and each path's peak RSS measured in its own process (psutil,
sampled over two steps; the RSS growth sampled in the shared process is kept in the JSON).

    .venv/bin/python bench/bench_dp.py [--tile 128] [--batch 16] [--reps 5] [--threads 2] [--model unet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from monai.losses import DiceCELoss  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from opacus.grad_sample import GradSampleModule  # noqa: E402

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models import (  # noqa: E402
    autocast,
    bf16_native,
    build_model,
    per_sample_only,
    register_fast_grad_samplers,
)


class PerSampleDiceCE(nn.Module):
    """DiceCE per sample (Opacus' ghost clipping needs a criterion with ``reduction="none"`` giving one
    loss per sample): the mean of MONAI's Dice loss over classes plus the pixel-mean cross entropy."""

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        d = self.dice(logits, target).reshape(logits.shape[0], -1).mean(1)
        ce = nn.functional.cross_entropy(logits, target[:, 0], reduction="none").reshape(logits.shape[0], -1)
        per = d + ce.mean(1)
        return per if self.reduction == "none" else per.mean() if self.reduction == "mean" else per.sum()


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.t.join()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="unet")
    ap.add_argument("--upsample", default="deconv")
    ap.add_argument("--paths", default=None, help="comma-separated subset of the paths (no_dp always runs)")
    ap.add_argument("--smoke", action="store_true", help="tiny: checks the bench works, no timing meaning")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child: one path, report its peak RSS
    args = ap.parse_args(argv)
    if args.smoke:
        args.tile, args.batch, args.reps = 32, 4, 1
    torch.set_num_threads(args.threads)
    mcfg = ModelConfig(name=args.model, upsample=args.upsample)
    x = torch.rand(args.batch, 3, args.tile, args.tile)
    y = (torch.rand(args.batch, 1, args.tile, args.tile) > 0.7).long()

    register_fast_grad_samplers()
    fast = {t: GradSampleModule.GRAD_SAMPLERS[t] for t in (nn.Conv2d, nn.ConvTranspose2d)}
    from opacus.grad_sample.conv import compute_conv_grad_sample

    opacus_default = {nn.Conv2d: compute_conv_grad_sample}  # ConvTranspose2d: none (functorch fallback)

    def use(samplers: Any) -> None:
        if samplers is None:
            return
        GradSampleModule.GRAD_SAMPLERS.pop(nn.ConvTranspose2d, None)
        GradSampleModule.GRAD_SAMPLERS.update(samplers)

    def make(mode: str) -> Any:
        torch.manual_seed(0)
        bf16 = mode.endswith("_bf16")  # train.precision: bfloat16 (CPU autocast, float32 loss and clipping)
        mode = mode.removesuffix("_bf16")
        nchw = mode.endswith("_nchw")
        mode = mode.removesuffix("_nchw")
        cl = mode.endswith("_cl")
        mode = mode.removesuffix("_cl")
        # Opacus' own Conv2d code assumes NCHW inputs (fedpath's makes them so): its path stays all-NCHW
        net = build_model(mcfg, tiny_channels_last=not nchw and mode != "dp_opacus_hooks")
        if cl:
            net = net.to(memory_format=torch.channels_last)
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        crit = DiceCELoss(to_onehot_y=True, softmax=True)
        model: nn.Module = net
        if mode == "dp_opacus_ghost":
            dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch)
            model, opt, gcrit, _ = PrivacyEngine(accountant="prv").make_private(
                module=net, optimizer=opt, data_loader=dl, criterion=PerSampleDiceCE(), noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost",
            )  # fmt: skip

            def ghost_step() -> None:
                opt.zero_grad(set_to_none=True)
                gcrit(model(xin), y).backward()
                opt.step()

            return ghost_step
        if mode in ("dp_fedpath", "dp_fedpath_unfused"):
            from pipeline.dprandom import SecureRandom
            from pipeline.dpsgd import make_private

            model, opt = make_private(
                net,
                opt,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=args.batch,
                rng=SecureRandom(),
                fused=mode == "dp_fedpath",
            )
        if mode == "dp_fedpath_torch_rng":
            per_sample_only(net)
        if mode not in ("no_dp", "dp_fedpath", "dp_fedpath_unfused"):
            dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch)
            model, opt, _ = PrivacyEngine(accountant="prv").make_private(
                module=net,
                optimizer=opt,
                data_loader=dl,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
                grad_sample_mode="hooks",
            )

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast("bfloat16" if bf16 else "float32"):
                out = model(xin)
            crit(out.float(), y).backward()
            opt.step()

        return step

    modes = {
        "no_dp": None, "dp_opacus_hooks": opacus_default, "dp_fedpath_torch_rng": fast, "dp_fedpath": fast,
        "dp_fedpath_unfused": fast, "dp_opacus_ghost": fast, "no_dp_cl": None, "dp_fedpath_cl": fast,
    }  # fmt: skip
    if bf16_native():  # emulated bf16 would only measure the emulation
        modes.update(
            {
                "no_dp_bf16": None,
                "dp_fedpath_bf16": fast,
                "no_dp_nchw_bf16": None,
                "dp_fedpath_nchw_bf16": fast,
            }
        )
    if args.paths:
        keep = {"no_dp", "dp_fedpath", "dp_fedpath_torch_rng", *args.paths.split(",")}
        modes = {m: s for m, s in modes.items() if m in keep}
    if args.only:
        use(modes[args.only])
        with PeakRSS() as pk:
            step = make(args.only)
            for _ in range(2):
                step()
        print(json.dumps({"maxrss_mb": (pk.base + pk.peak) / 2**20}))
        return {}
    steps = {}
    peak = {m: 0 for m in modes}
    for m, s in modes.items():
        use(s)
        with PeakRSS() as pk:
            steps[m] = make(m)
            steps[m]()  # warm-up (allocations, oneDNN kernels): most of a path's memory appears here
        peak[m] = pk.peak
    wall = {m: float("inf") for m in modes}
    cpu = {m: float("inf") for m in modes}
    for _ in range(args.reps):
        for m, s in modes.items():
            use(s)
            with PeakRSS() as pk:
                t0, c0 = time.perf_counter(), time.process_time()
                steps[m]()
                wall[m] = min(wall[m], time.perf_counter() - t0)
                cpu[m] = min(cpu[m], (time.process_time() - c0) / args.threads)
            peak[m] = max(peak[m], pk.peak)
    use(fast)
    # peak memory of each path in its own process (a shared process reuses the allocator's memory)
    import subprocess

    iso: dict[str, float | None] = {m: None for m in modes}
    for m in [] if args.smoke else modes:  # the smoke run skips the per-path processes
        cmd = [
            sys.executable,
            __file__,
            "--only",
            m,
            "--tile",
            str(args.tile),
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
            "--model",
            args.model,
            "--upsample",
            args.upsample,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        iso[m] = json.loads(out)["maxrss_mb"]
    res: dict[str, Any] = {
        "model": mcfg.model_dump(),
        "tile": args.tile,
        "batch": args.batch,
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "paths": {},
    }
    print(
        f"UNet {args.model}/{args.upsample}, tile {args.tile}, batch {args.batch}, {args.threads} threads, "
        f"best of {args.reps} (load avg {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'path':21s} {'img/s wall':>11s} {'ratio':>6s} {'img/s cpu':>10s} {'ratio':>6s} {'peak RSS MB':>12s}"
    )
    for m in modes:
        r = {
            "images_per_s_wall": args.batch / wall[m],
            "ratio_wall": wall["no_dp"] / wall[m],
            "images_per_s_cpu": args.batch / cpu[m],
            "ratio_cpu": cpu["no_dp"] / cpu[m],
            "rss_growth_mb_shared_process": peak[m] / 2**20,
            "peak_rss_mb": iso[m],
        }
        res["paths"][m] = r
        print(
            f"{m:21s} {r['images_per_s_wall']:11.1f} {r['ratio_wall']:6.2f} {r['images_per_s_cpu']:10.1f} "
            f"{r['ratio_cpu']:6.2f} {r['peak_rss_mb'] or float('nan'):12.0f}"
        )
    secure = {
        "wall": wall["dp_fedpath_torch_rng"] / wall["dp_fedpath"],
        "cpu": cpu["dp_fedpath_torch_rng"] / cpu["dp_fedpath"],
    }
    res["secure_vs_torch_rng"] = secure
    print(
        f"secure noise vs torch RNG (throughput ratio, target >= 0.9): wall {secure['wall']:.2f}, cpu {secure['cpu']:.2f}"
    )
    if "dp_fedpath_bf16" in modes:
        bf = {
            "no_dp": {"wall": wall["no_dp"] / wall["no_dp_bf16"], "cpu": cpu["no_dp"] / cpu["no_dp_bf16"]},
            "dp_fedpath": {"wall": wall["dp_fedpath"] / wall["dp_fedpath_bf16"], "cpu": cpu["dp_fedpath"] / cpu["dp_fedpath_bf16"]},
        }  # fmt: skip
        res["bf16_vs_float32"] = bf
        for k, v in bf.items():
            print(
                f"bf16 autocast vs float32, {k} (step speed-up): wall {v['wall']:.2f}x, cpu {v['cpu']:.2f}x"
            )
        tiny = {
            k: {
                "wall": wall[f"{k}_nchw_bf16"] / wall[f"{k}_bf16"],
                "cpu": cpu[f"{k}_nchw_bf16"] / cpu[f"{k}_bf16"],
            }
            for k in ("no_dp", "dp_fedpath")
        }
        res["tiny_convs_channels_last"] = tiny
        for k, v in tiny.items():
            print(
                f"tiny convs channels-last vs all NCHW, {k} bf16 (step speed-up): wall {v['wall']:.2f}x, cpu {v['cpu']:.2f}x"
            )
    best = max(
        (m for m in modes if m.startswith("dp_") and not m.endswith("_bf16") and not m.endswith("_nchw")),
        key=lambda m: res["paths"][m]["ratio_cpu"],
    )
    res["best_dp_path"] = best
    print(f"fastest DP path (cpu): {best}, {res['paths'][best]['ratio_cpu']:.2f}x no-DP (target >= 0.9)")
    out_path = args.out or Path(__file__).resolve().parent / "out" / (
        "dp_smoke.json" if args.smoke else "dp.json"
    )
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2))
    print(f"-> {out_path}")
    return res


if __name__ == "__main__":
    main()

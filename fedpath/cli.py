"""The ``fedpath`` command: one subcommand per stage, each taking ``--config`` and ``--set KEY=VALUE``.

Every subcommand exits non-zero with a one-line reason on bad input (:class:`FedpathError` and
:class:`ConfigError` are caught here and printed without a traceback). Stage modules are imported
lazily so that ``fedpath --help`` stays fast and ``wsi`` stays free of torch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.errors import FedpathError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated, DP segmentation of H&E slides."
)
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="experiment YAML")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: section.key=value")]
SiteOpt = Annotated[str, typer.Option("--site", "-s", help="site name from the config")]
DataRootOpt = Annotated[
    Path | None, typer.Option("--data-root", help="root of manifest paths (else FEDPATH_DATA_ROOT)")
]


def _cfg(config: Path | None, overrides: list[str] | None, *, federated: bool = True) -> ExperimentConfig:
    """The validated config. ``federated`` commands also validate ``federation.strategy`` against the
    strategy registry (which imports torch); the stages that never federate (synth, tile, train, infer,
    privacy, report) skip it, so that they start without torch."""
    cfg = load_config(config, overrides)
    if federated:
        from federation.strategies import strategy_config

        strategy_config(cfg.federation, f"{config or '<config>'}: federation.strategy")  # one-line error if bad
    return cfg


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def synth(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="default: <run_dir>/synthetic")] = None,
) -> None:
    """Generate the synthetic H&E default: pyramidal TIFF slides, exact masks and per-site manifests."""
    from wsi.errors import WSIError
    from wsi.synth import run_synth

    cfg = _cfg(config, set_, federated=False)
    try:
        # the config's own data_root (not FEDPATH_DATA_ROOT, which may be read-only real data)
        run_synth(cfg.synth, out or cfg.data_root or cfg.run_dir / "synthetic", run_dir=cfg.run_dir)
    except WSIError as exc:
        _fail(str(exc))


@app.command()
def tile(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    site: SiteOpt = "",
    data_root: DataRootOpt = None,
    scheduler: Annotated[str | None, typer.Option(help="address of an existing dask scheduler")] = None,
    workers: Annotated[int | None, typer.Option(help="local dask workers")] = None,
) -> None:
    """Tile one site's slides (tissue only, target MPP) into sites/<site>/store.zarr."""
    from wsi.errors import WSIError
    from wsi.tiling import run_tile_site

    cfg = _cfg(config, set_, federated=False)
    sites = [site] if site else [s.name for s in cfg.sites]
    failed = 0
    for name in sites:
        s = cfg.site(name)
        try:
            result = run_tile_site(
                manifest=s.manifest,
                data_root=cfg.resolved_data_root(data_root),
                store=cfg.store_path(name),
                tiling=cfg.tiling,
                site=name,
                run_dir=cfg.run_dir,
                scheduler=scheduler or cfg.tiling.scheduler,
                workers=workers or cfg.tiling.workers,
            )
        except WSIError as exc:  # the site as a whole cannot be tiled (manifest, store): one line, exit 2
            _fail(str(exc))
        failed += len(result.get("failed", []))  # each already logged in one line
    if failed:
        raise typer.Exit(1)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    site: Annotated[
        list[str] | None, typer.Option("--site", "-s", help="site(s); several = pooled centralised baseline")
    ] = None,
) -> None:
    """Train locally with DP-SGD (Opacus); with several sites, the pooled centralised baseline."""
    from pipeline.statement import statement_lines, write_statement
    from pipeline.train import run_train

    cfg = _cfg(config, set_, federated=False)
    run_train(cfg, site or [s.name for s in cfg.sites])
    _print_privacy(statement_lines(write_statement(cfg.run_dir)))


def _print_privacy(lines: list[tuple[str, str]]) -> None:
    for label, text in lines:
        typer.echo(f"{label}: {text}")


@app.command()
def pretrain(config: ConfigOpt = None, set_: SetOpt = None, data_root: DataRootOpt = None) -> None:
    """Server side: pretrain θ_pre on the server's own data: masked image modelling on its unlabelled slides
    (pretrain.objective: mim), or segmentation on slides it synthesises (pretrain.objective: synthetic)."""
    from fedpath.pretrain import run_pretrain

    cfg = _cfg(config, set_)
    res = run_pretrain(cfg, cfg.resolved_data_root(data_root))
    if res.get("objective") == "synthetic":
        vd = res.get("val_dice")
        val = "no validation slides" if vd is None else f"Dice {vd:.3f} on the synthetic validation slides"
        typer.echo(
            f"pretrain: θ_pre -> {res['path']} (segmentation on synthetic sites {', '.join(res['sites'])}, "
            f"{res['steps']} steps; {val})"
        )
        return
    typer.echo(
        f"pretrain: θ_pre -> {res['path']} ({res['tiles']} server tiles, {res['steps']} steps; masked L1 "
        f"{res['masked_l1_last']:.4f} vs mean-colour fill {res['mean_fill_l1']:.4f})"
    )


@app.command()
def provision(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Create the federation's dev CA, server certificate and one hashed token per site."""
    from federation.provision import run_provision

    run_provision(_cfg(config, set_))


InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="allow plain HTTP (tokens in clear) to or on a non-loopback address"),
]


def _insecure(overrides: list[str] | None, insecure: bool) -> list[str]:
    return list(overrides or []) + (["federation.insecure=true"] if insecure else [])


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    insecure: InsecureOpt = False,
    rebuild_state: Annotated[
        bool,
        typer.Option("--rebuild-state", help="rebuild server/state.json from the updates and global models on disk"),
    ] = False,
) -> None:
    """Run the aggregator service (FastAPI on uvicorn, TLS)."""
    from federation.server import run_server

    run_server(_cfg(config, _insecure(set_, insecure)), rebuild_state=rebuild_state)


@app.command("site-round")
def site_round(
    config: ConfigOpt = None, set_: SetOpt = None, site: SiteOpt = "", insecure: InsecureOpt = False
) -> None:
    """One site's batch job: pull the global model, train locally with DP, push the update, exit."""
    from federation.client import run_site_round

    if not site:
        _fail("--site is required")
    cfg = _cfg(config, _insecure(set_, insecure))
    result = run_site_round(cfg, site)
    typer.echo(f"site {site}: round {result['round']}: {result['outcome']}")
    from pipeline.statement import site_statement, statement_lines

    _print_privacy(statement_lines({"sites": {site: site_statement(cfg.run_dir, site)}}))


@app.command("site-model")
def site_model(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    site: SiteOpt = "",
    global_model: Annotated[
        Path | None, typer.Option("--global", help="a published global model file (default: the run's latest)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output file (default: sites/<site>/model_personal.safetensors)")
    ] = None,
) -> None:
    """The site's own model for `fedpath infer --model`: its head on the federation's body (heads:
    per_site), or FedMIC's personal teacher. Built from the site's private state, at the site."""
    from federation.site import write_site_model

    if not site:
        _fail("--site is required")
    path = write_site_model(_cfg(config, set_), site, global_model, out)
    typer.echo(f"site {site}: its own model {path} (run it with: fedpath infer --model {path})")


@app.command()
def simulate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """A whole federation on one machine: the real aggregator on loopback with TLS; every site's round job
    (`fedpath site-round`) in a warm per-site worker process, or a fresh process (fedpath.simulate_workers)."""
    from fedpath.simulate import run_simulation
    from pipeline.statement import statement_lines

    summary = run_simulation(_cfg(config, set_))
    typer.echo(
        f"federation: {summary['rounds']} round(s) in {summary['wall_s']} s; final model {summary['global_models'][-1]}"
    )
    _print_privacy(statement_lines(summary["privacy"]))


@app.command()
def privacy(
    run: Annotated[Path | None, typer.Option("--run", help="run directory")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write and print the run's privacy statement (privacy_statement.json): per site, every mechanism
    with its unit, ε, δ, accountant, noise source and who must be trusted."""
    from pipeline.statement import STATEMENT_FILE, statement_lines, write_statement

    run_dir = run if run is not None else _cfg(config, set_, federated=False).run_dir
    if not (Path(run_dir) / "sites").is_dir():
        _fail(f"{run_dir}: not a run directory (no sites/)")
    _print_privacy(statement_lines(write_statement(run_dir)))
    typer.echo(str(Path(run_dir) / STATEMENT_FILE))


@app.command()
def infer(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        Path | None, typer.Option(help="model .safetensors (default: the run's latest global model)")
    ] = None,
    slide: Annotated[list[Path] | None, typer.Option(help="slide file(s)")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="manifest CSV (its test split, or all with --all-splits)")
    ] = None,
    site: Annotated[str | None, typer.Option(help="use this site's manifest")] = None,
    data_root: DataRootOpt = None,
    all_splits: Annotated[bool, typer.Option("--all-splits")] = False,
    scheduler: Annotated[
        str | None, typer.Option(help="dask scheduler address (tcp://host:port): run slides and blocks there")
    ] = None,
) -> None:
    """Run a model over whole slides and stitch seam-free slide-level masks (OME-TIFF, OME-Zarr, GeoJSON)."""
    from pipeline.infer import run_infer

    cfg = _cfg(config, set_, federated=False)
    if scheduler:
        cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"scheduler": scheduler})})
    result = run_infer(
        cfg,
        model=model,
        slides=slide or [],
        manifest=manifest,
        site=site,
        data_root=cfg.resolved_data_root(data_root),
        all_splits=all_splits,
    )
    if result.get("failed"):
        raise typer.Exit(1)


@app.command()
def attack(config: ConfigOpt = None, set_: SetOpt = None, data_root: DataRootOpt = None) -> None:
    """Gradient-inversion and membership-inference attacks over a sweep of privacy settings."""
    from federation.attack.sweep import run_attack

    cfg = _cfg(config, set_)
    run_attack(cfg, data_root=cfg.resolved_data_root(data_root))


@app.command()
def calibrate(
    config: Annotated[Path, typer.Option("--config", "-c", help="calibrate YAML")] = Path("configs/calibrate.yaml"),
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """The ε grid on the real experiment: held-out Dice, inversion vs the prior, LiRA; recommends an ε."""
    from fedpath.calibrate import load_calibrate, run_calibrate

    cal, cfg = load_calibrate(config, set_)
    result = run_calibrate(cal, cfg, cfg.resolved_data_root(data_root))
    print(result["recommendation"]["text"])
    print(f"calibrate: {cfg.run_dir / 'calibrate' / 'calibrate.json'}")


@app.command()
def report(
    run: Annotated[Path | None, typer.Option("--run", help="run directory")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write report/index.html (self-contained) and report/report.json for a run directory."""
    from pipeline.report import build_report

    run_dir = run if run is not None else _cfg(config, set_, federated=False).run_dir
    path = build_report(run_dir)
    typer.echo(str(path))


@app.command()
def demo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The whole pipeline on the synthetic default, ending with the report's path and headline figures."""
    from fedpath.demo import run_demo

    run_demo(_cfg(config or Path("configs/demo.yaml"), set_))


@app.command()
def experiment(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    epsilons: Annotated[
        str, typer.Option(help="comma-separated FedDP ε targets over the whole training; 'inf' = clip, no noise "
                          "(default: the config's experiment.epsilons, else inf,8,4,1)")
    ] = "",
) -> None:
    """The real-data experiment: local, centralised, FedAvg, FedProx and FedDP at several ε, tabulated."""
    from fedpath.experiment import run_experiment

    cfg = _cfg(config, set_)
    try:
        eps = [float(e) for e in epsilons.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons: expected comma-separated numbers or 'inf', got {epsilons!r}") from None
    run_experiment(cfg, data_root=cfg.resolved_data_root(data_root), epsilons=eps or None)


@app.command("experiment-oneshot")
def experiment_oneshot(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_root: DataRootOpt = None,
    folds: Annotated[str, typer.Option(help="comma-separated left-out sites (default: every site)")] = "",
    no_dp_only: Annotated[bool, typer.Option("--no-dp-only", help="skip the ε = 8 level")] = False,
) -> None:
    """Leave-one-site-out: data vectors, FedAvg from θ_pre, the universal model, local and centralised."""
    from fedpath.experiment_oneshot import EPSILON, run_oneshot

    cfg = _cfg(config, set_)
    levels: tuple[float | None, ...] = (None,) if no_dp_only else (None, EPSILON)
    run_oneshot(cfg, cfg.resolved_data_root(data_root), [f for f in folds.split(",") if f] or None, levels)


def run(argv: list[str] | None = None) -> int:
    """Run ``fedpath`` on ``argv`` (default: ``sys.argv[1:]``) and return its exit status: 0, 2 with a
    one-line reason for bad input or a refusal, 130 when interrupted. An unexpected exception propagates
    (a traceback, exit 1). :func:`main` exits with it; ``fedpath simulate``'s warm site workers call it
    with the very argv of a ``fedpath site-round`` process."""
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns (not raises) a typer.Exit code here
        return rc if isinstance(rc, int) else 0
    except (ConfigError, FedpathError) as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        return 130
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return int(exc.exit_code)
        raise


def main() -> None:
    rc = run()
    if rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()

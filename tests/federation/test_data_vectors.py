"""Data vectors through the real aggregator: one vector per site, a version per late vector, SIGKILL-safe."""

from __future__ import annotations

import torch
from fedtest_utils import Fed, random_delta, update_body

from federation.client import ServerRefused
from federation.strategies import strategy_config
from federation.strategies.data_vectors import DataVectors, DataVectorsConfig
from pipeline.checkpoint import read_model_file
from pipeline.config import FederationConfig


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in a if a[k].is_floating_point())


def test_config_union_and_lambda() -> None:
    c = strategy_config(FederationConfig(strategy={"name": "data_vectors", "lam": "mean"}))
    assert isinstance(c, DataVectorsConfig) and DataVectors(c).lam(4) == 0.25
    assert DataVectors().lam(4) == 1.0


def test_late_vector_publishes_a_new_version_without_anyone_rerunning(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fed = Fed(tmp_path, ["a", "b", "c"], rounds=3, min_sites=2, strategy={"name": "data_vectors"})
    try:
        pre = fed.global0
        taus = {s: random_delta(pre, 0.01, i) for i, s in enumerate("abc")}
        fed.clients["a"].upload(update_body(taus["a"], "a", 0, 5))
        assert fed.state()["round"] == 0  # one vector: below min_sites, nothing published
        fed.clients["b"].upload(update_body(taus["b"], "b", 0, 7))
        fed.wait_round(1)
        g1, m1 = read_model_file(fed.paths.global_model(1))
        want1 = {k: v + taus["a"][k] + taus["b"][k] if v.is_floating_point() else v for k, v in pre.items()}
        assert _close(g1, want1)  # λ = 1: θ_pre + τ_a + τ_b, whatever the tile counts
        assert [u["site"] for u in m1.extra["updates"]] == ["a", "b"]

        # a second vector from a site is refused, whatever round it claims
        try:
            fed.clients["a"].upload(update_body(random_delta(pre, 0.01, 9), "a", 1, 5))
            raise AssertionError("a second vector was accepted")
        except ServerRefused as exc:
            assert exc.status == 409 and "already contributed" in str(exc)

        # the aggregator is SIGKILLed between versions; the restarted one remembers who contributed
        fed.proc.proc.kill()  # type: ignore[union-attr]
        fed.proc.proc.wait()  # type: ignore[union-attr]
        fed.url = fed.proc.start()
        for c in fed.clients.values():
            c.close()
        fed.clients = {s: fed.client(s) for s in "abc"}

        # site c is "days late": its vector alone publishes version 2, nobody else re-runs
        fed.clients["c"].upload(update_body(taus["c"], "c", 1, 3))
        fed.wait_round(2)
        g2, m2 = read_model_file(fed.paths.global_model(2))
        want2 = {k: want1[k] + taus["c"][k] if v.is_floating_point() else v for k, v in pre.items()}
        assert _close(g2, want2)
        assert [u["site"] for u in m2.extra["updates"]] == ["c"]
        try:
            fed.clients["b"].upload(update_body(random_delta(pre, 0.01, 8), "b", 2, 5))
            raise AssertionError("b's second vector was accepted after the restart")
        except ServerRefused as exc:
            assert "already contributed" in str(exc)
    finally:
        fed.close()


# -- server-side distillation: the universal model and restoration by distillation ------------------------
def _server_tiles(tmp_path, data_root):  # type: ignore[no-untyped-def]
    """The public CMU-1 slide tiled where the aggregator looks for its own tiles (as `fedpath pretrain` does)."""
    from pathlib import Path

    from fedcore.layout import RunLayout
    from wsi.config import TilingConfig
    from wsi.tiling import run_tile_site

    repo = Path(__file__).resolve().parents[2]
    rows = (repo / "data_manifests" / "slides.csv").read_text().splitlines()
    manifest = tmp_path / "server.csv"
    manifest.write_text("\n".join([rows[0], *[r for r in rows[1:] if "CMU-1" in r]]) + "\n")
    store = RunLayout(tmp_path / "run").server.data_store
    res = run_tile_site(manifest=manifest, data_root=data_root, store=store,
                        tiling=TilingConfig(target_mpp=1.0, tile_size=32, overlap=0), site="real_slides",
                        run_dir=None, workers=1)
    assert not res["failed"]
    return store


def _kl_to_ensemble(student: dict[str, torch.Tensor], teachers: list[dict[str, torch.Tensor]], store) -> float:  # type: ignore[no-untyped-def]
    from fedtest_utils import TINY_MODEL

    from pipeline.config import ModelConfig
    from pipeline.models import build_model
    from pipeline.transfer import UnlabelledTiles

    tiles = UnlabelledTiles(store, augment=False)
    x = torch.stack([tiles[i] for i in range(min(len(tiles), 64))])
    cfg = ModelConfig.model_validate(TINY_MODEL)

    def out(state: dict[str, torch.Tensor]) -> torch.Tensor:
        net = build_model(cfg)
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            return net(x)

    p = torch.softmax(sum(out(t) for t in teachers) / len(teachers) / 2.0, 1)
    q = torch.log_softmax(out(student) / 2.0, 1)
    return float((p * (p.log() - q)).sum(1).mean())


def test_universal_model_distils_the_sites_models_on_server_tiles(tmp_path, data_root) -> None:  # type: ignore[no-untyped-def]
    store = _server_tiles(tmp_path, data_root)
    strategy = {"name": "universal", "distil_steps": 40, "distil_batch": 8, "distil_lr": 3e-3, "weighted": False}
    fed = Fed(tmp_path, ["a", "b"], rounds=1, strategy=strategy)
    try:
        g0 = fed.global0
        deltas = {s: random_delta(g0, 0.05, i) for i, s in enumerate("ab")}
        for s in "ab":
            fed.clients[s].upload(update_body(deltas[s], s, 0, 4))
        fed.wait_round(1, timeout=300)
        g1, m1 = read_model_file(fed.paths.global_model(1))
        teachers = [{k: v + deltas[s][k] if v.is_floating_point() else v for k, v in g0.items()} for s in "ab"]
        avg = {k: v + (deltas["a"][k] + deltas["b"][k]) / 2 if v.is_floating_point() else v for k, v in g0.items()}
        assert not _close(g1, avg)  # not weight averaging
        # the distilled model reproduces the ensemble's outputs better than the model it started from
        assert _kl_to_ensemble(g1, teachers, store) < 0.5 * _kl_to_ensemble(g0, teachers, store)
    finally:
        fed.close()


def test_universal_without_server_tiles_says_what_to_do() -> None:
    import pytest
    from fedtest_utils import TINY_MODEL

    from federation.strategies import ServerContext, UpdateInfo
    from federation.strategies.universal import Universal
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    u = Universal()
    u.bind(ServerContext(model_builder=lambda: build_model(ModelConfig.model_validate(TINY_MODEL))))
    g = build_model(ModelConfig.model_validate(TINY_MODEL)).state_dict()
    info = UpdateInfo("a", 0, 1, None, __import__("pathlib").Path("/nonexistent"), "x", "x", 0.0)
    with pytest.raises(ValueError, match="fedpath pretrain"):
        u.aggregate(g, [info], 0)


def test_data_vectors_restored_by_distillation_move_towards_the_local_models(tmp_path, data_root) -> None:  # type: ignore[no-untyped-def]
    store = _server_tiles(tmp_path, data_root)
    strategy = {"name": "data_vectors", "lam": "sum", "restore": "distil", "distil_steps": 40, "distil_batch": 8, "distil_lr": 3e-3}
    fed = Fed(tmp_path, ["a", "b"], rounds=1, min_sites=2, strategy=strategy)
    try:
        pre = fed.global0
        taus = {s: random_delta(pre, 0.05, i) for i, s in enumerate("ab")}
        for s in "ab":
            fed.clients[s].upload(update_body(taus[s], s, 0, 4))
        fed.wait_round(1, timeout=300)
        g1, _ = read_model_file(fed.paths.global_model(1))
        merged = {k: v + taus["a"][k] + taus["b"][k] if v.is_floating_point() else v for k, v in pre.items()}
        teachers = [{k: v + taus[s][k] if v.is_floating_point() else v for k, v in pre.items()} for s in "ab"]
        assert not _close(g1, merged)
        assert _kl_to_ensemble(g1, teachers, store) < 0.5 * _kl_to_ensemble(merged, teachers, store)
    finally:
        fed.close()

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


# -- restoration by a DP fine-tune at a designated site, and λ tuned on the server's labelled tiles ---------
def test_restoration_by_a_designated_sites_finetune_is_its_one_extra_update_and_survives_sigkill(tmp_path) -> None:  # type: ignore[no-untyped-def]
    strategy = {"name": "data_vectors", "restore": "finetune", "restore_site": "a", "restore_steps": 3}
    fed = Fed(tmp_path, ["a", "b", "c"], rounds=4, min_sites=2, strategy=strategy)
    try:
        pre = fed.global0
        taus = {s: random_delta(pre, 0.01, i) for i, s in enumerate("abc")}
        fed.clients["a"].upload(update_body(taus["a"], "a", 0, 5))
        fed.clients["b"].upload(update_body(taus["b"], "b", 0, 7))
        fed.wait_round(1)
        g1, _ = read_model_file(fed.paths.global_model(1))
        # b may not send a second update; a may, once: its fine-tune of version 1
        try:
            fed.clients["b"].upload(update_body(random_delta(pre, 0.01, 9), "b", 1, 5))
            raise AssertionError("b's second update was accepted")
        except ServerRefused as exc:
            assert exc.status == 409 and "already contributed" in str(exc)
        restore = random_delta(pre, 0.003, 11)
        fed.clients["a"].upload(update_body(restore, "a", 1, 5))
        fed.wait_round(2)
        g2, m2 = read_model_file(fed.paths.global_model(2))
        assert _close(g2, {k: v + restore[k] if v.is_floating_point() else v for k, v in g1.items()})
        assert [u["site"] for u in m2.extra["updates"]] == ["a"]
        try:
            fed.clients["a"].upload(update_body(random_delta(pre, 0.01, 10), "a", 2, 5))
            raise AssertionError("a third update from the restoring site was accepted")
        except ServerRefused as exc:
            assert "already contributed" in str(exc)

        # SIGKILL: the restarted aggregator keeps the restoration and adds it to the late vector's merge
        fed.proc.proc.kill()  # type: ignore[union-attr]
        fed.proc.proc.wait()  # type: ignore[union-attr]
        fed.url = fed.proc.start()
        for c in fed.clients.values():
            c.close()
        fed.clients = {s: fed.client(s) for s in "abc"}
        fed.clients["c"].upload(update_body(taus["c"], "c", 2, 3))
        fed.wait_round(3)
        g3, _ = read_model_file(fed.paths.global_model(3))
        want3 = {k: v + taus["a"][k] + taus["b"][k] + taus["c"][k] + restore[k] if v.is_floating_point() else v
                 for k, v in pre.items()}
        assert _close(g3, want3)
    finally:
        fed.close()


def test_restoring_site_config_is_checked() -> None:
    import pytest

    with pytest.raises(ValueError, match="restore_site"):
        strategy_config(FederationConfig(strategy={"name": "data_vectors", "restore": "finetune"}))


def test_restoring_sites_two_jobs_end_at_its_target_epsilon(tmp_path, data_root) -> None:  # type: ignore[no-untyped-def]
    """The restoring site calibrates σ over its vector's steps plus the restoration's: both jobs, one σ,
    and the ledger ends at the target ε (not past it, not far below)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
    from ptrain_utils import SITE, small_config, tile_monuseg

    from fedcore.io import atomic_write_json
    from fedcore.layout import RunLayout
    from federation.strategies.data_vectors import DataVectorSite
    from pipeline.models import build_model
    from pipeline.privacy import PrivacyLedger

    run = tmp_path / "run"
    tile_monuseg(data_root, run, tile_size=32)
    cfg = small_config(run, max_steps=4, privacy={"enabled": True, "target_epsilon": 4.0})
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 3})})
    site = DataVectorSite(DataVectorsConfig(restore="finetune", restore_site=SITE, restore_steps=2))
    pre = build_model(cfg.model).state_dict()
    first = site.train(cfg, SITE, 0, pre, None)
    lay = RunLayout(run).site(SITE)
    atomic_write_json(lay.done(0), {"outcome": "uploaded"})  # what the round job writes after the upload
    assert site.contributed_enough(cfg, SITE, [0]) is False and site.contributed_enough(cfg, SITE, [0, 1])
    second = site.train(cfg, SITE, 1, first.state, None)
    assert first.steps == 4 and second.steps == 2 and first.noise_multiplier == second.noise_multiplier
    ledger = PrivacyLedger.load(lay.privacy)
    assert [e.job for e in ledger.entries] == ["data-vector", "restore"]
    assert 3.9 <= ledger.epsilon <= 4.0 + 1e-6


def test_lambda_tuned_on_the_servers_labelled_tiles(tmp_path, data_root) -> None:  # type: ignore[no-untyped-def]
    import sys
    from pathlib import Path

    import pytest

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
    from fedtest_utils import TINY_MODEL
    from ptrain_utils import tile_monuseg

    from federation.strategies import ServerContext
    from pipeline.config import ModelConfig
    from pipeline.merging import merge, validation_dice
    from pipeline.models import build_model

    store = tile_monuseg(data_root, tmp_path / "val", tile_size=32)
    mcfg = ModelConfig.model_validate(TINY_MODEL)

    def builder() -> torch.nn.Module:
        return build_model(mcfg)

    pre = builder().state_dict()
    total = random_delta(pre, 0.2, 3)
    dv = DataVectors(DataVectorsConfig(lam="tuned"))
    with pytest.raises(ValueError, match="server_val_manifest"):
        dv.tuned_lambda(pre, total, 2)
    dv.bind(ServerContext(model_builder=builder, server_val_store=store))
    lam = dv.tuned_lambda(pre, total, 2)
    scores = dv.last_tuning["scores"]
    assert len(scores) >= 8 and 0.5 in scores and 1.0 in scores  # the grid holds the mean and the sum
    assert scores[lam] == max(scores.values())
    assert scores[lam] == pytest.approx(validation_dice(builder, merge(pre, [total], lam), store))

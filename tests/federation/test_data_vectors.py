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

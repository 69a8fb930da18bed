"""Federation v2: typed payloads, the strategy registry, streaming aggregation, low-rank FedMIC payloads."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
from fedtest_utils import TINY_MODEL, Fed, random_delta, write_config

from fedcore.layout import RunLayout
from federation.lowrank import SEP, compress, decompress, lowrank_spec, max_rank, payload_nbytes
from federation.payloads import FitConfig, PayloadSpec, TensorDecl, UpdateMeta, full_delta_spec
from federation.strategies import (
    REGISTRY,
    CentralDP,
    FedAvg,
    FedMIC,
    ServerContext,
    UpdateInfo,
    build_strategy,
    strategy_config,
)
from federation.strategies.base import float_names, streaming_sum
from federation.strategies.dp import l2_norm
from federation.strategies.fedmic import FedMICConfig
from federation.wire import (
    WireError,
    atomic_write_bytes,
    encode_state,
    spec_of,
    state_digest,
    update_metadata,
)
from pipeline.config import ConfigError, FederationConfig, load_config
from pipeline.dprandom import SeededRandom

GLOBAL = {"conv.weight": torch.zeros(8, 4, 3, 3), "conv.bias": torch.zeros(8), "steps": torch.zeros(1, dtype=torch.int64)}


def _store(tmp: Path, site: str, payload: dict[str, torch.Tensor], n_tiles: int, norm: float) -> UpdateInfo:
    path = tmp / f"{site}.safetensors"
    meta = update_metadata(site=site, round=0, n_tiles=n_tiles, epsilon=None, update_id=site)
    atomic_write_bytes(path, encode_state(payload, meta))
    return UpdateInfo(site, 0, n_tiles, None, path, site, site, norm)


# -- typed payloads --------------------------------------------------------------------------------------
def test_payload_spec_checks_names_dtypes_shapes_and_rank_symbols() -> None:
    spec = lowrank_spec(spec_of(GLOBAL), None, "lowrank_delta")
    r = max_rank(8, 36)
    assert spec.dims["r:conv.weight"] == (1, r) and "conv.bias" in spec.tensors
    good = {"conv.weight::U": torch.zeros(8, 3), "conv.weight::V": torch.zeros(3, 36), "conv.bias": torch.zeros(8)}
    good["steps"] = torch.zeros(1, dtype=torch.int64)
    assert spec.validate(spec_of(good), "u") == {"r:conv.weight": 3}
    bad_rank = dict(good, **{"conv.weight::V": torch.zeros(4, 36)})
    with pytest.raises(WireError, match=r"'r:conv.weight' is 3 elsewhere"):
        spec.validate(spec_of(bad_rank), "u")
    too_big = dict(good, **{"conv.weight::U": torch.zeros(8, r + 1), "conv.weight::V": torch.zeros(r + 1, 36)})
    with pytest.raises(WireError, match=r"outside \[1, 6\]"):
        spec.validate(spec_of(too_big), "u")
    with pytest.raises(WireError, match="missing tensor 'conv.bias'"):
        spec.validate(spec_of({k: v for k, v in good.items() if k != "conv.bias"}), "u")
    with pytest.raises(WireError, match="dtype F64"):
        spec.validate(spec_of(dict(good, **{"conv.bias": torch.zeros(8, dtype=torch.float64)})), "u")
    # FedAvg declares a full delta: the factors are not what it expects
    with pytest.raises(WireError, match="unexpected tensor|missing tensor"):
        full_delta_spec(spec_of(GLOBAL), None).validate(spec_of(good), "u")
    # a data-vector payload: one scalar per site, bounded
    tau = PayloadSpec("data_vector", {"tau": TensorDecl(frozenset({"F32"}), (1,))}, max_abs=1.0)
    assert tau.validate(spec_of({"tau": torch.zeros(1)}), "u") == {}


def test_update_meta_is_typed_and_reads_older_headers() -> None:
    old = update_metadata(site="a", round=2, n_tiles=5, epsilon=1.5, update_id="x", extra={"steps": 3})
    meta = UpdateMeta.from_header(old, "u", max_n_tiles=10)
    assert (meta.site, meta.round, meta.n_tiles, meta.epsilon, meta.kind) == ("a", 2, 5, 1.5, "full_delta")
    assert meta.extra == {"steps": 3}
    assert UpdateMeta.from_header(meta.to_header(), "u") == meta
    for bad, why in (
        ({"n_tiles": 0}, "n_tiles"),
        ({"round": True}, "round"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"site": "../x"}, "site"),
    ):
        data = json.loads(old["fedpath_update"]) | bad
        with pytest.raises(WireError, match=why):
            UpdateMeta.from_header({"fedpath_update": json.dumps(data)}, "u")
    with pytest.raises(WireError, match="exceeds federation.max_n_tiles=4"):
        UpdateMeta.from_header(old, "u", max_n_tiles=4)


# -- registry and configs ----------------------------------------------------------------------------------
def test_registry_builds_every_strategy_from_old_and_new_configs(tmp_path: Path) -> None:
    assert set(REGISTRY) == {
        "fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "fedmic", "data_vectors", "universal"
    }
    # the older form: a name, options from the flat keys
    prox = build_strategy(FederationConfig(strategy="fedprox", proximal_mu=0.3), 2)
    assert prox.configure_fit(0).proximal_mu == 0.3
    # the new form: a mapping validated against the discriminated union
    mic = build_strategy(FederationConfig(strategy={"name": "fedmic", "energy_start": 0.8, "energy_rounds": 3}), 2)
    assert isinstance(mic, FedMIC)
    assert [round(mic.configure_fit(r).energy or 0, 4) for r in range(4)] == [0.8, 0.89, 0.98, 0.98]
    adam = strategy_config(FederationConfig(strategy={"name": "fedadam", "server_lr": 0.5}))
    assert adam.server_lr == 0.5  # type: ignore[attr-defined]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("federation:\n  strategy: {name: fedmic, energyy: 0.95}\n")
    with pytest.raises(ConfigError, match=r"^federation.strategy: unknown key 'energyy' for strategy fedmic$"):
        strategy_config(load_config(cfg).federation)
    with pytest.raises(ConfigError, match=r"unknown strategy 'fedsgd'"):
        strategy_config(FederationConfig(strategy="fedsgd"))
    with pytest.raises(ConfigError, match=r"energy_start"):
        strategy_config(FederationConfig(strategy={"name": "fedmic", "energy_start": 1.5}))


# -- streaming aggregation ---------------------------------------------------------------------------------
def test_streaming_accumulation_matches_the_close_time_average(tmp_path: Path) -> None:
    ups, deltas = [], []
    for i, n in enumerate([3, 5, 9]):
        d = random_delta({k: v for k, v in GLOBAL.items() if k != "steps"}, 0.1, i)
        d["steps"] = torch.zeros(1, dtype=torch.int64)
        deltas.append(d)
        ups.append(_store(tmp_path, f"s{i}", d, n, l2_norm(d)))
    names = float_names(GLOBAL)
    before = streaming_sum(ups, lambda u: u.n_tiles / 17, names, GLOBAL)  # the previous implementation
    s = FedAvg()
    acc = s.new_accumulator(GLOBAL, 0)
    for u in ups:
        s.on_update(acc, u)
    got = s.aggregate(GLOBAL, ups, 0, accumulated=acc)
    for k in names:
        torch.testing.assert_close(got[k], GLOBAL[k] + before[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(got["steps"], GLOBAL["steps"])
    # an accumulator that misses an update is not used: the close recomputes from the files
    partial = s.new_accumulator(GLOBAL, 0)
    s.on_update(partial, ups[0])
    torch.testing.assert_close(s.aggregate(GLOBAL, ups, 0, accumulated=partial)["conv.weight"], got["conv.weight"])
    # central DP: clipped uniform sum + seeded noise, the same streamed or recomputed
    c = CentralDP(FedAvg(), clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, n_sites=3)
    acc = c.new_accumulator(GLOBAL, 0)
    for u in ups:
        c.on_update(acc, u)
    a = c.finish(acc, 0, SeededRandom(7))
    b = c.average(GLOBAL, ups, 0, SeededRandom(7))
    clip = streaming_sum(ups, lambda u: min(1.0, 0.5 / u.norm), names, GLOBAL)
    noise = SeededRandom(7)
    for k in names:
        torch.testing.assert_close(a[k], b[k])
        torch.testing.assert_close(a[k], noise.add_gaussian(clip[k], 0.5).div_(3), rtol=1e-5, atol=1e-6)


# -- low-rank payloads ------------------------------------------------------------------------------------
def test_lowrank_keeps_the_energy_share_and_decodes_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(64, 4, generator=g) @ torch.randn(4, 288, generator=g)  # rank 4 + small noise
    delta = {"w": (low + 0.01 * torch.randn(64, 288, generator=g)).reshape(64, 32, 3, 3), "b": torch.randn(64)}
    for energy in (0.9, 0.98):
        p = compress(delta, energy)
        u, v = p["w" + SEP + "U"], p["w" + SEP + "V"]
        assert u.shape[1] == v.shape[0] <= 4
        back = decompress(p, spec_of(delta))
        kept = 1 - float((back["w"] - delta["w"]).pow(2).sum() / delta["w"].pow(2).sum())
        assert kept >= energy
        torch.testing.assert_close(back["b"], delta["b"])
        assert math.isclose(float(u.norm()), float(back["w"].norm()), rel_tol=1e-4)  # ||U V|| = ||U||
        assert payload_nbytes(p) * 5 < payload_nbytes(delta)
    # full-rank noise (what DP-SGD adds): the energy rule alone sends nearly everything; the rank cap
    # bounds the bytes whatever the noise
    noise = {"w": torch.randn(64, 288, generator=g).reshape(64, 32, 3, 3)}
    full = compress(noise, 0.98, torch.float16)
    capped = compress(noise, 0.98, torch.float16, rank_fraction=0.4)
    assert payload_nbytes(full) * 2.5 > payload_nbytes(noise)
    assert payload_nbytes(capped) * 5 <= payload_nbytes(noise)
    assert capped["w" + SEP + "U"].shape[1] == int(0.4 * max_rank(64, 288))


def test_int8_factors_buy_twice_the_rank_and_stream_with_their_scales() -> None:
    """int8 factors with one scale per rank component: within half a quantisation step of the float
    factors' product, half float16's bytes at the same rank (so a 0.75 cap of the break-even rank is about as small
    as float16's 0.4), declared with their scales, and decoded the same streamed or whole."""
    from federation.lowrank import SCALE, iter_decompressed

    g = torch.Generator().manual_seed(1)
    delta = {"w": torch.randn(64, 32, 3, 3, generator=g), "b": torch.randn(64, generator=g)}
    f16 = compress(delta, 0.98, torch.float16, rank_fraction=0.4)
    q8 = compress(delta, 0.98, torch.int8, rank_fraction=0.75)
    r16, r8 = f16["w" + SEP + "U"].shape[1], q8["w" + SEP + "U"].shape[1]
    assert r8 == int(0.75 * max_rank(64, 288)) and r8 >= 1.8 * r16
    assert q8["w" + SEP + "U"].dtype == torch.int8 and q8["w" + SEP + "V" + SCALE].shape == (r8,)
    assert payload_nbytes(q8) * 5 <= payload_nbytes(delta) and payload_nbytes(q8) < 1.1 * payload_nbytes(f16)
    ref = compress(delta, 0.98, torch.float32, rank_fraction=0.75)
    want = decompress(ref, spec_of(delta))["w"]
    got = decompress(q8, spec_of(delta))["w"]
    assert float((got - want).norm() / want.norm()) < 0.02  # rounding: far below what truncation leaves out
    kept16 = float((decompress(f16, spec_of(delta))["w"] - delta["w"]).norm())
    assert float((got - delta["w"]).norm()) < kept16  # twice the rank: closer to the delta for the same bytes
    spec = lowrank_spec(spec_of(delta), None, "lowrank_delta", "I8")
    ranks = spec.validate(spec_of(q8), "upload")
    assert ranks == {"r:w": r8}
    with pytest.raises(WireError, match="U.scale"):
        spec.validate(spec_of({k: v for k, v in q8.items() if not k.endswith("U" + SCALE)}), "upload")
    streamed = dict(iter_decompressed(iter(sorted(q8.items())), ["w", "b"], {"w": (64, 32, 3, 3), "b": (64,)}))
    torch.testing.assert_close(streamed["w"], got)
    torch.testing.assert_close(streamed["b"], delta["b"])


# -- the live service with a low-rank strategy --------------------------------------------------------------
@pytest.mark.parametrize("factor_dtype", ["float16", "int8"])
def test_fedmic_service_validates_factors_streams_and_publishes_compressed_versions(tmp_path: Path, factor_dtype: str) -> None:
    strategy = {"name": "fedmic", "energy_start": 0.9, "energy_rounds": 2, "factor_dtype": factor_dtype}
    fed = Fed(tmp_path, ["a", "b"], rounds=2, strategy=strategy)
    try:
        st = fed.clients["a"].status()
        assert st.payload == "lowrank_delta" and st.fit.energy == pytest.approx(0.9)
        g0 = fed.global0
        mic = FedMIC(FedMICConfig.model_validate(strategy))
        mic.bind(ServerContext(global_spec=spec_of(g0)))
        bodies = {}
        for i, s in enumerate("ab"):
            delta = random_delta(g0, 0.01, i)
            meta = UpdateMeta(site=s, round=0, n_tiles=3 + i, update_id=uuid.uuid4().hex, kind="lowrank_delta")
            bodies[s] = encode_state(mic.encode_update(delta, st.fit), meta.to_header())
        full = encode_state(random_delta(g0, 0.01, 5), UpdateMeta(site="a", round=0, n_tiles=3).to_header())
        resp = fed.raw("a", fed.token("a"), full)  # a full delta is not the declared payload
        assert resp.status_code == 422 and "payload kind 'full_delta'" in resp.json()["detail"]
        assert fed.clients["a"].upload(bodies["a"])["status"] == "accepted"
        fed.clients["b"].upload(bodies["b"])
        state = fed.wait_round(1)
        assert state["history"][0]["sites"] == ["a", "b"]
        g1_path = fed.paths.global_model(1)
        from pipeline.checkpoint import read_model_file

        g1, meta1 = read_model_file(g1_path)
        assert [u["site"] for u in meta1.extra["updates"]] == ["a", "b"]
        assert all(u["staleness"] == 0 and u["based_on"] == 0 for u in meta1.extra["updates"])
        # the download of version 1 as factors rebuilds it bit for bit from version 0
        client = fed.clients["a"]
        payload = client.download_delta(1)
        assert payload is not None and client.last_delta_digest == state_digest(g1)
        assert {t.dtype for k, t in payload.items() if k.endswith(SEP + "U")} == {mic.factor_dtype}
        from federation.lowrank import decompress_one
        from federation.strategies.fedmic import apply_delta

        rebuilt = {k: apply_delta(v, decompress_one(payload, k, tuple(v.shape))) for k, v in g0.items()}
        assert state_digest(rebuilt) == state_digest(g1)
        assert len(encode_state(payload)) < g1_path.stat().st_size  # random deltas: little to compress
    finally:
        fed.close()


def test_run_layout_names_every_path(tmp_path: Path) -> None:
    lay = RunLayout(tmp_path)
    assert lay.server.endpoint == tmp_path / "server" / "endpoint.json"
    assert lay.site("a").update(3) == tmp_path / "sites" / "a" / "rounds" / "3" / "update.safetensors"
    assert lay.site("a").update_privacy == tmp_path / "sites" / "a" / "update_privacy.json"
    from fedcore.errors import FedpathError

    with pytest.raises(FedpathError, match="site name"):
        lay.site("../etc")
    with pytest.raises(FedpathError, match="round"):
        lay.server.update(-1, "a")
    assert FitConfig().proximal_mu == 0.0 and TINY_MODEL["name"] == "unet"


def test_fedmic_server_error_feedback_delays_what_factors_leave_out_and_loses_nothing() -> None:
    """Published deltas plus the server's residual add up to every averaged delta (error feedback); without
    it the tail each round's factors drop is lost for good. A retried publish and a restart change nothing."""
    g0 = {"w": torch.randn(24, 72, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(24)}
    deltas = [random_delta(g0, 0.01, r) for r in range(4)]
    total = {k: sum(d[k] for d in deltas) for k in g0}
    finals = {}
    for ef in (True, False):
        mic = FedMIC(FedMICConfig(energy_start=0.5, energy_end=0.5, energy_rounds=1, error_feedback=ef))
        g = g0
        for r, d in enumerate(deltas):
            if r == 3:  # a restarted aggregator: the residual comes back from its saved state
                tensors, meta = mic.state_dict()
                mic = FedMIC(mic.cfg)
                mic.load_state_dict(tensors, meta)
                retry = mic.apply(g, d, r)  # a publish retried after a crash applies round 3 again
            g = mic.apply(g, d, r)
            if r == 3:
                assert all(torch.equal(g[k], retry[k]) for k in g)
        moved = {k: g[k] - g0[k] for k in g0}
        if ef:
            assert set(mic.residual) == {"w", "b"} and l2_norm(mic.residual) > 0
            kept = {k: moved[k] + mic.residual[k] for k in g0}
            assert all(torch.allclose(kept[k], total[k], atol=1e-5) for k in g0)
        else:
            assert mic.residual == {}
        finals[ef] = l2_norm({k: moved[k] - total[k] for k in g0}) / l2_norm(total)
    # random deltas at half the energy: without feedback most of the four rounds' tails are lost
    assert finals[True] < 0.7 * finals[False], finals


def test_fedmic_site_error_feedback_keeps_its_residual_privately_and_a_rerun_adds_it_once(tmp_path: Path) -> None:
    from federation.fedmic_site import FedMICSite
    from federation.site_state import SiteState

    cfg = load_config(write_config(tmp_path, ["a"], strategy={"name": "fedmic"}))
    mic = FedMIC(FedMICConfig(energy_start=0.5, energy_end=0.5, energy_rounds=1))
    fit = mic.configure_fit(0)
    assert fit.extra["error_feedback"] is True
    like = {"w": torch.zeros(24, 72), "b": torch.zeros(24)}
    spec = spec_of(like)
    deltas = [random_delta(like, 0.01, 10 + r) for r in range(3)]
    site = FedMICSite()
    sent = []
    for r, d in enumerate(deltas):
        payload = site.encode_update(mic, cfg, "a", r, d, fit)
        if r == 2:  # the job killed after saving its residual, re-run: the same upload, the residual added once
            again = site.encode_update(mic, cfg, "a", r, d, fit)
            assert all(torch.equal(payload[k], again[k]) for k in payload)
        sent.append(decompress(payload, spec))
    state = SiteState(RunLayout(cfg.run_dir).site("a").state)
    left = state.residual_for(3)
    for k in like:
        got = sum(s[k] for s in sent) + left[k]
        assert torch.allclose(got, sum(d[k] for d in deltas), atol=1e-5)
    assert float(left["b"].abs().max()) == 0.0  # vectors are sent whole
    # without feedback the site keeps nothing and the payload is the strategy's own encoding
    off = mic.configure_fit(0).model_copy(update={"extra": {**fit.extra, "error_feedback": False}})
    plain = site.encode_update(mic, cfg, "b", 0, deltas[0], off)
    assert all(torch.equal(plain[k], mic.encode_update(deltas[0], off)[k]) for k in plain)
    assert not SiteState(RunLayout(cfg.run_dir).site("b").state).residual_path.exists()


def test_fedmic_personal_model_is_the_best_teacher_on_the_sites_validation_split(tmp_path: Path) -> None:
    """``personal_select: best`` (the default): the teacher of the round with the best validation Dice is
    the personal model, a re-run of that round replaces it, a worse round does not; ``last`` takes the
    last round's teacher, which the next round trains on either way."""
    from federation.fedmic_site import FedMICSite
    from federation.site_state import SiteState
    from pipeline.errors import FedpathError

    cfg = load_config(write_config(tmp_path, ["a"], strategy={"name": "fedmic", "teacher_width": 1.0}))
    state = SiteState(RunLayout(cfg.run_dir).site("a").state)
    teachers = [{"teacher.w": torch.full((3, 2), float(r)), "teacher.b": torch.full((3,), float(r))} for r in range(4)]

    def personal() -> dict[str, torch.Tensor]:
        got = FedMICSite().personal_model(cfg, "a", {})
        assert got is not None
        return got[0]

    for r, score in enumerate((0.60, 0.72, 0.70)):  # round 1 is the best so far
        state.save_personal(r, teachers[r])
        state.offer_best(r, teachers[r], score)
    assert all(float(v.flatten()[0]) == 1.0 for v in personal().values())
    kept = state.load_personal()  # what the next round trains on: the last round's teacher
    assert kept is not None and float(kept["teacher.w"][0, 0]) == 2.0
    assert state.offer_best(1, teachers[3], 0.50)  # a re-run of the best's own round replaces it
    assert all(float(v.flatten()[0]) == 3.0 for v in personal().values())
    assert not state.offer_best(2, teachers[2], 0.49)
    with pytest.raises(FedpathError, match="not finite"):
        state.offer_best(3, teachers[3], float("nan"))
    strat = dict(cfg.federation.strategy, personal_select="last")  # type: ignore[arg-type]
    last = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"strategy": strat})})
    got = FedMICSite().personal_model(last, "a", {})
    assert got is not None and all(float(v.flatten()[0]) == 2.0 for v in got[0].values())

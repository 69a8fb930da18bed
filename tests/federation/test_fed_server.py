"""The aggregator as a real process (uvicorn, TLS, loopback): auth, every rejection, idempotency, SIGKILL.

Every refused request must leave the server's durable state byte-for-byte unchanged and appear in the
audit log with its reason.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fedtest_utils import Fed, random_delta, update_body, write_config

from federation.provision import run_provision
from federation.server import Aggregator
from federation.wire import encode_state, update_metadata
from pipeline.checkpoint import read_model_file
from pipeline.config import load_config


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    f = Fed(
        tmp_path_factory.mktemp("fedserver"),
        ["a", "b", "c"],
        rounds=2,
        min_sites=2,
        close_policy="min_sites",
        max_body_mb=0.25,
        max_update_norm=50.0,
        audit_unauth_window_s=0.5,
    )
    yield f
    f.close()


def _bad_bodies(g: dict[str, torch.Tensor]) -> dict[str, tuple[str, Any, int, str]]:
    """name -> (site, body, expected status, expected code); all for site a, round 0."""
    ok = random_delta(g, 0.01, 0)
    first = next(iter(g))
    wrong_shape = dict(ok) | {first: torch.zeros(*g[first].shape[:-1], g[first].shape[-1] + 1)}
    missing = {k: v for k, v in ok.items() if k != first}
    wrong_dtype = dict(ok) | {first: ok[first].double()}
    nan = dict(ok) | {first: ok[first].clone().fill_(float("nan"))}
    inf = dict(ok) | {first: ok[first].clone().fill_(float("inf"))}
    big = random_delta(g, 100.0, 1)
    good = update_body(ok, "a", 0, 5)
    no_meta = encode_state(ok)
    bad_meta = encode_state(ok, update_metadata(site="a", round=0, n_tiles=0, epsilon=1.0, update_id="x"))

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold on the streamed body
        for _ in range(40):
            yield b"\0" * 10_000

    return {
        "wrong shape": ("a", update_body(wrong_shape, "a", 0, 5), 422, "invalid"),
        "missing tensor": ("a", update_body(missing, "a", 0, 5), 422, "invalid"),
        "wrong dtype": ("a", update_body(wrong_dtype, "a", 0, 5), 422, "invalid"),
        "NaN": ("a", update_body(nan, "a", 0, 5), 422, "invalid"),
        "Inf": ("a", update_body(inf, "a", 0, 5), 422, "invalid"),
        "norm bound": ("a", update_body(big, "a", 0, 5), 422, "norm"),
        "oversized": ("a", b"\0" * 300_000, 413, "too_large"),
        "oversized chunked": ("a", chunked(), 413, "too_large"),
        "malformed": ("a", b"this is not a safetensors file at all", 422, "malformed"),
        "truncated": ("a", good[: len(good) // 2], 422, "malformed"),
        "empty": ("a", b"", 422, "malformed"),
        "no metadata": ("a", no_meta, 422, "malformed"),
        "bad metadata": ("a", bad_meta, 422, "malformed"),
        "future round": ("a", update_body(ok, "a", 1, 5), 409, "not_open"),
        "other site's metadata": ("a", update_body(ok, "b", 0, 5), 403, "site_mismatch"),
    }


def test_every_rejection_is_a_4xx_with_a_reason_and_changes_nothing(fed: Fed) -> None:
    before = fed.snapshot()
    body = update_body(random_delta(fed.global0, 0.01, 0), "a", 0, 5)
    auth_cases = {
        "missing token": (fed.raw("a", None, body), 401),
        "wrong token": (fed.raw("a", "not-the-token", body), 401),
        "token of another site": (fed.raw("a", fed.token("b"), body), 401),
        "unknown site": (fed.raw("mallory", fed.token("a"), body), 401),
        "no site": (fed.raw(None, fed.token("a"), body), 401),
    }
    for name, (resp, status) in auth_cases.items():
        assert resp.status_code == status, name
        assert resp.json()["detail"], name
    # one uniform answer: it does not tell which site names exist
    assert len({(r.status_code, r.text) for r, _ in auth_cases.values()}) == 1
    for name, (site, bad, status, code) in _bad_bodies(fed.global0).items():
        resp = fed.raw(site, fed.token(site), bad)
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text}"
        assert resp.json()["code"] == code, name
        assert resp.json()["detail"], name
        assert fed.snapshot() == before, f"{name} changed the server state"
    with pytest.raises(httpx.HTTPStatusError):
        httpx.get(f"{fed.url}/v1/status", verify=False).raise_for_status()  # status needs a token too
    assert fed.snapshot() == before
    rejected = [e for e in fed.audit() if e["outcome"] == "rejected"]
    assert len(rejected) >= len(_bad_bodies(fed.global0))
    assert all(e["reason"] for e in rejected)
    # failed authentications: the first of the address in full, the rest counted in a window summary
    end = time.monotonic() + 10
    while not [e for e in fed.audit() if e["outcome"] == "summary"] and time.monotonic() < end:
        time.sleep(0.1)
    unauth = [e for e in fed.audit() if e["outcome"] in ("unauthenticated", "summary")]
    assert unauth and all(e["reason"] for e in unauth)
    assert sum(e.get("count", 0) for e in unauth) >= len(auth_cases)
    assert any("mallory" in e.get("sites", {}) for e in unauth)
    assert not list((fed.paths.updates(0)).glob(".incoming-*"))


def test_rounds_idempotent_resubmit_late_updates_and_fedavg(fed: Fed) -> None:
    g0 = fed.global0
    da, db = random_delta(g0, 0.01, 10), random_delta(g0, 0.02, 11)
    body_a = update_body(da, "a", 0, 10)
    ack1 = fed.clients["a"].upload(body_a)
    assert ack1["status"] == "accepted" and ack1["round"] == 0
    stored = fed.paths.update(0, "a").read_bytes()
    assert stored == body_a
    assert fed.clients["a"].upload(body_a) == ack1  # the same update again: same ack, nothing new
    assert fed.paths.update(0, "a").read_bytes() == stored
    resp = fed.raw("a", fed.token("a"), update_body(da, "a", 0, 11))
    assert resp.status_code == 409 and resp.json()["code"] == "conflict"
    st = fed.clients["c"].status()
    assert st.sites_reported == ["a"] and st.submitted is False
    assert fed.clients["a"].status().submitted is True

    fed.clients["b"].upload(update_body(db, "b", 0, 30))  # k = 2 reached: the round closes
    state = fed.wait_round(1)
    assert state["history"][0]["sites"] == ["a", "b"]
    g1, meta = read_model_file(fed.paths.global_model(1))
    assert meta.round == 1 and meta.source == "global"
    for k in g0:
        want = g0[k] + (10 * da[k] + 30 * db[k]) / 40
        torch.testing.assert_close(g1[k], want, rtol=1e-5, atol=1e-6)
    # the model endpoint serves each round's global model
    got, gmeta = fed.clients["c"].download_model(1)
    assert gmeta.round == 1 and all(torch.equal(got[k], g1[k]) for k in g1)

    before = fed.snapshot()
    late = fed.raw("c", fed.token("c"), update_body(random_delta(g0, 0.01, 12), "c", 0, 5))
    assert late.status_code == 409 and late.json()["code"] == "closed"
    assert fed.snapshot() == before
    assert fed.clients["a"].upload(body_a) == ack1  # re-send after the round closed is still idempotent

    fed.clients["a"].upload(update_body(random_delta(g0, 0.01, 13), "a", 1, 10))
    fed.clients["c"].upload(update_body(random_delta(g0, 0.01, 14), "c", 1, 10))
    state = fed.wait_round(2)
    assert state["phase"] == "finished" and fed.clients["b"].status().phase == "finished"
    done = fed.raw("b", fed.token("b"), update_body(random_delta(g0, 0.01, 15), "b", 1, 5))
    assert done.status_code == 409 and done.json()["code"] == "finished"
    outcomes = {e["outcome"] for e in fed.audit()}
    assert {"accepted", "duplicate", "rejected", "published", "ok"} <= outcomes


def test_sigkill_mid_round_and_mid_upload_then_restart_finishes_the_round(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b", "c"], rounds=1, min_sites=3)
    try:
        g0 = fed.global0
        deltas = {s: random_delta(g0, 0.01, i) for i, s in enumerate("abc")}
        tiles = {"a": 3, "b": 5, "c": 8}
        bodies = {s: update_body(deltas[s], s, 0, tiles[s]) for s in "abc"}
        acks = {s: fed.clients[s].upload(bodies[s]) for s in "ab"}

        # an upload in flight when the server dies must not count
        release = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield bodies["c"][:1000]
            release.wait(30)
            yield bodies["c"][1000:]

        t = threading.Thread(target=lambda: _swallow(lambda: fed.raw("c", fed.token("c"), slow_body())))
        t.start()
        end = time.monotonic() + 20
        while not list(fed.paths.updates(0).glob(".incoming-*")) and time.monotonic() < end:
            time.sleep(0.05)
        assert list(fed.paths.updates(0).glob(".incoming-*")), "the in-flight upload never started"
        for c in fed.clients.values():
            c.close()
        assert fed.proc.proc is not None
        fed.proc.proc.kill()  # SIGKILL
        fed.proc.proc.wait()
        release.set()
        t.join(30)

        fed.url = fed.proc.start()  # a fresh ephemeral port
        fed.clients = {s: fed.client(s) for s in "abc"}
        st = fed.clients["c"].status()
        assert st.round == 0 and st.sites_reported == ["a", "b"] and st.submitted is False
        assert not list(fed.paths.updates(0).glob(".incoming-*"))
        assert fed.clients["a"].upload(bodies["a"]) == acks["a"]  # idempotent across the restart
        fed.clients["c"].upload(bodies["c"])
        state = fed.wait_round(1)
        assert state["phase"] == "finished" and state["history"][0]["sites"] == ["a", "b", "c"]
        g1, _ = read_model_file(fed.paths.global_model(1))
        for k in g0:
            want = g0[k] + sum(tiles[s] * deltas[s][k] for s in "abc") / sum(tiles.values())
            torch.testing.assert_close(g1[k], want, rtol=1e-5, atol=1e-6)
    finally:
        fed.close()


def _swallow(fn: Any) -> None:
    try:
        fn()
    except httpx.HTTPError:
        pass


def _submit(agg: Aggregator, site: str, body: bytes) -> dict[str, Any]:
    import hashlib

    tmp = agg.incoming_path()
    tmp.write_bytes(body)
    ack, _ = agg.submit(site, tmp, hashlib.sha256(body).hexdigest())
    return ack


def test_recovery_after_a_kill_during_aggregation_and_after_publishing(tmp_path: Path) -> None:
    """Crash points inside close_round, reproduced by rewinding state.json as a kill would leave it."""
    cfg = load_config(write_config(tmp_path, ["a", "b", "c"], rounds=2, min_sites=2, round_deadline_s=5.0))
    run_provision(cfg)
    agg = Aggregator(cfg)
    g0 = agg.global_state
    for i, s in enumerate("ab"):
        _submit(agg, s, update_body(random_delta(g0, 0.01, i), s, 0, 4))
    # all_or_deadline: 2 of 3 reported, so the round closes only at the deadline
    assert not agg.should_close(now=agg.opened_at + 1)
    assert agg.should_close(now=agg.deadline() + 0.01)
    paths = agg.paths

    # killed mid-aggregation: state.json says "aggregating", no round_1 yet
    agg.phase = "aggregating"
    agg._write_state()
    agg2 = Aggregator(cfg)
    assert agg2.round == 0 and sorted(agg2.accepted) == ["a", "b"] and agg2.resume_close
    assert agg2.should_close(now=agg2.opened_at)  # resumes at once, whatever the deadline
    assert agg2.close_round()
    g1 = paths.global_model(1).read_bytes()

    # killed after publishing round_1 but before state.json moved on: roll forward, do not re-aggregate
    state = json.loads(paths.state.read_text())
    state.update(round=0, phase="aggregating", history=[])
    paths.state.write_text(json.dumps(state))
    agg3 = Aggregator(cfg)
    assert agg3.round == 1 and agg3.phase == "open" and not agg3.accepted
    assert paths.global_model(1).read_bytes() == g1
    assert agg3.history[0]["sites"] == ["a", "b"]


def test_late_update_counts_in_the_next_round_when_configured(tmp_path: Path) -> None:
    cfg = load_config(
        write_config(
            tmp_path,
            ["a", "b", "c"],
            rounds=3,
            min_sites=2,
            close_policy="min_sites",
            late_updates="next_round",
        )
    )
    run_provision(cfg)
    agg = Aggregator(cfg)
    g0 = agg.global_state
    for i, s in enumerate("ab"):
        _submit(agg, s, update_body(random_delta(g0, 0.01, i), s, 0, 4))
    assert agg.should_close() and agg.close_round() and agg.round == 1
    late = update_body(random_delta(g0, 0.01, 9), "c", 0, 4)
    ack = _submit(agg, "c", late)
    assert ack["round"] == 1 and ack["update_round"] == 0
    assert agg.accepted["c"].late_from == 0
    assert agg.paths.update(1, "c").read_bytes() == late
    assert _submit(agg, "c", late) == ack  # idempotent as well
    # c has now used its slot in round 1: its own round-1 update is a conflict
    with pytest.raises(Exception, match="already submitted"):
        _submit(agg, "c", update_body(random_delta(g0, 0.01, 10), "c", 1, 4))
    _submit(agg, "a", update_body(random_delta(g0, 0.01, 11), "a", 1, 4))
    assert agg.close_round()
    assert agg.history[1]["late"] == {"c": 0}


def test_server_strategy_state_survives_a_restart(tmp_path: Path) -> None:
    """FedAdam's moments and the central-DP accountant are durable server state, saved with each model."""
    cfg = load_config(
        write_config(
            tmp_path,
            ["a", "b"],
            rounds=2,
            strategy="fedadam",
            update_dp={"mode": "central", "clip_norm": 0.5, "noise_multiplier": 1.2, "delta": 1e-5},
        )
    )
    run_provision(cfg)
    agg = Aggregator(cfg)
    g0 = agg.global_state
    for i, s in enumerate("ab"):
        _submit(agg, s, update_body(random_delta(g0, 0.01, i), s, 0, 4))
    assert agg.close_round()
    eps1 = agg.strategy.privacy_report()["epsilon"]  # type: ignore[index]
    m1 = {k: v.clone() for k, v in agg.strategy.inner.m.items()}  # type: ignore[attr-defined]

    restarted = Aggregator(cfg)
    report = restarted.strategy.privacy_report()
    assert report is not None and report["rounds"] == 1 and report["epsilon"] == pytest.approx(eps1)
    inner = restarted.strategy.inner  # type: ignore[attr-defined]
    assert m1.keys() == inner.m.keys() and all(torch.equal(m1[k], inner.m[k]) for k in m1)
    for i, s in enumerate("ab"):
        _submit(restarted, s, update_body(random_delta(g0, 0.01, 5 + i), s, 1, 4))
    assert restarted.close_round() and restarted.phase == "finished"
    state = json.loads(restarted.paths.state.read_text())
    assert state["central_privacy"]["rounds"] == 2 and state["central_privacy"]["epsilon"] > eps1


def test_a_site_that_never_arrives_does_not_stop_a_round_with_k_sites(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b", "c"], rounds=1, min_sites=2, round_deadline_s=4.0)
    try:
        for i, s in enumerate("ab"):
            fed.clients[s].upload(update_body(random_delta(fed.global0, 0.01, i), s, 0, 3))
        state = fed.wait_round(1, timeout=60)
        assert state["phase"] == "finished" and state["history"][0]["sites"] == ["a", "b"]
        # all_or_deadline: with k of n reported it waited for c until the deadline, then closed without it
        assert state["history"][0]["closed_at"] >= fed.opened0 + 4.0
    finally:
        fed.close()

"""Issue 14: no site, stranger or full disk can corrupt, stall or escape the federation.

Every test runs the real aggregator process (``python -m federation.server``, TLS on loopback) and
asserts on what a client sees and on what is on disk. Disk-full conditions are real: the server
process's RLIMIT_FSIZE is lowered from outside (psutil), so its writes fail with EFBIG as they would
with ENOSPC, and raised again to let it recover.
"""

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from fedtest_utils import Fed, random_delta, update_body, write_config

from federation.provision import provision_paths, run_provision
from federation.server import HEADER_ALLOWANCE, HEADER_PER_TENSOR, model_nbytes, server_paths
from federation.wire import spec_of
from fedpath.simulate import AggregatorProcess
from pipeline.checkpoint import read_model_file
from pipeline.config import ConfigError, load_config
from pipeline.errors import FedpathError

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``fedpath ARGS`` as its own process."""
    return subprocess.run(
        [sys.executable, "-c", "from fedpath.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )


def _serve(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m federation.server`` expected to exit (a refusal)."""
    return subprocess.run(
        [sys.executable, "-m", "federation.server", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )


def _one_line_error(out: str) -> str:
    lines = [x for x in out.strip().splitlines() if x.strip()]
    assert "Traceback" not in out, out
    assert lines and lines[-1].startswith("error:"), out
    return lines[-1]


def _limit_disk(fed: Fed, nbytes: int | None) -> None:
    """Make the server's file writes beyond ``nbytes`` fail (EFBIG), as on a full disk; None lifts it."""
    assert fed.proc.proc is not None
    soft = psutil.RLIM_INFINITY if nbytes is None else nbytes
    psutil.Process(fed.proc.proc.pid).rlimit(psutil.RLIMIT_FSIZE, (soft, psutil.RLIM_INFINITY))


def _wait(pred: Any, timeout: float = 30, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


# -- one live service for the refusal-only tests (nothing here closes a round) -------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    f = Fed(
        tmp_path_factory.mktemp("hardening"),
        ["a", "b", "c", "d", "e"],
        rounds=2,
        min_sites=5,
        header_timeout_s=1.5,
        body_idle_timeout_s=1.5,
        keep_alive_s=1.0,
        max_concurrent_uploads=2,
        audit_unauth_window_s=0.5,
    )
    yield f
    f.close()


def test_n_tiles_out_of_range_is_refused_before_it_is_stored(live: Fed) -> None:
    """A site claiming 10^12 tiles (the whole aggregate) or 10^400 (OverflowError) is refused with a 4xx."""
    before = live.snapshot()
    delta = random_delta(live.global0, 0.01, 1)
    for n in (10**12, 10**400, live.cfg.federation.max_n_tiles + 1):
        resp = live.raw("a", live.token("a"), update_body(delta, "a", 0, n))
        assert resp.status_code == 422, resp.text
        assert "n_tiles" in resp.json()["detail"] and "max_n_tiles" in resp.json()["detail"]
        assert live.snapshot() == before
    assert live.clients["a"].status().limits["max_n_tiles"] == live.cfg.federation.max_n_tiles


def test_default_norm_bound_refuses_a_huge_update_with_the_reason(live: Fed) -> None:
    before = live.snapshot()
    huge = {k: torch.full_like(v, 1e15) for k, v in random_delta(live.global0, 1.0, 2).items()}
    resp = live.raw("a", live.token("a"), update_body(huge, "a", 0, 5))
    assert resp.status_code == 422 and resp.json()["code"] in ("norm", "invalid"), resp.text
    assert "norm" in resp.json()["detail"] or "too large" in resp.json()["detail"]
    moderate = random_delta(live.global0, 10.0, 3)  # RMS 10 per parameter: far past the default bound
    resp = live.raw("a", live.token("a"), update_body(moderate, "a", 0, 5))
    assert resp.status_code == 422 and resp.json()["code"] == "norm", resp.text
    n = sum(v.numel() for v in live.global0.values() if v.is_floating_point())
    bound = live.clients["a"].status().limits["max_update_norm"]
    assert bound == pytest.approx(live.cfg.federation.max_update_rms * math.sqrt(n))
    assert f"{bound:.4g}" in resp.json()["detail"]
    assert live.snapshot() == before


def test_default_body_limit_is_derived_from_the_model_size(live: Fed) -> None:
    spec = spec_of(live.global0)
    want = 8 + model_nbytes(spec) + HEADER_ALLOWANCE + HEADER_PER_TENSOR * len(spec)
    assert live.cfg.federation.max_body_mb is None
    assert live.clients["a"].status().limits["max_body_bytes"] == want < 1024 * 1024
    before = live.snapshot()
    resp = live.raw("a", live.token("a"), b"\0" * (want + 1))
    assert resp.status_code == 413 and resp.json()["code"] == "too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: enforced while streaming
        for _ in range(want // 10_000 + 2):
            yield b"\0" * 10_000

    resp = live.raw("a", live.token("a"), chunked())
    assert resp.status_code == 413 and resp.json()["code"] == "too_large"
    assert live.snapshot() == before


def test_failed_authentication_is_uniform_and_docs_are_closed(live: Fed) -> None:
    body = update_body(random_delta(live.global0, 0.01, 4), "a", 0, 5)
    answers = [
        live.raw("a", "wrong-token", body),  # a site that exists
        live.raw("zz-not-a-site", "wrong-token", body),  # one that does not
        live.raw("zz-not-a-site", live.token("a"), body),
        live.raw("a", None, body),
        live.raw(None, None, body),
        live.request("GET", "/v1/status", "zz-not-a-site", "x"),
        live.request("GET", "/v1/status", "b", "x"),
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({r.text for r in answers}) == 1, [r.text for r in answers]
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert live.request("GET", path, None, None).status_code == 404, path
        assert live.request("GET", path, "a", live.token("a")).status_code == 404, path


def test_refusal_reasons_never_carry_a_server_path(live: Fed) -> None:
    good = update_body(random_delta(live.global0, 0.01, 5), "a", 0, 5)
    first = next(iter(live.global0))
    nan = random_delta(live.global0, 0.01, 5) | {first: torch.full_like(live.global0[first], float("nan"))}
    bodies = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not safetensors at all",
        "bad header length": b"\xff" * 8 + good[8:],
        "NaN": update_body(nan, "a", 0, 5),
        "header only": good[:200],
    }
    roots = {str(live.paths.root), str(live.cfg.run_dir), str(live.cfg.run_dir.resolve()), "/tmp"}
    for name, body in bodies.items():
        resp = live.raw("a", live.token("a"), body)
        assert 400 <= resp.status_code < 500, (name, resp.text)
        detail = resp.json()["detail"]
        assert detail and not any(r in detail for r in roots), (name, detail)
        assert ".incoming" not in detail and "/" not in detail, (name, detail)
    bad_query = live.request("GET", "/v1/model", "a", live.token("a"), params={"round": "x"})
    assert bad_query.status_code == 422 and "round" in bad_query.json()["detail"]


def _tls_socket(fed: Fed) -> ssl.SSLSocket:
    host, port = fed.url.removeprefix("https://").split(":")
    raw = socket.create_connection((host, int(port)), timeout=10)
    return fed.ssl_context().wrap_socket(raw, server_hostname=host)


def _closed_within(sock: ssl.SSLSocket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection; (closed in time, what it sent)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return False, got
    except (ConnectionResetError, ssl.SSLError):
        pass
    return True, got


def test_slow_heads_and_slow_bodies_are_dropped_and_uploads_are_bounded(live: Fed) -> None:
    """Slowloris: a request head or body that stalls is dropped; at most max_concurrent_uploads at once."""
    before = live.snapshot()
    # a request head that never completes
    head = _tls_socket(live)
    head.sendall(b"POST /v1/update HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    closed, _ = _closed_within(head, 10)
    assert closed and time.monotonic() - t0 < 6
    # authenticated uploads whose bodies stall: two fill the upload slots, the third is turned away
    body = update_body(random_delta(live.global0, 0.01, 6), "b", 0, 5)
    stalled = []
    for site in ("b", "c"):
        s = _tls_socket(live)
        s.sendall(
            (
                f"POST /v1/update HTTP/1.1\r\nHost: x\r\nX-Fedpath-Site: {site}\r\n"
                f"Authorization: Bearer {live.token(site)}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[:100]
        )
        stalled.append(s)
    time.sleep(0.3)
    busy = live.raw("d", live.token("d"), update_body(random_delta(live.global0, 0.01, 7), "d", 0, 5))
    assert busy.status_code == 503 and busy.json()["code"] == "busy" and busy.headers.get("retry-after")
    t0 = time.monotonic()
    for s in stalled:
        closed, got = _closed_within(s, 10)
        assert closed and b" 408 " in got.split(b"\r\n", 1)[0], got[:200]
        s.close()
    assert time.monotonic() - t0 < 8
    assert live.snapshot() == before
    assert not list(live.paths.updates(0).glob(".incoming-*"))
    # the slots are free again: a real site is served
    ack = live.clients["d"].upload(update_body(random_delta(live.global0, 0.01, 8), "d", 0, 5))
    assert ack["status"] == "accepted"


def test_bad_site_names_never_reach_the_disk(tmp_path: Path, live: Fed) -> None:
    """``hosp/a`` and ``../../../escape`` are refused at config load, provisioning and by the service."""
    for bad in ("hosp/a", "../../../escape", "A", "", "x" * 65):
        cfg_path = write_config(tmp_path, [bad])
        with pytest.raises(ConfigError, match=r"sites\.0\.name"):
            load_config(cfg_path)
        res = _cli("provision", "--config", str(cfg_path))
        assert res.returncode == 2 and "sites.0.name" in res.stderr, res.stderr
    assert not list(tmp_path.rglob("*escape*")) and not (tmp_path / "run" / "provision").exists()

    # a token table edited by hand with such a name: the service refuses to start, in one line
    cfg_path = write_config(tmp_path, ["a"])
    cfg = load_config(cfg_path)
    prov = run_provision(cfg)
    table = json.loads(prov.tokens.read_text())
    table["sites"]["../../../escape"] = table["sites"]["a"]
    prov.tokens.write_text(json.dumps(table))
    res = _serve(cfg_path)
    assert res.returncode != 0
    line = _one_line_error(res.stderr)
    assert "tokens.json" in line and "escape" in line

    # and a live service answers such a name like any stranger, writing nothing anywhere
    body = update_body(random_delta(live.global0, 0.01, 9), "a", 0, 5)
    for site in ("../../../escape", "hosp/a", "A"):
        resp = live.raw(site, live.token("a"), body)
        assert resp.status_code == 401
    assert not [
        p for p in live.cfg.run_dir.parent.rglob("*") if "escape" in p.name or p.name == "x.safetensors"
    ]


def test_unauthenticated_flood_is_rate_limited_and_counted_not_logged(tmp_path: Path) -> None:
    """1000 strangers' requests: 401/429 only, a few hundred bytes of audit, a legitimate site still served."""
    fed = Fed(tmp_path, ["a", "b"], rounds=1, min_sites=2, unauth_burst=20, unauth_per_s=5.0)
    try:
        size0 = fed.paths.audit.stat().st_size if fed.paths.audit.exists() else 0
        statuses: dict[int, int] = {}
        with httpx.Client(verify=fed.ssl_context(), timeout=30) as c:
            # the first failure of the address is logged: with a client-chosen 10 kB site name, clipped
            r = c.get(
                f"{fed.url}/v1/status", headers={"X-Fedpath-Site": "m" * 10_000, "Authorization": "Bearer x"}
            )
            assert r.status_code == 401
            t0 = time.monotonic()
            for i in range(1000):  # GETs keep the connection alive: the flood is as fast as it gets
                r = c.get(
                    f"{fed.url}/v1/status",
                    headers={"X-Fedpath-Site": f"s{i % 7}", "Authorization": f"Bearer t{i}"},
                )
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            seconds = time.monotonic() - t0
        assert set(statuses) <= {401, 429}, statuses
        # the allowance: a burst of 20 (one used above) and 5 per second after it
        assert statuses.get(401, 0) <= 20 + 5.0 * seconds + 1, (statuses, seconds)
        grown = fed.paths.audit.stat().st_size - size0
        assert grown < 2048, f"audit grew by {grown} bytes for 2001 failed requests in {seconds:.1f} s"
        assert fed.clients["a"].status().round == 0  # same address, valid credentials: served
        fed.proc.stop()  # the window's summary is written at shutdown
        lines = fed.audit()
        assert max(len(json.dumps(e)) for e in lines) < 2048
        summary = [e for e in lines if e["outcome"] == "summary"]
        assert summary and sum(e["count"] for e in summary) == 1001
        assert sum(e["rate_limited"] for e in summary) == statuses[429]
    finally:
        fed.close()


def test_trimmed_mean_bounds_one_poisoned_site_of_five(tmp_path: Path) -> None:
    """One of five sites sends a large update (within its norm bound): trimmed mean barely moves."""
    fed = Fed(tmp_path, ["a", "b", "c", "d", "e"], rounds=1, min_sites=5, strategy="fedtrimmedavg")
    try:
        g0 = fed.global0
        common = random_delta(g0, 0.01, 100)
        honest = {
            s: {k: common[k] + 0.002 * v for k, v in random_delta(g0, 1.0, 200 + i).items()}
            for i, s in enumerate("abcd")
        }
        bound = fed.clients["a"].status().limits["max_update_norm"]
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in common.values()))
        poison = {k: -v * (0.95 * bound / norm) for k, v in common.items()}  # just inside the bound
        for s, d in honest.items():
            fed.clients[s].upload(update_body(d, s, 0, 10))
        fed.clients["e"].upload(update_body(poison, "e", 0, 10**6))
        fed.wait_round(1)
        g1, _ = read_model_file(fed.paths.global_model(1))
        target = {k: g0[k] + sum(honest[s][k] for s in honest) / 4 for k in g0}
        honest_norm = math.sqrt(sum(float((target[k] - g0[k]).pow(2).sum()) for k in g0))
        moved = math.sqrt(sum(float((g1[k] - target[k]).pow(2).sum()) for k in g0))
        # tolerance: 25% of the honest update's norm; a tile-weighted mean would move by ~bound
        assert moved < 0.25 * honest_norm, (moved, honest_norm)
        fedavg_moved = math.sqrt(
            sum(
                float(
                    (
                        (10 * sum(honest[s][k] for s in honest) + 10**6 * poison[k]) / (40 + 10**6)
                        + g0[k]
                        - target[k]
                    )
                    .pow(2)
                    .sum()
                )
                for k in g0
            )
        )
        assert fedavg_moved > 20 * honest_norm
    finally:
        fed.close()


def test_a_late_update_is_counted_once(tmp_path: Path) -> None:
    fed = Fed(
        tmp_path, ["a", "b", "c"], rounds=3, min_sites=2, close_policy="min_sites", late_updates="next_round"
    )
    try:
        g0 = fed.global0
        for i, s in enumerate("ab"):
            fed.clients[s].upload(update_body(random_delta(g0, 0.01, i), s, 0, 4))
        fed.wait_round(1)
        late = update_body(random_delta(g0, 0.01, 9), "c", 0, 4)
        ack = fed.clients["c"].upload(late)
        assert ack["round"] == 1 and ack["update_round"] == 0
        fed.clients["a"].upload(update_body(random_delta(g0, 0.01, 10), "a", 1, 4))
        state = fed.wait_round(2)
        assert state["history"][1]["late"] == {"c": 0}
        # the job re-sends its saved round-0 update (it never saw the ack): the same ack, not a new count
        assert fed.clients["c"].upload(late) == ack
        st = fed.clients["c"].status()
        assert st.round == 2 and st.sites_reported == [] and st.submitted is False
        assert not fed.paths.update(2, "c").exists()
    finally:
        fed.close()


def test_a_refused_update_is_final_for_the_site_job(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b"], rounds=1, min_sites=2, max_update_norm=1.0)
    try:
        job = fed.cfg.site_dir("a") / "rounds" / "0"
        job.mkdir(parents=True)
        (job / "update.safetensors").write_bytes(update_body(random_delta(fed.global0, 10.0, 1), "a", 0, 5))
        uploads = lambda: [e for e in fed.audit() if e["action"].endswith("/v1/update") and e["site"] == "a"]  # noqa: E731
        for attempt in range(2):
            res = _cli("site-round", "--config", str(fed.config_path), "--site", "a")
            assert res.returncode == 2, res.stderr
            line = " ".join(res.stderr.split())
            assert "refused" in line and "norm" in line and "not re-sending" in line, line
            assert "Traceback" not in res.stderr
            assert len(uploads()) == 1, f"run {attempt + 1} sent the refused update again"
        assert not (job / "update.safetensors").exists() and (job / "update.refused.safetensors").is_file()
        assert json.loads((job / "refused.json").read_text())["code"] == "norm"
    finally:
        fed.close()


def test_full_disk_while_saving_an_update_answers_507_and_stores_nothing(tmp_path: Path) -> None:
    """Before the commit rename: 507 and nothing stored. After it: 200, and the state catches up."""
    fed = Fed(tmp_path, ["a", "b"], rounds=1, min_sites=2)
    try:
        body = update_body(random_delta(fed.global0, 0.01, 1), "a", 0, 5)
        before = fed.snapshot()
        _limit_disk(fed, 0)
        resp = fed.raw("a", fed.token("a"), body)
        assert resp.status_code == 507 and resp.json()["code"] == "storage", resp.text
        assert "nothing was stored" in resp.json()["detail"] and resp.headers.get("retry-after")
        assert fed.clients["b"].status().sites_reported == []  # the answer and the state agree
        _limit_disk(fed, None)
        assert fed.snapshot() == before
        assert not list(fed.paths.updates(0).glob(".incoming-*"))
        ack = fed.clients["a"].upload(body)  # the retry is accepted, once
        assert ack["status"] == "accepted" and fed.clients["a"].upload(body) == ack
        assert fed.paths.update(0, "a").read_bytes() == body

        # after the commit rename, state.json cannot be written (its temporary name is taken by a
        # directory): the update is stored, so the answer is 200, and the state catches up once it can
        assert fed.proc.proc is not None
        blocker = fed.paths.root / f".state.json.{fed.proc.proc.pid}.tmp"
        blocker.mkdir()
        body_b = update_body(random_delta(fed.global0, 0.01, 2), "b", 0, 5)
        fed_b = fed.client("b")
        try:
            ack_b = fed_b.upload(body_b)
            assert ack_b["status"] == "accepted" and fed.paths.update(0, "b").read_bytes() == body_b
            st = fed.clients["a"].status()
            assert st.state_saved is False or st.round == 1
        finally:
            blocker.rmdir()
            fed_b.close()
        state = fed.wait_round(1)  # both updates counted: the round closed and state.json caught up
        assert state["history"][0]["sites"] == ["a", "b"] and state["phase"] == "finished"
    finally:
        fed.close()


def test_full_disk_during_publish_is_reported_and_retried_after_a_restart(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b"], rounds=1, min_sites=2, close_policy="min_sites")
    try:
        bodies = {s: update_body(random_delta(fed.global0, 0.01, i), s, 0, 4) for i, s in enumerate("ab")}
        # room for an update but not for the next global model (its header carries the model's metadata)
        global_size = fed.paths.global_model(0).stat().st_size
        limit = (len(bodies["a"]) + global_size) // 2
        assert len(bodies["a"]) < limit < global_size
        _limit_disk(fed, limit)
        for s in "ab":
            fed.clients[s].upload(bodies[s])
        st = _wait(
            lambda: (x := fed.clients["a"].status()).publish_failures >= 2 and x,
            what="two failed publish attempts",
        )
        assert st.phase == "open" and st.round == 0 and "storage error" in st.publish_error
        assert not fed.paths.global_model(1).exists()
        assert fed.proc.proc is not None
        fed.proc.proc.kill()  # the coordinator frees space and restarts the service
        fed.proc.proc.wait()
        fed.url = fed.proc.start()
        fed.clients = {s: fed.client(s) for s in "ab"}
        state = fed.wait_round(1)
        assert state["phase"] == "finished" and state["history"][0]["sites"] == ["a", "b"]
        assert fed.clients["a"].status().publish_error is None
        assert not list(fed.paths.global_model(1).parent.glob("*.tmp"))
    finally:
        fed.close()


def test_a_retried_close_advances_fedadam_and_central_dp_once(tmp_path: Path) -> None:
    clip = 1.0
    fed = Fed(
        tmp_path,
        ["a", "b"],
        rounds=2,
        min_sites=2,
        close_policy="min_sites",
        strategy="fedadam",
        update_dp={"mode": "central", "clip_norm": clip, "noise_multiplier": 0.0, "delta": 1e-5},
    )
    try:
        g0 = fed.global0
        deltas = {s: random_delta(g0, 0.01, i) for i, s in enumerate("ab")}
        bodies = {s: update_body(deltas[s], s, 0, 4) for s in "ab"}
        # room for the updates, not for the server state (FedAdam's two moments: twice the model)
        limit = int(1.5 * len(bodies["a"]))
        _limit_disk(fed, limit)
        for s in "ab":
            fed.clients[s].upload(bodies[s])
        st = _wait(
            lambda: (x := fed.clients["a"].status()).publish_failures >= 3 and x,
            what="three failed closes",
        )
        assert st.round == 0 and "storage error" in st.publish_error
        _limit_disk(fed, None)  # the disk is freed: the same process retries and publishes
        state = fed.wait_round(1)
        assert state["central_privacy"]["rounds"] == 1
        assert [h["round"] for h in state["central_privacy"]["history"]] == [0]
        assert [h["round"] for h in state["history"]] == [0]
        # one Adam step from m=0, v=tau^2 on the clipped uniform mean (noise 0): what one close gives
        f = fed.cfg.federation
        g1, _ = read_model_file(fed.paths.global_model(1))
        norms = {s: math.sqrt(sum(float(v.double().pow(2).sum()) for v in deltas[s].values())) for s in "ab"}
        for k in g0:
            avg = sum(deltas[s][k].double() * min(1.0, clip / norms[s]) for s in "ab") / 2
            m = (1 - f.server_beta1) * avg
            v = f.server_beta2 * f.server_tau**2 + (1 - f.server_beta2) * avg * avg
            want = g0[k].double() + f.server_lr * m / (v.sqrt() + f.server_tau)
            torch.testing.assert_close(g1[k].double(), want, rtol=1e-4, atol=1e-6)
    finally:
        fed.close()


def test_second_serve_on_one_run_directory_refuses_with_the_holders_pid(live: Fed) -> None:
    res = _serve(live.config_path)
    assert res.returncode != 0
    line = _one_line_error(res.stderr)
    assert live.proc.proc is not None and f"PID {live.proc.proc.pid}" in line and "serve.lock" in line
    assert live.proc.proc.poll() is None and live.clients["a"].status().round == 0


def test_corrupt_state_is_a_one_line_error_and_can_be_rebuilt(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b"], rounds=2, min_sites=2, close_policy="min_sites")
    try:
        for i, s in enumerate("ab"):
            fed.clients[s].upload(update_body(random_delta(fed.global0, 0.01, i), s, 0, 3 + i))
        good = fed.wait_round(1)
        fed.clients["a"].upload(update_body(random_delta(fed.global0, 0.01, 5), "a", 1, 3))
        for c in fed.clients.values():
            c.close()
        fed.proc.stop()
        fed.paths.state.write_text('{"round": 1, "phase": "open", "hist')  # torn by hand or a bad disk
        with pytest.raises(FedpathError):
            fed.proc.start(timeout_s=60)
        line = _one_line_error((tmp_path / "server.log").read_text())
        assert "state.json" in line and "--rebuild-state" in line
        fed.url = fed.proc.start(args=["--rebuild-state"])
        fed.clients = {s: fed.client(s) for s in "ab"}
        st = fed.clients["b"].status()
        assert st.round == 1 and st.sites_reported == ["a"] and st.phase == "open"
        state = fed.state()
        assert [h["round"] for h in state["history"]] == [0]
        assert state["history"][0]["n_tiles"] == good["history"][0]["n_tiles"]
        assert list(fed.paths.root.glob("state.json.corrupt-*"))  # kept, not deleted
    finally:
        fed.close()


_SITECUSTOMIZE = """
import os
_log = os.environ["FEDPATH_FSYNC_LOG"]
_fsync, _replace = os.fsync, os.replace

def _note(*parts):
    with open(_log, "a") as f:
        f.write("\\t".join(str(p) for p in parts) + "\\n")

def fsync(fd):
    _fsync(fd)
    _note("fsync", os.readlink(f"/proc/self/fd/{fd}"))

def replace(src, dst, *a, **k):
    _replace(src, dst, *a, **k)
    _note("replace", os.path.abspath(src), os.path.abspath(dst))

os.fsync, os.replace = fsync, replace
"""


def test_global_models_are_fsynced_before_and_after_the_rename(tmp_path: Path) -> None:
    """The service process, with os.fsync/os.replace traced: file fsynced before rename, directory after."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    trace = tmp_path / "fsync.log"
    cfg_path = write_config(tmp_path, ["a", "b"], rounds=1, min_sites=2)
    cfg = load_config(cfg_path)
    run_provision(cfg)
    proc = AggregatorProcess(cfg, cfg_path, tmp_path / "server.log")
    env = _env() | {"FEDPATH_FSYNC_LOG": str(trace)}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    proc.start(env=env)
    fed_paths = server_paths(cfg)
    try:
        from federation.client import SiteClient

        g0, _ = read_model_file(fed_paths.global_model(0))
        for i, s in enumerate("ab"):
            with SiteClient(
                proc.url,
                s,
                provision_paths(cfg).site_token(s).read_text().strip(),
                provision_paths(cfg).ca_cert,
                retries=0,
            ) as c:
                c.upload(update_body(random_delta(g0, 0.01, i), s, 0, 3))
        _wait(lambda: json.loads(fed_paths.state.read_text())["phase"] == "finished", what="round 1")
    finally:
        proc.stop()
    events = [line.split("\t") for line in trace.read_text().splitlines()]
    for r in (0, 1):
        final = str(fed_paths.global_model(r).resolve())
        i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
        tmp = events[i][1]  # the writer's temporary file, in the same directory
        assert tmp != final and Path(tmp).parent == Path(final).parent
        assert ["fsync", tmp] in events[:i], f"round_{r}: file not fsynced before the rename"
        assert ["fsync", str(Path(final).parent)] in events[i + 1 :], (
            f"round_{r}: directory not fsynced after"
        )


def test_plain_http_needs_loopback_or_insecure(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, ["a", "b"], tls=False, host="0.0.0.0")
    cfg = load_config(cfg_path)
    run_provision(cfg)
    res = _serve(cfg_path)
    assert res.returncode != 0
    line = _one_line_error(res.stderr)
    assert "tls" in line and "0.0.0.0" in line and "--insecure" in line
    # the site job refuses to send its token in clear to another machine (no connection is attempted)
    res = _cli(
        "site-round",
        "--config",
        str(cfg_path),
        "--site",
        "a",
        "--set",
        "federation.server_url=http://192.0.2.7:8443",
    )
    assert res.returncode == 2 and "plain HTTP" in res.stderr and "--insecure" in res.stderr, res.stderr
    # explicitly insecure: it serves; a loopback client over http works without the flag
    proc = AggregatorProcess(cfg, cfg_path, tmp_path / "server.log")
    url = proc.start(args=["--insecure"])
    try:
        from federation.client import SiteClient

        assert url.startswith("http://127.0.0.1:")
        with SiteClient(
            url, "a", provision_paths(cfg).site_token("a").read_text().strip(), None, retries=0
        ) as c:
            assert c.status().round == 0
    finally:
        proc.stop()


def test_an_unbounded_n_tiles_stored_by_an_older_version_does_not_stall_the_round(tmp_path: Path) -> None:
    """A round left 'aggregating' with a 10^400-tile update on disk: quarantined at restart, round goes on."""
    fed = Fed(tmp_path, ["a", "b"], rounds=1, min_sites=2, close_policy="min_sites")
    try:
        body_b = update_body(random_delta(fed.global0, 0.01, 2), "b", 0, 5)
        fed.clients["b"].upload(body_b)
        for c in fed.clients.values():
            c.close()
        fed.proc.stop()
        poisoned = update_body(random_delta(fed.global0, 0.01, 1), "a", 0, 10**400)
        fed.paths.update(0, "a").write_bytes(poisoned)  # what the unbounded service accepted
        state = fed.state() | {"phase": "aggregating"}
        fed.paths.state.write_text(json.dumps(state))
        fed.url = fed.proc.start()
        fed.clients = {s: fed.client(s) for s in "ab"}
        st = fed.clients["a"].status()
        assert st.phase == "open" and st.sites_reported == ["b"] and st.round == 0
        assert fed.paths.quarantine(0, "a.safetensors").read_bytes() == poisoned  # kept, not counted
        fed.clients["a"].upload(update_body(random_delta(fed.global0, 0.01, 3), "a", 0, 7))
        state = fed.wait_round(1)
        assert state["phase"] == "finished" and state["history"][0]["n_tiles"] == {"a": 7, "b": 5}
    finally:
        fed.close()

"""Property-based fuzz of the aggregator's HTTP API (hypothesis driving httpx) against the real service.

Properties, for any method, path, credentials, query and body (random bytes, or a real update with
hostile metadata, missing or rescaled tensors, truncated or bit-flipped):

* the answer is never a 5xx (every refusal is a 4xx with a reason);
* a refused request changes nothing durable (``state.json`` and every file under ``updates/``,
  ``global/`` and ``strategy/``).

The default run is derandomised and bounded (``FUZZ_EXAMPLES`` requests, well under a minute on two
cores); the ``slow`` variant explores ten times more with fresh randomness.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fedtest_utils import Fed, random_delta, update_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.wire import UPDATE_META_KEY, encode_state

FUZZ_EXAMPLES = 150
SITES = ["a", "b", "c"]
PATHS = ["/v1/update", "/v1/status", "/v1/model", "/v1/health", "/docs", "/openapi.json", "/v1/update/", "/"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    # strangers are not rate-limited here: the fuzz must reach every code path, not the 429
    f = Fed(
        tmp_path_factory.mktemp("fuzz"), SITES, rounds=3, min_sites=3, unauth_burst=100_000, unauth_per_s=1e4
    )
    yield f
    f.close()


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


@st.composite
def update_bodies(draw: st.DrawFn, like: dict[str, torch.Tensor]) -> bytes:
    """A safetensors update whose metadata and tensors are drawn, then maybe truncated or bit-flipped."""
    meta: dict[str, Any] = {
        "site": draw(st.one_of(st.sampled_from([*SITES, "zz", "../x", "", "A"]), json_values)),
        "round": draw(st.one_of(st.integers(min_value=-2, max_value=4), json_values)),
        "n_tiles": draw(st.one_of(st.integers(min_value=-2, max_value=10**400), json_values)),
        "epsilon": draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), json_values)),
        "update_id": draw(st.one_of(st.text(max_size=200), json_values)),
    }
    for key in draw(st.sets(st.sampled_from(sorted(meta)), max_size=2)):
        del meta[key]
    tensors = {k: v.clone() for k, v in random_delta(like, 0.01, draw(st.integers(0, 3))).items()}
    shape = draw(st.sampled_from(["ok", "scaled", "drop", "extra", "dtype", "nan"]))
    first = next(iter(tensors))
    if shape == "scaled":
        tensors = {k: v * draw(st.sampled_from([1e3, 1e15, 1e30, -1e38])) for k, v in tensors.items()}
    elif shape == "drop":
        tensors.pop(first)
    elif shape == "extra":
        tensors["extra.weight"] = torch.zeros(3)
    elif shape == "dtype":
        tensors[first] = tensors[first].double()
    elif shape == "nan":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    metadata = {UPDATE_META_KEY: draw(st.one_of(st.just(json.dumps(meta)), st.text(max_size=50)))}
    body = bytearray(encode_state(tensors, metadata))
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    if cut is not None:
        body = body[:cut]
    for pos, byte in draw(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=3)):
        if pos < len(body):
            body[pos] = byte
    return bytes(body)


def good_bodies(like: dict[str, torch.Tensor]) -> st.SearchStrategy[bytes]:
    """Well-formed updates of site a: the first is accepted, others are duplicates, conflicts or early."""
    return st.builds(
        lambda seed, r, n: update_body(random_delta(like, 0.01, seed), "a", r, n),
        st.integers(0, 2),
        st.integers(0, 1),
        st.integers(1, 100),
    )


def requests(like: dict[str, torch.Tensor]) -> st.SearchStrategy[dict[str, Any]]:
    safe_path = st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#?%"), max_size=30
    )
    # weighted towards the upload endpoint with real credentials and update-shaped bodies: that is where
    # the state lives; the rest of the surface is still drawn
    return st.fixed_dictionaries(
        {
            "method": st.one_of(
                st.just("POST"),
                st.just("POST"),
                st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
            ),
            "path": st.one_of(
                st.just("/v1/update"),
                st.just("/v1/update"),
                st.sampled_from(PATHS),
                safe_path.map(lambda p: "/" + p),
            ),
            "who": st.one_of(
                st.just("a"),
                st.sampled_from(["a", "b", "none", "bad_token", "stranger", "odd_name", "token_only"]),
            ),
            "params": st.one_of(
                st.none(),
                st.fixed_dictionaries(
                    {"round": st.one_of(st.integers(-5, 2**70), st.text(max_size=8), st.just("1e400"))}
                ),
            ),
            "body": st.one_of(
                good_bodies(like),
                update_bodies(like),
                update_bodies(like),
                st.none(),
                st.binary(max_size=2048),
            ),
            "content_type": st.sampled_from(
                ["application/octet-stream", "application/json", "text/plain", ""]
            ),
        }
    )


def _headers(fed: Fed, who: str, content_type: str) -> dict[str, str | bytes]:
    h: dict[str, str | bytes] = {"Content-Type": content_type} if content_type else {}
    creds = {
        "a": ("a", fed.token("a")),
        "b": ("b", fed.token("b")),
        "none": (None, None),
        "bad_token": ("a", "x" * 43),
        "stranger": ("zz", fed.token("a")),
        "odd_name": ("../../../escape\u00e9".encode(), fed.token("a")),
        "token_only": (None, fed.token("c")),
    }[who]
    if creds[0] is not None:
        h["X-Fedpath-Site"] = creds[0]
    if creds[1] is not None:
        h["Authorization"] = f"Bearer {creds[1]}"
    return h


def _settled(fed: Fed) -> dict[str, Any]:
    """The durable state once no close is in progress (an accepted update may close a round)."""
    prev = fed.snapshot()
    for _ in range(100):
        time.sleep(0.05)
        now = fed.snapshot()
        if now == prev and now["state"]["phase"] != "aggregating":
            return now
        prev = now
    return prev


def _run_fuzz(fed: Fed, client: httpx.Client, req: dict[str, Any], seen: dict[int, int]) -> None:
    before = fed.snapshot()
    resp = client.request(
        req["method"],
        fed.url + req["path"],
        params=req["params"],
        content=req["body"],
        headers=_headers(fed, req["who"], req["content_type"]),
    )
    seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
    assert resp.status_code < 500, (req["method"], req["path"], req["who"], resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        if req["method"] != "HEAD":
            assert resp.json()["detail"], resp.text[:300]
        assert fed.snapshot() == before, f"refused {req['method']} {req['path']} changed the state"
    elif req["method"] == "POST":
        _settled(fed)


def _fuzz(fed: Fed, examples: int, derandomize: bool) -> dict[int, int]:
    seen: dict[int, int] = {}
    with httpx.Client(verify=fed.ssl_context(), timeout=30) as client:

        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=derandomize,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(req=requests(fed.global0))
        def prop(req: dict[str, Any]) -> None:
            _run_fuzz(fed, client, req, seen)

        prop()
    return seen


def test_http_fuzz_never_5xx_and_refusals_change_nothing(target: Fed) -> None:
    t0 = time.monotonic()
    seen = _fuzz(target, FUZZ_EXAMPLES, derandomize=True)
    assert time.monotonic() - t0 < 120
    print("fuzz status counts:", seen)
    # it reached acceptance and refusals of several kinds
    assert {200, 401, 404, 409, 422} <= set(seen), seen
    assert not list(target.paths.updates(0).glob(".incoming-*"))
    assert not [p for p in Path(target.cfg.run_dir).parent.rglob("*escape*")]


@pytest.mark.slow
def test_http_fuzz_long(target: Fed) -> None:
    seen = _fuzz(target, 10 * FUZZ_EXAMPLES, derandomize=False)
    assert all(code < 500 for code in seen)

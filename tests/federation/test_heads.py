"""Per-site heads (issue 16): sites with different class counts federate one body through the real
aggregator, each keeping its own head; the base model with a fresh head for a site's class count.

Real pieces throughout: synthetic slides tiled by the real tiler, the aggregator process with TLS, the
site client's round job training with DP-SGD, and a site job SIGKILLed between local steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fedtest_utils import Fed, random_delta, update_body

from fedcore.layout import RunLayout
from federation.client import ServerRefused, run_site_round
from federation.site_state import SiteState
from federation.strategies import build_strategy, strategy_config
from federation.strategies.heads import PerSiteHeads
from federation.wire import decode_state, read_header
from pipeline.checkpoint import ModelMeta, read_model_file
from pipeline.config import ConfigError, ExperimentConfig, FederationConfig
from pipeline.errors import FedpathError
from pipeline.transfer import fresh_head, head_keys
from wsi.config import SynthConfig, TilingConfig
from wsi.synth import run_synth
from wsi.tiling import run_tile_site

REPO = Path(__file__).resolve().parents[2]
HEADS = {"name": "fedavg", "heads": "per_site"}
CLASSES = {"a": 2, "b": 3}  # the global model (the server's config) has 2 classes


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small synthetic slide per site, tiled at 32 px by the real tiler (a template to copy)."""
    root = tmp_path_factory.mktemp("heads_data")
    synth = SynthConfig(sites=list(CLASSES), slides_per_site=1, held_out_slides=0, width=512, height=512, seed=5)
    run_synth(synth, root / "synthetic")
    out = {}
    for site in CLASSES:
        store = root / "stores" / site / "store.zarr"
        res = run_tile_site(
            manifest=root / "synthetic" / "manifests" / f"{site}.csv",
            data_root=root / "synthetic",
            store=store,
            tiling=TilingConfig(target_mpp=1.0, tile_size=32, overlap=0),
            site=site,
            run_dir=None,
            workers=1,
        )
        assert not res["failed"], res["failed"]
        out[site] = store
    return out


def _site_config(fed: Fed, site: str, **train: Any) -> ExperimentConfig:
    """The site's own config: the federation's, with its class count and small DP-SGD jobs."""
    data = fed.cfg.model_dump(mode="json")
    data["model"]["out_channels"] = CLASSES[site]
    data["train"].update(
        {
            "batch_size": 8,
            "physical_batch_size": 8,
            "max_steps": 3,
            "threads": 1,
            "lr": 1e-2,
            "privacy": {
                "enabled": True,
                "target_epsilon": None,
                "noise_multiplier": 1.0,
                "budget_epsilon": "unlimited",
                "max_grad_norm": 1.0,
            },
            **train,
        }
    )
    data["federation"]["upload_retries"] = 0
    return ExperimentConfig.model_validate(data)


def _body(state: dict[str, torch.Tensor], head: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k not in head}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_heads_option_config() -> None:
    s = build_strategy(FederationConfig(strategy=HEADS), 2)
    assert isinstance(s, PerSiteHeads) and s.describe() == "PerSiteHeads(fedavg)"
    assert not isinstance(build_strategy(FederationConfig(strategy="fedavg"), 2), PerSiteHeads)
    with pytest.raises(ConfigError, match="'heads' is an option of the strategies that upload a full delta"):
        strategy_config(FederationConfig(strategy={"name": "fedmic", "heads": "per_site"}))
    with pytest.raises(ConfigError, match="heads"):
        strategy_config(FederationConfig(strategy={"name": "fedavg", "heads": "mine"}))


def test_task_model_endpoint_bounds_the_class_count_and_serves_one_head_per_count(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b"], strategy=HEADS, max_classes=64)
    try:
        tok = fed.token("a")
        head = head_keys(fed.cfg.model)

        def ask(classes: Any, site: str | None = "a", token: str | None = tok, **params: Any) -> Any:
            p = dict(params) if classes is None else {"classes": classes, **params}
            return fed.request("GET", "/v1/model/task", site, token, params=p)

        for bad in ["0", "65", str(10**12), "abc", "2.5", "-1", "", "3 ", "１"]:
            resp = ask(bad)
            assert resp.status_code == 422, (bad, resp.text)
            body = resp.json()
            assert body["code"] == "bad_classes" and "\n" not in body["detail"]
            assert body["detail"].startswith("classes: must be a whole number from 1 to 64")
        missing = ask(None)
        assert missing.status_code == 422 and missing.json()["detail"].startswith("classes: missing")
        assert ask("3", token="wrong").status_code == 401  # authenticated like /v1/model
        assert ask("3", round=5).status_code == 404  # no such version

        got = ask("3")
        assert got.status_code == 200 and got.headers["x-fedpath-round"] == "0"
        state, header = decode_state(got.content, "task model")
        meta = ModelMeta.from_header(header, "task model")
        assert meta.model.out_channels == 3 and meta.round == 0 and meta.extra["head"] == sorted(head)
        # the base model's body, a fresh head for 3 classes: the same for every site asking for 3
        assert _same(_body(state, head), _body(fed.global0, head))
        assert _same({k: state[k] for k in head}, fresh_head(fed.cfg.model, 3))
        assert all(state[k].shape[1] == 3 for k in head if k.endswith("weight"))
        again = fed.request("GET", "/v1/model/task", "b", fed.token("b"), params={"classes": 3})
        assert again.content == got.content
        other = ask("5")
        assert other.status_code == 200 and other.content != got.content

        # the site client's call
        st, m = fed.clients["b"].download_task_model(3)
        assert m.model.out_channels == 3 and _same(st, state)
        audit = [e for e in fed.audit() if e.get("action") == "task_model"]
        assert audit and audit[-1]["outcome"] == "ok"
    finally:
        fed.close()


def test_server_refuses_a_head_tensor_or_a_wrong_body_shape(tmp_path: Path) -> None:
    fed = Fed(tmp_path, ["a", "b"], strategy=HEADS)
    try:
        head = head_keys(fed.cfg.model)
        g0 = fed.global0
        with_head = random_delta(g0, 1e-3, 1)
        with pytest.raises(ServerRefused) as exc:
            fed.clients["a"].upload(update_body(with_head, "a", 0, 4))
        assert exc.value.status == 422 and "unexpected tensor" in str(exc.value)
        assert any(k in str(exc.value) for k in head)
        body = random_delta(_body(g0, head), 1e-3, 2)
        name = next(iter(body))
        bad = dict(body)
        bad[name] = torch.zeros((*body[name].shape[:-1], body[name].shape[-1] + 1))
        with pytest.raises(ServerRefused) as exc:
            fed.clients["a"].upload(update_body(bad, "a", 0, 4))
        assert exc.value.status == 422 and name in str(exc.value) and "shape" in str(exc.value)
        assert not fed.paths.update(0, "a").exists()
        ack = fed.clients["a"].upload(update_body(body, "a", 0, 4))  # the body alone is accepted
        assert ack["status"] == "accepted"
    finally:
        fed.close()


_KILLED_JOB = """
import sys
from federation.client import run_site_round
from pipeline.config import load_config
run_site_round(load_config(sys.argv[1]), sys.argv[2])
"""


def test_two_sites_with_two_and_three_classes_federate_the_body_and_keep_their_heads(
    tmp_path: Path, stores: dict[str, Path]
) -> None:
    fed = Fed(tmp_path, list(CLASSES), rounds=2, strategy=HEADS)
    try:
        run = RunLayout(fed.cfg.run_dir)
        for site, store in stores.items():
            shutil.copytree(store, run.site(site).store)
        cfgs = {"a": _site_config(fed, "a"), "b": _site_config(fed, "b", max_steps=12, checkpoint_every=1)}
        head = head_keys(fed.cfg.model)
        state = {s: SiteState(run.site(s).state) for s in CLASSES}
        g0 = fed.global0

        # -- round 0: a (2 classes, like the global) starts from version 0's head; b (3) asks the server
        for site in CLASSES:
            out = run_site_round(cfgs[site], site)
            assert out["outcome"] == "uploaded"
        fed.wait_round(1, timeout=120)
        h0 = {s: state[s].load_head() for s in CLASSES}
        for s, h in h0.items():
            assert h is not None and h.round == 0 and h.classes == CLASSES[s] and h.trained is not None
            assert not _same(h.trained, h.start)  # the head trained
        assert h0["a"] is not None and _same(h0["a"].start, {k: g0[k] for k in head})
        assert h0["b"] is not None and _same(h0["b"].start, fresh_head(fed.cfg.model, 3))
        assert all(h0["b"].start[k].shape[1] == 3 for k in head if k.endswith("weight"))
        assert any(e.get("action") == "task_model" and e["site"] == "b" for e in fed.audit())
        assert not any(e.get("action") == "task_model" and e["site"] == "a" for e in fed.audit())

        # -- round 1: a as usual; b's job is SIGKILLed between local steps, then run again
        assert run_site_round(cfgs["a"], "a")["outcome"] == "uploaded"
        frozen = tmp_path / "site_b.yaml"
        frozen.write_text(yaml.safe_dump(cfgs["b"].model_dump(mode="json")))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        job = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, str(frozen), "b"], env=env, stderr=subprocess.PIPE)
        progress = run.site("b").round(1) / "progress.json"
        end = time.monotonic() + 300
        while not (progress.is_file() and json.loads(progress.read_text())["step"] >= 2):
            assert job.poll() is None, job.stderr.read().decode()[-3000:] if job.stderr else ""
            assert time.monotonic() < end
            time.sleep(0.005)
        job.send_signal(signal.SIGKILL)
        job.wait()
        killed_at = json.loads(progress.read_text())["step"]
        assert not json.loads(progress.read_text())["done"] and 2 <= killed_at < 12
        mid = state["b"].load_head()
        assert mid is not None and mid.round == 1 and mid.trained is None
        assert h0["b"].trained is not None and _same(mid.start, h0["b"].trained)  # round 1 starts from round 0's head
        spent = json.loads(run.site("b").privacy.read_text())["entries"][-1]["steps"]

        out = run_site_round(cfgs["b"], "b")
        assert out["outcome"] == "uploaded" and out["trained"]
        train_b = json.loads(run.site("b").train_json(1).read_text())
        assert train_b["head"]["resumed_from"] == killed_at  # the checkpoint (head included) was resumed
        entries = [e for e in json.loads(run.site("b").privacy.read_text())["entries"] if e["job"] == "round-1"]
        assert len(entries) == 1 and entries[0]["steps"] == 12 + (spent - killed_at)  # ε not spent twice
        fed.wait_round(2, timeout=120)
        h1 = {s: state[s].load_head() for s in CLASSES}
        for s, h in h1.items():
            prev = h0[s]
            assert h is not None and prev is not None and prev.trained is not None and h.trained is not None
            assert h.round == 1 and _same(h.start, prev.trained) and not _same(h.trained, prev.trained)

        # -- the server: body-only updates, the body averaged, the published head untouched
        body_keys = set(g0) - head
        for r in (0, 1):
            for s in CLASSES:
                specs = read_header(fed.paths.update(r, s)).specs
                assert set(specs) == body_keys and not set(specs) & head
        g1, _ = read_model_file(fed.paths.global_model(1))
        g2, m2 = read_model_file(fed.paths.global_model(2))
        assert m2.model == fed.cfg.model and "PerSiteHeads" in m2.extra["strategy"]
        for before, after in ((g0, g1), (g1, g2)):
            assert not _same(_body(before, head), _body(after, head))  # the body moved
            assert _same({k: after[k] for k in head}, {k: g0[k] for k in head})  # no site's head in it
        # the published body is exactly version 1 + the tile-weighted mean of the two body deltas
        ups = {s: decode_state(fed.paths.update(1, s).read_bytes(), s) for s in CLASSES}
        n = {s: json.loads(ups[s][1]["fedpath_update"])["n_tiles"] for s in CLASSES}
        for k in body_keys:
            if g1[k].is_floating_point():
                want = g1[k] + sum(n[s] * ups[s][0][k] for s in CLASSES) / sum(n.values())
                assert torch.allclose(g2[k], want, atol=1e-6), k

        # -- each site's own model: the version's body with its head; b predicts 3 classes
        from federation.heads_site import site_model
        from pipeline.models import build_model

        for s in CLASSES:
            net = build_model(cfgs[s].model)
            net.load_state_dict(site_model(cfgs[s], s, g2))
            with torch.no_grad():
                assert net(torch.rand(1, 3, 32, 32)).shape[1] == CLASSES[s]

        # -- `fedpath site-model`: b's own model as a file `fedpath infer --model` runs
        from federation.site import write_site_model
        from pipeline.infer import load_inference_model

        path = write_site_model(cfgs["b"], "b")
        assert path == run.site("b").personal_model
        mine = load_inference_model(path)
        held = state["b"].load_head()
        assert held is not None and mine.meta.source == "personal" and mine.meta.model.out_channels == 3
        assert _same({k: mine.state[k] for k in head}, held.latest)  # its own head ...
        assert _same(_body(mine.state, head), _body(g2, head))  # ... on the latest version's body
        with torch.no_grad():
            assert mine.net(torch.rand(1, 3, 32, 32)).shape[1] == 3
        plain = cfgs["b"].model_copy(update={"federation": cfgs["b"].federation.model_copy(update={"strategy": "fedavg"})})
        with pytest.raises(FedpathError, match="keeps no model of the site's own"):
            write_site_model(plain, "b")
    finally:
        fed.close()

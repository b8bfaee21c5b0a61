"""``polyadapter serve --replicas 2`` on a local Ray Serve instance (127.0.0.1 only):
greedy outputs (plain and streamed) equal the single-process engine's; requests for
one adapter land on the replica that holds it (Ray's multiplexed routing, counted
from ``x-polyadapter-replica``); tenant keys hold on every replica; an adapter loaded
and unloaded at run time is listed, served and then gone on both replicas; killing a
replica mid-traffic loses no request a retrying client sends, and the service keeps
answering. Every loop is bounded in count and time."""
from __future__ import annotations

import collections
import os
import signal
import time

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")

import httpx  # noqa: E402
import openai  # noqa: E402
from server_kit import Server, build_folder  # noqa: E402

import polyadapter as pa  # noqa: E402
from polyadapter.basemodels import load_causal_lm  # noqa: E402
from polyadapter.serve import Engine, SamplingParams  # noqa: E402
from polyadapter.store import Store  # noqa: E402

NAMES = ("lora", "ia3", "prompt", "lora8")
FRESH = {"affinity-a": "lora", "affinity-b": "ia3"}  # requested by the affinity test only
PROMPTS = ["hello world", "the quick brown fox", "adapters serve many tasks"]
GREEDY = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
HEADER = "x-polyadapter-replica"
KEY, TENANT, ADMIN = "main-key", "tenant-key", "admin-key"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = build_folder(tmp_path_factory.mktemp("replicas"))
    Store.init(made["model"].parent / "store").close()  # one store; every replica opens it
    return made


@pytest.fixture(scope="module")
def server(files):
    a = files["adapters"]
    args = ["--model", str(files["model"]), "--replicas", "2", "--no-store-adapters", "--max-loaded", "8",
            "--store", str(files["model"].parent / "store"), "--adapter-dir", str(a["lora"].parent),
            "--api-key", KEY, "--tenant-key", f"{TENANT}=lora,ia3", "--admin-key", ADMIN]
    for name in NAMES:
        args += ["--adapter", f"{name}={a[name]}"]
    for name, like in FRESH.items():
        args += ["--adapter", f"{name}={a[like]}"]
    s = Server(args, timeout=240)
    yield s
    s.stop()
    assert s.proc.returncode == 0, "".join(s.output)[-3000:]


@pytest.fixture(scope="module")
def offline(files):
    model, tok = load_causal_lm(files["model"])
    engine = Engine(pa.AdapterModel(model), tok, max_num_seqs=8)
    for name in NAMES:
        engine.register_adapter(name, files["adapters"][name])
    yield engine
    engine.close()


def reference(offline, model, prompt):
    setup = None if model == "tiny-llama" else model
    return offline.generate([prompt], [setup], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].text


def client(server, retries=0, key=KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=retries, timeout=60)


def complete(c, model, prompt):
    raw = c.completions.with_raw_response.create(model=model, prompt=prompt, **GREEDY)
    return raw.parse().choices[0].text, raw.headers.get(HEADER)


def admin(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"})


def models(server, key=KEY):
    r = httpx.get(server.url + "/v1/models", timeout=30, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}, r.headers[HEADER]


def test_outputs_equal_the_single_engine_and_models_are_listed(server, offline):
    c = client(server)
    assert {m.id for m in c.models.list().data} == {"tiny-llama", *NAMES, *FRESH}
    for model in ("tiny-llama", *NAMES):
        for prompt in PROMPTS[:2]:
            text, replica = complete(c, model, prompt)
            assert text == reference(offline, model, prompt), (model, prompt)
            assert replica and replica.isdigit()
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    assert "polyadapter" in httpx.get(server.url + "/metrics", timeout=30).text
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404
    r = httpx.post(server.url + "/v1/completions", json={"model": "lora", "prompt": "x"}, timeout=30)
    assert r.status_code == 401  # keys are checked by the replica, as by the single server


def test_streams_equal_the_single_engine(server, offline):
    c = client(server)
    for model in ("tiny-llama", "lora", "prompt"):
        with c.completions.with_streaming_response.create(model=model, prompt=PROMPTS[2], stream=True,
                                                          **GREEDY) as raw:
            assert raw.headers.get(HEADER, "").isdigit()
            pieces = [chunk.choices[0].text for chunk in raw.parse() if chunk.choices]
        assert len(pieces) > 1 and "".join(pieces) == reference(offline, model, PROMPTS[2]), (model, pieces)
    stream = c.chat.completions.create(model="ia3", messages=[{"role": "user", "content": "hi"}], stream=True,
                                       **GREEDY)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


def test_requests_for_one_adapter_land_on_the_replica_holding_it(server):
    c = client(server)
    seen = collections.defaultdict(collections.Counter)
    for name in FRESH:  # the first request places the adapter ...
        seen[name][complete(c, name, PROMPTS[0])[1]] += 1
    time.sleep(2)  # ... which reaches the front's router within Ray's update interval ...
    for _ in range(5):  # ... and the rest follow it
        for name in FRESH:
            seen[name][complete(c, name, PROMPTS[0])[1]] += 1
    assert all(len(seen[name]) == 1 for name in FRESH), dict(seen)


def test_tenant_keys_hold_on_every_replica(server):
    tenant = client(server, key=TENANT)
    for _ in range(6):
        assert models(server, key=TENANT)[0] == {"tiny-llama", "lora", "ia3"}
        with pytest.raises(openai.NotFoundError):
            tenant.completions.create(model="prompt", prompt="x", **GREEDY)
    assert complete(tenant, "lora", PROMPTS[0])[0]


def _on_both_replicas(server, check, limit=40):
    """Runs ``check(ids)`` on /v1/models answers until both replicas answered (bounded)."""
    replicas = set()
    for _ in range(limit):
        ids, replica = models(server)
        check(ids)
        replicas.add(replica)
        if len(replicas) == 2:
            return
    pytest.fail(f"only replica(s) {replicas} answered {limit} /v1/models requests")


def test_load_and_unload_reach_every_replica(server, offline, files):
    folder = files["adapters"]["lora"]
    r = admin(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(folder)})
    assert r.status_code == 200, r.text
    assert admin(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(folder)}).status_code == 400
    _on_both_replicas(server, lambda ids: "late" in ids)
    c = client(server)
    assert complete(c, "late", PROMPTS[1])[0] == reference(offline, "lora", PROMPTS[1])
    r = admin(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert r.status_code == 200, r.text
    _on_both_replicas(server, lambda ids: "late" not in ids)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="late", prompt="x", **GREEDY)
    assert admin(server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 404
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(folder)},
                   timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code in (401, 403)  # not the admin key


def test_killing_a_replica_mid_traffic_loses_no_retried_request(server, offline):
    c = client(server, retries=3)
    ref = {name: reference(offline, name, PROMPTS[1]) for name in NAMES}
    victim = int(complete(c, "lora", PROMPTS[1])[1])
    assert victim != os.getpid()
    answered, replicas = 0, set()
    deadline = time.monotonic() + 120
    for i in range(24):
        assert time.monotonic() < deadline
        if i == 4:
            os.kill(victim, signal.SIGKILL)
        name = NAMES[i % len(NAMES)]
        text, replica = complete(c, name, PROMPTS[1])
        assert text == ref[name]
        answered += 1
        replicas.add(int(replica))
    assert answered == 24 and replicas - {victim}, replicas  # the other replica took over
    # the dead replica answers nothing after its death; Ray Serve starts a new one
    for _ in range(60):
        r = httpx.get(server.url + "/health", timeout=30)
        if r.status_code == 200:
            break
        time.sleep(1)
    assert r.status_code == 200
    assert complete(c, "lora", PROMPTS[1])[0] == ref["lora"]

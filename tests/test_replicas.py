"""``polyadapter serve --replicas 2`` on a local Ray Serve instance (127.0.0.1 only):
greedy outputs equal the single-process engine's; requests for one adapter land on
one replica (Ray's multiplexed routing, counted from ``x-polyadapter-replica``);
killing a replica mid-traffic loses no request a retrying client sends, and the
service keeps answering. Every loop is bounded in count and time."""
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
PROMPTS = ["hello world", "the quick brown fox", "adapters serve many tasks"]
GREEDY = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
HEADER = "x-polyadapter-replica"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = build_folder(tmp_path_factory.mktemp("replicas"))
    Store.init(made["model"].parent / "store").close()  # one store; every replica opens it
    return made


@pytest.fixture(scope="module")
def server(files):
    a = files["adapters"]
    args = ["--model", str(files["model"]), "--replicas", "2", "--no-store-adapters", "--max-loaded", "4",
            "--store", str(files["model"].parent / "store")]
    for name in NAMES:
        args += ["--adapter", f"{name}={a[name]}"]
    s = Server(args, timeout=240)
    yield s
    s.stop()
    assert s.proc.returncode is not None


@pytest.fixture(scope="module")
def offline(files):
    model, tok = load_causal_lm(files["model"])
    engine = Engine(pa.AdapterModel(model), tok, max_num_seqs=8)
    for name in NAMES:
        engine.register_adapter(name, files["adapters"][name])
    yield engine
    engine.close()


def client(server, retries=0):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=retries, timeout=60)


def complete(c, model, prompt):
    raw = c.completions.with_raw_response.create(model=model, prompt=prompt, **GREEDY)
    return raw.parse().choices[0].text, raw.headers.get(HEADER)


def test_outputs_equal_the_single_engine_and_models_are_listed(server, offline):
    c = client(server)
    assert {m.id for m in c.models.list().data} == {"tiny-llama", *NAMES}
    for model in ("tiny-llama", *NAMES):
        for prompt in PROMPTS[:2]:
            text, replica = complete(c, model, prompt)
            ref = offline.generate([prompt], [None if model == "tiny-llama" else model],
                                   SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
            assert text == ref.text, (model, prompt)
            assert replica and replica.isdigit()
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    assert "polyadapter" in httpx.get(server.url + "/metrics", timeout=30).text
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404


def test_requests_for_one_adapter_land_on_one_replica(server):
    c = client(server)
    seen = collections.defaultdict(collections.Counter)
    for _ in range(4):
        for name in NAMES:
            seen[name][complete(c, name, PROMPTS[0])[1]] += 1
    for name in NAMES:  # the first request places the adapter; the rest follow it
        replica, hits = seen[name].most_common(1)[0]
        assert hits >= 3, dict(seen)


def test_killing_a_replica_mid_traffic_loses_no_retried_request(server, offline):
    c = client(server, retries=3)
    ref = {name: offline.generate([PROMPTS[1]], [name], SamplingParams(max_tokens=8, temperature=0,
                                                                       ignore_eos=True))[0].text for name in NAMES}
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

"""``polyadapter serve``: a real server process on 127.0.0.1 (a free port) driven by
the real ``openai`` client (sync and async) and ``httpx``. Outputs equal the engine's
offline outputs for the same requests; keys, tenants, load/unload, overload (429),
client disconnects, path checks and a schemathesis fuzz of the OpenAPI schema (no
5xx). Every loop is bounded in count and time; nothing leaves 127.0.0.1."""
from __future__ import annotations

import asyncio
import re
import shutil
import time

import httpx
import openai
import pytest
from server_kit import Server, build_folder

import polyadapter as pa
from polyadapter.basemodels import load_causal_lm
from polyadapter.compose import Average, Stack
from polyadapter.serve import Engine, SamplingParams
from polyadapter.store import Store

KEY, TENANT, ADMIN = "main-key", "tenant-key", "admin-key"
GREEDY = {"temperature": 0, "max_tokens": 8}
IGNORE_EOS = {"ignore_eos": True}
PROMPTS = ["hello world", "the quick brown fox", "adapters serve many tasks", "how are you today?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    made = build_folder(root)
    store = Store.init(root / "store")
    store.add(made["adapters"]["lora8"], "stored")
    store.add(made["adapters"]["lora"], "stored")   # version 2
    store.close()
    made["store"], made["root"] = root / "store", root
    shutil.copytree(made["adapters"]["ia3"], root / "outside")  # an adapter folder outside --adapter-dir
    (made["adapters"]["lora"].parent / "link-out").symlink_to(root)  # adapters/link-out -> root (outside)
    return made


@pytest.fixture(scope="module")
def server(files):
    a = files["adapters"]
    s = Server(["--model", str(files["model"]), "--store", str(files["store"]), "--no-store-adapters",
                "--adapter", f"lora={a['lora']}", "--adapter", f"lora8={a['lora8']}", "--adapter", f"ia3={a['ia3']}",
                "--adapter", f"bottleneck={a['bottleneck']}", "--adapter", f"prompt={a['prompt']}",
                "--adapter", f"peft={a['peft']}", "--adapter", f"lorab={a['lorab']}", "--adapter-dir", str(a["lora"].parent),
                "--api-key", KEY, "--tenant-key", f"{TENANT}=lora,ia3", "--admin-key", ADMIN,
                "--max-loaded", "4", "--max-lora-rank", "8"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(files):
    """The same model and adapters in an engine in this process: the reference."""
    model, tok = load_causal_lm(files["model"])
    engine = Engine(pa.AdapterModel(model), tok, max_num_seqs=8)
    for name, folder in files["adapters"].items():
        engine.register_adapter(name, folder)
    yield engine, tok
    engine.close()


def expected(offline, prompt, setup, max_tokens=8, chat=False):
    engine, tok = offline
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return engine.generate([prompt], [setup], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                             ignore_eos=True))[0]


def client(server, key=KEY, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


# ---------------------------------------------------------------- answers
def test_models_lists_the_base_and_every_adapter_with_parent_and_root(server, files):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"tiny-llama", "lora", "lora8", "lorab", "ia3", "bottleneck", "prompt", "peft"}
    assert models["tiny-llama"].parent is None
    assert models["lora"].parent == "tiny-llama" and models["lora"].root == str(files["adapters"]["lora"])


@pytest.mark.parametrize("model", ["tiny-llama", "lora", "peft", "ia3", "bottleneck", "prompt"])
def test_completion_equals_the_engine_offline(server, offline, model):
    c = client(server)
    r = c.completions.create(model=model, prompt=PROMPTS[0], extra_body=IGNORE_EOS, **GREEDY)
    ref = expected(offline, PROMPTS[0], None if model == "tiny-llama" else model)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == ref.prompt_tokens


def test_adapters_answer_differently_from_the_base(server):
    c = client(server)
    texts = {m: c.completions.create(model=m, prompt=PROMPTS[1], extra_body=IGNORE_EOS, **GREEDY).choices[0].text
             for m in ("tiny-llama", "lora", "ia3")}
    assert len(set(texts.values())) == 3, texts


def test_chat_streaming_and_not_equal_the_engine_offline(server, offline):
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[2]}]
    ref = expected(offline, PROMPTS[2], "lora", chat=True)
    whole = c.chat.completions.create(model="lora", messages=messages, extra_body=IGNORE_EOS, **GREEDY)
    assert whole.choices[0].message.content == ref.text
    chunks = list(c.chat.completions.create(model="lora", messages=messages, stream=True,
                                            stream_options={"include_usage": True}, extra_body=IGNORE_EOS,
                                            **GREEDY))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.text
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_completion_stream_logprobs_and_n(server, offline):
    c = client(server)
    stream = c.completions.create(model="ia3", prompt=PROMPTS[3], stream=True, n=2, logprobs=1,
                                  extra_body=IGNORE_EOS, **GREEDY)
    texts, logprobs = {0: "", 1: ""}, {0: [], 1: []}
    for ch in stream:
        for choice in ch.choices:
            texts[choice.index] += choice.text
            if choice.logprobs:
                logprobs[choice.index] += choice.logprobs.token_logprobs
    ref = expected(offline, PROMPTS[3], "ia3")
    assert texts[0] == texts[1] == ref.text
    assert len(logprobs[0]) == 8 and all(lp <= 0 for lp in logprobs[0])


def test_compositions_and_merges_in_extension_fields(server, offline):
    c = client(server)
    for body, setup in ((({"adapters": {"stack": ["lora", "bottleneck"]}}), Stack("lora", "bottleneck")),
                        ({"adapters": {"average": ["lora", "peft"], "weights": [0.3, 0.7]}},
                         Average("lora", "peft", weights=[0.3, 0.7])),
                        ({"merged_adapters": {"ids": ["lora", "lorab"], "weights": [0.5, 0.5],
                                              "merge_strategy": "linear"}},
                         {"ids": ["lora", "lorab"], "weights": [0.5, 0.5], "merge_strategy": "linear"}),
                        ({"merged_adapters": {"ids": ["lora", "lorab"], "weights": [1.0, 0.5],
                                              "merge_strategy": "ties", "density": 0.5}},
                         {"ids": ["lora", "lorab"], "weights": [1.0, 0.5], "merge_strategy": "ties",
                          "density": 0.5})):
        r = c.completions.create(model="tiny-llama", prompt=PROMPTS[0], extra_body={**IGNORE_EOS, **body},
                                 **GREEDY)
        assert r.choices[0].text == expected(offline, PROMPTS[0], setup).text, body
    with pytest.raises(openai.BadRequestError, match="same rank"):  # LoRAs of ranks 4 and 8: linear refuses
        c.completions.create(model="tiny-llama", prompt=PROMPTS[0], **GREEDY,
                             extra_body={"merged_adapters": {"ids": ["lora", "lora8"], "weights": [0.5, 0.5]}})


COMPOSED = {"stack": ({"adapters": {"stack": ["lora", "bottleneck"]}}, Stack("lora", "bottleneck")),
            "average": ({"adapters": {"average": ["ia3", "lora8"]}}, Average("ia3", "lora8")),
            "merge": ({"merged_adapters": {"ids": ["lora", "lorab"], "weights": [0.6, 0.4]}},
                      {"ids": ["lora", "lorab"], "weights": [0.6, 0.4]})}


def test_32_concurrent_async_streams_each_equal_offline(server, offline):
    """32 streams at once over adapters of five methods, the base, two compositions and a merge."""
    setups = ["lora", "ia3", "bottleneck", "prompt", "peft", "tiny-llama", "lora8", "stack", "average", "merge"]
    jobs = [(PROMPTS[i % 4], setups[i % len(setups)]) for i in range(32)]

    async def one(c, prompt, setup):
        extra, model = (COMPOSED[setup][0], "tiny-llama") if setup in COMPOSED else ({}, setup)
        text = ""
        async for ch in await c.completions.create(model=model, prompt=prompt, stream=True,
                                                   extra_body={**IGNORE_EOS, **extra}, **GREEDY):
            text += ch.choices[0].text if ch.choices else ""
        return text

    async def all_of():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(c, p, m) for p, m in jobs)), 180)
        finally:
            await c.close()

    got = asyncio.run(all_of())
    for (prompt, setup), text in zip(jobs, got):
        ref = COMPOSED[setup][1] if setup in COMPOSED else None if setup == "tiny-llama" else setup
        assert text == expected(offline, prompt, ref).text, (prompt, setup)


def test_store_versions_by_name_at_version(server, offline, files):
    c = client(server)
    r1 = c.completions.create(model="stored@1", prompt=PROMPTS[0], extra_body=IGNORE_EOS, **GREEDY)
    r2 = c.completions.create(model="stored@2", prompt=PROMPTS[0], extra_body=IGNORE_EOS, **GREEDY)
    assert r1.choices[0].text == expected(offline, PROMPTS[0], "lora8").text
    assert r2.choices[0].text == expected(offline, PROMPTS[0], "lora").text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="stored@9", prompt=PROMPTS[0], **GREEDY)


# ---------------------------------------------------------------- refusals
def test_unknown_model_is_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="nope", prompt="x", **GREEDY)
    assert e.value.body["message"] == "The model 'nope' does not exist."


def test_keys_and_tenants(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    tenant = client(server, key=TENANT)
    assert {m.id for m in tenant.models.list().data} == {"tiny-llama", "lora", "ia3"}
    tenant.completions.create(model="lora", prompt="x", **GREEDY)
    with pytest.raises(openai.NotFoundError) as e:  # exists, but not for this tenant: no leak
        tenant.completions.create(model="bottleneck", prompt="x", **GREEDY)
    assert e.value.body["message"] == "The model 'bottleneck' does not exist."
    with pytest.raises(openai.NotFoundError):
        tenant.completions.create(model="tiny-llama", prompt="x", extra_body={"adapters": {"stack": ["lora", "peft"]}},
                                  **GREEDY)


def test_bad_requests_are_400_naming_the_problem(server):
    post = lambda body: httpx.post(server.url + "/v1/completions", json=body, timeout=30,  # noqa: E731
                                   headers={"Authorization": f"Bearer {KEY}"})
    r = post({"model": "lora", "prompt": "hello", "max_tokens": 1000})
    assert r.status_code == 400 and re.search(r"1000 max_tokens.*context is 256", r.json()["error"]["message"])
    r = post({"model": "lora", "prompt": "hello", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post({"model": "lora", "prompt": "hello", "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post({"model": "lora", "prompt": [10**9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


# ---------------------------------------------------------------- load / unload
def _admin(server, path, body, key=ADMIN):
    return httpx.post(server.url + path, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})


def test_load_and_unload_during_traffic(server, offline, files):
    folder = files["adapters"]["lora"]
    c = client(server)
    stop = time.monotonic() + 60

    async def traffic():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        try:
            outs = []
            for _ in range(4):
                outs += await asyncio.gather(*(ac.completions.create(model=m, prompt=PROMPTS[0],
                                                                     extra_body=IGNORE_EOS, **GREEDY)
                                               for m in ("ia3", "bottleneck", "peft")))
                assert time.monotonic() < stop
            return outs
        finally:
            await ac.close()

    async def both():
        task = asyncio.ensure_future(traffic())
        await asyncio.sleep(0.05)
        r = await asyncio.to_thread(_admin, server, "/v1/load_lora_adapter", {"lora_name": "fresh",
                                                                             "lora_path": str(folder)})
        assert r.status_code == 200, r.text
        got = await asyncio.to_thread(c.completions.create, model="fresh", prompt=PROMPTS[0],
                                      extra_body=IGNORE_EOS, **GREEDY)
        r = await asyncio.to_thread(_admin, server, "/v1/unload_lora_adapter", {"lora_name": "fresh"})
        assert r.status_code == 200, r.text
        return got, await task

    got, outs = asyncio.run(both())
    assert got.choices[0].text == expected(offline, PROMPTS[0], "lora").text
    for out, model in zip(outs, ["ia3", "bottleneck", "peft"] * 4):
        assert out.choices[0].text == expected(offline, PROMPTS[0], model).text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="fresh", prompt="x", **GREEDY)


def test_load_unload_status_codes_and_keys(server, files):
    a = files["adapters"]
    assert _admin(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(a["lora"])},
                  key=KEY).status_code == 401
    assert _admin(server, "/v1/load_lora_adapter", {"lora_name": "lora", "lora_path": str(a["lora"])}).status_code \
        == 400  # duplicate
    assert _admin(server, "/v1/unload_lora_adapter", {"lora_name": "ghost"}).status_code == 404
    r = _admin(server, "/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": "store:stored@1"})
    assert r.status_code == 200, r.text   # rank 8: at the server's --max-lora-rank 8
    assert _admin(server, "/v1/unload_lora_adapter", {"lora_name": "wide"}).status_code == 200


def test_paths_outside_the_adapter_dirs_are_refused(server, files):
    inside = files["adapters"]["lora"].parent
    for path in (str(files["root"] / "outside"), f"{inside}/../outside", f"{inside}/link-out/outside",
                 "/etc", "relative/../../x"):
        r = _admin(server, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": path})
        assert r.status_code == 400, (path, r.text)
    assert "sneaky" not in {m.id for m in client(server).models.list().data}


def test_rank_above_the_limit_is_400(server, files):
    r = _admin(server, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(files["adapters"]["lora16"])})
    assert r.status_code == 400 and "rank 16" in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------- metrics
def test_metrics_expose_engine_pool_and_vllm_lora_info(server):
    client(server).completions.create(model="lora", prompt="hello", **GREEDY)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("polyadapter_requests_total", "polyadapter_time_to_first_token_seconds_bucket",
                 "polyadapter_queue_depth", "polyadapter_running_requests", "polyadapter_kv_blocks_used",
                 "polyadapter_adapter_pool_hits_total", "polyadapter_adapter_evictions_total",
                 "polyadapter_adapter_load_seconds_bucket"):
        assert name in text, name
    assert re.search(r'vllm:lora_requests_info\{max_lora="4",running_lora_adapters="[^"]*",'
                     r'waiting_lora_adapters="[^"]*"\}', text)


# ---------------------------------------------------------------- overload, disconnects, fuzz
@pytest.fixture(scope="module")
def small(files):
    """A server with a running batch of 2 and a queue of 2: a 5th request in flight gets 429."""
    s = Server(["--model", str(files["model"]), "--adapter", f"lora={files['adapters']['lora']}",
                "--max-num-seqs", "2", "--max-queue", "2", "--store", str(files["store"]), "--no-store-adapters"])
    yield s
    s.stop()


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _until(check, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_overload_gets_429_with_retry_after_and_the_server_answers_afterwards(small):
    body = {"model": "lora", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:
            return await asyncio.wait_for(asyncio.gather(*(c.post("/v1/completions", json=body)
                                                           for _ in range(12))), 120)

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "RateLimitError"
    assert _until(lambda: _metric(small, "polyadapter_in_flight_requests") == 0)
    r = httpx.post(small.url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_client_disconnect_cancels_and_frees_kv_blocks(small):
    before = _metric(small, 'polyadapter_requests_total{status="cancelled"}')
    body = {"model": "lora", "prompt": "hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", json={**body, "stream": False, "n": 2}, timeout=0.3)
    assert _until(lambda: _metric(small, 'polyadapter_requests_total{status="cancelled"}') >= before + 3)
    assert _until(lambda: _metric(small, "polyadapter_kv_blocks_used") == 0
                  and _metric(small, "polyadapter_running_requests") == 0)


def test_openapi_schema_fuzzed_gives_no_5xx(small):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(httpx.get(small.url + "/openapi.json", timeout=10).json())
    deadline = time.monotonic() + 120
    for path, method in (("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                         ("/v1/load_lora_adapter", "POST"), ("/v1/unload_lora_adapter", "POST"),
                         ("/v1/models", "GET")):
        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema[path][method].as_strategy())
        def check(case):
            assert time.monotonic() < deadline, "fuzzing ran past its time"
            response = case.call(base_url=small.url, timeout=60)
            assert response.status_code < 500, (path, case.body, response.text)

        check()
    assert httpx.get(small.url + "/health", timeout=10).status_code == 200

"""The serving engine: for every method and composition, greedy outputs equal each
request run alone with ``pm.generate`` under ``set_active`` (token for token, fp32),
with staggered arrivals, forced chunked prefill, a device pool smaller than the
adapters in flight, cancellation and preemption."""
from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest
import torch
from conftest import make_model

import polyadapter as pa
from polyadapter.compose import Average, Fuse, Stack
from polyadapter.errors import ConfigError
from polyadapter.methods.arrow import ArrowConfig
from polyadapter.methods.poly import PolyConfig
from polyadapter.ops.shared_basis import compress_to_shared_basis
from polyadapter.serve import Engine, Merge, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _configs() -> dict:
    return {"l8": pa.LoraConfig(r=8, targets=["all-linear"]), "l4": pa.LoraConfig(r=4),
            "l2": pa.LoraConfig(r=2, targets=["all-linear"]),
            "ia": pa.IA3Config(), "bn": pa.BottleneckConfig(), "bp": pa.BottleneckConfig(mode="parallel"),
            "sp": pa.SparseConfig(density=0.05), "do": pa.LoraConfig(r=3, use_dora=True),
            "pr": pa.PromptConfig(num_virtual_tokens=3, seed=0), "p5": pa.PromptConfig(num_virtual_tokens=5, seed=1)}


def _randomize(pm, name, g):
    with torch.no_grad():
        for p in pm.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _zoo(kind: str) -> pa.AdapterModel:
    model = make_model(kind)
    model.generation_config.eos_token_id = None  # both sides run to max_tokens
    pm = pa.AdapterModel(model)
    g = torch.Generator().manual_seed(11)
    for name, cfg in _configs().items():
        pm.add_adapter(name, cfg, activate=False)
        _randomize(pm, name, g)
    if kind == "llama":
        pm.add_adapter("hd", pa.LoraConfig(r=2, modules_to_save=["lm_head"]), activate=False)
        _randomize(pm, "hd", g)
        for name in ("la", "lb", "lc"):
            pm.add_adapter(name, pa.LoraConfig(r=4, targets=["q_proj", "v_proj"]), activate=False)
            _randomize(pm, name, g)
        pm.add_adapter("fu", pa.FusionConfig(adapters=["la", "lb"]), activate=False)
        _randomize(pm, "fu", g)
        pm.add_adapter("ar", ArrowConfig(library=["la", "lb", "lc"], top_k=2), activate=False)
        pm.add_adapter("po", PolyConfig(inventory=["la", "lb", "lc"], n_heads=2, seed=0), activate=False)
        _randomize(pm, "po", g)
        compress_to_shared_basis(pm, ["la", "lb"], "sb", rank=4)
    return pm


@functools.lru_cache(maxsize=None)
def zoo(kind: str) -> pa.AdapterModel:
    return _zoo(kind)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 100, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _drain(engine, handles, seconds: float = 120) -> None:
    """Step a thread-less engine until every handle is done (bounded in time; a step with
    nothing to run, while adapters are read in the background, sleeps a moment)."""
    deadline = time.monotonic() + seconds
    while not all(h.done for h in handles):
        assert time.monotonic() < deadline, f"requests still running after {seconds} s"
        if not engine.step():
            time.sleep(0.001)


def reference(pm, prompt: list[int], setup, max_tokens: int) -> list[int]:
    """The request alone: ``pm.generate`` under ``set_active``, greedy."""
    saved = pm.state.setup
    pm.set_active(setup) if setup is not None else pm.set_active()
    try:
        ids = torch.tensor([prompt])
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          do_sample=False)
    finally:
        pm.state.setup = saved
    out = out[0].tolist()
    # a prompt adapter makes generate run from inputs_embeds: it then returns only new tokens
    return out[-max_tokens:]


SETUPS = {
    "llama": [None, "l8", "l4", "l2", "ia", "bn", "bp", "sp", "do", "pr", "p5", "hd", Stack("l4", "ia"),
              Stack("pr", "l8"), Average("l8", "bp", weights=[0.3, 0.7]), Fuse("la", "lb"), "fu", "ar", "po",
              "la-jd", Stack("bn", "l2")],
    "gpt2": [None, "l8", "l4", "ia", "bn", "bp", "sp", "do", "pr", Stack("l4", "ia"),
             Average("l8", "bn", weights=[0.5, 0.5])],
}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_every_method_and_composition_equals_running_alone(kind):
    pm = zoo(kind)
    setups = SETUPS[kind]
    prompts = _prompts(len(setups), seed=1)
    want = [reference(pm, p, s, GREEDY.max_tokens) for p, s in zip(prompts, setups)]
    with Engine(pm, start=False, max_num_seqs=8, max_num_batched_tokens=16, chunk_size=5,
                kv_cache_tokens=1024) as engine:
        got = engine.generate(prompts, setups, GREEDY)
    for s, w, g in zip(setups, want, got):
        assert g.token_ids == w, f"setup {s!r}"
        assert g.finish_reason == "length"


def test_staggered_arrivals_and_chunked_prefill():
    pm = zoo("llama")
    setups = ["l8", None, "ia", Stack("pr", "l8"), "bn", "do", "l4", "sp"] * 2
    prompts = _prompts(len(setups), seed=2)
    want = [reference(pm, p, s, 5) for p, s in zip(prompts, setups)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    with Engine(pm, start=False, max_num_seqs=5, max_num_batched_tokens=7, chunk_size=3,
                kv_cache_tokens=1024) as engine:
        handles = []
        for i, (p, s) in enumerate(zip(prompts, setups)):  # one new request every other step
            handles.append(engine.submit(p, s, params))
            engine.step()
            if i % 2:
                engine.step()
        _drain(engine, handles)
        assert [h.result(0).token_ids for h in handles] == want


def test_preemption_when_kv_runs_out_keeps_outputs_equal():
    pm = zoo("llama")
    setups = ["l8", "ia", None, "bn", "l4", "do"]
    prompts = [p + [3] * 10 for p in _prompts(len(setups), seed=3)]
    want = [reference(pm, p, s, 6) for p, s in zip(prompts, setups)]
    with Engine(pm, start=False, max_num_seqs=6, max_num_batched_tokens=64, chunk_size=64, block_size=4,
                kv_cache_tokens=64) as engine:
        got = engine.generate(prompts, setups, GREEDY)
        assert engine.scheduler.preemptions > 0
        assert engine.allocator.num_free == engine.num_blocks
    assert [g.token_ids for g in got] == want


def test_cancel_frees_blocks_on_the_next_step():
    pm = zoo("llama")
    with Engine(pm, start=False, kv_cache_tokens=512, block_size=4) as engine:
        long = engine.submit([5] * 20, "l8", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        other = engine.submit([6] * 8, "ia", GREEDY)
        for _ in range(3):
            engine.step()
        used = engine.num_blocks - engine.allocator.num_free
        assert len(long.request.blocks) > 0 and used >= len(long.request.blocks)
        long.cancel()
        engine.step()
        assert long.done and long.result(0).finish_reason == "cancelled"
        assert long.request.blocks == []
        assert engine.num_blocks - engine.allocator.num_free == len(other.request.blocks)
        while not other.done:
            engine.step()
        assert engine.allocator.num_free == engine.num_blocks
        assert other.result(0).token_ids == reference(pm, [6] * 8, "ia", 6)


def test_sampling_is_per_request_and_seeded_streams_do_not_depend_on_the_batch():
    pm = zoo("llama")
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        alone = engine.generate([[7, 8, 9]], ["l8"], seeded)[0].token_ids
        crowd = engine.generate([[7, 8, 9]] + _prompts(5, seed=4), ["l8", None, "ia", "bn", "l4", None],
                                [seeded] + [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)] * 5)
    assert crowd[0].token_ids == alone
    stop = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(alone[2],), ignore_eos=True)
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        out = engine.generate([[7, 8, 9]], ["l8"], SamplingParams(max_tokens=8, temperature=0, logprobs=True,
                                                                  ignore_eos=True))[0]
        assert len(out.logprobs) == 8 and all(lp <= 0 for lp in out.logprobs)
        first = reference(pm, [7, 8, 9], "l8", 8)
        stop = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(first[3],), ignore_eos=True)
        stopped = engine.generate([[7, 8, 9]], ["l8"], stop)[0]
    cut = first.index(first[3]) + 1
    assert stopped.token_ids == first[:cut] and stopped.finish_reason == "stop"


def _saved_library(pm, tmp_path, names) -> dict:
    paths = {}
    for n in names:
        paths[n] = tmp_path / n
        pm.save_adapter(n, paths[n])
    return paths


def test_pool_smaller_than_the_adapters_in_flight_loads_and_evicts(tmp_path):
    """Adapters registered from folders (native and PEFT), a pool of 2 device slots,
    6 distinct adapters in flight: outputs still equal running alone."""
    src = zoo("llama")
    g = torch.Generator().manual_seed(3)
    for i in range(6):
        if f"x{i}" not in src.adapters:
            src.add_adapter(f"x{i}", pa.LoraConfig(r=4 + 4 * (i % 2), targets=["all-linear"]), activate=False)
            _randomize(src, f"x{i}", g)
    folders = {}
    for i in range(6):
        folders[f"x{i}"] = tmp_path / f"x{i}"
        src.save_adapter(f"x{i}", folders[f"x{i}"], format="peft" if i % 3 == 0 else "native")
    names = [f"x{i}" for i in (0, 1, 2, 3, 4, 5, 0, 2, 4, 1, 3, 5)]
    prompts = _prompts(len(names), seed=5)
    want = [reference(src, p, n, 6) for p, n in zip(prompts, names)]
    base = make_model("llama")
    base.generation_config.eos_token_id = None
    pm = pa.AdapterModel(base)
    with Engine(pm, start=False, device_slots=2, max_num_seqs=4, kv_cache_tokens=1024) as engine:
        for n, path in folders.items():
            engine.register_adapter(n, path)
        assert pm.adapters == []  # registering reads no weights
        got = engine.generate(prompts, names, GREEDY)
        stats = engine.pool.stats
        assert stats.evictions > 0 and stats.loads >= 6
        assert len(pm.adapters) <= 2
        # every install used a plan the reader thread built and checked (evicted ones again)
        assert len(stats.prepare_ms) == stats.installs > 6
    assert [x.token_ids for x in got] == want, [(x.finish_reason, x.error) for x in got]


def test_loads_while_requests_run_never_mix_weights(tmp_path):
    """Adapters keep arriving (register + first use) while others decode: each request
    still matches its own adapter alone; slots of evicted adapters are reused."""
    src = zoo("llama")
    folders = _saved_library(src, tmp_path, ["l8", "l2", "do", "ia", "bn"])
    base = make_model("llama")
    base.generation_config.eos_token_id = None
    pm = pa.AdapterModel(base)
    order = ["l8", "l2", "do", "ia", "bn", "l8", "l2"]
    prompts = _prompts(len(order), seed=6)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [reference(src, p, n, 8) for p, n in zip(prompts, order)]
    with Engine(pm, start=False, device_slots=2, max_num_seqs=3, kv_cache_tokens=1024) as engine:
        handles = []
        for p, n in zip(prompts, order):
            if n not in engine.pool.sources:
                engine.register_adapter(n, folders[n])
            handles.append(engine.submit(p, n, params))
            for _ in range(3):
                engine.step()
        _drain(engine, handles)
    assert [h.result(0).token_ids for h in handles] == want


def test_per_request_merge_is_computed_once_and_cached():
    pm = zoo("llama")
    merge = {"ids": ["la", "lb"], "weights": [0.6, 0.4], "merge_strategy": "ties", "density": 0.5}
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        a, b = engine.generate([[4, 5, 6], [9, 9]], [{"merged_adapters": merge}, merge], GREEDY)
        name = Merge.from_lorax(merge).name
        assert engine.pool.stats.installs == 1 and name in pm.adapters
        want = [reference(pm, [4, 5, 6], name, 6), reference(pm, [9, 9], name, 6)]
        assert [a.token_ids, b.token_ids] == want
        assert want[0] != reference(pm, [4, 5, 6], "la", 6)
        # a merge that cannot be computed fails its requests with the reason, not the engine
        bad = engine.generate([[4, 5]], [Merge(("l8", "l2"), (1, 1), "ties", density=0.5)], GREEDY)[0]
        assert bad.finish_reason == "error" and "same rank" in bad.error
        assert engine.generate([[4, 5]], ["l8"], GREEDY)[0].token_ids == reference(pm, [4, 5], "l8", 6)
    pm.remove_adapter(name)


def test_thread_streams_sync_and_async():
    pm = zoo("llama")
    with Engine(pm, kv_cache_tokens=1024) as engine:
        h = engine.submit([3, 4, 5], "l4", GREEDY)
        tokens = [e.token for e in h]
        assert tokens == reference(pm, [3, 4, 5], "l4", 6) == h.result(5).token_ids
        assert h.result().ttft_s is not None and h.result().completion_tokens == 6

        async def many():
            hs = [engine.submit(p, s, GREEDY) for p, s in zip(_prompts(4, seed=8), ["l8", "ia", None, "bn"])]
            async def collect(x):
                return [e.token async for e in x]
            return await asyncio.wait_for(asyncio.gather(*(collect(x) for x in hs)), 60)
        outs = asyncio.run(many())
        assert outs == [reference(pm, p, s, 6) for p, s in zip(_prompts(4, seed=8), ["l8", "ia", None, "bn"])]


def test_bad_requests_are_refused_with_the_reason():
    pm = zoo("llama")
    with Engine(pm, start=False, kv_cache_tokens=256, device_slots=2) as engine:
        with pytest.raises(pa.errors.AdapterNameError, match="nope"):
            engine.submit([1, 2], "nope")
        with pytest.raises(ConfigError, match="context is 64"):
            engine.submit([1] * 60, None, SamplingParams(max_tokens=10))
        with pytest.raises(ConfigError, match="vocabulary size 100"):
            engine.submit([100], None)
        with pytest.raises(ConfigError, match="token ids"):
            engine.submit([], None)
        with pytest.raises(ConfigError, match="whole batch"):
            engine.submit([1], pa.compose.BatchSplit("l8", batch_sizes=[1]))
        with pytest.raises(ConfigError, match="text prompt needs"):
            engine.submit("hello", None)
    assert not threading.current_thread().name.startswith("polyadapter")


def test_adapters_from_the_store_and_a_thousand_registered(tmp_path):
    from polyadapter.store import Store
    src = zoo("llama")
    folders = _saved_library(src, tmp_path, ["l8", "bn"])
    store = Store.init(tmp_path / "store")
    for n, path in folders.items():
        store.add(path, f"s-{n}")
    base = make_model("llama")
    base.generation_config.eos_token_id = None
    pm = pa.AdapterModel(base)
    with Engine(pm, start=False, store=store, device_slots=2, kv_cache_tokens=1024) as engine:
        for i in range(1000):
            engine.register_adapter(f"n{i}", f"store:s-{('l8', 'bn')[i % 2]}")
        assert engine.pool.stats.loads == 0 and pm.adapters == []
        names = ["n0", "n1", "n2", "n0", "n3"]
        prompts = _prompts(len(names), seed=9)
        got = engine.generate(prompts, names, GREEDY)
        assert engine.pool.stats.loads == 4  # n0 once; the rest on first use
        with pytest.raises(pa.errors.AdapterNameError, match="already registered"):
            engine.register_adapter("n5", "store:s-l8")
    want = [reference(src, p, ("l8", "bn")[int(n[1:]) % 2], 6) for p, n in zip(prompts, names)]
    assert [g.token_ids for g in got] == want


def test_an_unreadable_adapter_fails_its_requests_only(tmp_path):
    src = zoo("llama")
    folders = _saved_library(src, tmp_path, ["l8"])
    weights = [p for p in folders["l8"].iterdir() if p.suffix == ".safetensors"]
    weights[0].write_bytes(b"\x00" * 16)
    base = make_model("llama")
    base.generation_config.eos_token_id = None
    pm = pa.AdapterModel(base)
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        engine.register_adapter("broken", folders["l8"])
        bad, good = engine.generate([[3, 4], [3, 4]], ["broken", None], GREEDY)
    assert bad.finish_reason == "error" and "broken" in bad.error
    assert good.token_ids == reference(src, [3, 4], None, 6)
    assert pm.adapters == []


def test_unregister_refuses_what_is_in_use_and_frees_the_rest(tmp_path):
    src = zoo("llama")
    folders = _saved_library(src, tmp_path, ["l8", "la", "lb"])
    pm = pa.AdapterModel(make_model("llama"))
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        for n, path in folders.items():
            engine.register_adapter(n, path)
        engine.register_adapter("mix", Merge(("la", "lb"), (0.5, 0.5)))
        h = engine.submit([3, 4], "l8", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        deadline = time.monotonic() + 60  # until it runs (its adapter is read in the background first)
        while not h.request.output and time.monotonic() < deadline:
            if not engine.step():
                time.sleep(0.001)
        assert h.request.output and not h.done
        with pytest.raises(pa.errors.PolyAdapterError, match="in use by running requests"):
            engine.pool.unregister("l8")
        with pytest.raises(pa.errors.PolyAdapterError, match="used by"):
            engine.pool.unregister("la")
        h.cancel()
        engine.step()
        engine.pool.unregister("l8")
        assert "l8" not in pm.adapters and "l8" not in engine.pool.sources
        with pytest.raises(pa.errors.AdapterNameError, match="no adapter named 'l8'"):
            engine.submit([3], "l8")


def test_a_name_registered_again_never_gets_the_old_adapters_read(tmp_path):
    """Unregistering drops a read (and prepared parts) still in the pool's hands, so the
    same name registered from another folder serves the new weights."""
    src = zoo("llama")
    folders = _saved_library(src, tmp_path, ["la", "lb"])
    pm = pa.AdapterModel(make_model("llama"))
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        engine.register_adapter("x", folders["la"])
        engine.pool.prefetch(["x"])
        engine.pool._loading["x"].result(timeout=60)   # read and prepared, not yet installed
        engine.pool.unregister("x")
        engine.register_adapter("x", folders["lb"])
        got = engine.generate([[3, 4, 5]], ["x"], GREEDY)[0].token_ids
    assert got == reference(src, [3, 4, 5], "lb", 6)
    assert got != reference(src, [3, 4, 5], "la", 6)


def test_run_serves_in_the_calling_thread_until_stopped():
    """``Engine.run`` (engines made with ``start=False``): the loop runs in the caller's
    thread while another thread submits; it returns when ``stop`` is set, and refuses to
    run beside the engine's own loop thread."""
    pm = zoo("llama")
    prompts, setups = _prompts(3, seed=5), ["l8", None, Stack("l4", "ia")]
    with Engine(pm, start=False, kv_cache_tokens=1024) as engine:
        got, stop = {}, threading.Event()

        def feed():
            try:
                handles = [engine.submit(p, s, GREEDY) for p, s in zip(prompts, setups)]
                got["out"] = [h.result(120).token_ids for h in handles]
            finally:
                stop.set()
        feeder = threading.Thread(target=feed)
        feeder.start()
        engine.run(stop=stop)
        feeder.join(timeout=60)
        assert not feeder.is_alive() and stop.is_set()
    assert got["out"] == [reference(pm, p, s, 6) for p, s in zip(prompts, setups)]
    with Engine(pm, kv_cache_tokens=256) as threaded:
        with pytest.raises(pa.errors.StateError, match="already runs its loop in thread 'polyadapter-engine'"):
            threaded.run()


def test_start_in_thread_builds_and_runs_the_engine_in_one_new_thread():
    """What ``build`` returns comes back once built; the engine's loop runs in the thread
    that built it; what ``build`` raises is raised in the caller, and a build that does not
    return a thread-less engine is refused."""
    from polyadapter.serve import start_in_thread
    pm = zoo("llama")
    built = {}

    def build():
        built["thread"] = threading.current_thread()
        return Engine(pm, start=False, kv_cache_tokens=1024), "settings"
    engine, extra = start_in_thread(build)
    try:
        assert extra == "settings" and engine._thread is built["thread"]
        assert built["thread"] is not threading.current_thread() and built["thread"].is_alive()
        out = engine.generate([[3, 4, 5]], ["l8"], GREEDY)[0].token_ids   # served by the loop thread
        assert out == reference(pm, [3, 4, 5], "l8", 6)
    finally:
        engine.close()
    assert not built["thread"].is_alive()

    def broken():
        raise ConfigError("no model here")
    with pytest.raises(ConfigError, match="no model here"):
        start_in_thread(broken)
    with pytest.raises(ConfigError, match="must return an Engine made with start=False"):
        start_in_thread(lambda: "not an engine")

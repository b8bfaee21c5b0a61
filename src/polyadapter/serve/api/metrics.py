"""Prometheus metrics (prometheus-client, one registry per app). Request counts and
latency histograms are recorded by the routes; engine and pool state is read at
scrape time. ``vllm:lora_requests_info`` is named and labelled as vLLM's, so routers
that read it for adapter affinity (the Gateway API inference extension, llm-d) work
unchanged."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS_MS = (1, 5, 10, 20, 50, 100, 250, 500, 1000, 5000)


class Metrics:
    def __init__(self, engine, admission):
        self.registry = CollectorRegistry()
        self.requests = Counter("polyadapter_requests", "Finished API requests by status", ["status"],
                                registry=self.registry)
        self.ttft = Histogram("polyadapter_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("polyadapter_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, admission))

    def observe(self, output) -> None:
        if output.ttft_s is not None:
            self.ttft.observe(output.ttft_s)
        if output.completion_tokens > 1 and output.ttft_s is not None:
            self.tpot.observe((output.latency_s - output.ttft_s) / (output.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine, admission):
        self.engine, self.admission = engine, admission

    def collect(self):
        m = self.engine.metrics()
        gauges = {"polyadapter_queue_depth": ("Requests waiting for the running batch", m["waiting"]),
                  "polyadapter_running_requests": ("Requests in the running batch", m["running"]),
                  "polyadapter_in_flight_requests": ("Requests accepted and not finished (API)",
                                                     self.admission.in_flight),
                  "polyadapter_kv_blocks_used": ("KV cache blocks in use", m["kv_blocks_used"]),
                  "polyadapter_kv_blocks_total": ("KV cache blocks", m["kv_blocks_total"]),
                  "polyadapter_adapters_on_device": ("Adapters installed on the device", m["adapters_on_device"]),
                  "polyadapter_adapters_registered": ("Adapters the server can serve", m["adapters_registered"])}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {"polyadapter_adapter_pool_hits": ("Requests whose adapters were on the device", "pool_hits"),
                    "polyadapter_adapter_pool_misses": ("Requests that waited for an adapter", "pool_misses"),
                    "polyadapter_adapter_loads": ("Adapter reads from disk or the store", "pool_loads"),
                    "polyadapter_adapter_installs": ("Adapter installs into device slots", "pool_installs"),
                    "polyadapter_adapter_evictions": ("Adapters evicted from device slots", "pool_evictions"),
                    "polyadapter_preemptions": ("Requests preempted for KV memory", "preemptions"),
                    "polyadapter_engine_steps": ("Engine steps run", "steps")}
        for name, (doc, key) in counters.items():
            yield CounterMetricFamily(name, doc, value=m[key])
        loads = list(self.engine.pool.stats.load_ms)
        buckets = [(str(b / 1000), sum(v <= b for v in loads)) for b in LOAD_BUCKETS_MS] + [("+Inf", len(loads))]
        yield HistogramMetricFamily("polyadapter_adapter_load_seconds", "Adapter read latency (disk or store "
                                    "to host memory)", buckets=buckets, sum_value=sum(loads) / 1000)
        running, waiting = self.engine.adapters_in_use()
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests (vLLM's name)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        info.add_metric([str(self.engine.pool.device_slots), ",".join(running), ",".join(waiting)], time.time())
        yield info

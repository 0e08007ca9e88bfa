"""The engine service's Prometheus metrics (served at /metrics by common/service_http.py).

Two sources, each read by its owner: `engine_stats` runs on the engine thread at the end of every
turn and copies the engine's state out as plain numbers (EngineStats); the event loop then sets
the gauges from it, and observes latencies and counts tokens as it turns outputs into reply
entries (EngineMetrics.on_output). Nothing here reads the engine from another thread.

Per-adapter series are bounded (AdapterTopK): at each scrape only the METRICS_ADAPTER_LABELS
adapters with the most finished requests get a series, each holding that adapter's whole count (so
a series only grows, even when it drops out of the top and comes back); the rest is the difference
to the totals (`lorafleet_engine_finished_requests_total`, `..._generated_tokens_total`): in
PromQL, other = total - sum(per adapter). An adapter="other" series would have to shrink whenever an
adapter enters the top, which Prometheus reads as a counter reset.

`vllm:lora_requests_info` is vLLM's gauge, with its labels, for routers that send requests to the
engine already holding their adapter (the Kubernetes Gateway API inference extension's LoRA
affinity): running_lora_adapters and waiting_lora_adapters are comma-joined adapter ids (waiting:
the first 64 in queue order), max_lora the adapters that fit on the GPU at once (the slots); the
value is the scrape time, as vLLM sets it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from itertools import islice

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
WAITING_ADAPTERS_SHOWN = 64


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_pages: int
    free_pages: int
    adapter_pages: int
    adapters_on_gpu: int
    adapters_packed: int
    packed_bytes: int
    adapter_slots: int
    adapter_loads: int
    adapter_evictions: int
    packs_on_demand: int
    preemptions: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


def engine_stats(engine) -> EngineStats:
    """On the engine thread: the engine's state as plain numbers."""
    sched, adapters = engine.scheduler, engine.adapters
    return EngineStats(
        running=len(sched.running), waiting=len(sched.waiting), kv_pages=engine.kv.used_pages(),
        free_pages=engine.kv.allocator.num_free, adapter_pages=adapters.resident_pages(),
        adapters_on_gpu=adapters.num_resident, adapters_packed=len(adapters.host),
        packed_bytes=adapters.host.used_bytes, adapter_slots=adapters.tables.page_table.shape[0],
        adapter_loads=adapters.num_loads, adapter_evictions=adapters.num_evictions,
        packs_on_demand=adapters.host.num_packed_on_demand, preemptions=sched.num_preemptions,
        running_adapters=tuple(sorted({r.adapter_id for r in sched.running if r.adapter_id})),
        waiting_adapters=tuple(dict.fromkeys(
            r.adapter_id for r in islice(sched.waiting, WAITING_ADAPTERS_SHOWN) if r.adapter_id)),
    )


class EngineMetrics:
    def __init__(self, adapter_labels: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, "lorafleet_engine_"
        self.running = Gauge(p + "requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "requests queued in the engine", registry=r)
        self.kv_pages = Gauge(p + "kv_pages_used", "pool pages holding KV cache", registry=r)
        self.free_pages = Gauge(p + "pages_free", "free pool pages", registry=r)
        self.adapter_pages = Gauge(p + "adapter_pages_used", "pool pages holding adapters", registry=r)
        self.adapters_gpu = Gauge(p + "adapters_on_gpu", "adapters resident in the GPU pool", registry=r)
        self.adapters_packed = Gauge(p + "adapters_packed_on_host", "adapters packed in host memory", registry=r)
        self.packed_bytes = Gauge(p + "packed_adapter_bytes", "host bytes of packed adapters", registry=r)
        self.loads = Counter(p + "adapter_loads", "adapters copied into the GPU pool", registry=r)
        self.evictions = Counter(p + "adapter_evictions", "adapters evicted from the GPU pool", registry=r)
        self.pack_waits = Counter(p + "adapter_packs_on_demand", "adapters packed while a load waited", registry=r)
        self.preemptions = Counter(p + "preemptions", "requests preempted (recomputed later)", registry=r)
        self.tokens = Counter(p + "generated_tokens", "tokens generated (rate: tokens per second)", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "ingest to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram(p + "inter_token_seconds", "between two outputs of a request, per token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "request_seconds", "ingest to the last token", buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram(p + "turn_seconds", "one engine turn (admissions and a step)", buckets=STEP_BUCKETS,
                              registry=r)
        self.finished = Counter(p + "finished_requests", "requests finished (any reason)", registry=r)
        self.per_adapter = AdapterTopK(adapter_labels)  # adapter_requests / adapter_tokens, top adapters
        r.register(self.per_adapter)
        self.kafka_lag = Gauge(p + "kafka_lag", "work messages not yet finished: partition end offset minus the "
                               "engine's committed offset", ["partition"], registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "running and waiting LoRA adapters (vLLM's gauge)",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        self._last: EngineStats | None = None

    def on_turn(self, stats: EngineStats, seconds: float) -> None:
        """Event loop: gauges from the turn's EngineStats; counters advance by what changed."""
        last = self._last
        self.step.observe(seconds)
        for gauge, value in ((self.running, stats.running), (self.waiting, stats.waiting),
                             (self.kv_pages, stats.kv_pages), (self.free_pages, stats.free_pages),
                             (self.adapter_pages, stats.adapter_pages), (self.adapters_gpu, stats.adapters_on_gpu),
                             (self.adapters_packed, stats.adapters_packed), (self.packed_bytes, stats.packed_bytes)):
            gauge.set(value)
        for counter, name in ((self.loads, "adapter_loads"), (self.evictions, "adapter_evictions"),
                              (self.pack_waits, "packs_on_demand"), (self.preemptions, "preemptions")):
            delta = getattr(stats, name) - (getattr(last, name) if last else 0)
            if delta > 0:
                counter.inc(delta)
        if last is None or (stats.running_adapters, stats.waiting_adapters) != (last.running_adapters,
                                                                                last.waiting_adapters):
            self.lora_info.clear()  # one series: the current adapters
        self.lora_info.labels(",".join(stats.running_adapters), ",".join(stats.waiting_adapters),
                              str(stats.adapter_slots)).set(time.time())
        self._last = stats

    def on_output(self, job, out, now: float) -> None:
        """Event loop, per RequestOutput of a job, before its entry is recorded: first token,
        tokens, inter-token gap, end. Sets job.last_output_at."""
        received_at, new_tokens = job.item.received_at, len(out.new_token_ids)
        if new_tokens and not job.history:
            self.ttft.observe(max(now - received_at, 0.0))
        elif new_tokens and job.last_output_at:
            gap = (now - job.last_output_at) / new_tokens
            for _ in range(new_tokens):
                self.itl.observe(gap)
        job.last_output_at = now
        self.tokens.inc(new_tokens)
        if job.item.adapter is not None:
            self.per_adapter.add(job.item.adapter, int(out.finished), new_tokens)
        if out.finished:
            self.finished.inc()
            self.e2e.observe(max(now - received_at, 0.0))


class AdapterTopK:
    """Finished requests and tokens per adapter, exported for the `k` adapters with the most
    requests at each scrape (a Prometheus custom collector). Updated on the event loop, read by
    the scrape thread: a lock guards the dict."""

    def __init__(self, k: int):
        self.k = k
        self._counts: dict[str, list[int]] = {}  # adapter -> [finished requests, tokens]
        self._lock = threading.Lock()

    def add(self, adapter: str, requests: int, tokens: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(adapter, [0, 0])
            counts[0] += requests
            counts[1] += tokens

    def collect(self):
        with self._lock:
            top = sorted(self._counts.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[: self.k]
        requests = CounterMetricFamily("lorafleet_engine_adapter_requests", "finished requests of each of the top "
                                       "adapters (the rest: finished_requests_total minus their sum)", labels=["adapter"])
        tokens = CounterMetricFamily("lorafleet_engine_adapter_tokens", "generated tokens of each of the top adapters",
                                     labels=["adapter"])
        for adapter, (n_requests, n_tokens) in top:
            requests.add_metric([adapter], n_requests)
            tokens.add_metric([adapter], n_tokens)
        yield requests
        yield tokens

    def describe(self):
        return []  # names known only at collect time: registration does not pre-check them

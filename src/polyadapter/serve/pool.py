"""The adapter pool: thousands of registered adapters, a few on the device at once.

Three tiers:

- **device**: adapters installed on the model, at most ``device_slots`` of them (plus
  the ones that were installed before the engine started, which stay). Their weights
  sit in fixed bank slots (``mixed.SlotBank``): installing one writes its own slots
  and nothing else. When the device is full, the least recently used adapter that no
  running request holds (and no other installed adapter builds on) is removed.
- **host**: adapters read from disk and checked, kept in memory (LRU, bounded by
  ``host_bytes``; pinned memory on CUDA so the copy to the device is asynchronous).
- **source**: a native or PEFT folder, or a ``store:`` reference. Registering reads
  only the adapter's config (for its method and the adapters it builds on), never its
  weights, so registering the 1,000th costs what registering the first did.

Reads from disk run in a background thread (``prefetch`` starts them as soon as a
request is queued); installing onto the device happens on the engine's thread between
steps, never during one, so no step sees an adapter half-written.

Per-request merges (LoRAX's ``merged_adapters``) become derived adapters named by
the merge's content: computed once with ``ops.combine`` when their sources are on the
device, then kept in the host tier like any other adapter.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compose import depends_on
from ..errors import AdapterNameError, ConfigError, LoadError, PolyAdapterError
from ..sites import Site, original_or_site
from .reader import Reader

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # ops.combine's names


@dataclass(frozen=True)
class Merge:
    """A per-request merge of adapters (LoRAX's ``merged_adapters``): ``adapters`` with
    ``weights`` by ``method`` (linear, ties, dare_linear, dare_ties, magnitude_prune),
    ``density`` for all but linear. Computed once and cached as a derived adapter."""

    adapters: tuple
    weights: tuple
    method: str = "linear"
    density: float | None = None
    majority_sign: str = "total"

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.adapters or len(self.adapters) != len(self.weights):
            raise ConfigError(f"merge: {len(self.adapters)} adapters and {len(self.weights)} weights; give one "
                              f"weight per adapter (and at least one adapter)")
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"merge: method {self.method!r} is unknown; expected one of {sorted(MERGE_METHODS)}")

    @classmethod
    def from_lorax(cls, spec: dict) -> Merge:
        """From LoRAX's ``{"ids", "weights", "merge_strategy", "density", "majority_sign_method"}``."""
        if not isinstance(spec, dict) or "ids" not in spec:
            raise ConfigError(f"merged_adapters must be an object with 'ids' (and 'weights'); found {spec!r}")
        ids = list(spec["ids"])
        weights = spec.get("weights") or [1.0] * len(ids)
        return cls(tuple(ids), tuple(weights), spec.get("merge_strategy", "linear"), spec.get("density"),
                   spec.get("majority_sign_method", "total"))

    @property
    def name(self) -> str:
        key = json.dumps([self.adapters, self.weights, self.method, self.density, self.majority_sign])
        return "merge-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Parts:
    """An adapter as read from disk: what ``plan_adapter`` + ``load_tensors`` need."""

    config: object
    sites: list
    tensors: dict
    provenance: dict = field(default_factory=dict)
    where: str = ""
    plan: object = None   # built and filled in the reader thread (see ``prepare``); used by one install

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Source:
    """A registered adapter: where it lives, and what the engine must know before its
    weights are read (its method, the adapters it builds on, its virtual tokens)."""

    name: str
    kind: str          # resident | folder | store | merge
    ref: object        # a path, a store ref, a Merge, or None
    method: str
    needs: list
    virtual_tokens: int = 0   # prompt tuning: placeholder tokens in front of the prompt
    rank: int | None = None   # LoRA's largest rank (None for other methods)

    @classmethod
    def of_config(cls, name: str, kind: str, ref, config) -> Source:
        tokens = config.num_virtual_tokens if config.method == "prompt" else 0
        return cls(name, kind, ref, config.method, depends_on(config), tokens, _largest_rank(config))


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0            # disk -> host reads
    installs: int = 0         # host -> device installs
    evictions: int = 0
    load_ms: list = field(default_factory=list)      # disk -> host, per read
    install_ms: list = field(default_factory=list)   # host -> device, per install (on the engine thread)
    prepare_ms: list = field(default_factory=list)   # parts built and checked, per install (reader thread)


class AdapterPool:
    def __init__(self, pm, device_slots: int = 16, host_bytes: int = 4 << 30, store=None,
                 max_rank: int | None = None):
        if device_slots < 1:
            raise ConfigError(f"device_slots={device_slots} must be >= 1")
        self.pm, self.store, self.max_rank = pm, store, max_rank
        self._store_thread = threading.get_ident()   # the thread whose connection ``store`` holds
        self.resident = set(pm.adapters)            # installed before the engine: never evicted
        self.device_slots = device_slots
        self.host_bytes = host_bytes
        self.sources: dict[str, Source] = {n: Source.of_config(n, "resident", None, pm.record(n).config)
                                           for n in self.resident}
        self.device: OrderedDict[str, None] = OrderedDict()   # evictable installed adapters, LRU first
        self.host: OrderedDict[str, Parts] = OrderedDict()
        self.pins: Counter = Counter()
        self.wanted: OrderedDict[str, None] = OrderedDict()
        self.failed: dict[str, str] = {}
        self.stats = PoolStats()
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._tree_lock = threading.Lock()   # the model's module tree: installs vs. plans read in the reader
        self._local = threading.local()
        self.on_loaded = lambda: None   # the engine wakes its loop when a read finishes
        self._reader = Reader("polyadapter-pool", on_exit=self._close_reader_store)
        self._saved_bank_slots = pm.state.bank_slots
        pm.state.bank_slots = pm.state.bank_slots or device_slots + len(self.resident)

    # ------------------------------------------------------------------ registry
    def register(self, name: str, source) -> None:
        """Register adapter ``name`` from a folder (native or PEFT), a ``store:REF``
        string, or a :class:`Merge`. Reads the config only."""
        from ..names import check_name
        check_name(name)
        if name in self.sources:
            raise AdapterNameError(f"an adapter named {name!r} is already registered")
        if isinstance(source, Merge):
            missing = [a for a in source.adapters if a not in self.sources]
            if missing:
                raise AdapterNameError(f"merge {name!r}: unknown adapter(s) {missing}")
            self.sources[name] = Source(name, "merge", source, self.sources[source.adapters[0]].method,
                                        list(source.adapters))
            return
        text = str(source)
        if text.startswith("store:"):
            if self.store is None:
                raise ConfigError(f"adapter {name!r}: {text} names the store, but the engine has none")
            version = self._resolve(text[len("store:"):])
            from ..methods import config_from_dict
            config = config_from_dict(version.config, where=f"store adapter {version.ref}")
            found = Source.of_config(name, "store", text[len("store:"):], config)
        else:
            found = _folder_source(name, Path(text))
        if self.max_rank is not None and found.rank is not None and found.rank > self.max_rank:
            raise ConfigError(f"adapter {name!r} ({text}): LoRA rank {found.rank} is above this engine's "
                              f"max_lora_rank={self.max_rank}")
        self.sources[name] = found

    def unregister(self, name: str) -> None:
        if name not in self.sources:
            raise AdapterNameError(f"no adapter named {name!r} is registered")
        if self.pins[name]:
            raise PolyAdapterError(f"adapter {name!r} is in use by running requests")
        users = [s.name for s in self.sources.values() if name in s.needs]
        if users:
            raise PolyAdapterError(f"adapter {name!r} is used by {users[:3]}; unregister those first")
        if name in self.resident:
            raise PolyAdapterError(f"adapter {name!r} was installed before the engine started; it stays")
        if name in self.device:
            self._evict(name)
        with self._lock:  # a read or prepare still running is dropped: a new adapter of this name reads afresh
            self.host.pop(name, None)
            self._loading.pop(name, None)
        self.wanted.pop(name, None)
        del self.sources[name]

    def merge_source(self, merge: Merge) -> str:
        """The derived adapter's name for ``merge``, registered on first use."""
        name = merge.name
        if name not in self.sources:
            self.register(name, merge)
        return name

    def closure(self, names) -> list[str]:
        """``names`` and everything they build on, dependencies first."""
        out: list[str] = []

        def visit(n, trail):
            if n in out:
                return
            if n not in self.sources:
                raise AdapterNameError(f"no adapter named {n!r} is registered; registered: "
                                       f"{sorted(self.sources)[:10]}{' ...' if len(self.sources) > 10 else ''}")
            if n in trail:
                raise ConfigError(f"adapters {trail + [n]} build on each other in a circle")
            for d in self.sources[n].needs:
                visit(d, trail + [n])
            out.append(n)
        for n in names:
            visit(n, [])
        return out

    # ------------------------------------------------------------------ tiers
    def on_device(self, name: str) -> bool:
        return name in self.resident or name in self.device

    def prefetch(self, names) -> None:
        """Start reading every adapter in ``names`` that is in neither memory tier."""
        for n in names:
            if not self.on_device(n):
                self.wanted.setdefault(n, None)
                self._start_read(n)

    def acquire(self, names: list[str], first: bool = True) -> bool:
        """Pin ``names`` if all are on the device; else queue what is missing and say no.
        ``first``: the request's first try (counted as a pool hit or miss)."""
        missing = [n for n in names if not self.on_device(n)]
        if missing:
            self.stats.misses += first
            self.prefetch(missing)
            return False
        self.stats.hits += first
        for n in names:
            self.pins[n] += 1
            if n in self.device:
                self.device.move_to_end(n)
        return True

    def release(self, names) -> None:
        for n in names:
            self.pins[n] -= 1
            if self.pins[n] <= 0:
                del self.pins[n]

    def install_ready(self) -> None:
        """Between steps: install wanted adapters whose parts are in memory (dependencies
        first), evicting idle ones to make room. Never blocks on disk."""
        for name in list(self.wanted):
            if self.on_device(name):
                self.wanted.pop(name, None)
                continue
            source = self.sources.get(name)
            if source is None:
                self.wanted.pop(name, None)
                continue
            if not all(self.on_device(d) for d in source.needs):
                self.prefetch(source.needs)
                continue
            parts = self._take_read(name)
            if parts is None and source.kind != "merge":
                continue
            if len(self.device) >= self.device_slots and not self._evict_one(protect=set(source.needs)):
                return  # every slot holds an adapter in use; try again after the next step
            started = time.perf_counter()
            try:
                with self._tree_lock:
                    if parts is None:
                        self._compute_merge(source)
                    else:
                        install(self.pm, name, parts)
            except PolyAdapterError as e:
                self.failed[name] = f"adapter {name!r}: {e}"
                self.wanted.pop(name, None)
                continue
            self.stats.install_ms.append((time.perf_counter() - started) * 1e3)
            self.stats.installs += 1
            self.device[name] = None
            self.wanted.pop(name, None)

    def slot_rank(self, name: str | None) -> tuple[int, int]:
        """(bank, slot) of ``name`` at its first site ((-1, -1) for the base or an
        adapter without bank slots). Every site installs the pool's adapters in the same
        order, so banks and slots agree across sites: ordering a step's rows by this
        rank makes each bank's rows consecutive (views instead of gathers, see
        ``mixed.Step.span``) and puts them in slot order, so the segment kernels gather
        and scatter nothing at any site."""
        if name is None or name not in self.pm.adapters:
            return (-1, -1)
        record = self.pm.record(name)
        if not record.sites:
            return (-1, -1)
        site = original_or_site(self.pm.model, record.sites[0])
        if not isinstance(site, Site):
            return (-1, -1)
        layout = site.layout()
        role = layout.roles.get(name)
        if name not in layout.slots or role is None or not isinstance(role[1], int):
            return (-1, -1)
        return (role[1], layout.slots[name])

    def _compute_merge(self, source: Source) -> None:
        from ..ops.combine import combine
        m: Merge = source.ref
        options = {} if m.density is None else {"density": m.density}
        if m.method in ("ties", "dare_ties"):
            options["majority_sign"] = m.majority_sign
        if m.method.startswith("dare"):
            options["seed"] = 0
        combine(self.pm, source.name, list(m.adapters), list(m.weights), m.method, **options)
        self._keep(source.name, self._installed_parts(source.name))

    def _evict_one(self, protect: set) -> bool:
        installed_needs = {d for n in list(self.device) + list(self.resident)
                           for d in self.sources[n].needs if n in self.sources}
        for name in self.device:  # least recently used first
            if not self.pins[name] and name not in protect and name not in installed_needs:
                self._evict(name)
                return True
        return False

    def _evict(self, name: str) -> None:
        if name not in self.host:  # keep its weights in host memory (a derived merge, say)
            self._keep(name, self._installed_parts(name))
        with self._tree_lock:
            self.pm.remove_adapter(name)
        del self.device[name]
        self.stats.evictions += 1

    def _installed_parts(self, name: str) -> Parts:
        """An installed adapter as host-tier parts (its tensors copied to the CPU)."""
        record = self.pm.record(name)
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in self.pm.adapter_state_dict(name).items()}
        return Parts(record.config, list(record.sites), tensors, dict(record.provenance), f"adapter {name}")

    def _keep(self, name: str, parts: Parts) -> None:
        with self._lock:
            self.host[name] = parts
            self.host.move_to_end(name)
            total = sum(p.nbytes for p in self.host.values())
            for other in list(self.host):
                if total <= self.host_bytes:
                    break
                if other != name and other not in self.wanted:
                    total -= self.host.pop(other).nbytes

    def _start_read(self, name: str) -> None:
        source = self.sources.get(name)
        if source is None or source.kind in ("resident", "merge"):
            return
        with self._lock:
            if name in self.host or name in self._loading:
                return
            future = self._loading[name] = self._reader.submit(self._read, source)
        future.add_done_callback(lambda _: self.on_loaded())

    def _take_read(self, name: str) -> Parts | None:
        """The adapter's parts with a prepared plan, or None while the reader thread
        reads or prepares them (it prepares again after an eviction: plans are single use)."""
        with self._lock:
            future = self._loading.get(name)
            if future is None and name in self.host:
                self.host.move_to_end(name)
                parts = self.host[name]
                if parts.plan is not None or self.sources[name].kind == "merge":
                    return parts
                future = self._loading[name] = self._reader.submit(self._prepare, name, parts)
                future.add_done_callback(lambda _: self.on_loaded())
                return None
        if future is None:
            self._start_read(name)
            return None
        if not future.done():
            return None
        with self._lock:
            self._loading.pop(name, None)
        try:
            parts = future.result()
        except PolyAdapterError as e:
            self.failed[name] = f"adapter {name!r}: {e}"
            self.wanted.pop(name, None)
            return None
        self._keep(name, parts)
        return parts

    def _read(self, source: Source) -> Parts:
        started = time.perf_counter()
        if source.kind == "store":
            from ..formats.native import meta_config
            version, meta, tensors = self._reader_store().read(source.ref)
            where = f"store adapter {version.ref}"
            parts = Parts(meta_config(meta, where), list(meta.get("sites", [])), tensors,
                          dict(meta.get("provenance", {})), where)
        else:
            parts = read_folder(source.ref)
        if torch.cuda.is_available() and _model_device(self.pm).type == "cuda":
            parts.tensors = {k: v.pin_memory() for k, v in parts.tensors.items()}
        self.stats.loads += 1
        self.stats.load_ms.append((time.perf_counter() - started) * 1e3)
        return self._prepare(source.name, parts)

    def _prepare(self, name: str, parts: Parts) -> Parts:
        started = time.perf_counter()
        with self._tree_lock:  # the engine thread wraps sites and adds parts under the same lock
            parts.plan = prepare(self.pm, name, parts)
        self.stats.prepare_ms.append((time.perf_counter() - started) * 1e3)
        return parts

    def _resolve(self, ref: str):
        """The store version ``ref`` names, read through a connection of the calling
        thread (an HTTP server registers adapters from its worker threads)."""
        if threading.get_ident() == self._store_thread:
            return self.store.resolve(ref)
        from ..store import Store
        with Store(self.store.path) as store:
            return store.resolve(ref)

    def _reader_store(self):
        """The reader thread's own connection to the store (SQLite connections stay in
        the thread that opened them)."""
        store = getattr(self._local, "store", None)
        if store is None:
            from ..store import Store
            store = self._local.store = Store(self.store.path)
        return store

    def _close_reader_store(self) -> None:
        """In an exiting reader thread: close its store connection (SQLite connections
        are closed in the thread that opened them)."""
        store = getattr(self._local, "store", None)
        if store is not None:
            self._local.store = None
            store.close()

    def close(self) -> None:
        self._reader.shutdown()   # its thread closes its own store connection as it exits
        self.pm.state.bank_slots = self._saved_bank_slots


def _largest_rank(config) -> int | None:
    if config.method != "lora":
        return None
    return max([config.r] + [r for r in (getattr(config, "rank_pattern", None) or {}).values()])


def _model_device(pm) -> torch.device:
    p = next(pm.model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _folder_source(name: str, path: Path) -> Source:
    """A folder's Source from its config file alone (the weights are read on first use)."""
    from ..formats import native, peft
    from ..formats.files import read_json
    if not path.is_dir():
        raise LoadError(f"{path}: not an adapter folder")
    if native.is_native(path):
        meta = native.read_meta(path)
        return Source.of_config(name, "folder", path, native.meta_config(meta, str(path / native.CONFIG_FILE)))
    file = path / peft.CONFIG_FILE
    if file.is_file():  # PEFT's LoRA and IA3 build on no other adapter and add no virtual tokens
        config = read_json(file)
        ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
        ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
        method = peft.method_of(config, str(file))
        return Source(name, "folder", path, method, [], 0, max(ranks) if method == "lora" and ranks else None)
    raise LoadError(f"{path}: neither a polyadapter folder ({native.CONFIG_FILE}) nor a PEFT folder "
                    f"({peft.CONFIG_FILE})")


def read_folder(path: Path) -> Parts:
    """A native or PEFT folder's parts, read and checked (no model needed)."""
    from ..formats import native, peft
    if native.is_native(path):
        meta = native.read_meta(path)
        config = native.meta_config(meta, str(path / native.CONFIG_FILE))
        file, tensors = native.read_weights(path, meta)
        return Parts(config, list(meta.get("sites", [])), tensors, dict(meta.get("provenance", {})), str(path))
    form = peft.native_parts(path)
    return Parts(form.config, list(form.sites), form.tensors, dict(form.provenance), str(path))


def prepare(pm, name: str, parts: Parts):
    """A filled plan for installing ``parts`` as ``name``: every check of a folder load
    (sites, tensor names, shapes, finiteness) and the copy into new parameters, without
    touching the model, so the pool runs it in its reader thread, off the step loop."""
    from ..formats.files import check_tensors
    plan = pm.plan_adapter(name, parts.config, filled=True)
    if set(plan.record.sites) != set(parts.sites):
        missing = sorted(set(parts.sites) - set(plan.record.sites))
        raise LoadError(f"{parts.where}: the adapter's sites do not fit this model: saved sites not found "
                        f"here {missing[:3]}")
    check_tensors(parts.tensors, plan.state_dict(), parts.where)
    plan.load_tensors(parts.tensors)
    plan.record.provenance = dict(parts.provenance)
    return plan


def install(pm, name: str, parts: Parts) -> None:
    """Install ``parts`` as adapter ``name`` (with the plan the reader thread prepared,
    else preparing it here); on error the model is unchanged."""
    plan, parts.plan = parts.plan, None
    if plan is None or plan.record.name != name:
        plan = prepare(pm, name, parts)
    pm.install(plan)

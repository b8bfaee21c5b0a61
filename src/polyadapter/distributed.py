"""Training an adapter across processes: torch DistributedDataParallel (DDP) through
accelerate, over the adapter's parameters only, or FSDP2 (``fully_shard``) when the
base does not fit on one device. Run a script that calls these with
``accelerate launch --multi_gpu --num_processes N script.py`` (on a machine without
CUDA too: the processes then use gloo on CPU; with CUDA, NCCL), or ``torchrun``.

    from polyadapter import distributed
    pm.add_adapter("topic", pa.LoraConfig(r=8))
    metrics = distributed.train(pm, "topic", rows, steps=100, batch_size=32, task="classification",
                                out="runs/topic")             # written by the main process only

or piece by piece (the same loop):

    acc = distributed.accelerator()
    pm.train_adapter("topic")
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-3)
    model, opt, data = distributed.prepare(acc, pm, opt, distributed.loader(rows, 32, steps=100))
    distributed.train_steps(acc, model, opt, data, task="causal-lm")
    distributed.save(acc, pm, "topic", "runs/topic")

What DDP sees: only parameters that require grad take part in its all-reduce, and
``train_adapter`` leaves only the adapter's. :func:`prepare` also tells DDP to ignore
every tensor of the frozen base (no broadcast of the base at start-up, no broadcast of
its buffers in each forward) and checks instead that every process holds the same base
(its fingerprint); ``find_unused_parameters`` stays off (every adapter parameter takes
part in every forward). :func:`ddp_report` says what DDP registered.

The loss of a step is the global batch's: each process sums its rows' (or tokens')
losses and divides by the count over all processes, times the number of processes —
DDP (and FSDP) average gradients, so the update equals one process's over the whole
global batch, even when processes hold different numbers of tokens.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from .batches import collate, logits_of, loss_sum, order
from .errors import ConfigError, StateError


# ---------------------------------------------------------------------- the processes
def accelerator(**kwargs):
    """An ``accelerate.Accelerator`` for adapter training: on CPU (gloo) when there is
    no CUDA, DDP without the unused-parameter search, and
    ``split_batches`` so a loader's batch is the global batch (each process takes its
    share). ``kwargs`` go to ``Accelerator``. (Buffer broadcasts stay on: :func:`prepare`
    makes DDP ignore the base's buffers, so only adapter buffers, if any, are synced.)"""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(split_batches=True))
    kwargs["kwargs_handlers"] = [ddp, *kwargs.get("kwargs_handlers", [])]
    return Accelerator(**kwargs)


def world_size() -> int:
    """How many processes the launcher started (1 outside ``torchrun``/``accelerate launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Replicas:
    """This process among those a launcher started: what the plain training loops of
    ``training.py`` need to run as data parallel (``polyadapter train --processes N``)."""
    accelerator: object
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, pm) -> nn.Module:
        """``pm`` under DDP over its trainable (adapter) parameters (see :func:`prepare`);
        a model that is not an AdapterModel (full fine-tuning) under plain DDP."""
        if not hasattr(pm, "adapter_key_prefixes"):
            return self.accelerator.prepare(pm)
        return prepare(self.accelerator, pm)

    def rows(self, idx: list) -> tuple[list, float]:
        """This process's share of a global batch's row indices, and its weight: 1, or 0
        when the batch has fewer rows than processes and none is left for this one (it
        then runs the first row with weight 0, so every process takes part in the step)."""
        mine = idx[self.rank::self.world]
        return (mine, 1.0) if mine else (idx[:1], 0.0)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (for reporting)."""
        t = torch.tensor([float(value)], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, "mean").item())


def launched() -> Replicas | None:
    """The :class:`Replicas` when this process is one of several a launcher started
    (``WORLD_SIZE`` > 1; the process group starts here), else None."""
    if world_size() <= 1:
        return None
    acc = accelerator()
    return Replicas(acc, acc.process_index, acc.num_processes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, args: list[str], module: str | None = None, port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that starts ``processes`` copies of a script
    (``args[0]``, its arguments after) or of ``python -m module args``, on this machine.
    ``--multi_gpu`` picks accelerate's torchrun launcher, which starts every process on
    CPU too (``--cpu`` picks the one-process launcher unless mpirun is set up)."""
    if processes < 1:
        raise ConfigError(f"processes must be at least 1; found {processes}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or free_port())]
    if processes > 1:
        cmd.append("--multi_gpu")
    if module:
        cmd += ["-m", module]
    return cmd + list(args)


def relaunch(processes: int, args: list[str], module: str = "polyadapter", timeout: float | None = None) -> int:
    """Run ``python -m module args`` as ``processes`` processes through accelerate's
    launcher and wait; returns its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    return subprocess.run(launch_command(processes, args, module=module), env=env, timeout=timeout).returncode


# ---------------------------------------------------------------------- DDP
def frozen_names(pm) -> list[str]:
    """Names (in ``pm``'s module tree) of every parameter and buffer that is not an
    adapter's: the frozen base, which DDP must neither broadcast nor all-reduce."""
    keep = pm.adapter_key_prefixes()
    return [n for n, _ in chain(pm.named_parameters(), pm.named_buffers()) if not n.startswith(keep)]


def check_trainable(pm) -> list[nn.Parameter]:
    """The parameters that require grad; all must be adapters' (the base stays frozen)."""
    keep = pm.adapter_key_prefixes()
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    if not trainable:
        raise StateError("no parameter requires grad: call pm.train_adapter(name) before preparing the model")
    stray = [n for n, _ in trainable if not n.startswith(keep)]
    if stray:
        raise StateError(f"{len(stray)} base parameter(s) require grad (e.g. {stray[0]!r}); the base must stay "
                         f"frozen (pm.train_adapter makes only the adapter trainable)")
    return [p for _, p in trainable]


def check_same_base(acc, pm) -> None:
    """Every process must hold the same frozen base (DDP does not broadcast it here):
    compare the base fingerprints (structure, and a sample of every weight)."""
    if acc.num_processes <= 1:
        return
    from accelerate.utils import gather_object
    prints = gather_object([pm.state.base_fingerprint])
    for rank, fp in enumerate(prints):
        if fp != prints[0]:
            raise StateError(f"process {rank}'s base model differs from process 0's (fingerprint {fp} vs "
                             f"{prints[0]}); load the same base weights in every process")


def prepare(acc, pm, *objects):
    """``acc.prepare(pm, *objects)`` for adapter training: checks that only adapter
    parameters require grad and that every process has the same base, and makes DDP
    ignore the base's tensors. Returns what ``acc.prepare`` returns."""
    from torch.nn.parallel import DistributedDataParallel
    check_trainable(pm)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pm, frozen_names(pm))
    check_same_base(acc, pm)
    return acc.prepare(pm, *objects)


def ddp_report(model) -> dict:
    """What DDP registered for ``model`` (a prepared model): whether it is wrapped, its
    ``find_unused_parameters``, the parameter tensors and elements its all-reduce
    covers, the buffers it syncs in each forward, and how many tensors it ignores."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return {"wrapped": False}
    params = [p for p in model.parameters() if p.requires_grad]
    return {"wrapped": True, "find_unused_parameters": model.find_unused_parameters,
            "synced_buffers": len(model.modules_buffers) if model.will_sync_module_buffers() else 0,
            "parameter_tensors": len(params), "parameters": sum(p.numel() for p in params),
            "reducer_tensors": int(model._get_ddp_logging_data().get("num_parameter_tensors", -1)),
            "ignored": len(model.parameters_to_ignore)}


def loader(rows: list[dict], batch_size: int, steps: int, seed: int = 0, pad_id: int = 0):
    """A DataLoader of ``steps`` global batches of ``batch_size`` rows in the order
    :func:`polyadapter.batches.order` gives (the same in every process and in a
    one-process run); prepared with :func:`accelerator`'s ``split_batches``, each process
    gets ``batch_size / N`` rows of each."""
    from functools import partial
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, sampler=order(len(rows), batch_size, steps, seed),
                                       collate_fn=partial(collate, pad_id=pad_id), drop_last=True)


def train_steps(acc, model, optimizer, batches, task: str = "classification", clip: float | None = 1.0) -> dict:
    """One optimizer step per batch (this process's share of each global batch): the
    global batch's mean loss (see the module notes), gradients clipped to ``clip`` (their
    global norm), ``optimizer.step()``. Works for a DDP-prepared model and a
    :func:`shard`-ed one. Returns the mean loss of every step (over all processes)."""
    losses, start = [], time.perf_counter()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        batch = dict(batch)
        labels = batch.pop("labels")
        total, count = loss_sum(logits_of(model(**batch)), labels, task)
        stats = torch.stack([total.detach(), torch.tensor(float(count), device=total.device)])
        stats = acc.reduce(stats, "sum") if acc.num_processes > 1 else stats
        (total * acc.num_processes / stats[1]).backward()  # DDP/FSDP average: the global mean
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(stats[0] / stats[1]))
    model.eval()
    return {"losses": losses, "steps": len(losses), "processes": acc.num_processes,
            "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------- FSDP
def shard(pm, layer_classes: list[str] | None = None, mesh=None) -> list[str]:
    """Shard ``pm`` over all processes with FSDP2 (``torch.distributed.fsdp.fully_shard``):
    every block whose class name is in ``layer_classes`` (default: the base's
    ``_no_split_modules``, e.g. ``LlamaDecoderLayer``), then the whole model. The frozen
    base and the adapters are both sharded; a forward gathers one block at a time, and
    only adapter gradients are reduce-scattered. Call after ``train_adapter`` and before
    making the optimizer; the adapters are first broadcast from process 0 (FSDP does not
    sync them) and the bases compared. Returns the sharded blocks' names."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise StateError("shard needs the process group: create distributed.accelerator() first")
    check_trainable(pm)
    names = set(layer_classes if layer_classes is not None else getattr(pm.model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError("shard: no layer classes (the base names no _no_split_modules); pass layer_classes")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        pm.to(torch.device("cuda", torch.cuda.current_device()))
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, pm.state.base_fingerprint)
    if any(fp != prints[0] for fp in prints):
        raise StateError("the processes hold different base models (fingerprints differ); load the same weights")
    with torch.no_grad():
        for t in pm.state_dict(keep_vars=True).values():  # adapters only
            dist.broadcast(t.data, src=0)
    mesh = mesh or init_device_mesh(device, (dist.get_world_size(),))
    blocks = [n for n, m in pm.named_modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"shard: no module of class {sorted(names)} in the model")
    for n in blocks:
        fully_shard(pm.get_submodule(n), mesh=mesh)
    fully_shard(pm, mesh=mesh)
    return blocks


def is_sharded(pm) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in pm.parameters())


@contextmanager
def gathered(pm, name: str):
    """Inside, adapter ``name``'s parameters of a :func:`shard`-ed model are whole plain
    tensors in every process (an all-gather of the adapter only; the base stays
    sharded), so ``pm.save_adapter`` works. Every process must enter; no forward inside."""
    from torch.distributed.tensor import DTensor
    swapped = []
    try:
        for part in pm.parts(name).values():
            for module in part.modules():
                for key, p in list(module._parameters.items()):
                    if isinstance(p, DTensor):
                        module._parameters[key] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=False)
                        swapped.append((module, key, p))
        yield pm
    finally:
        for module, key, p in swapped:
            module._parameters[key] = p


def save(acc, pm, name: str, path, **kwargs):
    """Save adapter ``name`` from the main process only (every process must call this;
    the others wait). Works for DDP (every process holds the same adapter) and for a
    :func:`shard`-ed model (the adapter is gathered first). ``kwargs`` go to
    ``pm.save_adapter``. Returns its result on the main process, None on the others."""
    acc.wait_for_everyone()
    result = None
    if is_sharded(pm):
        with gathered(pm, name):
            if acc.is_main_process:
                result = pm.save_adapter(name, path, **kwargs)
    elif acc.is_main_process:
        result = pm.save_adapter(name, path, **kwargs)
    acc.wait_for_everyone()
    return result


# ---------------------------------------------------------------------- the whole job
def train(pm, name: str, rows: list[dict], *, steps: int, batch_size: int, task: str = "classification",
          lr: float = 1e-3, seed: int = 0, clip: float | None = 1.0, pad_id: int = 0, out=None,
          fsdp: bool = False, layer_classes: list[str] | None = None, acc=None, **save_kwargs) -> dict:
    """Train adapter ``name`` of ``pm`` for ``steps`` steps of AdamW over global batches of
    ``batch_size`` encoded rows (see ``polyadapter.batches``) across every launched
    process — DDP, or FSDP2 with ``fsdp=True`` — and save it to ``out`` from the main
    process. Every process must call it with the same base, rows and arguments; in one
    process it is the plain loop. ``batch_size`` must be a multiple of the number of
    processes. Returns the metrics (losses per step, processes, DDP report)."""
    acc = acc or accelerator()
    if batch_size % acc.num_processes:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of the {acc.num_processes} processes "
                          f"(each takes an equal share of every global batch)")
    params = pm.train_adapter(name)
    data = loader(rows, batch_size, steps, seed=seed, pad_id=pad_id)
    if fsdp:
        shard(pm, layer_classes)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
        model, data = pm, acc.prepare(data)
    else:
        opt = torch.optim.AdamW(params, lr=lr)
        model, opt, data = prepare(acc, pm, opt, data)
    metrics = train_steps(acc, model, opt, data, task=task, clip=clip)
    metrics.update({"ddp": ddp_report(model), "fsdp": fsdp, "batch_size": batch_size, "lr": lr, "seed": seed})
    if out is not None:
        pm.record(name).provenance.update({"training": {k: v for k, v in metrics.items() if k != "losses"}})
        saved = save(acc, pm, name, out, **save_kwargs)
        metrics["saved"] = None if saved is None else str(saved)
    for p in pm.parameters():
        p.requires_grad_(False)
    return metrics

"""Process-group set-up shared by training and evaluation: one code path for CPU/gloo and GPU/NCCL.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; a plain ``python`` run is a world of one.
With CUDA available, each process takes GPU LOCAL_RANK and the NCCL backend (untested here: this
project has had no GPU machine); otherwise the CPU and gloo.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Cluster:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_cluster(force_cpu: bool = False) -> Cluster:
    if "RANK" not in os.environ:          # a plain python run: a world of one on a free local port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and not force_cpu:
        device, backend = torch.device(f"cuda:{local}"), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            # Under torchrun, keep each restart's keys apart: after --max-restarts relaunches the workers,
            # gloo would otherwise find the dead attempt's addresses in the agent's store and fail to
            # connect (pytorch/pytorch#167288).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                                  is_master=False, timeout=timedelta(minutes=10))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"clickpipe/attempt_{restart}", store),
                                    rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend)
    return Cluster(rank, world, local, device, backend)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether bf16 matrix products run natively on ``device``, why): a GPU that reports bf16 support, or a
    CPU with AVX-512 BF16 or AMX in /proc/cpuinfo. Elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'does not support'} bf16"
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return False, "no /proc/cpuinfo to read the CPU's flags from"
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(have), f"the CPU has {', '.join(have)}" if have else "the CPU has neither avx512_bf16 nor amx_bf16"


def dense_step_timer(in_features: int, hidden: Sequence[int], batch: int,
                     device: torch.device) -> Callable[[bool], float]:
    """A probe of the dense part's cost: ``timer(bf16)`` -> seconds of one forward + backward of an MLP of
    the model's shape (``in_features`` -> ``hidden`` -> 1, ReLU) at ``batch`` rows on ``device``, fp32 or
    under bf16 autocast (the median of a few steps after a warm-up one)."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [torch.nn.Linear(width, h, device=device), torch.nn.ReLU()]
        width = h
    mlp = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1, device=device))
    x = torch.randn(batch, in_features, device=device)

    def timer(bf16: bool) -> float:
        times = []
        for i in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = mlp(x)
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:                                   # the first step warms up (kernel selection, caches)
                times.append(time.perf_counter() - t)
        mlp.zero_grad(set_to_none=True)
        return sorted(times)[len(times) // 2]
    return timer


def resolve_bf16(setting: bool | str, device: torch.device,
                 timer: Callable[[bool], float] | None = None) -> tuple[bool, str]:
    """The training config's ``bf16`` (true, false or "auto") -> (use bf16 autocast, why).

    Under "auto" with a ``timer`` (:func:`dense_step_timer`): bf16 when the measured dense step is faster
    under bf16 than in fp32, summed over all ranks (so every rank agrees), and only where bf16 is native
    (:func:`native_bf16`): a CPU flag is not enough, an Intel Xeon with AVX-512 BF16 but no AMX ran the
    paper's MLP slower in bf16 (issue 17). Without a timer, "auto" follows :func:`native_bf16` alone."""
    if setting != "auto":
        return bool(setting), f"bf16: {str(setting).lower()} in the config"
    ok, why = native_bf16(device)
    if timer is not None and ok:
        fp32, bf16 = min(timer(False), timer(False)), min(timer(True), timer(True))
        if dist.is_initialized():
            t = torch.tensor([fp32, bf16], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            fp32, bf16 = (float(v) / dist.get_world_size() for v in t.tolist())
        ok = bf16 < fp32
        why = (f"{why}; the dense step measured {1e3 * fp32:.1f} ms fp32, {1e3 * bf16:.1f} ms bf16 "
               f"(mean over ranks): {'bf16' if ok else 'fp32'} is faster")
    if dist.is_initialized():
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if ok and not flag.item():
            ok, why = False, f"{why}, but another rank's device does not"
    return ok, f"bf16: auto, {why}"


def log_project_info() -> None:
    """The project's own loggers at INFO, every library's at WARNING (the root logger's level): TorchRec,
    FBGEMM (which logs its kernel choices on the root logger) and petastorm say what they do at INFO."""
    for name in ("deepfm", "pipeline", "jobs"):
        logging.getLogger(name).setLevel(logging.INFO)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

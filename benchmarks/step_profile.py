"""Where a training step's time goes: torch.profiler over N steps of the real training loop (after its
warm-up), summarised as the device time per step by operator, by kernel and by kind of work, against the
wall time of the same steps. The device time over the wall time says whether the step waits on the GPU
(near 1) or on the Python side and the data (well below 1). Used by bench_train.py --profile."""

from __future__ import annotations

import contextlib
import time

import torch

# kind of work, by the first fragment found in an operator's name (lower case), in this order
KINDS = (
    ("attention", ("attention", "sdpa", "flash", "_efficient")),
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "bmm", "matmul", "aten::mm", "linear", "gemm")),
    ("normalisation", ("norm",)),
    ("optimizer and EMA", ("foreach", "adam", "lerp")),
    ("copies and casts", ("copy", "_to_copy", "cat", "contiguous", "clone")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KINDS if any(part in lowered for part in parts)), "other")


@contextlib.contextmanager
def profiled_steps(loop_module, skip: int, active: int, cuda: bool):
    """Profile steps skip+1 .. skip+active of loop_module's training loop (one step of the profiler's own
    warm-up before them); yields a dict that holds, afterwards, the profiler and each step's wall time.
    Steps are counted at the end of loop_module._train_step, so each profiled window holds one forward,
    backward and optimizer step and the EMA update of the step before."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities, schedule=schedule(wait=skip, warmup=1, active=active, repeat=1))
    original, ends = loop_module._train_step, []

    def step_then_count(*args, **kwargs):
        result = original(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        profiler.step()
        return result

    found = {"profiler": profiler, "ends": ends, "window": (skip + 1, skip + 1 + active)}
    loop_module._train_step = step_then_count
    try:
        with profiler:
            yield found
    finally:
        loop_module._train_step = original


def summarise(found: dict, cuda: bool, top: int = 12) -> dict:
    """Per profiled step: wall ms, device ms (the kernels' time; CPU ops' time without a GPU), the busy
    share, and the operators, kernels and kinds of work that took the most of it."""
    first, last = found["window"]
    ends = found["ends"]
    steps = last - first
    if len(ends) < last:
        raise RuntimeError(f"the loop ran {len(ends)} steps; the profile needs {last}")
    wall_ms = (ends[last - 1] - ends[first - 1]) * 1e3 / steps
    events = found["profiler"].key_averages()
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU

    def device_us(event) -> float:
        if cuda:
            return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
        return float(event.self_cpu_time_total)

    kernels = [e for e in events if e.device_type == device_type] if cuda else []
    operators = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
    # the kernels' time on a GPU; on a CPU the aten operators' self times (they do the work)
    total_us = sum(device_us(e) for e in (kernels if cuda else operators))
    per_step = total_us / 1e3 / steps

    def table(rows) -> list[dict]:
        ranked = sorted(rows, key=device_us, reverse=True)[:top]
        return [
            {
                "name": e.key[:120],
                "ms_per_step": round(device_us(e) / 1e3 / steps, 3),
                "share": round(device_us(e) / total_us, 4) if total_us else None,
                "calls_per_step": round(e.count / steps, 1),
            }
            for e in ranked
            if device_us(e) > 0
        ]

    kinds: dict[str, float] = {}
    for event in operators:
        if device_us(event) > 0:
            kinds[kind_of(event.key)] = kinds.get(kind_of(event.key), 0.0) + device_us(event)
    attributed = sum(kinds.values())
    return {
        "steps_profiled": steps,
        "wall_ms_per_step": round(wall_ms, 2),
        "device_ms_per_step": round(per_step, 2),
        "device_busy_share": round(per_step / wall_ms, 3) if wall_ms else None,
        "kernel_launches_per_step": round(sum(e.count for e in kernels) / steps, 0) if cuda else None,
        "by_kind": {k: round(v / attributed, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        if attributed
        else {},
        "top_operators": table(operators),
        "top_kernels": table(kernels),
    }

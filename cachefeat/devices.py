"""Where and in what precision torch runs: one device resolver, one precision resolver, one autocast, for
the backbone (stage one, predict) and the adapters (stage two) alike."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class DeviceError(ValueError):
    """A --device or --precision this machine cannot honour (one line)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return dev


def resolve_precision(precision: str, device: torch.device, gpu_auto: str) -> str:
    """`auto` is fp32 on CPU (CPUs without bf16 units run autocast several times slower than fp32) and
    `gpu_auto` on GPU: the caller's choice, because the two stages want different things. The backbone
    asks for fp16 (CLIP was trained in fp16: more mantissa than bf16, the range is known); adapter
    training asks for bf16 where the GPU has it (fresh weights need bf16's range; no loss scaling)."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "fp16" if gpu_auto == "bf16" and not torch.cuda.is_bf16_supported() else gpu_auto
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision!r}: expected auto, fp32, fp16 or bf16")
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@contextmanager
def cpu_threads(n: int):
    """Run with `n` torch CPU threads (0: leave as is), then restore. Small adapters, and memory-bound copies
    beside busy decoder processes, run far faster on one thread than on threads that wait for each other
    (torch.cat of a batch of frames: 1 ms on one thread, 51 ms on two beside a busy decoder, measured)."""
    old = torch.get_num_threads()
    if n > 0 and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)

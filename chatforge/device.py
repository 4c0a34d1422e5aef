"""Device and mixed-precision choices: which device, which autocast dtype, whether to scale.

bf16 autocast keeps fp32 master weights and runs matmuls in bf16: about twice as fast
as fp32 on CPUs with AMX and on every recent GPU (see ``cpu_has_fast_bf16`` for CPUs
with AVX-512 BF16 only), with no loss scaling
needed because bf16 has fp32's exponent range. fp16 has a narrow range, so it needs
a ``GradScaler``; it is offered only on CUDA, for GPUs without bf16 (pre-Ampere).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from chatforge.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else mps, else cpu; anything else is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this torch build sees no CUDA GPU; use device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} asked for, but MPS is not available here; use device=cpu")
    return device


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: ``dtype`` is the autocast dtype (fp32 = no autocast)."""

    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16; None otherwise (bf16 and fp32 need none)."""
        if self.dtype == torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and ":" in line:
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 autocast beats fp32 on this CPU: it needs AMX tile units (``amx_bf16``).

    Measured on a 2-core Xeon with AVX-512 BF16 but no AMX, torch 2.13, the tiny preset:
    pre-training took 265 s in bf16 and 209 s in fp32, SFT 392 s and 308 s. AVX-512 BF16
    alone speeds up large matmuls, but at these sizes the casts autocast adds cost more
    than the matmuls save, so ``auto`` keeps fp32 there (and wherever bf16 is emulated);
    ``dtype=bf16`` still forces it."""
    flags = cpu_flags()
    if flags:
        return "amx_bf16" in flags
    try:  # no /proc/cpuinfo: trust oneDNN's own check
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    """``auto`` -> bf16 on GPUs that have it and CPUs with AMX, fp16 on older CUDA GPUs, else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu":
            dtype = "bf16" if cpu_has_fast_bf16() else "fp32"
        else:
            dtype = "fp32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not allowed; allowed: auto, {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type != "cuda":
        raise ConfigError(f"dtype: fp16 needs a CUDA GPU (loss scaling); on {device.type} use bf16 or fp32")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype: bf16 is not supported by this GPU; use fp16 or fp32")
    return Precision(device, DTYPES[dtype])

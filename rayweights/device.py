"""``torch_device``: the one reading of a ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:1``)."""

from __future__ import annotations

import torch

__all__ = ["torch_device"]


def torch_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; anything else as torch reads it.  A CUDA
    device asked for where none is visible is a ``ValueError`` naming the setting."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: {spec!r} is not auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} requested but no CUDA device is visible")
    return dev

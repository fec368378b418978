"""LoRA adapters for conv, transposed-conv and linear layers (Denoised Neural Weights, Sec. 4.2).

For a conv layer with weight ``[f, c, kh, kw]`` the adapter is a *down* conv ``c -> r`` with the
layer's own kernel/stride/padding (``lora_down``) followed by a 1x1 *up* conv ``r -> f``
(``lora_up``), added to the frozen layer's output.  ``lora_up`` starts at zero, so a fresh adapter
leaves the base model unchanged.  Parameter names end in ``lora_down.weight`` / ``lora_up.weight``,
which :mod:`rayweights.blocks` folds into the host layer's group (grouping rule 1: down, up, then
the layer's BN).
"""

from __future__ import annotations

from torch import nn

__all__ = ["LoRAConv2d", "LoRAConvTranspose2d", "LoRALinear", "lora_parameters"]


class _LoRABase(nn.Module):
    rank: int
    scale: float

    def _init_lora(self, rank: int, alpha: float | None):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / rank
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_up(self.lora_down(x))


class LoRAConv2d(_LoRABase):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 rank: int = 4, alpha: float | None = None, bias: bool = True):
        super().__init__()
        self.base = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=bias)
        self.lora_down = nn.Conv2d(in_ch, rank, kernel_size, stride, padding, bias=False)
        self.lora_up = nn.Conv2d(rank, out_ch, 1, bias=False)
        self._init_lora(rank, alpha)


class LoRAConvTranspose2d(_LoRABase):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 output_padding: int = 0, rank: int = 4, alpha: float | None = None, bias: bool = True):
        super().__init__()
        self.base = nn.ConvTranspose2d(in_ch, out_ch, kernel_size, stride, padding, output_padding, bias=bias)
        self.lora_down = nn.ConvTranspose2d(in_ch, rank, kernel_size, stride, padding, output_padding, bias=False)
        self.lora_up = nn.Conv2d(rank, out_ch, 1, bias=False)
        self._init_lora(rank, alpha)


class LoRALinear(_LoRABase):
    def __init__(self, in_features: int, out_features: int, rank: int = 1, alpha: float | None = None,
                 bias: bool = True):
        super().__init__()
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        self._init_lora(rank, alpha)


def lora_parameters(model: nn.Module) -> list[str]:
    """Names of every LoRA down/up weight in ``model`` (state_dict order)."""
    return [n for n, _ in model.named_parameters() if ".lora_down." in f".{n}" or ".lora_up." in f".{n}"]


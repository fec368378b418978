"""The comparison: initialisation candidates, fine-tuning curves, N-sample statistics, memorisation.

For one task (a :class:`~rayweights.evaluation.protocols.TaskAdapter`), a source of generated weights
(a :class:`~rayweights.evaluation.protocols.WeightSampler`) and the zoo the generator learnt from
(:class:`ZooReference`), :func:`evaluate_task` builds the initialisations

  (a) generated       sample 0 of N generated weight sets (an unselected draw)
  (b) random          the adapter's default initialisation (``build_model(seed)``)
  (c) pretrained      the adapter's base weights if it has some (``pretrained_state_dict()``), else the
                      final checkpoint of the zoo member whose condition is most similar to the task
                      (``adapter.similarity``: task overlap or condition-embedding cosine)
  (d) best_of_n       the generated sample with the best metric on the *training* split (p-diff)
  (e) nearest_noise   the zoo checkpoint nearest (L2, weight space) to sample 0 plus Gaussian noise of
                      ``noise_frac`` x the per-group std of the zoo's weights (Zeng et al. 2025);
                      ``noise_anchor="task"`` anchors on the most similar task's member instead
  (f) soup            the average of the zoo members' final weights (all members, or those of the
                      most similar condition with ``soup="similar_task"``)

fine-tunes each for E epochs (metric per epoch, cumulative training wall time), and measures:
the epoch-0 metric; epochs / seconds to reach the from-scratch (random) final metric and the
speed-ups; best/avg/median over the N samples at epoch 0 (also for their nearest+noise twins);
memorisation (p-diff): IoU of wrong predictions between each sample and its most similar zoo member
vs the zoo's own pairwise IoU, and the nearest-neighbour L2 distance in weight space from each
sample to the zoo vs the zoo members' distance to their nearest other member.

One module (~450 lines): the candidates, the fine-tuning protocol and the statistics over them are
one comparison protocol; report.py formats it and adapters.py/families.py supply the tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..blocks import LayoutError, WeightLayout
from ..table import Zoo, open_zoo
from . import metrics as M
from .protocols import TaskAdapter, WeightSampler

__all__ = ["EvalOptions", "ZooReference", "InitCandidate", "Curve", "TaskResult", "evaluate_task",
           "finetune_curve", "score_samples", "INIT_LABELS", "ALL_INITS", "add_group_noise",
           "sample_blocks_raw"]

log = logging.getLogger(__name__)

INIT_LABELS = {
    "generated": "(a) generated",
    "random": "(b) random",
    "pretrained": "(c) pretrained",
    "best_of_n": "(d) best-of-N generated",
    "nearest_noise": "(e) nearest zoo ckpt + noise",
    "soup": "(f) zoo soup (average)",
}
ALL_INITS = list(INIT_LABELS)


@dataclass
class EvalOptions:
    """How one task is evaluated (also the ``options`` section of the evaluate config)."""

    num_samples: int = 10            # N generated weight sets per task
    epochs: int = 10                 # E fine-tuning epochs
    seeds: list[int] = field(default_factory=lambda: [0])   # fine-tuning seeds (curves averaged)
    inits: list[str] = field(default_factory=lambda: list(ALL_INITS))
    noise_frac: float = 0.1          # (e): noise std = noise_frac x per-group std of the zoo weights
    noise_anchor: str = "sample"     # (e): "sample" (nearest to generated sample 0) | "task"
    soup: str = "all"                # (f): "all" members | "similar_task"
    pretrained: str = "auto"         # (c): "auto" (adapter base if any, else similar task) | "similar_task" | "base"
    max_zoo_members: int = 256       # zoo members used as the reference (random subset beyond this)
    iou_members: int = 32            # zoo members whose predictions enter the IoU statistics
    sample_seed: int = 0
    target_tol: float = 0.0          # "reached the from-scratch final metric" within this tolerance

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError("num_samples: must be >= 1")
        if self.epochs < 1:
            raise ValueError("epochs: must be >= 1")
        if not self.seeds:
            raise ValueError("seeds: at least one seed")
        bad = [i for i in self.inits if i not in INIT_LABELS]
        if bad:
            raise ValueError(f"inits: unknown {bad} (choose from {ALL_INITS})")
        if "random" not in self.inits:
            raise ValueError("inits: 'random' is required (it defines the from-scratch target)")
        if self.noise_frac < 0:
            raise ValueError("noise_frac: must be >= 0")
        if self.noise_anchor not in ("sample", "task"):
            raise ValueError("noise_anchor: 'sample' or 'task'")
        if self.soup not in ("all", "similar_task"):
            raise ValueError("soup: 'all' or 'similar_task'")
        if self.pretrained not in ("auto", "similar_task", "base"):
            raise ValueError("pretrained: 'auto', 'similar_task' or 'base'")
        if self.max_zoo_members < 1 or self.iou_members < 0:
            raise ValueError("max_zoo_members: >= 1; iou_members: >= 0")


# ----------------------------------------------------------------------------- the zoo side
class ZooReference:
    """The zoo members the comparisons use: their final weights (soup, pretrained, IoU), all their
    checkpoints streamed in chunks (nearest neighbour), and per-group weight stats (noise scale)."""

    def __init__(self, zoo: Zoo | str, max_members: int = 256, seed: int = 0, chunk_members: int = 16):
        self.zoo = open_zoo(zoo) if isinstance(zoo, str) else zoo
        rows = self.zoo.members.to_pylist()
        if not rows:
            raise LayoutError(f"zoo {self.zoo.uri}: no members to compare with")
        self.total_members = len(rows)
        if len(rows) > max_members:
            rows = random.Random(seed).sample(rows, max_members)
            rows.sort(key=lambda r: r["member_id"])
        self.rows = rows
        self.chunk_members = chunk_members
        self.layout: WeightLayout = self.zoo.layout
        self.final = self.zoo.blocks([r["member_id"] for r in rows], last_k=1)       # [M, nb, bs]
        self.stats_layout = self.layout.fit_stats(self.final) if len(rows) else self.layout

    @property
    def member_ids(self) -> list[str]:
        return [r["member_id"] for r in self.rows]

    @property
    def conditions(self) -> list[str]:
        return [r["condition"] for r in self.rows]

    def checkpoint_chunks(self):
        """Yields (blocks [R, nb, bs], owner member ids [R]) over every checkpoint of the members."""
        for i in range(0, len(self.rows), self.chunk_members):
            part = self.rows[i:i + self.chunk_members]
            b = self.zoo.blocks([r["member_id"] for r in part])
            owners = [r["member_id"] for r in part for _ in range(len(r["checkpoints"]))]
            if len(owners) != b.shape[0]:
                owners = [r["member_id"] for r in part for _ in range(b.shape[0] // len(part))]
            yield b, owners

    def checkpoints(self, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        """Blocks of the given checkpoints (global indices in :meth:`checkpoint_chunks` order), one pass."""
        want, out, off = set(int(i) for i in indices), {}, 0
        for b, _ in self.checkpoint_chunks():
            for i in want:
                if off <= i < off + b.shape[0]:
                    out[i] = b[i - off].clone()
            off += b.shape[0]
            if len(out) == len(want):
                break
        missing = want - set(out)
        if missing:
            raise IndexError(f"checkpoint index {min(missing)} out of range ({off} checkpoints)")
        return out

    def most_similar(self, adapter: TaskAdapter) -> int:
        """Index (in :attr:`rows`) of the member whose condition is most similar to the task (first on ties)."""
        sims = [float(adapter.similarity(c)) for c in self.conditions]
        best = max(sims)
        cands = [i for i, s in enumerate(sims) if s == best]
        return cands[0]

    def similar_members(self, adapter: TaskAdapter) -> list[int]:
        sims = [float(adapter.similarity(c)) for c in self.conditions]
        best = max(sims)
        return [i for i, s in enumerate(sims) if s == best]


def add_group_noise(blocks: torch.Tensor, stats_layout: WeightLayout, frac: float, seed: int) -> torch.Tensor:
    """blocks + N(0, (frac * std_g)^2) on real weights (padding stays 0), std_g per layout group."""
    g = torch.Generator().manual_seed(seed)
    std = torch.tensor([gr.std for gr in stats_layout.groups], dtype=torch.float32)[stats_layout.block_group]
    noise = torch.randn(blocks.shape, generator=g) * std[:, None] * frac
    return blocks + noise * stats_layout.valid_mask.to(blocks.dtype)


# ----------------------------------------------------------------------------- results
@dataclass
class InitCandidate:
    name: str
    blocks: torch.Tensor | None      # raw layout blocks, or None for the adapter's default init
    seconds: float = 0.0             # time spent producing it (sampling, selection)
    note: str = ""


@dataclass
class Curve:
    """Fine-tuning curve of one initialisation: test metrics at epochs 0..E (means over seeds)."""

    init: str
    metric: str
    values: list[float]              # primary metric per epoch, mean over seeds
    per_seed: list[list[float]]
    wall: list[float]                # cumulative seconds (init cost + training) at each epoch
    all_metrics: list[dict]          # every metric of evaluate() per epoch (seed 0)
    init_seconds: float = 0.0
    note: str = ""


@dataclass
class TaskResult:
    task_id: str
    condition: str
    seen: bool
    metric: str
    higher_is_better: bool
    epochs: int
    curves: dict[str, Curve]
    table: dict[str, dict]           # init -> epoch0, final, epochs_to_target, time_to_target, speedups
    target: float                    # from-scratch (random init) final metric
    samples: dict[str, dict]         # "generated" / "nearest_noise" -> best/avg/median/worst at epoch 0
    memorisation: dict[str, Any]
    notes: list[str]
    verdict: dict[str, Any]
    extra_metrics: list[str] = field(default_factory=list)   # also tabulated and plotted (e.g. fid, psnr)
    # per image metric (fid, kid): {"extractor", "label", "n_generated", "n_target", "images"} — shown next
    # to every such score in the report (the adapter's ``metric_info``)
    metric_info: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d


# ----------------------------------------------------------------------------- helpers
def sample_blocks_raw(sampler: WeightSampler, condition: str | None, n: int, seed: int) -> torch.Tensor:
    """[n, nb, bs] raw (denormalised) blocks from a sampler."""
    blocks = sampler.sample(condition, n, seed)
    L = sampler.layout
    if tuple(blocks.shape[1:]) != (L.num_blocks, L.block_size) or blocks.shape[0] != n:
        raise LayoutError(f"sampler returned shape {tuple(blocks.shape)}, expected ({n}, {L.num_blocks}, {L.block_size})")
    blocks = blocks.detach().to(torch.float32).cpu()
    if sampler.normalized:
        blocks = L.denormalize(blocks)
    return blocks * L.valid_mask.to(blocks.dtype)


def _model_from_blocks(adapter: TaskAdapter, layout: WeightLayout, blocks: torch.Tensor | None, seed: int):
    torch.manual_seed(seed)
    model = adapter.build_model(seed)
    if blocks is not None:
        adapter.load_layout_state_dict(model, layout.detokenize(blocks))
    return model


def finetune_curve(adapter: TaskAdapter, layout: WeightLayout, cand: InitCandidate, epochs: int,
                   seeds: Sequence[int], progress=None) -> Curve:
    """Fine-tune ``cand`` for ``epochs`` epochs per seed; test metrics before and after every epoch."""
    per_seed, walls, first_metrics = [], [], []
    for si, seed in enumerate(seeds):
        model = _model_from_blocks(adapter, layout, cand.blocks, seed)
        opt = adapter.make_optimizer(model)
        m0 = adapter.evaluate(model, "test")
        vals, wall, mets, spent = [float(m0[adapter.metric])], [cand.seconds], [m0], 0.0
        for e in range(1, epochs + 1):
            t0 = time.perf_counter()
            adapter.train_epoch(model, opt, e, seed)
            spent += time.perf_counter() - t0
            m = adapter.evaluate(model, "test")
            vals.append(float(m[adapter.metric]))
            wall.append(cand.seconds + spent)
            mets.append(m)
            if progress is not None:
                progress.update(1)
        per_seed.append(vals)
        walls.append(wall)
        if si == 0:
            first_metrics = mets
    values = np.mean(np.asarray(per_seed), axis=0).tolist()
    wall = np.mean(np.asarray(walls), axis=0).tolist()
    return Curve(cand.name, adapter.metric, values, per_seed, wall, first_metrics, cand.seconds, cand.note)


def _better(a: float, b: float, higher: bool) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return False
    return a > b if higher else a < b


def score_samples(adapter: TaskAdapter, sampler: WeightSampler, n: int, seed: int = 0,
                  split: str = "test") -> dict[str, float]:
    """Epoch-0 metric of ``n`` generated weight sets (no fine-tuning): best/avg/median/worst (p-diff),
    plus ``random`` (the adapter's default init, same seed) for reference.  For sweeps."""
    gen = sample_blocks_raw(sampler, adapter.condition, n, seed)
    vals = [float(adapter.evaluate(_model_from_blocks(adapter, sampler.layout, gen[i], seed), split)[adapter.metric])
            for i in range(n)]
    out = M.summarize(vals, adapter.higher_is_better)
    out["random"] = float(adapter.evaluate(_model_from_blocks(adapter, sampler.layout, None, seed), split)[adapter.metric])
    return out


# ----------------------------------------------------------------------------- the task evaluation
def evaluate_task(adapter: TaskAdapter, sampler: WeightSampler, reference: ZooReference,
                  options: EvalOptions | None = None, show_progress: bool = True) -> TaskResult:
    """Run the whole comparison for one task (see the module doc)."""
    opt = options or EvalOptions()
    L = reference.layout
    if not sampler.layout.same_structure(L):
        raise LayoutError(f"task {adapter.task_id}: the generator's layout does not match the zoo's layout")
    adapter_layout = getattr(adapter, "layout", None)
    if adapter_layout is not None and not adapter_layout.same_structure(L):
        raise LayoutError(f"task {adapter.task_id}: the adapter's layout does not match the zoo's layout")
    higher, metric, N = adapter.higher_is_better, adapter.metric, opt.num_samples
    seen = adapter.condition in set(reference.zoo.conditions())
    notes: list[str] = []
    if reference.total_members > len(reference.rows):
        notes.append(f"zoo reference: {len(reference.rows)} of {reference.total_members} members (random subset)")

    # -- N generated samples ------------------------------------------------------------------
    t0 = time.perf_counter()
    gen = sample_blocks_raw(sampler, adapter.condition, N, opt.sample_seed)
    sample_seconds = (time.perf_counter() - t0) / N
    recorded = getattr(sampler, "seconds_per_sample", None)
    if callable(recorded):                       # replayed samples: the generation time recorded at sampling
        sample_seconds = float(recorded(adapter.condition))
    if not bool(torch.isfinite(gen).all()):
        notes.append("some generated weights are NaN/Inf")
        gen = torch.nan_to_num(gen, nan=0.0, posinf=0.0, neginf=0.0)
    seed0 = opt.seeds[0]
    gen_test, gen_train, gen_preds = [], [], []
    for i in range(N):
        model = _model_from_blocks(adapter, L, gen[i], seed0)
        gen_test.append(float(adapter.evaluate(model, "test")[metric]))
        gen_train.append(float(adapter.evaluate(model, "train")[metric]))
        gen_preds.append(adapter.predictions(model, "test"))

    # -- nearest zoo checkpoint of every sample (weight space) ------------------------------
    nn_d, nn_i = M.nn_distances(gen, reference.checkpoint_chunks())
    zoo_nn_d, _ = M.nn_distances(reference.final, reference.checkpoint_chunks(),
                                 sample_groups=reference.member_ids)
    finite_zoo = zoo_nn_d[torch.isfinite(zoo_nn_d)]

    stats = reference.stats_layout
    candidates: dict[str, InitCandidate] = {}
    if "generated" in opt.inits:
        candidates["generated"] = InitCandidate("generated", gen[0].clone(), sample_seconds, "sample 0 of N")
    if "random" in opt.inits:
        candidates["random"] = InitCandidate("random", None, 0.0, "adapter default init")
    if "pretrained" in opt.inits:
        base = getattr(adapter, "pretrained_state_dict", None)
        base_sd = base() if (callable(base) and opt.pretrained in ("auto", "base")) else None
        if opt.pretrained == "base" and base_sd is None:
            notes.append("(c): the adapter has no base weights; using the most similar task's zoo member")
        if base_sd is not None:
            candidates["pretrained"] = InitCandidate("pretrained", L.tokenize(base_sd), 0.0, "adapter base weights")
        else:
            j = reference.most_similar(adapter)
            candidates["pretrained"] = InitCandidate(
                "pretrained", reference.final[j].clone(), 0.0,
                f"zoo member {reference.rows[j]['member_id']} ({reference.rows[j]['condition']})")
    if "best_of_n" in opt.inits:
        k = int(np.argmax(gen_train) if higher else np.argmin(gen_train))
        candidates["best_of_n"] = InitCandidate("best_of_n", gen[k].clone(), sample_seconds * N,
                                                f"sample {k} of {N}, chosen on the training split")
    anchors = reference.checkpoints(nn_i.tolist())
    noisy = [add_group_noise(anchors[int(nn_i[i])], stats, opt.noise_frac, opt.sample_seed * 7919 + i)
             for i in range(N)]
    if "nearest_noise" in opt.inits:
        if opt.noise_anchor == "sample":
            b, note = noisy[0], f"nearest zoo checkpoint to sample 0 + noise {opt.noise_frac} x group std"
        else:
            j = reference.most_similar(adapter)
            b = add_group_noise(reference.final[j], stats, opt.noise_frac, opt.sample_seed)
            note = f"member {reference.rows[j]['member_id']} (most similar task) + noise {opt.noise_frac} x group std"
        candidates["nearest_noise"] = InitCandidate("nearest_noise", b, 0.0, note)
    if "soup" in opt.inits:
        idx = list(range(len(reference.rows))) if opt.soup == "all" else reference.similar_members(adapter)
        candidates["soup"] = InitCandidate("soup", reference.final[idx].mean(dim=0), 0.0,
                                           f"average of {len(idx)} zoo members' final weights")

    noisy_test, noisy_preds = [], []
    for i in range(N):
        model = _model_from_blocks(adapter, L, noisy[i], seed0)
        noisy_test.append(float(adapter.evaluate(model, "test")[metric]))
        noisy_preds.append(adapter.predictions(model, "test"))

    # -- fine-tuning curves ----------------------------------------------------------------
    total = len(candidates) * len(opt.seeds) * opt.epochs
    bar = tqdm(total=total, desc=f"fine-tune {adapter.task_id}", disable=not show_progress, leave=False)
    curves = {name: finetune_curve(adapter, L, c, opt.epochs, opt.seeds, bar) for name, c in candidates.items()}
    bar.close()

    target = curves["random"].values[-1]
    rnd_epochs = M.epochs_to_reach(curves["random"].values, target, higher, opt.target_tol)
    rnd_time = M.time_to_reach(curves["random"].values, curves["random"].wall, target, higher, opt.target_tol)
    table = {}
    for name, c in curves.items():
        e = M.epochs_to_reach(c.values, target, higher, opt.target_tol)
        t = M.time_to_reach(c.values, c.wall, target, higher, opt.target_tol)
        table[name] = {"epoch0": c.values[0], "final": c.values[-1], "epochs_to_target": e,
                       "time_to_target": t, "speedup_epochs": M.speedup(rnd_epochs, e),
                       "speedup_time": M.speedup(rnd_time, t), "init_seconds": c.init_seconds, "note": c.note}

    samples = {"generated": M.summarize(gen_test, higher), "nearest_noise": M.summarize(noisy_test, higher),
               "generated_train": M.summarize(gen_train, higher)}

    # -- memorisation ------------------------------------------------------------------------
    mem: dict[str, Any] = {
        "nn_l2_sample_to_zoo": M.summarize(nn_d.tolist(), higher_is_better=False),
        "nn_l2_zoo_to_zoo": M.summarize(finite_zoo.tolist(), higher_is_better=False),
        "weights": L.num_params,
    }
    targets = adapter.targets("test")
    if targets is not None and opt.iou_members > 0 and gen_preds[0] is not None:
        same = [i for i, c in enumerate(reference.conditions) if c == adapter.condition]
        pool = same if len(same) >= 2 else list(range(len(reference.rows)))
        pool = pool[: opt.iou_members]
        zoo_preds = []
        for j in pool:
            model = _model_from_blocks(adapter, L, reference.final[j], seed0)
            zoo_preds.append(adapter.predictions(model, "test"))
        zoo_iou = M.pairwise_iou(zoo_preds, targets) if len(zoo_preds) >= 2 else None
        gen_iou = M.pairwise_iou(gen_preds, targets) if N >= 2 else None
        max_iou, _ = M.nearest_iou(gen_preds, zoo_preds, targets)
        noisy_iou, _ = M.nearest_iou(noisy_preds, zoo_preds, targets)
        off = lambda m: m[np.triu_indices(m.shape[0], 1)] if m is not None else np.array([])
        mem.update({
            "iou_pool": "same task" if len(same) >= 2 else "all reference members",
            "iou_pool_size": len(pool),
            "iou_zoo_pairwise_mean": float(off(zoo_iou).mean()) if zoo_iou is not None else math.nan,
            "iou_generated_pairwise_mean": float(off(gen_iou).mean()) if gen_iou is not None else math.nan,
            "iou_generated_vs_nearest_zoo_mean": float(max_iou.mean()),
            "iou_generated_vs_nearest_zoo_max": float(max_iou.max()),
            "iou_noise_baseline_vs_nearest_zoo_mean": float(noisy_iou.mean()),
        })
        zp = mem["iou_zoo_pairwise_mean"]
        mem["memorises"] = bool(not math.isnan(zp) and mem["iou_generated_vs_nearest_zoo_mean"] > zp)
    zoo_nn = mem["nn_l2_zoo_to_zoo"]["avg"]
    mem["nn_ratio"] = (mem["nn_l2_sample_to_zoo"]["avg"] / zoo_nn) if zoo_nn and not math.isnan(zoo_nn) else math.nan

    # -- plain verdicts ----------------------------------------------------------------------
    verdict: dict[str, Any] = {}
    if "generated" in curves:
        g = table["generated"]
        for b in ("nearest_noise", "soup", "random", "pretrained"):
            if b in table:
                verdict[f"beats_{b}_epoch0"] = _better(g["epoch0"], table[b]["epoch0"], higher)
                verdict[f"beats_{b}_final"] = _better(g["final"], table[b]["final"], higher)
        winners = [n for n in curves if n != "generated" and not _better(g["epoch0"], table[n]["epoch0"], higher)
                   and n in ("nearest_noise", "soup")]
        verdict["simple_baselines_win_epoch0"] = winners
    extra = [m for m in getattr(adapter, "report_metrics", []) if m in curves["random"].all_metrics[0]]
    for name, c in curves.items():
        for m in extra:
            table[name][f"{m}_epoch0"] = c.all_metrics[0].get(m)
            table[name][f"{m}_final"] = c.all_metrics[-1].get(m)
    info = {m: dict(v) for m, v in (getattr(adapter, "metric_info", None) or {}).items()}
    return TaskResult(adapter.task_id, adapter.condition, seen, metric, higher, opt.epochs, curves, table, target,
                      samples, mem, notes, verdict, extra, info)

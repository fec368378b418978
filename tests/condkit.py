"""Conditional generators on a real zoo, in one process: build a small digits-subsets zoo, train
Denoised Weights / D2NWG with the same stage modules, batches and optimiser settings the Ray Train
worker uses, sample held-out tasks and score what a user needs (shared by
tests/test_generator_quality_conditional.py and bench/bench_conditional_quality.py).

Per held-out task: epoch-0 accuracy (no fine-tuning) of the generated weight sets, of random init,
of the most similar zoo task's final checkpoints + Gaussian noise (0.1 x the zoo's per-group std,
Zeng et al. 2025) and of the average of every zoo member's final checkpoint; and over all samples:
per-tensor mean/std within the zoo's range (``rayweights.evaluation.diagnostics``), invalid weight
sets (non-finite, negative running variance), diversity within a condition and between conditions,
each relative to the zoo's own (members of one task / task means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rayweights.config import load_config, to_dict
from rayweights.generators import build_method
from rayweights.evaluation.diagnostics import diagnose, invalid_fraction
from rayweights.evaluation.families import position_similarity
from rayweights.table import open_zoo
from rayweights.train.data import fit_stats
from rayweights.train.config import GeneratorTrainConfig, resolved_stage
from rayweights.zoo import ZooSpec, build_zoo
from rayweights.zoo import architectures, families
try:
    from rayweights.zoo.spec import read_zoo_spec
except ImportError:                     # a checkout before the zoo family's data API (to run the gate on it)
    def read_zoo_spec(uri):
        from rayweights.evaluation.families import read_zoo_spec as read

        return read(open_zoo(uri))

HELD_OUT = ["digits:0,1,2,5", "digits:3,4,7,8", "digits:1,6,8,9"]
# heads on one shared frozen body: every 4-class task but the held-out ones, 2 members each
HEADS_SPEC = "jobs/specs/digits_heads.yaml"


def build_subsets_zoo(output: str, max_tasks: int = 10, held_out=HELD_OUT, members: int = 2, epochs=(5, 6),
                      hidden: int = 16, keep_last: int = 2, block_size: int = 128, init: str = "member",
                      select=None, norm: bool = True):
    """A 4-class digits-subsets zoo of an MLP-3 built in this process (no Ray).  ``select``: train
    and keep only these parameters (e.g. ``"last:1"``, the head on a frozen shared body)."""
    spec = ZooSpec(name="digits-4class", output=output, family="dataset-subsets", dataset="digits",
                   classes_per_task=4, max_tasks=max_tasks, held_out=list(held_out), architecture="mlp3",
                   arch_options={"hidden": hidden, "norm": norm}, members_per_task=members, keep_last=keep_last,
                   block_size=block_size, rule=1, init=init, select=select, train_only_selected=select is not None)
    spec.hparams.lr = [0.005, 0.02]
    spec.hparams.epochs = list(epochs)
    build_zoo(spec, use_ray=False, progress=False)
    return open_zoo(output), spec


def build_spec_zoo(path: str, output: str):
    """The zoo of a shipped spec file, built in this process (no Ray) into ``output``."""
    import os

    spec = load_config(ZooSpec, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path),
                       [f"output={output}"])
    build_zoo(spec, use_ray=False, progress=False)
    return open_zoo(output), spec


def make_method(name: str, zoo, cfg):
    by = getattr(cfg, "normalization", None)
    layout = fit_stats(zoo, cfg.stats_members, cfg.seed, by) if by else fit_stats(zoo, cfg.stats_members, cfg.seed)
    conds = zoo.conditions()
    if name == "denoised_weights":       # as the trainer does: the recipe's condition_mode picks what is cached
        m = build_method(name, layout, cfg.preset, model_overrides=cfg.model, scheduler=cfg.scheduler,
                         text_encoder=cfg.text_encoder)
        m.build_condition_cache(conds, "default")
        return m
    spec, _ = read_zoo_spec(zoo.uri)
    m = build_method(name, layout, cfg.preset, model_overrides=cfg.model, scheduler=cfg.scheduler,
                     condition_names=conds, dataset_options={"samples_per_class": cfg.dataset_samples_per_class,
                                                             "seed": cfg.seed, "zoo_spec": to_dict(spec)})
    m.build_features_bank()
    return m


def train_config(path: str, overrides=()) -> GeneratorTrainConfig:
    return load_config(GeneratorTrainConfig, path, list(overrides))


def _lr_at(step: int, sc: dict) -> float:
    """The worker's DeepSpeed schedules (WarmupLR / WarmupDecayLR / WarmupCosineLR), approximately."""
    lr, warm, total = sc["lr"], int(sc.get("warmup_steps") or 0), int(sc["steps"])
    f = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    kind = sc.get("lr_schedule") or "constant"
    if kind == "linear_decay" and step >= warm:
        f = max(0.0, (total - step) / max(1, total - warm))
    elif kind == "cosine" and step >= warm:
        f = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return lr * f


def train_in_process(method, cfg: GeneratorTrainConfig, zoo, seed: int = 0, finish=None, log=None) -> dict:
    """Every stage of ``method`` on ``zoo`` with ``cfg``'s per-stage steps/batch/lr/schedule (AdamW,
    one process); ``finish(method, stage)`` runs the driver's between-stage work."""
    try:
        from rayweights.train.trainer import finish_stage
    except ImportError:                 # a checkout before finish_stage existed
        def finish_stage(method, stage, weights=None):
            if getattr(method, "first_stage", None) == stage:
                method.fit_latent_scale(weights)
            if method.name == "d2nwg" and stage == "dataset_encoder":
                method.build_condition_cache()

    torch.manual_seed(seed)
    rows = zoo.members.to_pylist()
    names = method.condition_names or (method.conditions.conditions if method.conditions else [])
    w, cid = [], []
    for r in rows:
        b = zoo.blocks([r["member_id"]])
        w.append(b)
        cid += [names.index(r["condition"]) if r["condition"] in names else -1] * b.shape[0]
    w, cid = torch.cat(w), torch.tensor(cid)
    L = method.layout
    losses = {}
    for stage in method.stages:
        sc = resolved_stage(cfg, stage)
        module = method.trainer_module(stage)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=sc["lr"],
                                weight_decay=sc["weight_decay"])
        ema = method.ema_tracker(stage) if hasattr(method, "ema_tracker") else None
        g = torch.Generator().manual_seed(seed + 17)
        hist = []
        for step in range(int(sc["steps"])):
            for pg in opt.param_groups:
                pg["lr"] = _lr_at(step, sc)
            bsz = int(sc["batch_size"])
            if method.stage_unit[stage] == "block":
                nb = L.num_blocks
                pick = torch.randint(w.shape[0] * nb, (bsz,), generator=g)
                batch = {"block": w.reshape(-1, L.block_size)[pick], "block_index": pick % nb,
                         "cond_id": cid[pick // nb]}
            else:
                pick = torch.randint(w.shape[0], (min(bsz, w.shape[0]),), generator=g)
                batch = {"weights": w[pick].reshape(len(pick), -1), "cond_id": cid[pick]}
            loss = module(**method.prepare(stage, batch, "cpu"))
            opt.zero_grad()
            loss.backward()
            if sc.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(module.parameters(), float(sc["grad_clip"]))
            opt.step()
            if ema is not None:
                ema.update()
            hist.append(float(loss.detach()))
            if log and (step % 200 == 0 or step == int(sc["steps"]) - 1):
                log(f"{stage} step {step} loss {sum(hist[-50:]) / len(hist[-50:]):.4f}")
        if ema is not None:
            ema.copy_to()
        losses[stage] = hist
        method.models[method.stage_model[stage]].eval()
        finish_stage(method, stage, w.reshape(w.shape[0], -1))
        if finish is not None:
            finish(method, stage)
    return losses


# ----------------------------------------------------------------------------- scoring
def _recipe(spec, task):
    """The zoo's recipe for ``task``: ``build_model(seed)`` is the member's starting network (``init:
    shared``: the zoo's one initialisation, so parameters a layout leaves out are the frozen body the
    members trained on); its split is the task's data, loaded once."""
    return families.subsets.ClassifierRecipe(spec, task)


def _acc(spec, condition: str, sds) -> list[float]:
    recipe = _recipe(spec, families.task_from_condition(condition))
    Xva, yva = recipe.split["test"]
    out = []
    for sd in sds:
        model = recipe.build_model(0)
        if sd is not None:
            model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
        model.eval()
        with torch.no_grad():
            logits = model(Xva)
        out.append(float((logits.argmax(1) == yva).float().mean()) if torch.isfinite(logits).all() else 0.0)
    return out


def _random_sds(spec, condition: str, n: int, names=()):
    """Random init of the layout's parameters ``names``: the recipe's initialisation of member seed
    ``s``; with ``init: shared`` these parameters are drawn afresh (seeded), the rest stay the zoo's body."""
    task = families.task_from_condition(condition)
    recipe = _recipe(spec, task)
    in_shape = tuple(recipe.split["train"][0].shape[1:])
    sds = []
    for s in range(n):
        sd = recipe.build_model(s).state_dict()
        if spec.init == "shared":
            torch.manual_seed(1000 + s)
            fresh = architectures.build(spec.architecture, in_shape, len(task.classes), **spec.arch_options).state_dict()
            sd.update({k: fresh[k] for k in names})
        sds.append(sd)
    return sds


@dataclass
class TaskScore:
    condition: str
    generated: list[float]
    random: list[float]
    nearest_noise: list[float]
    average: float

    @property
    def beats_random(self) -> bool:
        return _above(self.generated, self.random)

    @property
    def beats_nearest_noise(self) -> bool:
        return _above(self.generated, self.nearest_noise)


def _above(xs: list[float], ys: list[float]) -> bool:
    """Mean of ``xs`` above mean of ``ys`` by more than two standard errors of the difference: a
    4-class network at chance scores 0.20-0.30 on these validation sets, so a bare ``>`` is a coin toss."""
    import statistics

    def var(v):
        return statistics.variance(v) if len(v) > 1 else 0.0

    se = (var(xs) / max(1, len(xs)) + var(ys) / max(1, len(ys))) ** 0.5
    return _mean(xs) - _mean(ys) > 2 * se


@dataclass
class Score:
    tasks: list[TaskScore]
    groups_within_fraction: float        # share of tensors whose samples' mean/std lie in the zoo's range
    groups_outside: list[str]
    invalid_fraction: float
    within_ratio: float                  # median pairwise L2 of one condition's samples / zoo member spread
    between_ratio: float                 # mean L2 between conditions' sample means / the zoo's task means'
    min_pairwise: float                  # smallest L2 between two samples of one condition / zoo spacing
    notes: list[str] = field(default_factory=list)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score(samples: dict[str, torch.Tensor], zoo, spec, noise_frac: float = 0.1, seed: int = 0,
          anchor: str = "sample") -> Score:
    """``samples``: condition -> raw (denormalised) blocks [n, num_blocks, block_size].  Nearest +
    noise (``rayweights.evaluation``'s baseline (e)): the zoo's final checkpoint nearest to generated
    sample 0 (``anchor="sample"``, evaluate's default) or the most similar task's (``"task"``), plus
    Gaussian noise of ``noise_frac`` x the zoo's per-group std."""
    L = zoo.layout
    rows = zoo.members.to_pylist()
    last = {r["member_id"]: zoo.blocks([r["member_id"]])[-1] for r in rows}
    allz = zoo.blocks()
    # per-group std of the zoo's weights, broadcast to blocks (the noise of nearest + noise)
    gstd = torch.zeros(L.num_blocks, 1)
    for gr in L.groups:
        v = allz[:, gr.first_block:gr.first_block + gr.num_blocks].reshape(allz.shape[0], -1)[:, :gr.numel]
        gstd[gr.first_block:gr.first_block + gr.num_blocks] = float(v.std())
    avg = torch.stack(list(last.values())).mean(0)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for cond, x in samples.items():
        n = x.shape[0]
        gen = _acc(spec, cond, [L.detokenize(b * L.valid_mask) for b in x])
        rnd = _acc(spec, cond, _random_sds(spec, cond, n, [p.name for p in L.params]))
        if anchor == "sample":        # evaluate's default: the zoo checkpoint nearest to generated sample 0
            keys = list(last)
            d = torch.cdist(torch.nan_to_num(x[:1]).reshape(1, -1),
                            torch.stack([last[k] for k in keys]).reshape(len(keys), -1))
            near = [keys[int(d.argmin())]]
        else:                         # the most similar zoo task's members
            tc = families.task_from_condition(cond).classes
            sims = [position_similarity(tc, families.task_from_condition(r["condition"]).classes) for r in rows]
            near = [r["member_id"] for r, s in zip(rows, sims) if s == max(sims)]
        noisy = [L.detokenize((last[near[i % len(near)]] + noise_frac * gstd * torch.randn(
            last[near[0]].shape, generator=g)) * L.valid_mask) for i in range(n)]
        tasks.append(TaskScore(cond, gen, rnd, _acc(spec, cond, noisy), _acc(spec, cond, [L.detokenize(avg)])[0]))
    flat = torch.cat([x.reshape(x.shape[0], -1) for x in samples.values()])
    d = diagnose(flat, zoo, L)
    within = [gc for gc in d.groups]
    outside = [gc.name for gc in within if not gc.within]
    # diversity, relative to the zoo: members of one task, and task means
    zflat = {r["member_id"]: zoo.blocks([r["member_id"]]).reshape(-1, L.num_blocks * L.block_size) for r in rows}
    by_task: dict[str, list[torch.Tensor]] = {}
    for r in rows:
        by_task.setdefault(r["condition"], []).append(zflat[r["member_id"]][-1])
    member_spread = torch.tensor([float(torch.pdist(torch.stack(v)).median()) for v in by_task.values()
                                  if len(v) > 1]).median()
    task_means = torch.stack([torch.stack(v).mean(0) for v in by_task.values()])
    zoo_between = float(torch.pdist(task_means).mean())
    per = [x.reshape(x.shape[0], -1).double() for x in samples.values()]
    wpair = torch.cat([torch.pdist(torch.nan_to_num(p)) for p in per if p.shape[0] > 1])
    smeans = torch.stack([torch.nan_to_num(p).mean(0) for p in per])
    between = float(torch.pdist(smeans).mean()) if len(per) > 1 else 0.0
    return Score(tasks, 1.0 - len(outside) / max(1, len(within)), outside, invalid_fraction(flat, L),
                 float(wpair.median()) / float(member_spread), between / zoo_between,
                 float(wpair.min()) / float(member_spread), d.notes)


def seen_fit(method, zoo, spec, n: int = 6, tasks: int = 4, **sample_kw) -> str:
    """Epoch-0 accuracy of generated weights for ``tasks`` of the zoo's own (seen) tasks beside their
    members' final checkpoints: how well the generator fits what it was trained on."""
    L = method.layout
    rows = zoo.members.to_pylist()
    conds = sorted({r["condition"] for r in rows})
    out = []
    for i, c in enumerate(conds[:: max(1, len(conds) // tasks)][:tasks]):
        x = L.denormalize(method.sample([c], n, seed=200 + i, **sample_kw))
        gen = _acc(spec, c, [L.detokenize(b * L.valid_mask) for b in x])
        zoo_acc = _acc(spec, c, [zoo.layout.detokenize(zoo.blocks([r["member_id"]])[-1])
                                 for r in rows if r["condition"] == c])
        out.append(f"{c} generated {_mean(gen):.3f} / zoo {_mean(zoo_acc):.3f}")
    return "; ".join(out)


def table(name: str, s: Score) -> str:
    f = lambda v: f"{v:.3f}"  # noqa: E731
    out = [f"### {name}", "",
           "| held-out task | generated epoch-0 acc (mean / min / max) | random | nearest + noise | checkpoint average |",
           "|---|---|---|---|---|"]
    for t in s.tasks:
        out.append(f"| {t.condition} | {f(_mean(t.generated))} / {f(min(t.generated))} / {f(max(t.generated))} | "
                   f"{f(_mean(t.random))} | {f(_mean(t.nearest_noise))} | {f(t.average)} |")
    out += ["", "| per-tensor stats in zoo range | invalid weight sets | diversity within (/ zoo members) | "
            "between conditions (/ zoo tasks) | closest pair (/ zoo members) |", "|---|---|---|---|---|",
            f"| {f(s.groups_within_fraction)}{' (outside: ' + ', '.join(s.groups_outside[:4]) + ')' if s.groups_outside else ''}"
            f" | {f(s.invalid_fraction)} | {f(s.within_ratio)} | {f(s.between_ratio)} | {f(s.min_pairwise)} |"]
    return "\n".join(out)

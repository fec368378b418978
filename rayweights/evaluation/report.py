"""The evaluation report: a markdown table (also printed) and matplotlib PNG convergence curves.

``write_report(results, out_dir, header)`` writes ``report.md``, ``results.json``,
``curves-<task>.png`` (metric vs epoch and vs wall time, one line per initialisation, as in
Denoised Weights Fig. 4 / D2NWG Fig. 4) and ``curves-mean.png`` (the mean over tasks).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ..fmt import cell as _f
from .core import INIT_LABELS, TaskResult

__all__ = ["render_markdown", "verdict_sentences", "plot_curves", "plot_mean_curves", "write_report",
           "memorisation_markdown", "comparison_table", "summary_metrics"]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "task"


def _count(results: Sequence[TaskResult], key: str) -> tuple[int, int]:
    have = [r for r in results if key in r.verdict]
    return sum(bool(r.verdict[key]) for r in have), len(have)


def verdict_sentences(results: Sequence[TaskResult]) -> list[str]:
    """Plain statements of whether generated weights (a) beat the simple baselines (e) and (f)."""
    out = []
    if not results or "generated" not in results[0].curves:
        return ["No generated initialisation was evaluated."]
    E = results[0].epochs
    parts = []
    for b, name in (("nearest_noise", "the nearest zoo checkpoint + noise (e)"), ("soup", "the zoo soup (f)"),
                    ("random", "random init (b)")):
        k0, n0 = _count(results, f"beats_{b}_epoch0")
        kE, nE = _count(results, f"beats_{b}_final")
        if n0:
            parts.append(f"{name} at epoch 0 on {k0} of {n0} task(s) and after {E} epochs on {kE} of {nE}")
    if parts:
        out.append("Generated weights (a) beat " + "; ".join(parts) + ".")
    losses = []
    for r in results:
        g = r.table["generated"]
        for b, tag in (("nearest_noise", "(e)"), ("soup", "(f)")):
            for when, key in (("epoch 0", "epoch0"), (f"epoch {E}", "final")):
                vk = f"beats_{b}_{'epoch0' if key == 'epoch0' else 'final'}"
                if vk in r.verdict and not r.verdict[vk]:
                    losses.append(f"{r.task_id} {tag} at {when}: {_f(r.table[b][key])} vs generated {_f(g[key])}")
    if losses:
        out.append("Generated weights do NOT beat the simple baselines here — the baseline wins or ties on: "
                   + "; ".join(losses) + ".")
    else:
        out.append("Generated weights beat both simple baselines (e) and (f) on every task, at epoch 0 and at the end.")
    mem = [r for r in results if "memorises" in r.memorisation]
    if mem:
        k = sum(r.memorisation["memorises"] for r in mem)
        out.append(f"Memorisation: on {k} of {len(mem)} task(s) the generated models' wrong predictions overlap "
                   "their nearest zoo member more than zoo members overlap each other (IoU above the zoo's "
                   "pairwise IoU).")
    return out


def _counts(i: Mapping[str, Any] | None) -> str:
    return f" (n={i.get('n_generated')}/{i.get('n_target')})" if i else ""


def _metric_info_lines(r: TaskResult) -> list[str]:
    """One line per group of image metrics with the same extractor and images: which extractor produced
    the scores and how many images each side."""
    info = getattr(r, "metric_info", None) or {}
    groups: dict[tuple, list[str]] = {}
    for m, i in info.items():
        groups.setdefault((i.get("label", i.get("extractor")), i.get("n_generated"), i.get("n_target"),
                           i.get("images", "")), []).append(m)
    out = []
    for (label, n_gen, n_tgt, images), ms in groups.items():
        out.append(f"- {' and '.join(f'**{m}**' for m in ms)} (every epoch, every row): extractor `{label}`; "
                   f"{n_gen} generated vs {n_tgt} target images" + (f" ({images})" if images else "") + ".")
    return [""] + out if out else []


def _metric_axis_label(r: TaskResult, m: str) -> str:
    i = (getattr(r, "metric_info", None) or {}).get(m)
    if not i:
        return m
    kind = str(i.get("extractor", "")).partition(":")[0]
    what = {"small": "small, random net", "trained": "trained edit-op CNN", "inception": "Inception"}.get(kind, kind)
    return f"{m} ({what}; {i.get('n_generated')} vs {i.get('n_target')} images)"


def render_markdown(results: Sequence[TaskResult], header: Mapping[str, Any] | None = None,
                    images: Mapping[str, str] | None = None) -> str:
    lines = ["# Evaluation report", ""]
    if header:
        for k, v in header.items():
            lines.append(f"- **{k}**: {v}")
        lines.append("")
    lines += ["## Verdict", ""] + [f"- {s}" for s in verdict_sentences(results)] + [""]
    for r in results:
        better = "higher is better" if r.higher_is_better else "lower is better"
        lines += [f"## Task `{r.task_id}` — `{r.condition}` ({'seen by the generator' if r.seen else 'held out'})",
                  "", f"Metric: **{r.metric}** on the test split ({better}); from-scratch target = random init "
                  f"after {r.epochs} epochs = {_f(r.target)}.", ""]
        extra = list(getattr(r, "extra_metrics", []) or [])
        info = getattr(r, "metric_info", None) or {}
        ex_head = "".join(f" {m}{_counts(info.get(m))} epoch 0 | {m}{_counts(info.get(m))} epoch {r.epochs} |"
                          for m in extra)
        lines.append(f"| initialisation | epoch 0 | epoch {r.epochs} | epochs to target | speed-up (epochs) | "
                     f"time to target (s) | speed-up (time) | init cost (s) |{ex_head} note |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(extra) + "---|")
        for name, row in r.table.items():
            ex = "".join(f" {_f(row.get(f'{m}_epoch0'))} | {_f(row.get(f'{m}_final'))} |" for m in extra)
            lines.append(f"| {INIT_LABELS.get(name, name)} | {_f(row['epoch0'])} | {_f(row['final'])} | "
                         f"{_f(row['epochs_to_target'])} | {_f(row['speedup_epochs'], 2)} | "
                         f"{_f(row['time_to_target'], 3)} | {_f(row['speedup_time'], 2)} | "
                         f"{_f(row['init_seconds'], 4)} |{ex} {row['note']} |")
        lines += _metric_info_lines(r)              # the extractor and the image counts, under the scores
        lines += ["", "N-sample statistics at epoch 0 (no fine-tuning):", "",
                  "| set | best | avg | median | worst | N |", "|---|---:|---:|---:|---:|---:|"]
        for name, label in (("generated", "generated (test)"), ("generated_train", "generated (train)"),
                            ("nearest_noise", "nearest zoo ckpt + noise (test)")):
            s = r.samples.get(name)
            if s:
                lines.append(f"| {label} | {_f(s['best'])} | {_f(s['avg'])} | {_f(s['median'])} | "
                             f"{_f(s['worst'])} | {s['n']} |")
        m = r.memorisation
        lines += ["", "Memorisation:", "", "| measure | value |", "|---|---:|",
                  f"| NN L2 distance, generated sample -> zoo (avg / min) | {_f(m['nn_l2_sample_to_zoo']['avg'])} / "
                  f"{_f(m['nn_l2_sample_to_zoo']['best'])} |",
                  f"| NN L2 distance, zoo member -> other zoo members (avg / min) | "
                  f"{_f(m['nn_l2_zoo_to_zoo']['avg'])} / {_f(m['nn_l2_zoo_to_zoo']['best'])} |",
                  f"| ratio (sample->zoo / zoo->zoo) | {_f(m.get('nn_ratio'), 3)} |"]
        if "iou_zoo_pairwise_mean" in m:
            lines += [
                f"| IoU of wrong predictions, generated vs nearest zoo member (mean / max) | "
                f"{_f(m['iou_generated_vs_nearest_zoo_mean'])} / {_f(m['iou_generated_vs_nearest_zoo_max'])} |",
                f"| IoU, zoo pairwise (mean over {m['iou_pool_size']} members, {m['iou_pool']}) | "
                f"{_f(m['iou_zoo_pairwise_mean'])} |",
                f"| IoU, generated pairwise (mean) | {_f(m['iou_generated_pairwise_mean'])} |",
                f"| IoU, nearest ckpt + noise vs nearest zoo member (mean) | "
                f"{_f(m['iou_noise_baseline_vs_nearest_zoo_mean'])} |",
                f"| memorises (generated-vs-nearest IoU above zoo pairwise IoU) | {_f(m['memorises'])} |"]
        if r.notes:
            lines += [""] + [f"- note: {n}" for n in r.notes]
        if images and r.task_id in images:
            lines += ["", f"![convergence curves for {r.task_id}]({images[r.task_id]})"]
        lines.append("")
    if images and "__mean__" in images:
        lines += ["## Mean over tasks", "", f"![mean convergence curves]({images['__mean__']})", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib             # the plotting backend is chosen only where a plot is made

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: TaskResult, path: str) -> str:
    """Metric vs epoch and vs cumulative wall time, one line per initialisation."""
    plt = _plt()
    extra = list(getattr(result, "extra_metrics", []) or [])
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(5.5 * (2 + len(extra)), 4))
    ax1, ax2 = axes[0], axes[1]
    for name, c in result.curves.items():
        label = INIT_LABELS.get(name, name)
        ax1.plot(range(len(c.values)), c.values, marker="o", ms=3, label=label)
        ax2.plot(c.wall, c.values, marker="o", ms=3, label=label)
        for ax, m in zip(axes[2:], extra):      # seed 0's secondary metrics (FID curves, Denoised Weights Fig. 4)
            ax.plot(range(len(c.all_metrics)), [e.get(m, float("nan")) for e in c.all_metrics], marker="o", ms=3,
                    label=label)
    for ax, xl in ((ax1, "fine-tuning epoch"), (ax2, "wall time (s, incl. init cost)")):
        ax.axhline(result.target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel(result.metric)
        ax.grid(alpha=0.3)
    for ax, m in zip(axes[2:], extra):
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel(_metric_axis_label(result, m))
        ax.grid(alpha=0.3)
    ax1.set_title(f"{result.task_id} ({'seen' if result.seen else 'held out'})")
    ax2.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mean_curves(results: Sequence[TaskResult], path: str) -> str:
    """The mean curve over tasks per initialisation (D2NWG Fig. 4: average accuracy evolution)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n in results[0].curves if all(n in r.curves for r in results)]
    for name in names:
        v = np.mean([r.curves[name].values for r in results], axis=0)
        ax.plot(range(len(v)), v, marker="o", ms=3, label=INIT_LABELS.get(name, name))
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(f"mean {results[0].metric} over {len(results)} task(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return _jsonable(o.item())
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def memorisation_markdown(studies: Sequence[Any], images: Mapping[str, str]) -> str:
    """The report section of Zeng et al.'s memorisation study (one table + scatter per seen task)."""
    out = ["## Memorisation on seen tasks (accuracy vs novelty)", "",
           "Baselines built from the training checkpoints (Zeng et al. 2025): Gaussian noise at several σ "
           "(x the zoo's per-group std), the average of 16 random checkpoints, a per-coordinate Gaussian fitted "
           "to the zoo; the zoo row scores each member against the other members (a fresh run's novelty).", ""]
    for m in studies:
        out += [m.table(), ""]
        if m.task in images:
            out += [f"![accuracy vs novelty, {m.task}]({images[m.task]})", ""]
    return "\n".join(out)


def write_report(results: Sequence[TaskResult], out_dir: str, header: Mapping[str, Any] | None = None,
                 print_table: bool = True, memorisation: Sequence[Any] = ()) -> str:
    """Write report.md, results.json and the PNGs under ``out_dir`` (a local folder); returns the markdown.
    ``memorisation``: :class:`rayweights.evaluation.memorisation.MemorisationResult` per seen task."""
    os.makedirs(out_dir, exist_ok=True)
    images = {}
    for r in results:
        name = f"curves-{_slug(r.task_id)}.png"
        plot_curves(r, os.path.join(out_dir, name))
        images[r.task_id] = name
    if len(results) > 1:
        plot_mean_curves(results, os.path.join(out_dir, "curves-mean.png"))
        images["__mean__"] = "curves-mean.png"
    md = render_markdown(results, header, images)
    if memorisation:
        memo_images = {}
        for m in memorisation:
            name = f"memorisation-{_slug(m.task)}.png"
            m.plot(os.path.join(out_dir, name))
            memo_images[m.task] = name
        md = md.rstrip("\n") + "\n\n" + memorisation_markdown(memorisation, memo_images) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    payload = {"header": dict(header or {}), "verdict": verdict_sentences(results),
               "tasks": [r.to_dict() for r in results],
               "memorisation": [m.to_dict() for m in memorisation]}
    tmp = os.path.join(out_dir, f".results.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:                 # the done marker: written last, whole or not at all
        json.dump(_jsonable(payload), f, indent=1, default=str)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    if print_table:
        print(md)
    return md


# ----------------------------------------------------------------------------- summaries of results.json
def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else math.nan


def _speedup(row: Mapping[str, Any], kind: str) -> float | None:
    """A row's speed-up from results.json, where an infinite one (target reached at epoch 0 / after no
    training time) was written as null: None only when the target was not reached."""
    v = row.get(f"speedup_{kind}")
    if v is not None:
        return float(v)
    return math.inf if row.get(f"{kind}_to_target") == 0 else None


def _median(values) -> float | None:
    v = sorted(float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x)))
    if not v:
        return None
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def summary_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """Sweep metrics from an evaluation's ``results.json``: ``gen_<metric>`` = mean over tasks of
    the average epoch-0 metric of the N generated samples (no fine-tuning), plus best/median,
    the epoch-0 and final values of every initialisation and seconds per sample."""
    tasks = results.get("tasks") or []
    if not tasks:
        return {}
    metric = tasks[0]["metric"]
    gen = [t["samples"]["generated"] for t in tasks]
    out: dict[str, Any] = {
        "metric": metric,
        f"gen_{metric}": _mean(g.get("avg") for g in gen),
        f"gen_{metric}_best": _mean(g.get("best") for g in gen),
        f"gen_{metric}_median": _mean(g.get("median") for g in gen),
        "num_tasks": len(tasks),
    }
    for init in ("random", "generated", "nearest_noise", "soup", "pretrained", "best_of_n"):
        rows = [t["table"][init] for t in tasks if init in t["table"]]
        if rows:
            out[f"{init}_{metric}_epoch0"] = _mean(r.get("epoch0") for r in rows)
            out[f"{init}_{metric}_final"] = _mean(r.get("final") for r in rows)
    secs = [t["table"]["generated"].get("init_seconds") for t in tasks if "generated" in t["table"]]
    if secs:
        out["sample_seconds"] = _mean(secs)
    return out


def comparison_table(results: Mapping[str, Any]) -> str:
    """The comparison of initialisations of an evaluation's ``results.json``, averaged over its
    held-out tasks: metric at epoch 0 and after the last epoch, the speed-up to random's final
    value, and the generated samples without fine-tuning (markdown)."""
    tasks = results.get("tasks") or []
    if not tasks:
        return "(no evaluated tasks)"
    metric, E = tasks[0]["metric"], tasks[0]["epochs"]
    lines = [f"Mean over {len(tasks)} held-out task(s) ({', '.join(t['condition'] for t in tasks)}): "
             f"{metric} before fine-tuning (epoch 0) and after {E} epoch(s)",
             "", f"| initialisation | {metric} epoch 0 | {metric} epoch {E} | reached random's final | "
                 f"speed-up to it (epochs) | speed-up to it (wall time) |",
             "|---|---:|---:|---:|---:|---:|"]
    for init, label in INIT_LABELS.items():
        rows = [t["table"][init] for t in tasks if init in t["table"]]
        if not rows:
            continue
        # speed-ups over the tasks that reached the target: the median (one task reached at epoch 0 is inf)
        sp = [_speedup(r, "epochs") for r in rows]
        st = [_speedup(r, "time") for r in rows]
        reached = sum(r.get("epochs_to_target") is not None for r in rows)
        lines.append(f"| {label} | {_f(_mean(r.get('epoch0') for r in rows))} | "
                     f"{_f(_mean(r.get('final') for r in rows))} | {reached}/{len(rows)} | "
                     f"{_f(_median(sp), 2)} | {_f(_median(st), 2)} |")
    lines += ["", "Speed-ups: median over the tasks where the initialisation reached random's final value, of "
                  "random's epochs (wall time) over its own; wall time includes the initialisation's cost "
                  "(sampling, best-of-N scoring)."]
    gen = [t["samples"]["generated"] for t in tasks]
    lines += ["", f"Generated samples without fine-tuning (N = {gen[0].get('n')} per task): "
                  f"best {_f(_mean(g.get('best') for g in gen))}, avg {_f(_mean(g.get('avg') for g in gen))}, "
                  f"median {_f(_mean(g.get('median') for g in gen))}"]
    for v in results.get("verdict") or []:
        lines.append(f"- {v}")
    return "\n".join(lines)

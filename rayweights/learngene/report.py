"""Markdown table and matplotlib plot of a learngene comparison summary."""

from __future__ import annotations

from typing import Any, Mapping

from ..fmt import cell

__all__ = ["render_markdown", "plot_curves", "format_table", "LABELS"]

LABELS = {"scratch": "random init", "fine": "FINE (Σ phase + full)", "fine_nosigma": "learngene init, no Σ phase"}


def _g(v: Any, nd: int = 4) -> str:
    return cell(v, nd, "g")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _size(s: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items())


def format_table(summary: Mapping) -> str:
    """The per-size comparison table (markdown)."""
    m, B, S = summary["metric"], summary["budget"], summary["steps"]
    has_ns = "fine_nosigma" in summary["methods"]
    has_f = "fine" in summary["methods"]
    head = ["size", "params", f"random init @{B}"]
    head += [f"FINE @{B}"] if has_f else []
    head += [f"no-Σ @{B}"] if has_ns else []
    head += [f"direct PT @{S}"] + ([f"FINE @{S}"] if has_f else [])
    head += ["target", "steps→target random"] + (["FINE"] if has_f else []) + (["no-Σ"] if has_ns else [])
    head += ["speedup"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary["sizes"]:
        ab, fn, st = e["at_budget"], e["final"], e["steps_to_target"]
        cells = [f"{e['name']} ({_size(e['size'])})", f"{e['params']:,}", _g(ab.get("scratch"))]
        cells += [_g(ab.get("fine"))] if has_f else []
        cells += [_g(ab.get("fine_nosigma"))] if has_ns else []
        cells += [_g(fn.get("scratch"))] + ([_g(fn.get("fine"))] if has_f else [])
        cells += [_g(e["target"]), _g(st.get("scratch"))]
        cells += [_g(st.get("fine"))] if has_f else []
        cells += [_g(st.get("fine_nosigma"))] if has_ns else []
        sp = e.get("speedup")
        cells += [f"{_g(sp, 3)}×" if sp is not None else "—"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\nmetric: `{m}` ({'higher' if summary['higher_is_better'] else 'lower'} is better)"


def render_markdown(summary: Mapping) -> str:
    t, st, lg = summary["totals"], summary["storage"], summary["learngene"]
    src = summary["source"]
    lines = [f"# Learngene (FINE) comparison: {summary['name']}", "",
             f"Family `{summary['family']}`; source {_size(src['size'])} ({src['params']:,} params, "
             f"{t['source_steps']} training steps incl. learngene learning); learngene mode `{lg['mode']}`, "
             f"{len(lg['genes'])} layer types. Every run lasts {summary['steps']} steps (= direct pretraining "
             f"of that size); the fixed budget is {summary['budget']} steps, FINE's Σ-only phase "
             f"({summary['sigma_steps']} steps on a subset) included. Seeds: {summary['seeds']} (curves averaged). "
             f"Target: `{summary['target']['kind']}`"
             + (f" − tolerance {summary['target']['tolerance']}" if summary['target']['tolerance'] else "") + ".",
             "", format_table(summary), "",
             "## Training steps for all sizes", "",
             "| | steps |", "|---|---|",
             f"| direct pretraining, each size to its target | {t['direct_steps']:,} "
             f"(full runs: {t['direct_steps_full']:,}) |",
             "| FINE: source + learngene learning once, then each size to the target | "
             + (f"{t['fine_steps']:,} |" if t["fine_steps"] is not None else
                f"not all sizes reached the target ({t['fine_sizes_reached']}/{t['sizes']}) |")]
    if t.get("step_ratio"):
        lines.append(f"| ratio (direct / FINE) | {t['step_ratio']:.2f}× |")
    lines += ["", "## Storage (float32)", "", "| | bytes |", "|---|---|",
              f"| learngenes (U, V of every layer type + the source's Σ) | {_bytes(st['learngene_bytes'])} |",
              f"| learngene U, V + every target's trained Σ | {_bytes(st['learngene_uv_bytes'] + st['sigma_bytes'])} |",
              f"| {t['sizes']} separate models | {_bytes(st['models_bytes'])} |",
              f"| ratio (models / learngenes) | {st['ratio']:.2f}× |",
              f"| ratio (models / learngenes + Σs) | {st['ratio_with_sigmas']:.2f}× |", "",
              "## Layer types", "", "| type | out | in | depth | rank | rel. error |", "|---|---|---|---|---|---|"]
    for g in lg["genes"]:
        lines.append(f"| {g['name']} | {g['out_dim']} | {'x'.join(map(str, g['in_shape']))} | {g['depth']} | "
                     f"{'x'.join(map(str, g['rank']))} | {_g(g['rel_error'], 3)} |")
    lines += ["", "![curves](curves.png)", ""]
    verdicts = []
    for e in summary["sizes"]:
        sp = e.get("speedup")
        if sp is None:
            who = "FINE" if e["steps_to_target"].get("fine") is None else "random init"
            verdicts.append(f"- {e['name']}: {who} did not reach the target within {summary['steps']} steps.")
        elif sp > 1:
            verdicts.append(f"- {e['name']}: FINE reached the target {sp:.2f}× sooner than random init.")
        else:
            verdicts.append(f"- {e['name']}: FINE was not faster than random init ({sp:.2f}×).")
    return "\n".join(lines + ["## Verdict", ""] + verdicts) + "\n"


def plot_curves(summary: Mapping, path: str) -> str:
    """One panel per target size: metric vs training step for every method, the Σ-only phase
    shaded, the budget (dotted) and the target (dashed)."""
    import matplotlib             # the plotting backend is chosen only where a plot is made

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = summary["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), squeeze=False)
    colors = {"scratch": "tab:gray", "fine": "tab:red", "fine_nosigma": "tab:blue"}
    for ax, e in zip(axes[0], sizes):
        for m, c in e["curves"].items():
            ax.plot(c["steps"], c["values"], label=LABELS.get(m, m), color=colors.get(m), lw=1.6)
        if summary["sigma_steps"] and "fine" in e["curves"]:
            ax.axvspan(0, summary["sigma_steps"], color="tab:red", alpha=0.08, lw=0)
        ax.axvline(summary["budget"], color="k", ls=":", lw=1)
        ax.axhline(e["target"], color="k", ls="--", lw=0.8)
        ax.set_title(f"{e['name']} ({e['params']:,} params)", fontsize=9)
        ax.set_xlabel("training step")
        if not summary["higher_is_better"]:
            vals = [v for c in e["curves"].values() for v in c["values"] if v and v > 0]
            if vals and max(vals) / max(min(vals), 1e-12) > 20:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(summary["metric"])
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"learngene {summary['name']}: {summary['metric']} vs steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

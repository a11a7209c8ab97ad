"""Reporting the convergence suite: summary rows, markdown, plots, JSON.

Per task and optimizer, the summary has the run at its selected learning
rate ("tuned") and, for the optimizers with `default_row` (Adam, Ginger),
the run at the default learning rate ("default"): mean ± std over seeds of
the final training loss, the best and the final validation loss and the
task's metric, and the median time per training step.
"""

import json
import math
import os
import platform
import warnings

import numpy as np

from convergence_harness import (COLORS, LABELS, OPTIMIZERS, _mean,
                                 default_lr, lr_grid, select_lr)
from convergence_tasks import TASKS


# ------------------------------------------------------------------ summary
def summarize(runs, task_names, opt_names):
    """Rows: per task, each optimizer at its selected lr, plus defaults."""
    rows = []
    for tname in task_names:
        task = TASKS[tname]
        for oname in opt_names:
            sel = [r for r in runs if r["task"] == tname
                   and r["optimizer"] == oname]
            if not sel:
                continue
            best = select_lr(sel)
            tried = sorted({r["learning_rate"] for r in sel})
            edge = None
            if len(tried) >= 3 and best in (tried[0], tried[-1]):
                edge = "low" if best == tried[0] else "high"
            entries = [("tuned", best, edge)]
            dl = default_lr(oname)
            if OPTIMIZERS[oname]["default_row"] and len(tried) > 1:
                entries.append(("default", dl, None))
            for kind, lr, e in entries:
                rr = [r for r in sel if r["learning_rate"] == lr]
                if rr:
                    rows.append(_row(task, oname, kind, lr, rr, e, tried))
    return rows


def _stat(vals):
    fin = [v for v in vals if isinstance(v, (int, float))
           and math.isfinite(v)]
    if len(fin) < len(vals) or not fin:
        return (math.inf, 0.0)
    return (float(np.mean(fin)), float(np.std(fin)))


def _row(task, oname, kind, lr, rr, edge=None, tried=()):
    def stat(key):
        return _stat([r[key] for r in rr])

    extra = {}
    finals = [r.get("final") or {} for r in rr]
    for k in sorted({k for f in finals for k, v in f.items()
                     if isinstance(v, (int, float))}):
        extra[k] = _stat([f.get(k, math.nan) for f in finals])
    steps = rr[0]["steps"]
    return {
        "task": task.name,
        "optimizer": oname,
        "setting": kind,
        "learning_rate": lr,
        "lrs_tried": list(tried),
        "grid_edge": edge,
        "seeds": len(rr),
        "diverged": sum(r["diverged"] for r in rr),
        "steps": steps,
        "train_loss": stat("train_loss"),
        "val_loss": stat("val_loss"),
        "best_val_loss": stat("best_val_loss"),
        "metric": stat("metric"),
        "metric_label": task.metric[1],
        "metric_kind": task.metric_kind,
        "final": extra,
        "ms_per_step": float(np.median(
            [r.get("ms_per_step", 1000 * r["seconds"] / r["steps"])
             for r in rr])),
    }


def _label(row):
    if row["setting"] == "default":
        if OPTIMIZERS[row["optimizer"]]["kind"] == "ginger":
            return "Ginger(tau=8) defaults"
        return f"{LABELS[row['optimizer']]}() defaults"
    return LABELS[row["optimizer"]]


def _fmt(mean_std, digits=4, pct=False):
    m, s = mean_std
    if not math.isfinite(m):
        return "diverged"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{digits}g} ± {s:.{digits - 2}g}" if s else f"{m:.{digits}g}"


def format_metric(row):
    m, s = row["metric"]
    if not math.isfinite(m):
        return "diverged" if row["diverged"] else "–"
    kind = row.get("metric_kind", "pct")
    pm = (lambda d: f" ± {s:.{d}f}") if row["seeds"] > 1 else (lambda d: "")
    if kind == "r2":
        return f"R² {m:.3f}{pm(3)}"
    if kind == "ppl":
        return f"ppl {m:.3f}{pm(3)}"
    if kind == "rouge":
        f = row.get("final", {})
        parts = [f"{f[k][0]:.1f}" for k in ("rouge1", "rouge2")
                 if k in f and math.isfinite(f[k][0])]
        return "R-1/2/L " + " / ".join(parts + [f"{m:.1f}"]) + pm(1)
    return f"{row['metric_label'].replace('val ', '')} {_fmt((m, s), pct=True)} %"


def _fmt_lr(row):
    s = f"{row['learning_rate']:g}"
    if row.get("grid_edge"):
        s += " ↓" if row["grid_edge"] == "low" else " ↑"
    return s


# ----------------------------------------------------------------- machine
def machine_info():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras

    versions = {"python": platform.python_version(),
                "keras": keras.__version__, "numpy": np.__version__}
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax
            versions["jax"] = jax.__version__
        elif backend == "tensorflow":
            import tensorflow as tf
            versions["tensorflow"] = tf.__version__
        else:
            import torch
            versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import keras_ginger
        versions["keras_ginger"] = getattr(keras_ginger, "__version__", "?")
    except ImportError:  # pragma: no cover
        pass
    return {
        "cpu": cpu or "unknown CPU",
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "backend": backend,
        "versions": versions,
    }


def _machine_line(meta):
    m = meta["machine"]
    others = ", ".join(f"{k} {v}" for k, v in m["versions"].items()
                       if k != "keras")
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; "
            f"Keras {m['versions']['keras']} on {m['backend']} ({others}). "
            f"Total wall time {meta['wall_seconds'] / 60:.1f} min.")


def _describe_optimizer(name, ginger_defaults):
    spec = OPTIMIZERS[name]
    kw = {k: v for k, v in spec["kwargs"].items() if k != "learning_rate"}
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    if spec["kind"] == "ginger":
        return f"`Ginger({args})`"
    return f"`keras.optimizers.{spec['kind']}({args})`"


# ---------------------------------------------------------------- markdown
def markdown(rows, meta):
    gd = meta.get("ginger_defaults", {})
    shown = {k: v for k, v in gd.items()
             if k in ("learning_rate", "tau", "beta_1", "beta_2", "damping",
                      "graft", "relative_damping", "graft_beta_2",
                      "graft_epsilon", "metric")}
    lines = [
        f"# Convergence suite ({meta['date']})",
        "",
        _machine_line(meta),
        "",
        "Values after an equal step budget per task, mean ± std over seeds. "
        "train loss: mean loss of the last epoch; best val: lowest "
        "validation loss over the epochs (what early stopping keeps; it "
        "selects the learning rate); final val: validation loss and metric "
        "at the end (ppl: per-character perplexity; R-1/2/L: ROUGE F1 % "
        "of greedy summaries, ± of ROUGE-L). Rows in bold: the defaults "
        "(`Adam()`, `Ginger(tau=8)`). ↑ / ↓: the selected learning rate is "
        "the highest / lowest tried. ms/step: median training step.",
        "",
        "Ginger's package defaults (`inspect.signature`): "
        + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ".",
        "",
        "| task | optimizer | lr | steps | seeds | train loss | best val "
        "| final val | final val metric | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = _label(r)
        if r["setting"] == "default":
            name = f"**{name}**"
        lines.append(
            f"| {r['task']} | {name} | {_fmt_lr(r)} | "
            f"{r['steps']} | {r['seeds']}"
            f"{' (' + str(r['diverged']) + ' diverged)' if r['diverged'] else ''} | "
            f"{_fmt(r['train_loss'])} | {_fmt(r['best_val_loss'])} | "
            f"{_fmt(r['val_loss'])} | {format_metric(r)} | "
            f"{r['ms_per_step']:.1f} |")
    lines += ["", *_pivot(rows, meta), ""]
    lines += [
        "Optimizers: " + "; ".join(
            f"{LABELS[o]} {_describe_optimizer(o, gd)}"
            for o in meta["optimizers"]) + ". Ginger trains through "
        "`keras_ginger.with_fisher` (sampled Fisher), the others through "
        "the plain model."
        + (" Keras's Muon orthogonalises the momentum of 2-D kernels only; "
           "other variables (biases, norms, 3-D attention and 4-D conv "
           "kernels) and those whose path contains \"embedding\" take its "
           "AdamW step." if "muon" in meta["optimizers"] else ""),
        "",
        "Learning-rate grids: "
        + "; ".join(f"{LABELS[o]} "
                    f"{', '.join(f'{x:g}' for x in meta['grids'][o])}"
                    for o in meta["optimizers"]) + ".",
        "",
        "Protocol: " + meta["protocol"],
        "",
    ]
    info = meta.get("task_info") or {}
    if info:
        lines += ["Tasks: " + "; ".join(
            f"{t} ({TASKS[t].title}"
            + (": " + ", ".join(f"{k} {_short(v)}" for k, v in d.items())
               if d else "") + ")" for t, d in info.items()) + ".", ""]
    return "\n".join(lines)


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _pivot(rows, meta):
    """Best validation loss at the tuned lr: tasks x optimizers, the best
    per task in bold, and each one's ratio to tuned Adam."""
    tasks = [t for t in meta["tasks"] if any(r["task"] == t for r in rows)]
    opts = [o for o in meta["optimizers"]
            if any(r["optimizer"] == o for r in rows)]
    if len(opts) < 2:
        return []
    out = ["Best validation loss at each optimizer's selected learning "
           "rate (mean over seeds; ratio to tuned Adam in brackets; best "
           "per task in bold):", "",
           "| task | " + " | ".join(LABELS[o] for o in opts) + " |",
           "|---" * (len(opts) + 1) + "|"]
    for t in tasks:
        tuned = {r["optimizer"]: r["best_val_loss"][0] for r in rows
                 if r["task"] == t and r["setting"] == "tuned"}
        fin = [v for v in tuned.values() if math.isfinite(v)]
        best = min(fin) if fin else None
        adam = tuned.get("adam")
        cells = []
        for o in opts:
            v = tuned.get(o)
            if v is None:
                cells.append("")
                continue
            if not math.isfinite(v):
                cells.append("diverged")
                continue
            c = f"{v:.4g}"
            if adam and math.isfinite(adam) and o != "adam":
                c += f" ({v / adam:.3f})"
            cells.append(f"**{c}**" if v == best else c)
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    return out


# -------------------------------------------------------------------- plots
def plot_task(runs, rows, tname, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = TASKS[tname]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in [r for r in rows if r["task"] == tname]:
        rr = [r for r in runs if r["task"] == tname
              and r["optimizer"] == row["optimizer"]
              and r["learning_rate"] == row["learning_rate"]]
        dashed = row["setting"] == "default"
        label = (_label(row) if dashed else
                 f"{LABELS[row['optimizer']]} (lr {row['learning_rate']:g})")
        color = COLORS[row["optimizer"]]
        for ax, key in zip(axes, ("loss", "val_loss")):
            n = max(len(r["history"].get(key, [])) for r in rr)
            if n == 0:
                continue
            curves = np.full((len(rr), n), np.nan)
            for i, r in enumerate(rr):
                h = r["history"].get(key, [])
                curves[i, :len(h)] = h
            curves[~np.isfinite(curves)] = np.nan
            x = np.arange(1, n + 1) * (row["steps"] / max(n, 1))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(curves, 0)
                lo, hi = np.nanmin(curves, 0), np.nanmax(curves, 0)
            ax.plot(x, mean, color=color, linestyle="--" if dashed else "-",
                    linewidth=1.3 if dashed else 1.8, label=label,
                    marker="o" if n == 1 else None)
            if len(rr) > 1 and not dashed:
                ax.fill_between(x, lo, hi, color=color, alpha=0.15,
                                linewidth=0)
    for ax, t in zip(axes, ("training loss (epoch mean)", "validation loss")):
        ax.set_title(t)
        ax.set_xlabel("step")
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 3:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{task.title} — {meta['machine']['backend']}, "
                 f"{meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------- json
def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_outputs(runs, timings, meta, out, prefix, task_names, opt_names):
    os.makedirs(out, exist_ok=True)
    meta.setdefault("grids", {o: lr_grid(o) for o in opt_names})
    rows = summarize(runs, task_names, opt_names)
    data = {"meta": meta, "timings_s": timings, "summary": rows,
            "runs": runs}
    with open(os.path.join(out, prefix + ".json"), "w") as f:
        json.dump(_jsonable(data), f, indent=1)
    with open(os.path.join(out, prefix + ".md"), "w") as f:
        f.write(markdown(rows, meta))
    plots = []
    for tname in task_names:
        path = os.path.join(out, f"{prefix}_{tname}.png")
        plot_task(runs, rows, tname, path, meta)
        plots.append(path)
    return rows, plots


# -------------------------------------------------------------------- sweep
def sweep_summary(runs, task_names):
    """Per candidate and task: (train, best val) ratios to Adam()."""
    def cand(r):
        return (r["learning_rate"], r["damping"], r["beta_2"],
                r.get("global_clipnorm"))

    cands = sorted({cand(r) for r in runs if r["optimizer"] != "adam"},
                   key=lambda c: (c[3] or 0, c[2], c[1], c[0]))
    table = {}
    for c in cands:
        per_task = {}
        for tname in task_names:
            tr = [r for r in runs if r["task"] == tname]
            adam = [r for r in tr if r["optimizer"] == "adam"]
            gr = [r for r in tr if r["optimizer"] != "adam" and cand(r) == c]
            if not gr:
                continue
            a_tr = _mean(r["train_loss"] for r in adam)
            a_bv = _mean(r["best_val_loss"] for r in adam)
            g_tr = _mean(r["train_loss"] for r in gr)
            g_bv = _mean(r["best_val_loss"] for r in gr)
            g_fv = _mean(r["val_loss"] for r in gr)
            per_task[tname] = {"train": g_tr, "best_val": g_bv,
                               "final_val": g_fv,
                               "train_ratio": g_tr / a_tr,
                               "best_val_ratio": g_bv / a_bv,
                               "adam_train": a_tr, "adam_best_val": a_bv,
                               "adam_final_val": _mean(
                                   r["val_loss"] for r in adam)}
        table[c] = per_task
    return table


def sweep_markdown(runs, meta, task_names):
    m = meta["machine"]
    table = sweep_summary(runs, task_names)
    gd = meta.get("ginger_defaults", {})
    others = ", ".join(f"{k} = {gd[k]!r}" for k in
                       ("beta_1", "graft", "relative_damping") if k in gd)
    lines = [f"# Ginger(tau=8) defaults sweep ({meta['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; "
             f"Keras {m['versions']['keras']} on {m['backend']}; total "
             f"{meta['wall_seconds'] / 60:.1f} min. Seeds {meta['seeds']}, "
             "each task's full step budget (as in convergence.md), "
             f"{others} (package defaults). Each cell: Ginger's final "
             "training loss / best validation loss, mean over the seeds; ✓ "
             "when both are at most `Adam()`'s (first line); 'div.' when a "
             "seed diverged.", ""]
    head = ("| lr | damping | beta_2 | global_clipnorm | lr/damping | "
            + " | ".join(task_names) + " | all ✓ |")
    lines += [head, "|---" * (5 + len(task_names) + 1) + "|"]
    any_c = next(iter(table.values()), {})
    adam_cells = []
    for t in task_names:
        a = any_c.get(t)
        adam_cells.append(f"{a['adam_train']:.3g} / {a['adam_best_val']:.3g}"
                          if a else "")
    lines.append("| `Adam()` | | | | | " + " | ".join(adam_cells) + " | |")
    for (lr, d, b2, clip), per_task in table.items():
        cells, ok_all = [], True
        for t in task_names:
            v = per_task.get(t)
            if v is None:
                cells.append("")
                ok_all = False
                continue
            if not math.isfinite(v["train"]) or not math.isfinite(
                    v["best_val"]):
                cells.append("div.")
                ok_all = False
                continue
            ok = v["train_ratio"] <= 1.0 and v["best_val_ratio"] <= 1.0
            ok_all &= ok
            cells.append(f"{v['train']:.3g} / {v['best_val']:.3g}"
                         + (" ✓" if ok else ""))
        lines.append(f"| {lr:g} | {d:g} | {b2:g} | {clip or '–'} | "
                     f"{lr / d:.2g} | "
                     + " | ".join(cells) + f" | {'**yes**' if ok_all else ''} |")
    lines.append("")
    return "\n".join(lines)

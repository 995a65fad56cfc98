"""Tables and the plot of an accuracy run, from its raw rows (``scripts/eval_accuracy.py``)."""

import math
from collections import defaultdict
from pathlib import Path

from .stats import bootstrap, paired_difference


def _cell(values) -> str:
    if not values:
        return "-"
    ci = bootstrap(values)
    return f"{ci.mean:.3f} [{ci.lo:.2f}, {ci.hi:.2f}] n={ci.n}"


def mass_table(rows: list[dict]) -> list[str]:
    """Mean kept share per (model, setting, phase, method@budget) x context, averaged over
    layers; intervals resample prompts x positions (blocks or decode steps)."""
    mass = [r for r in rows if r["kind"] == "mass"]
    if not mass:
        return []
    contexts = sorted({r["context"] for r in mass})
    cells = defaultdict(list)
    for r in mass:
        key = (r["model"], r["setting"], r["phase"], r["method"])
        cells[key, r["context"]].extend(r["shares"])
    keys = sorted({k for k, _ in cells}, key=lambda k: (k[0], k[1], k[2], _budget(k[3]), k[3]))
    out = ["**Attention mass kept** (share of dense softmax mass in the plan, mean over layers, "
           "query blocks or decode steps and prompts; bootstrap 95% interval, n = blocks x layers)",
           "", "| model | setting | phase | method | " + " | ".join(map(str, contexts)) + " |",
           "|---" * (4 + len(contexts)) + "|"]  # fmt: skip
    for k in keys:
        out.append(
            f"| {' | '.join(k)} | " + " | ".join(_cell(cells[k, c]) for c in contexts) + " |"
        )
    return out + [""]


def _budget(label: str) -> int:
    return int(label.rsplit("@", 1)[1]) if "@" in label else 0


def task_table(rows: list[dict]) -> list[str]:
    """Mean score per (model, setting, method) x (task, context), with intervals; and the
    paired difference to dense."""
    tasks = [r for r in rows if r["kind"] == "task"]
    if not tasks:
        return []
    cols = sorted({(r["task"], r["context"]) for r in tasks})
    by = defaultdict(dict)
    for r in tasks:
        by[r["model"], r["setting"], r["method"]][r["task"], r["context"], r["index"]] = r["score"]
    out = ["**Tasks** (share answered right; bootstrap 95% interval; same samples for every "
           "method; `setting` - = dense)", "",
           "| model | setting | method | " + " | ".join(f"{t} {c}" for t, c in cols) + " | all | vs dense |",
           "|---" * (5 + len(cols)) + "|"]  # fmt: skip
    for key in sorted(by, key=lambda k: (k[0], k[1] != "-", k[1], _budget(k[2]), k[2])):
        scores = by[key]
        cells = [_cell([v for (t, c, _), v in scores.items() if (t, c) == col]) for col in cols]
        dense = by.get((key[0], "-", "dense"), {})
        shared = sorted(set(scores) & set(dense))
        diff = "-"
        if key[2] != "dense" and shared:
            d = paired_difference([scores[i] for i in shared], [dense[i] for i in shared])
            diff = f"{d.mean:+.3f} [{d.lo:+.2f}, {d.hi:+.2f}]"
        out.append(f"| {' | '.join(key)} | " + " | ".join(cells)
                   + f" | {_cell(list(scores.values()))} | {diff} |")  # fmt: skip
    return out + [""]


def ppl_table(rows: list[dict]) -> list[str]:
    """Perplexity per method and position quarter, relative to dense with paired intervals
    over 128-position segments."""
    ppl = [r for r in rows if r["kind"] == "ppl"]
    if not ppl:
        return []
    out = ["**Perplexity by position** on held-out essays (relative to dense; paired bootstrap "
           "95% interval over segments of 128 positions)", "",
           "| model | method | context | ppl | Q1 | Q2 | Q3 | Q4 | all |", "|---" * 9 + "|"]  # fmt: skip
    for r in ppl:
        dense = next((d for d in ppl if d["model"] == r["model"] and d["method"] == "dense"), None)
        segs, n = r["segment_nll"], len(r["segment_nll"][0])
        quarters = [[(w, j) for w in range(len(segs)) for j in range(n) if j * 4 // n == q]
                    for q in range(4)] + [[(w, j) for w in range(len(segs)) for j in range(n)]]  # fmt: skip
        cells = []
        for q in quarters:
            if dense is None or r["method"] == "dense":
                mean = sum(segs[w][j] for w, j in q) / len(q)
                cells.append(f"{math.exp(mean):.2f}")
                continue
            d = paired_difference([segs[w][j] for w, j in q],
                                  [dense["segment_nll"][w][j] for w, j in q])  # fmt: skip
            rel = lambda x: 100 * (math.exp(x) - 1)
            cells.append(f"{rel(d.mean):+.1f}% [{rel(d.lo):+.1f}, {rel(d.hi):+.1f}]")
        out.append(f"| {r['model']} | {r['method']} | {r['context']} | {r['ppl']:.3f} | "
                   + " | ".join(cells) + " |")  # fmt: skip
    return out + [""]


def plot(rows: list[dict], path: Path) -> Path | None:
    """Mass kept vs context, one panel per (model, phase) of the sparse-decode setting."""
    mass = [r for r in rows if r["kind"] == "mass" and r["setting"] == "sparse"]
    if not mass:
        mass = [r for r in rows if r["kind"] == "mass"]
    if not mass:
        return None
    from matplotlib.figure import Figure

    panels = sorted({(r["model"], r["phase"]) for r in mass})
    names = sorted({r["method"].rsplit("@", 1)[0] for r in mass})
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    budgets = sorted({_budget(r["method"]) for r in mass})
    styles = {b: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(budgets)}
    fig = Figure(figsize=(4.2 * len(panels) + 2.2, 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (model, phase) in zip(axes, panels):
        sel = [r for r in mass if (r["model"], r["phase"]) == (model, phase)]
        for method in sorted({r["method"] for r in sel}, key=lambda m: (_budget(m), m)):
            ctx = sorted({r["context"] for r in sel if r["method"] == method})
            ys = [bootstrap([s for r in sel if r["method"] == method and r["context"] == c
                             for s in r["shares"]]) for c in ctx]  # fmt: skip
            name = method.rsplit("@", 1)[0]
            ax.errorbar(ctx, [y.mean for y in ys], yerr=[[y.mean - y.lo for y in ys],
                        [y.hi - y.mean for y in ys]], marker="o", capsize=3,
                        color=colors[name], linestyle=styles[_budget(method)])  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("share of attention mass kept")
        ax.set_title(f"{model}: {phase}")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[n], marker="o", label=n) for n in names]
    handles += [
        Line2D([], [], color="k", linestyle=styles[b], label=f"budget {b}") for b in budgets
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def plot_tasks(rows: list[dict], path: Path) -> Path | None:
    """Share answered vs context with bootstrap intervals, one panel per (model, task), one
    line per (method, setting)."""
    tasks = [r for r in rows if r["kind"] == "task"]
    if not tasks:
        return None
    from matplotlib.figure import Figure

    panels = sorted({(r["model"], r["task"]) for r in tasks})
    lines = sorted({(r["method"], r["setting"]) for r in tasks}, key=lambda k: (k[0] != "dense", k))
    fig = Figure(figsize=(3.6 * len(panels) + 2.6, 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (model, task) in zip(axes, panels):
        sel = [r for r in tasks if (r["model"], r["task"]) == (model, task)]
        for i, line in enumerate(lines):
            ctx = sorted({r["context"] for r in sel if (r["method"], r["setting"]) == line})
            ys = [bootstrap([r["score"] for r in sel if (r["method"], r["setting"]) == line
                             and r["context"] == c]) for c in ctx]  # fmt: skip
            if not ys:
                continue
            ax.errorbar([c * 1.03**i for c in ctx], [y.mean for y in ys],
                        yerr=[[y.mean - y.lo for y in ys], [y.hi - y.mean for y in ys]],
                        marker="o", capsize=3, color=f"C{i % 10}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("share answered")
        ax.set_title(f"{model}: {task}")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=f"C{i % 10}", marker="o", label=m if s == "-" else f"{m} ({s})")
        for i, (m, s) in enumerate(lines)
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def render(out: Path, rows: list[dict]) -> str:
    """Write OUT/results.md, OUT/mass.png and OUT/tasks.png (each plot where its rows are);
    return the markdown."""
    meta = next((r for r in rows if r["kind"] == "meta"), {})
    env = meta.get("environment", {})
    models = {r["model"]: r.get("dtype") for r in rows if r["kind"] == "model"}
    lines = [f"Models: {', '.join(f'{m} ({d})' for m, d in models.items())}; device "
             f"{env.get('device_name', '?')} ({env.get('device', '?')}), mlx {env.get('mlx', '?')}.",
             ""]  # fmt: skip
    lines += mass_table(rows) + task_table(rows) + ppl_table(rows)
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    plot(rows, out / "mass.png")
    plot_tasks(rows, out / "tasks.png")
    return text

"""The three faces of an inspection: the terminal table, the JSON file and the HTML report.

The HTML report is one self-contained file: its figures are drawn with matplotlib (an optional
dependency, the ``inspect`` extra) and embedded as base64 PNG, with no script and nothing fetched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.core.write import write_atomic

EXTRA = "pip install 'mergesmith[inspect]'"


# --- writing a single file ---------------------------------------------------------------------------


def check_output_file(path: str, overwrite: bool, flag: str) -> Path:
    """Refuse, before any work, an output file that exists (unless ``overwrite``), is a folder, or whose
    folder does not exist."""
    p = Path(path)
    if p.is_dir():
        raise MergeError(f"{flag} {path}: is a folder; give a file name")
    if not p.parent.is_dir():
        raise MergeError(f"{flag} {path}: folder {p.parent} does not exist; create it first")
    if os.path.lexists(p) and not overwrite:
        raise MergeError(f"{flag} {path}: the file exists; pass --overwrite to replace it")
    return p


def write_output_file(path: Path, text: str, overwrite: bool) -> None:
    """Write ``text`` whole or not at all: into a hidden file beside ``path``, then linked into place
    (which fails if a file appeared there meanwhile) or, with ``overwrite``, renamed over it."""
    try:
        write_atomic(path, text.encode("utf-8"), replace=overwrite)
    except FileExistsError:
        raise MergeError(f"{path}: the file exists; pass --overwrite to replace it") from None
    except OSError as exc:
        raise MergeError(f"{path}: cannot write it ({exc.strerror or exc.__class__.__name__})") from None


def to_json_text(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


# --- terminal ----------------------------------------------------------------------------------------


def short(ref: str) -> str:
    return Path(ref.rstrip("/")).name or ref


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def compat_lines(report_or_header: dict[str, Any], base: str, models: Sequence[str]) -> list[str]:
    """The compatibility section: its verdict and one line per problem."""
    c = report_or_header
    lines = [f"compatibility: {c['verdict']} (base {base!r}; models {', '.join(repr(m) for m in models)})"]
    lines += [f"  {p['severity']}: {p['message']}" for p in c["problems"]]
    return lines


def _pairs(m: int) -> list[tuple[int, int]]:
    return [(i, k) for i in range(m) for k in range(i + 1, m)]


def table(report: dict[str, Any], top: int) -> str:
    """Layer/module groups, most conflicted first, as aligned columns."""
    m = len(report["models"])
    names = [short(r) for r in report["models"]]
    by_key = {(g["layer"], g["module"]): g for g in report["groups"]}
    ranked = [by_key[(w["layer"], w["module"])] for w in report["worst"]]
    unchanged = [g for g in ranked if not any(g["relative_norm"])]  # no model moved these: nothing to show
    rows = [g for g in ranked if any(g["relative_norm"])][:top]
    method = report["method"]
    head = ["layer", "module", "rel|tau| " + "/".join(names)]
    if m >= 2:
        head += ["cos min", "conflict max"]
    extra = _method_column(method)
    if extra:
        head.append(extra[0])
    merged = report["merged"] is not None
    if merged:
        head += ["dist base", "survival " + "/".join(names)]
    body = []
    for g in rows:
        cells = [g["layer"], g["module"], " ".join(_f(x) for x in g["relative_norm"])]
        if m >= 2:
            cos = [g["cosine"][i][k] for i, k in _pairs(m) if g["cosine"][i][k] is not None]
            conf = [g["sign_conflict"][i][k] for i, k in _pairs(m) if g["sign_conflict"][i][k] is not None]
            cells += [_f(min(cos) if cos else None, 2), _f(max(conf) if conf else None, 2)]
        if extra:
            cells.append(extra[1](g["method"]))
        if merged:
            mg = g["merged"] or {}
            cells += [
                _f(mg.get("distance_to_base")),
                " ".join(_f(x, 2) for x in mg.get("survival", [None] * m)),
            ]
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    out.insert(1, "  ".join("-" * w for w in widths))
    more = len(ranked) - len(rows) - len(unchanged)
    if more > 0:
        out.append(f"({more} more layer/module groups in --json and --report)")
    if unchanged:
        shown = ", ".join(f"{g['layer']} {g['module']}" for g in unchanged[:4])
        out.append(
            f"({len(unchanged)} groups no model changes: {shown}{' ...' if len(unchanged) > 4 else ''})"
        )
    return "\n".join(out)


def _method_column(method: str | None):
    def values(key: str, digits: int = 2):
        return lambda mf: " ".join(_f(x, digits) for x in mf[key]) if mf and mf.get(key) else "-"

    if method == "ties":
        return "ties lost", values("ties_sign_lost_mass")
    if method in ("dare_linear", "dare_ties"):
        return "dare kept", values("dare_expected_kept_mass")
    if method == "slerp":
        return "slerp deg", lambda mf: _f(mf.get("slerp_angle_degrees") if mf else None, 1)
    return None


def terminal(report: dict[str, Any], top: int) -> str:
    c = report["compatibility"]
    lines = []
    shared = ", ".join(
        f"{short(s['model'])} {_f(s['relative_distance'])} ({s['verdict']})" for s in c["shared_base"]
    )
    lines.append(f"shared base (median ||model - base|| / ||base|| of the changed matrices): {shared}")
    new = [p for p in c["problems"] if p["check"] == "shared_base"]
    lines += [f"  {p['severity']}: {p['message']}" for p in new]
    if c["tensors_not_inspected"]:
        lines.append(
            f"  {len(c['tensors_not_inspected'])} tensor(s) not inspected (missing or of another shape)"
        )
    if report["groups"]:
        lines += ["", table(report, top)]
    lines += ["", f"verdict: {report['verdict']}"]
    return "\n".join(lines)


# --- HTML --------------------------------------------------------------------------------------------


def check_matplotlib() -> str | None:
    """None when matplotlib can be imported, else the one line that says how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"--report needs matplotlib, which is not installed: {EXTRA}"
    return None


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(report: dict[str, Any], value) -> tuple[list[str], list[str], list[list[float]]]:
    """Layers x modules matrix of ``value(group)`` (NaN where a group is absent or undefined)."""
    layers = list(dict.fromkeys(g["layer"] for g in report["groups"]))
    modules = [
        m
        for m in ("embedding", "attention", "mlp", "norm", "other")
        if any(g["module"] == m for g in report["groups"])
    ]
    cell = {(g["layer"], g["module"]): g for g in report["groups"]}
    grid = []
    for lay in layers:
        row = []
        for mod in modules:
            g = cell.get((lay, mod))
            v = value(g) if g is not None else None
            row.append(math.nan if v is None else float(v))
        grid.append(row)
    return layers, modules, grid


def _heatmaps(
    report: dict[str, Any], title: str, panels: list[tuple[str, Any]], cmap: str, vmin=None, vmax=None
) -> str:
    from matplotlib.figure import Figure

    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    layers, modules, _ = _grid(report, lambda g: None)
    # one colour scale for every panel, so that panels compare
    seen = [v for _, value in panels for row in _grid(report, value)[2] for v in row if not math.isnan(v)]
    if seen:
        vmin = min(seen) if vmin is None else vmin
        vmax = max(seen) if vmax is None else vmax
    fig = Figure(figsize=(3.2 * cols, 0.28 * len(layers) * rows + 1.4 * rows))
    fig.suptitle(title)
    for idx, (label, value) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, idx + 1)
        _, _, grid = _grid(report, value)
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(modules)), modules, fontsize=7, rotation=30)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        if len(layers) <= 40:
            _label_cells(ax, grid, 6)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _png(fig)


def _label_cells(ax: Any, grid: list[list[float]], fontsize: int) -> None:
    """Each cell of a heatmap labelled with its value (two decimals), but NaN cells."""
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if not math.isnan(v):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=fontsize)


def _matrix(report: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    names = [short(r) for r in report["models"]]
    t = report["totals"]
    fig = Figure(figsize=(7.5, 3.4))
    for idx, (key, title, cmap, lo, hi) in enumerate(
        (
            ("cosine", "cosine of task vectors", "coolwarm", -1, 1),
            ("sign_conflict", "sign conflict", "magma_r", 0, 1),
        )
    ):
        ax = fig.add_subplot(1, 2, idx + 1)
        grid = [[math.nan if v is None else v for v in row] for row in t[key]]
        im = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=30)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        _label_cells(ax, grid, 8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _png(fig)


def _pca(report: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    names = [short(r) for r in report["models"]]
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 2, 1)
    mp = report["pca"]["models"]
    if mp:
        labels = ["base", *names]
        for i, (p, lab) in enumerate(zip(mp["points"], labels)):
            ax.scatter([p["x"]], [p["y"]], color="black" if i == 0 else f"C{i - 1}", s=60)
            ax.annotate(lab, (p["x"], p["y"]), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ex = mp["explained"]
        ax.set_xlabel(f"PC1 ({100 * ex[0]:.0f} %)")
        ax.set_ylabel(f"PC2 ({100 * ex[1]:.0f} %)")
    ax.set_title("whole task vectors (base at the origin)", fontsize=10)
    ax = fig.add_subplot(1, 2, 2)
    rp = report["pca"]["rows"]
    if rp:
        for i, name in enumerate(names):
            pts = [p for p in rp["points"] if p["model"] == i]
            ax.scatter(
                [p["x"] for p in pts], [p["y"] for p in pts], s=6, alpha=0.6, color=f"C{i}", label=name
            )
        ax.legend(fontsize=8, markerscale=2)
        ex = rp["explained"]
        ax.set_xlabel(f"PC1 ({100 * ex[0]:.0f} %)")
        ax.set_ylabel(f"PC2 ({100 * ex[1]:.0f} %)" if len(ex) > 1 else "PC2")
    ax.set_title("sampled task-vector rows", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def figures_html(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of every figure of the report."""
    m = len(report["models"])
    names = [short(r) for r in report["models"]]
    out = []
    if not report["groups"]:
        return out
    rel = [(names[i], (lambda g, i=i: g["relative_norm"][i])) for i in range(m)]
    out.append(
        (
            "Relative norm ||tau|| / ||base|| per layer and module",
            _heatmaps(report, "relative norm", rel, "viridis", 0),
        )
    )
    if m >= 2:
        pairs = _pairs(m)
        cos = [(f"{names[i]} / {names[k]}", (lambda g, i=i, k=k: g["cosine"][i][k])) for i, k in pairs]
        out.append(
            (
                "Cosine similarity of task vectors per layer and module",
                _heatmaps(report, "cosine", cos, "coolwarm", -1, 1),
            )
        )
        conf = [
            (f"{names[i]} / {names[k]}", (lambda g, i=i, k=k: g["sign_conflict"][i][k])) for i, k in pairs
        ]
        out.append(
            (
                "Sign conflict (share of entries where both are nonzero)",
                _heatmaps(report, "sign conflict", conf, "magma_r", 0, 1),
            )
        )
        out.append(("Whole-model similarity and sign conflict", _matrix(report)))
    if report["method"] == "ties":
        lost = [
            (names[i], (lambda g, i=i: (g["method"] or {}).get("ties_sign_lost_mass", [None] * m)[i]))
            for i in range(m)
        ]
        out.append(
            (
                "TIES: share of each task vector's mass lost to the sign election",
                _heatmaps(report, "ties lost", lost, "magma_r", 0),
            )
        )
    if report["merged"] is not None:
        surv = [
            (names[i], (lambda g, i=i: (g["merged"] or {}).get("survival", [None] * m)[i])) for i in range(m)
        ]
        out.append(
            (
                "After the merge: survival of each task vector",
                _heatmaps(report, "survival", surv, "viridis", 0),
            )
        )
    out.append(("PCA of the task vectors", _pca(report)))
    return out


def to_html(report: dict[str, Any], top: int) -> str:
    """The report as one HTML page: verdict, compatibility, table, figures, config."""
    e = html.escape
    c = report["compatibility"]
    problems = "".join(
        f"<li class='{e(p['severity'])}'>{e(p['severity'])}: {e(p['message'])}</li>" for p in c["problems"]
    )
    shared = "".join(
        f"<tr><td>{e(short(s['model']))}</td><td>{_f(s['relative_distance'])}</td><td>{_f(s['relative_norm'])}</td><td>{e(s['verdict'])}</td></tr>"
        for s in c["shared_base"]
    )
    figs = "".join(
        f"<figure><img alt='{e(cap)}' src='data:image/png;base64,{png}'><figcaption>{e(cap)}</figcaption></figure>"
        for cap, png in figures_html(report)
    )
    config = f"<h2>Config</h2><pre>{e(report['config'])}</pre>" if report["config"] else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mergesmith inspect</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; }}
li.error {{ color: #a00; }} li.warning {{ color: #a60; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
pre {{ background: #f4f4f4; padding: 0.5em; overflow-x: auto; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>mergesmith inspect</h1>
<p><b>Verdict:</b> {e(report["verdict"])}</p>
<p>Base {e(report["base"])}; models {e(", ".join(report["models"]))}; method {e(str(report["method"]))}{"; merged " + e(report["merged"]) if report["merged"] else ""}</p>
<h2>Compatibility: {e(c["verdict"])}</h2>
<ul>{problems or "<li>no problem found</li>"}</ul>
<table><tr><th>model</th><th>median ||model - base|| / ||base|| (matrices)</th><th>over all weights</th><th>verdict</th></tr>{shared}</table>
<h2>Layers, most conflicted first</h2>
<pre>{e(table(report, top)) if report["groups"] else "no tensor inspected"}</pre>
<h2>Figures</h2>
{figs}
{config}
</body></html>
"""

"""REPORT.md and PNG plots for benchmarks/reproduce_small.py, from the runs' metrics.jsonl.

Everything here reads finished (or partly finished) run directories, so the report can be
rewritten at any time: `python benchmarks/reproduce_small.py --report-only`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from megasink.heatmap import COLORBAR_LABEL, DORMANT, LEGEND, dormant_count, dormant_mask, draw_importance

VARIANT_ROWS = ("gated", "sink", "vanilla", "vanilla-bos")


# --------------------------------------------------------------------------- reading


def read_run(run_dir: Path) -> dict | None:
    """Per-run summary from metrics.jsonl (the last record per step wins: resumed runs)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    train, val = {}, {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (val if "val_loss" in rec else train)[rec["step"]] = rec
    if not train:
        return None
    steps = sorted(train)
    tail_steps = [s for s in steps if s >= 0.9 * steps[-1]]
    tail = [train[s]["loss"] for s in tail_steps]
    cv = [sum(train[s]["cv"][layer] for s in tail_steps) / len(tail_steps) for layer in range(len(train[steps[-1]]["cv"]))]
    imp_steps = [s for s in steps if "importance" in train[s]]
    imp = train[imp_steps[-1]]["importance"] if imp_steps else None
    vsteps = sorted(val)
    out = {"step": steps[-1], "done": (run_dir / "done.json").exists(),
           "train_loss": sum(tail) / len(tail), "cv": cv, "cv_mean": sum(cv) / len(cv), "cv_max": max(cv), "cv_peak": max(max(train[s]["cv"]) for s in steps),
           "cv_first": max(train[steps[0]]["cv"]), "importance": imp,
           "dormant": dormant_count(imp) if imp else float("nan"),
           "cv_curve": ([s for s in steps], [train[s]["cv"] for s in steps]),
           "val_curve": (vsteps, [val[s]["val_loss"] for s in vsteps]),
           "val_loss": val[vsteps[-1]]["val_loss"] if vsteps else float("nan"),
           "val_bpb": val[vsteps[-1]].get("val_bpb", float("nan")) if vsteps else float("nan")}
    return out


def mean_spread(xs: list[float]) -> tuple[float, float]:
    """Mean and half the range (the spread over seeds; 0 for one seed)."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return sum(xs) / len(xs), (max(xs) - min(xs)) / 2


def fmt(xs: list[float], digits: int = 3) -> str:
    m, s = mean_spread(xs)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if len(xs) > 1 else "")


def collect(out: Path, runs) -> tuple[dict, dict]:
    """{run name: summary} and {group: [summaries over seeds]} for the runs that have metrics."""
    by_run, groups = {}, {}
    for run in runs:
        s = read_run(out / "runs" / run.name)
        if s is not None:
            s["run"] = run
            by_run[run.name] = s
            if s["done"]:  # the claims and the per-setting table use finished runs only
                groups.setdefault(run.group, []).append(s)
    return by_run, groups


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_cells(runs, by_run):
    """(row label, column label, summary or None) for the seed-1 from-scratch runs."""
    rows, cols, cells = [], [], {}
    for run in runs:
        if run.finetune or run.seed != 1:
            continue
        variant = run.group[:-len(lam_tag(run.coef)) - 1]
        col = ("λ=" + (f"{run.coef:g}" if run.coef else "0")) + (" N_h·CV²" if "-nh" in variant else "")
        row = variant.replace("-nh", "")
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[(row, col)] = by_run.get(run.name)
    rows.sort(key=lambda r: VARIANT_ROWS.index(r) if r in VARIANT_ROWS else 99)
    order = {c: ("N_h" in c, float(c.split("=")[1].split()[0])) for c in cols}
    cols.sort(key=order.get)
    return rows, cols, cells


def plot_cv_curves(path: Path, runs, by_run) -> None:
    plt = _plt()
    rows, cols, cells = _grid_cells(runs, by_run)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.0 * len(rows) + 0.6),
                             squeeze=False, sharex=True, sharey="row")
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax, s = axes[i][j], cells.get((row, col))
            ax.set_title(f"{row}, {col}", fontsize=8)
            if s is None:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            steps, cvs = s["cv_curve"]
            for layer in range(len(cvs[0])):
                ax.plot(steps, [c[layer] for c in cvs], label=f"L{layer}", lw=1.2)
            ax.tick_params(labelsize=7)
        axes[i][0].set_ylabel("per-layer CV", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle("per-layer CV of head importance over training (seed 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_heatmaps(path: Path, runs, by_run) -> None:
    plt = _plt()
    rows, cols, cells = _grid_cells(runs, by_run)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols) + 1, 2.0 * len(rows) + 0.8), squeeze=False,
                             constrained_layout=True)
    im = None
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax, s = axes[i][j], cells.get((row, col))
            if s is None or s["importance"] is None:
                ax.set_axis_off()
                ax.set_title(f"{row}, {col}: not run", fontsize=8)
                continue
            im = draw_importance(ax, s["importance"], f"{row}, {col}: {s['dormant']} dormant")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6).set_label(COLORBAR_LABEL, fontsize=9)
    fig.suptitle(f"end-of-run head importance (mean gate), seed 1\n({LEGEND})", fontsize=10)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_val_curves(path: Path, runs, by_run) -> None:
    plt = _plt()
    rows, cols, cells = _grid_cells(runs, by_run)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.0), squeeze=False, sharey=True)
    for i, row in enumerate(rows):
        ax = axes[0][i]
        for col in cols:
            s = cells.get((row, col))
            if s is not None and s["val_curve"][0]:
                ax.plot(*s["val_curve"], marker="o", ms=3, label=col)
        ax.set_title(row, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("validation loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_vs_lambda(path: Path, groups: dict, lambdas) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for variant in VARIANT_ROWS:
        xs, vm, vs, cm, cs = [], [], [], [], []
        for k, coef in enumerate(lambdas):
            seeds = groups.get(f"{variant}-{lam_tag(coef)}")
            if seeds:
                xs.append(k)
                m, s = mean_spread([x["val_loss"] for x in seeds])
                vm.append(m), vs.append(s)
                m, s = mean_spread([x["cv_max"] for x in seeds])
                cm.append(m), cs.append(s)
        if xs:
            axes[0].errorbar(xs, vm, yerr=vs, marker="o", capsize=3, label=variant)
            axes[1].errorbar(xs, cm, yerr=cs, marker="o", capsize=3, label=variant)
    for ax, lab in zip(axes, ("final validation loss", "final max per-layer CV")):
        ax.set_xticks(range(len(lambdas)))
        ax.set_xticklabels([f"{c:g}" for c in lambdas])
        ax.set_xlabel("λ (aux loss coefficient)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    fig.suptitle("error bars: spread over seeds (half range) where there are two", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_finetune(path: Path, base: dict, fts: list[tuple[str, dict]]) -> None:
    plt = _plt()
    panels = [("starting model", base)] + fts
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels) + 1, 2.8), squeeze=False,
                             constrained_layout=True)
    im = None
    for ax, (name, s) in zip(axes[0], panels):
        im = draw_importance(ax, s["importance"], f"{name}: {s['dormant']} dormant")
    fig.colorbar(im, ax=axes, shrink=0.8).set_label(COLORBAR_LABEL, fontsize=8)
    fig.suptitle(f"fine-tuning from the collapsed baseline ({LEGEND})", fontsize=8)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def lam_tag(coef: float) -> str:
    """Run-name tag of a lambda: l0, l1e-4, ..., l1."""
    return "l0" if coef == 0 else f"l{coef:.0e}".replace("e-0", "e-").replace("e+00", "")


# --------------------------------------------------------------------------- tables


def scratch_table(runs, groups: dict) -> list[str]:
    lines = ["| setting | seeds | steps | train loss | val loss | val bits/byte | mean CV | max CV | peak max CV "
             "(training) | dormant heads |", "|---|---|---|---|---|---|---|---|---|---|"]
    seen = []
    for run in runs:
        if run.finetune or run.group in seen or run.group not in groups:
            continue
        seen.append(run.group)
        g = groups[run.group]
        n_heads = sum(len(r) for r in g[0]["importance"]) if g[0]["importance"] else 0
        steps = "/".join(sorted({str(s["step"]) for s in g}))
        lines.append(f"| {run.group} | {len(g)} | {steps} | {fmt([s['train_loss'] for s in g])} "
                     f"| {fmt([s['val_loss'] for s in g])} | {fmt([s['val_bpb'] for s in g])} "
                     f"| {fmt([s['cv_mean'] for s in g])} | {fmt([s['cv_max'] for s in g])} "
                     f"| {fmt([s['cv_peak'] for s in g])} | {fmt([float(s['dormant']) for s in g], 1)} of {n_heads} |")
    return lines


def formerly_dormant(imp) -> list[list[bool]]:
    """The starting model's dormant heads; where a layer has none, its least important head."""
    mask = dormant_mask(imp)
    for row, m in zip(imp, mask):
        if not any(m):
            m[row.index(min(row))] = True
    return mask


def _masked_mean(imp, mask, want=True) -> float:
    xs = [x for row, mr in zip(imp, mask) for x, b in zip(row, mr) if b == want]
    return sum(xs) / len(xs) if xs else float("nan")


def top_m(imp, m: int) -> list[list[bool]]:
    """The m most important heads of each layer (the heads a shared/routed split would share)."""
    masks = []
    for row in imp:
        top = sorted(range(len(row)), key=lambda h: -row[h])[:m]
        masks.append([h in top for h in range(len(row))])
    return masks


def finetune_rows(base: dict, fts: list[tuple[str, dict]], m: int) -> tuple[list[str], dict]:
    imp0 = base["importance"]
    masks = {"dormant": formerly_dormant(imp0), "top": top_m(imp0, m)}
    facts = {"m": m}
    lines = [f"| run | steps | formerly dormant heads' mean gate | top-{m} heads' mean gate | mean CV | max CV "
             "| dormant heads | val loss |", "|---|---|---|---|---|---|---|---|"]
    for name, s in [("starting model", base)] + fts:
        d, t = _masked_mean(s["importance"], masks["dormant"]), _masked_mean(s["importance"], masks["top"])
        facts[name] = {"dormant_gate": d, "top_gate": t, "val_loss": s["val_loss"], "dormant": s["dormant"]}
        lines.append(f"| {name} | {s['step']} | {d:.3f} | {t:.3f} | {s['cv_mean']:.3f} | {s['cv_max']:.3f} "
                     f"| {s['dormant']} | {s['val_loss']:.3f} |")
    return lines, facts


# --------------------------------------------------------------------------- reading against the claims


def _g(groups, variant, coef):
    return groups.get(f"{variant}-{lam_tag(coef)}", [])


def _m(g, key) -> float:
    return mean_spread([s[key] for s in g])[0]


def seed_noise(groups) -> float:
    """Largest half-range of the final validation loss over the settings with two or more seeds."""
    spreads = [mean_spread([s["val_loss"] for s in g])[1] for g in groups.values() if len(g) > 1]
    return max(spreads) if spreads else float("nan")


def _collapsed(g) -> bool:
    return bool(g) and (_m(g, "cv_peak") >= 0.2 or _m(g, "dormant") >= 1)


def regime_lines(groups) -> list[str]:
    """Which baselines (lambda = 0) of this sweep collapsed: CV rising well above its start, dormant heads."""
    out = []
    for v in VARIANT_ROWS:
        base = _g(groups, v, 0.0)
        if base:
            word = "**collapsed**" if _collapsed(base) else "did **not** collapse"
            out.append(f"- {v}, λ=0 ({len(base)} seed{'s' if len(base) > 1 else ''}): {word}: max per-layer CV "
                       f"{_m(base, 'cv_first'):.3f} at the first log → peak {_m(base, 'cv_peak'):.3f} → final "
                       f"{_m(base, 'cv_max'):.3f}; {_m(base, 'dormant'):.1f} dormant heads at the end.")
    return out + ["  (collapsed: a peak max per-layer CV of at least 0.2 or a dormant head at the end.)"]


def _by_lambda(groups, v, key) -> str:
    coefs = sorted({s["run"].coef for g in groups.values() for s in g if s["run"].group.startswith(v + "-l")})
    return ", ".join(f"{c:g}: {_m(_g(groups, v, c), key):.3f}" for c in coefs)


def claim_cv(groups, best) -> list[str]:
    out = []
    for v in VARIANT_ROWS:
        base, cure = _g(groups, v, 0.0), _g(groups, v, best)
        if not base or not cure:
            continue
        pairs = [(b, c) for b in base for c in cure if b["run"].seed == c["run"].seed]
        n_lower = sum(c["cv_max"] < b["cv_max"] for b, c in pairs)
        ratio = _m(base, "cv_max") / max(_m(cure, "cv_max"), 1e-9)
        if _collapsed(base):
            state = f"baseline collapsed (peak max CV {_m(base, 'cv_peak'):.2f}, {_m(base, 'dormant'):.1f} dormant heads)"
        else:
            state = f"baseline did not collapse (peak max CV {_m(base, 'cv_peak'):.3f})"
        lower = pairs and n_lower == len(pairs)
        verdict = "**holds**" if lower and ratio >= 2 else ("holds weakly" if lower else "**does not hold**")
        if not _collapsed(base):
            verdict = "not tested: nothing to cure (no collapse), and the CV² term is too small to move anything"
        out.append(f"  - {v}: {state}; final max CV {_m(base, 'cv_max'):.3f} → {_m(cure, 'cv_max'):.3f} at λ={best:g} "
                   f"({ratio:.1f}x lower; lower in {n_lower}/{len(pairs)} seed pairs): {verdict}. "
                   f"Final max CV by λ: {_by_lambda(groups, v, 'cv_max')}.")
    return out


def note_scale_by_heads(groups, best) -> list[str]:
    plain, scaled = _g(groups, "gated", best), groups.get(f"gated-nh-{lam_tag(best)}", [])
    if not plain or not scaled:
        return []
    return [f"- **`scale_by_heads`** (each layer's CV² times its 8 heads, i.e. 8x the pull at the same λ), gated, "
            f"λ={best:g}: final max CV {_m(scaled, 'cv_max'):.3f} vs {_m(plain, 'cv_max'):.3f} unscaled, val loss "
            f"{_m(scaled, 'val_loss'):.3f} vs {_m(plain, 'val_loss'):.3f} (one seed)."]


def claim_quality(groups, best, noise) -> list[str]:
    out = []
    for v in VARIANT_ROWS:
        base, cure = _g(groups, v, 0.0), _g(groups, v, best)
        if not base or not cure:
            continue
        d = _m(cure, "val_loss") - _m(base, "val_loss")
        n = max(mean_spread([s["val_loss"] for s in base])[1], mean_spread([s["val_loss"] for s in cure])[1])
        n = n if len(base) > 1 else noise
        if math.isnan(n):
            verdict = "one seed: no noise estimate"
        elif abs(d) <= max(n, 1e-4) * 2:
            verdict = "no worse within the seed spread"
        else:
            verdict = "better by more than the seed spread" if d < 0 else "**worse** by more than the seed spread"
        out.append(f"  - {v}: val loss {_m(base, 'val_loss'):.3f} (λ=0) vs {_m(cure, 'val_loss'):.3f} (λ={best:g}), "
                   f"Δ {d:+.3f}, seed spread ±{n:.3f} ({len(base)}+{len(cure)} runs): {verdict}.")
    return out


def claim_order(groups, best, noise) -> list[str]:
    out = []
    for coef in (0.0, best):
        vals = {v: _m(_g(groups, v, coef), "val_loss") for v in ("gated", "sink", "vanilla") if _g(groups, v, coef)}
        if len(vals) < 3:
            continue
        order = sorted(vals, key=vals.get)
        gaps = [vals[b] - vals[a] for a, b in zip(order, order[1:])]
        ok = order == ["gated", "sink", "vanilla"]
        gap_words = [f"{a} vs {b} {g:.3f} ({'settled' if g > 2 * noise else 'within twice the spread: not settled'})"
                     for a, b, g in zip(order, order[1:], gaps)]
        out.append(f"  - λ={coef:g}: " + " < ".join(f"{v} {vals[v]:.3f}" for v in order) + " (val loss): "
                   + ("the claimed order" if ok else "**not** the claimed order")
                   + f"; gaps against the seed spread ±{noise:.3f}: " + "; ".join(gap_words) + ".")
    return out


def claim_excess(groups, lambdas, noise) -> list[str]:
    out = []
    for v in VARIANT_ROWS:
        top = max((c for c in lambdas if _g(groups, v, c)), default=0.0)
        rest = {c: _m(_g(groups, v, c), "val_loss") for c in lambdas if c < top and _g(groups, v, c)}
        if not _g(groups, v, top) or not rest:
            continue
        best_c = min(rest, key=rest.get)
        d = _m(_g(groups, v, top), "val_loss") - rest[best_c]
        verdict = ("**holds**" if d > 2 * noise else "holds weakly (within twice the seed spread)" if d > 0
                   else "**does not hold**") if not math.isnan(noise) else ("holds" if d > 0 else "does not hold")
        if not _collapsed(_g(groups, v, 0.0)):
            verdict = "not tested: the CV² term is too small here to help or hurt"
        out.append(f"  - {v}: val loss at λ={top:g} {_m(_g(groups, v, top), 'val_loss'):.3f} vs best smaller λ "
                   f"({best_c:g}) {rest[best_c]:.3f}: Δ {d:+.3f}: {verdict}. "
                   f"Val loss by λ: {_by_lambda(groups, v, 'val_loss')}.")
    return out


def claim_pinning(facts: dict, names: list[str]) -> list[str]:
    plain = next((n for n in names if n.endswith("plain")), None)
    routed = next((n for n in names if "all-routed" in n), None)
    shared = next((n for n in names if "shared" in n), None)
    if not (plain and routed and shared) or any(n not in facts for n in (plain, routed, shared)):
        return ["  - not run."]
    p, r, s = (facts[n] for n in (plain, routed, shared))
    lift_r, lift_s = r["dormant_gate"] - p["dormant_gate"], s["dormant_gate"] - p["dormant_gate"]
    top_r, top_s = r["top_gate"] - p["top_gate"], s["top_gate"] - p["top_gate"]
    pinned = lift_r > lift_s
    verdict = ("**holds** in the gates: with every head routed the CV² term pulls the formerly dormant heads up "
               "further than with the split" if pinned else
               "**does not hold**: the split lifts the formerly dormant heads as much or more")
    return [f"  - formerly dormant heads' mean gate: start {facts['starting model']['dormant_gate']:.3f}; plain "
            f"fine-tuning {p['dormant_gate']:.3f}, all routed {r['dormant_gate']:.3f} ({lift_r:+.3f} vs plain), "
            f"top-{facts['m']} shared {s['dormant_gate']:.3f} ({lift_s:+.3f}); the start's top-{facts['m']} heads "
            f"per layer: {top_r:+.3f} (all routed) and {top_s:+.3f} (shared) vs plain. {verdict}. "
            f"Dormant heads left: {p['dormant']} / {r['dormant']} / {s['dormant']} (plain / all routed / shared); "
            f"val loss {p['val_loss']:.3f} / {r['val_loss']:.3f} / {s['val_loss']:.3f}, so no quality difference "
            "shows at this scale. One seed and 150 steps: read the direction, not the size."]


# --------------------------------------------------------------------------- the report


def per_run_table(runs, by_run, out: Path) -> list[str]:
    lines = ["| run | seed | steps | per-layer final CV | dormant | val loss | wall min |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        s = by_run.get(run.name)
        if s is None:
            lines.append(f"| {run.name} | {run.seed} | not run | | | | |")
            continue
        done = out / "runs" / run.name / "done.json"
        wall = f"{json.loads(done.read_text())['seconds'] / 60:.1f}" if done.exists() else "(unfinished)"
        lines.append(f"| {run.name} | {run.seed} | {s['step']} | {' '.join(f'{c:.3f}' for c in s['cv'])} "
                     f"| {s['dormant']} | {s['val_loss']:.3f} | {wall} |")
    return lines


def write_report(out: Path, runs, command: str, smoke: bool = False, notes: list[str] = (),
                 lambdas=(0.0, 1e-4, 1e-3, 1e-2, 1e-1), best: float = 1e-2) -> Path:
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    by_run, groups = collect(out, runs)
    scratch = [r for r in runs if not r.finetune]
    plot_cv_curves(plots / "cv_curves.png", scratch, by_run)
    plot_heatmaps(plots / "importance_heatmaps.png", scratch, by_run)
    plot_val_curves(plots / "val_curves.png", scratch, by_run)
    plot_vs_lambda(plots / "val_vs_lambda.png", groups, lambdas)
    fts = [(r.name, by_run[r.name]) for r in runs if r.finetune and r.name in by_run and by_run[r.name]["importance"]]
    base_name = next((r.finetune for r in runs if r.finetune), "")
    base = by_run.get(base_name)
    ft_lines, facts = (["not run."], {})
    if fts and base and base["importance"]:
        shared = next((r for r in runs if r.finetune and "shared" in r.name), None)
        m = int(next((e.split("=")[1] for e in shared.extra if e.startswith("aux_loss.shared_heads=")), 1)) if shared else 1
        ft_lines, facts = finetune_rows(base, fts, m)
        plot_finetune(plots / "finetune_heatmaps.png", base, fts)
    noise = seed_noise(groups)
    missing = [r.name for r in runs if not (out / "runs" / r.name / "done.json").exists()]
    lines = ["# Head collapse and its cure at small scale" + (" (smoke run: numbers mean nothing)" if smoke else ""), "",
             "Written by `benchmarks/reproduce_small.py` from the runs' `metrics.jsonl`. Command:", "",
             f"    {command}", "",
             f"Runs finished: {len(runs) - len(missing)} of {len(runs)}" + (f" (missing: {', '.join(missing)})" if missing else "") + ".",
             "Importance is the mean gate of a head over a training batch; CV is std/mean of a layer's head "
             "importances (final CV: the mean of the logged CVs over the last 10% of steps); a head is *dormant* "
             f"when its final importance is below {DORMANT} x its layer's mean. Train loss: mean of the logged "
             "losses over the last 10% of steps; validation loss and bits/byte: the last evaluation. Settings with two seeds read "
             "mean ± half the range. `-nh`: `aux_loss.scale_by_heads=true` (each layer's CV² times its 8 heads); "
             "`-bos`: a BOS token at the start of every document (`tools/preprocess_data.py --prepend-bos`).", ""]
    lines += ["## Regimes tried", "", "In this sweep:", ""] + regime_lines(groups) + [""]
    if notes:
        lines += ["Outside it:", ""] + list(notes) + [""]
    lines += ["## Reading against the paper's claims", "",
              f"Seed noise: the largest half-range of the final validation loss over the two-seed settings is "
              f"±{noise:.3f}; a difference within about twice that is not a result.", "",
              "- **The aux loss lowers the CV (for every variant).**"] + claim_cv(groups, best)
    lines += ["- **Quality is no worse (or better).**"] + claim_quality(groups, best, noise)
    lines += ["- **gated ≥ sink ≥ vanilla** (lower validation loss is better)."] + claim_order(groups, best, noise)
    lines += ["- **Excessive λ hurts.**"] + claim_excess(groups, lambdas, noise)
    lines += note_scale_by_heads(groups, best)
    lines += ["- **Fine-tuning without a shared/routed split pins dormant heads on.**"]
    lines += claim_pinning(facts, [n for n, _ in fts])
    lines += ["", "## From scratch, per setting", ""] + scratch_table(scratch, groups)
    lines += ["", f"## Fine-tuning from `{base_name}` (the pinning experiment)", "",
              "Formerly dormant heads: the starting model's dormant heads (a layer without one contributes its least "
              "important head). Top-m heads: the starting model's most important heads per layer (those the split "
              "shares; the trainer measures its own on the first batch). The CV of the `shared` run is over its "
              "routed heads.", ""] + ft_lines
    lines += ["", "## Per run", ""] + per_run_table(runs, by_run, out)
    lines += ["", "## Plots", "", "- per-layer CV over training: ![](plots/cv_curves.png)",
              "- end-of-run importance (colour: importance / layer mean; numbers: importance): "
              "![](plots/importance_heatmaps.png)",
              "- validation loss over training: ![](plots/val_curves.png)",
              "- final validation loss and max CV vs λ: ![](plots/val_vs_lambda.png)"]
    if facts:
        lines.append("- fine-tuning, end-of-run importance: ![](plots/finetune_heatmaps.png)")
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path

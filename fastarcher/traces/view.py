"""Trace viewer: one self-contained HTML page per step (tokens coloured by entropy and by influence).

    python -m fastarcher.traces.view RUN_DIR --step N [--out file.html] [--max-responses 40]

Reads `RUN_DIR/entropy_trace/` and `RUN_DIR/influence_trace/` (either may be absent). The page shows
the step's statistics, a summary plot across all traced steps (matplotlib PNG embedded as base64),
and every traced response with its tokens twice, side by side: coloured by entropy (white to orange,
nats) and by influence score (blue negative, red positive; the scale is the 99th percentile of |score|
in the step). Hovering a token shows its index, id and values. Responses of the two traces are
matched by (rank, row). No script, font or image is fetched from anywhere: the page opens offline.
Without --step the last traced step is shown; without --out the page is RUN_DIR/trace_view_step_NNNNNN.html.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import load_step, read_manifest, step_filename

__all__ = ["build_page", "summary_plot_png", "main"]

_ENTROPY_RGB = (230, 85, 13)
_POSITIVE_RGB = (178, 24, 43)
_NEGATIVE_RGB = (33, 102, 172)

_CSS = """
body { font-family: 'DejaVu Sans', Arial, sans-serif; margin: 18px 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px 0; } h2 { font-size: 16px; margin: 18px 0 6px 0; }
.sub { color: #666; font-size: 12px; margin-bottom: 10px; }
table.stats { border-collapse: collapse; font-size: 12px; margin: 4px 0 8px 0; }
table.stats td, table.stats th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; background: #fff; }
table.stats th { background: #f0f0f0; text-align: left; }
table.stats td.k { text-align: left; color: #555; }
.tables { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
.plot img { max-width: 100%; border: 1px solid #ddd; background: #fff; }
.legend { display: flex; gap: 28px; font-size: 12px; align-items: center; margin: 6px 0 10px 0; }
.bar { display: inline-block; width: 160px; height: 12px; border: 1px solid #bbb; vertical-align: middle;
       margin: 0 6px; }
.resp { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 10px 0; padding: 8px 10px; }
.meta { font-size: 12px; color: #444; margin-bottom: 6px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-weight: bold; font-size: 11px; }
.acc { background: #d8f0d8; color: #1a6a1a; } .rej { background: #f6d5d5; color: #8a1a1a; }
.neu { background: #eee; color: #555; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.col h3 { font-size: 11px; color: #666; margin: 0 0 3px 0; font-weight: normal; text-transform: uppercase;
          letter-spacing: .04em; }
.toks { font-family: 'DejaVu Sans Mono', monospace; font-size: 13px; line-height: 1.75; white-space: pre-wrap;
        word-break: break-word; }
.tok { border-radius: 2px; padding: 1px 0; }
.missing { color: #999; font-size: 12px; font-style: italic; }
"""


def _mix(rgb: tuple[int, int, int], alpha: float) -> str:
    alpha = min(max(alpha, 0.0), 1.0) if math.isfinite(alpha) else 0.0
    r, g, b = (round(255 + (c - 255) * alpha) for c in rgb)
    return f"rgb({r},{g},{b})"


def _fmt(value: float, digits: int = 3) -> str:
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:+.{digits - 1}e}"
    return f"{value:+.{digits}f}"


def _token_html(text: str, colour: str, tooltip: str, light_text: bool) -> str:
    if text == "":
        shown = "\u00b7"  # a token that ends inside a multi-byte character
    else:
        shown = html.escape(text).replace("\n", "\u21b5\n")
    style = f"background:{colour};" + ("color:#fff;" if light_text else "")
    return f'<span class="tok" style="{style}" title="{html.escape(tooltip)}">{shown}</span>'


def _tokens_entropy(data: dict, r: int, vmax: float) -> str:
    a, b = data["response_offsets"][r], data["response_offsets"][r + 1]
    parts = []
    for n in range(a, b):
        h = float(data["token_entropy"][n])
        alpha = h / vmax if vmax > 0 else 0.0
        tip = f"t={data['token_positions'][n]} id={data['token_ids'][n]} entropy={h:.3f} nats"
        parts.append(_token_html(str(data["token_text"][n]), _mix(_ENTROPY_RGB, alpha), tip, alpha > 0.65))
    return "".join(parts)


def _tokens_influence(data: dict, r: int, smax: float) -> str:
    a, b = data["response_offsets"][r], data["response_offsets"][r + 1]
    parts = []
    for n in range(a, b):
        s = float(data["token_scores"][n])
        alpha = abs(s) / smax if smax > 0 else 0.0
        tip = (f"t={data['token_positions'][n]} id={data['token_ids'][n]} score={s:+.4g} "
               f"grad_norm={float(data['token_grad_norm'][n]):.4g}")
        parts.append(_token_html(str(data["token_text"][n]), _mix(_POSITIVE_RGB if s >= 0 else _NEGATIVE_RGB, alpha),
                                 tip, alpha > 0.65))
    return "".join(parts)


def _load(root: Path, step: int) -> dict | None:
    return load_step(root, step) if (root / step_filename(step)).exists() else None


def summary_plot_png(entropy_records: Sequence[dict], influence_records: Sequence[dict], step: int | None) -> bytes:
    """PNG of per-step statistics across the run: entropy mean/quantiles/high-entropy share, influence
    response scores (accepted vs rejected means, mean |token score|), accepted/rejected counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["entropy"] if entropy_records else []) + (["influence", "counts"] if influence_records else [])
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 2.9), dpi=100, squeeze=False)

    def series(records, key):
        return [np.nan if r.get(key) is None else float(r[key]) for r in records]

    for ax, panel in zip(axes[0], panels):
        if panel == "entropy":
            steps = [r["step"] for r in entropy_records]
            qkeys = sorted((k for k in entropy_records[-1] if k.startswith("entropy_q")), key=lambda k: float(k[9:]))
            if len(qkeys) >= 2:
                ax.fill_between(steps, series(entropy_records, qkeys[0]), series(entropy_records, qkeys[-1]),
                                color="#fdd0a2", alpha=0.8, label=f"q{qkeys[0][9:]}-q{qkeys[-1][9:]}")
            ax.plot(steps, series(entropy_records, "entropy_mean"), "o-", color="#e6550d", ms=3, label="mean")
            ax.set_ylabel("entropy (nats)")
            twin = ax.twinx()
            twin.plot(steps, series(entropy_records, "high_entropy_share"), "^:", color="#555", ms=3,
                      label="high-entropy share")
            twin.set_ylim(-0.02, 1.02)
            twin.set_ylabel("share", fontsize=8)
            handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
            ax.set_title("response-token entropy", fontsize=10)
        elif panel == "influence":
            steps = [r["step"] for r in influence_records]
            ax.plot(steps, series(influence_records, "response_score_accepted_mean"), "o-", color="#1a9850", ms=3,
                    label="accepted: mean response score")
            ax.plot(steps, series(influence_records, "response_score_rejected_mean"), "o-", color="#d73027", ms=3,
                    label="rejected: mean response score")
            ax.plot(steps, series(influence_records, "token_score_abs_mean"), "s--", color="#555", ms=3,
                    label="mean |token score|")
            ax.axhline(0, color="#999", lw=0.8)
            ax.set_ylabel("score")
            ax.legend(fontsize=7, loc="best")
            ax.set_title("influence scores", fontsize=10)
        else:
            steps = [r["step"] for r in influence_records]
            width = 0.4 * _min_gap(steps)
            ax.bar(steps, series(influence_records, "n_accepted"), width=width, color="#1a9850", alpha=0.7,
                   label="accepted")
            ax.bar(steps, [-v for v in series(influence_records, "n_rejected")], width=width, color="#d73027",
                   alpha=0.7, label="rejected (down)")
            ax.axhline(0, color="#999", lw=0.8)
            ax.set_ylabel("traced responses")
            ax.legend(fontsize=7, loc="best")
            ax.set_title("accepted / rejected", fontsize=10)
        if step is not None:
            ax.axvline(step, color="#3366cc", lw=1, alpha=0.6)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no traced steps", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _min_gap(steps: Sequence[int]) -> float:
    gaps = np.diff(sorted(set(steps)))
    return float(gaps.min()) if gaps.size else 1.0


def _stats_table(entropy_rec: dict | None, influence_rec: dict | None) -> str:
    """The step's manifest statistics as small key/value tables side by side."""
    tables = []
    if entropy_rec:
        quantile_keys = sorted((k for k in entropy_rec if k.startswith("entropy_q")), key=lambda k: float(k[9:]))
        keys = ["entropy_mean"] + quantile_keys
        tables.append(("entropy", [(k, entropy_rec.get(k)) for k in keys + ["high_entropy_share", "n_tokens"]]))
    if influence_rec:
        keys = ["n_responses", "n_tokens", "n_accepted", "n_rejected", "n_units_with_contrast", "method", "damping",
                "token_score_abs_mean", "response_score_accepted_mean", "response_score_rejected_mean"]
        tables.append(("influence", [(k, influence_rec.get(k)) for k in keys]))
    html_tables = []
    for title, items in tables:
        rows = "".join(f"<tr><td class=\"k\">{html.escape(k)}</td><td>{html.escape(_value(v))}</td></tr>"
                       for k, v in items)
        html_tables.append(f'<table class="stats"><tr><th colspan="2">{title}</th></tr>{rows}</table>')
    return f'<div class="tables">{"".join(html_tables)}</div>'


def _value(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _response_meta(key, ent: dict | None, ent_i, inf: dict | None, inf_i) -> str:
    src, i = (inf, inf_i) if inf_i is not None else (ent, ent_i)  # a response may be in one trace only
    rank, row = key
    parts = [f"rank {rank}", f"row {row}", f"group {int(src['group_ids'][i])}"]
    for name, arr in (("reward", "rewards"), ("advantage", "advantages")):
        value = float(src[arr][i])
        if math.isfinite(value):
            parts.append(f"{name} {value:+.3g}")
    parts.append(f"{int(src['n_response_tokens'][i])} response tokens")
    badge = ""
    if inf_i is not None:
        flag = int(inf["accepted"][inf_i])
        badge = {1: '<span class="badge acc">accepted</span>', -1: '<span class="badge rej">rejected</span>'}.get(
            flag, '<span class="badge neu">no side</span>')
        parts.append(f"response score {_fmt(inf['response_scores'][inf_i])}"
                     f" (untraced positions {_fmt(inf['response_context_scores'][inf_i])})")
    return f'<div class="meta">{badge} {html.escape(" · ".join(parts))}</div>'


def build_page(run_dir: str | Path, step: int | None = None, max_responses: int = 40) -> tuple[str, int]:
    """(HTML text, step shown)."""
    run_dir = Path(run_dir)
    ent_root, inf_root = run_dir / "entropy_trace", run_dir / "influence_trace"
    ent_records, inf_records = read_manifest(ent_root), read_manifest(inf_root)
    steps = sorted({r["step"] for r in ent_records} | {r["step"] for r in inf_records})
    if not steps:
        raise FileNotFoundError(f"{run_dir} holds no entropy_trace/ or influence_trace/ steps")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"--step {step} was not traced; traced steps: {steps}")
    ent, inf = _load(ent_root, step), _load(inf_root, step)
    ent_rec = next((r for r in ent_records if r["step"] == step), None)
    inf_rec = next((r for r in inf_records if r["step"] == step), None)
    png = base64.b64encode(summary_plot_png(ent_records, inf_records, step)).decode()

    index: dict[tuple[int, int], list] = {}
    for which, data in ((0, ent), (1, inf)):
        if data is None:
            continue
        for i, (rank, row) in enumerate(zip(data["rank"].tolist(), data["row"].tolist())):
            index.setdefault((rank, row), [None, None])[which] = i
    keys = sorted(index)[:max_responses]

    vmax = float(np.quantile(ent["token_entropy"], 0.99)) if ent is not None and ent["token_entropy"].size else 1.0
    smax = 1.0
    if inf is not None and inf["token_scores"].size:
        smax = float(np.quantile(np.abs(inf["token_scores"]), 0.99))
    cards = []
    for key in keys:
        ei, ii = index[key]
        left = (_tokens_entropy(ent, ei, vmax) if ei is not None
                else '<span class="missing">not in the entropy trace</span>')
        right = (_tokens_influence(inf, ii, smax) if ii is not None
                 else '<span class="missing">not in the influence trace</span>')
        cards.append(
            f'<div class="resp">{_response_meta(key, ent, ei, inf, ii)}<div class="cols">'
            f'<div class="col"><h3>entropy</h3><div class="toks">{left}</div></div>'
            f'<div class="col"><h3>influence</h3><div class="toks">{right}</div></div></div></div>'
        )
    legend = (
        f'<div class="legend"><span>entropy 0<span class="bar" style="background:linear-gradient(to right,'
        f'{_mix(_ENTROPY_RGB, 0)},{_mix(_ENTROPY_RGB, 1)})"></span>{vmax:.3g} nats (step q99)</span>'
        f'<span>influence {_fmt(-smax)}<span class="bar" style="background:linear-gradient(to right,'
        f'{_mix(_NEGATIVE_RGB, 1)},#ffffff,{_mix(_POSITIVE_RGB, 1)})"></span>{_fmt(smax)} '
        '(step q99 of |score|)</span></div>'
    )
    shown = f"{len(keys)} of {len(index)} responses" if index else "no responses"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fastarcher traces: step {step}</title>
<style>{_CSS}</style></head><body>
<h1>fastarcher traces &mdash; step {step}</h1>
<div class="sub">{html.escape(str(run_dir))} · traced steps: {html.escape(", ".join(map(str, steps)))} · {shown}</div>
{_stats_table(ent_rec, inf_rec)}
<div class="plot"><img alt="summary across steps" src="data:image/png;base64,{png}"></div>
<h2>Responses</h2>
{legend}
<div class="sub">Influence: score of each token's share of the update on its unit's accepted-minus-rejected
direction (positive = raises the accepted-vs-rejected margin). Hover a token for its values.</div>
{"".join(cards)}
</body></html>
"""
    return page, step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastarcher.traces.view", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run folder holding entropy_trace/ and/or influence_trace/")
    parser.add_argument("--step", type=int, default=None, help="step to show (default: the last traced step)")
    parser.add_argument("--out", type=Path, default=None, help="output HTML (default: RUN_DIR/trace_view_step_N.html)")
    parser.add_argument("--max-responses", type=int, default=40, help="show at most this many responses")
    args = parser.parse_args(argv)
    page, step = build_page(args.run_dir, args.step, args.max_responses)
    out = args.out or args.run_dir / f"trace_view_step_{step:06d}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

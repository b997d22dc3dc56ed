"""Results on screen (a table), in `results.json` and as PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows of a suite's results."""
    suite, s = results["suite"], results["summary"]
    rows: list[tuple[str, str]] = []
    if suite == "ppl":
        rows += [("documents", f"{s['documents']}"), ("tokens scored", f"{s['tokens']:,}"),
                 ("bytes", f"{s['bytes']:,}"), ("nats / token", _num(s["nats_per_token"])),
                 ("perplexity", _num(s["perplexity"], 2)),
                 ("bits / byte", _num(s["bits_per_byte"]))]
        for b in s.get("loss_by_context", []):
            rows.append((f"  nats/token, context {b['from_tokens']}-{b['to_tokens']}",
                         f"{b['nats_per_token']:.4f} ({b['count']:,} tokens)"))
    elif suite == "niah":
        rows.append(("accuracy", _pct(s["accuracy"])))
        for length, acc in s["accuracy_by_length"].items():
            rows.append((f"  length {int(length):,}", _pct(acc)))
        ix = s.get("indexer")
        if ix:
            rows += [("indexer top-k holds the needle", _pct(ix["hit_rate"])),
                     ("indexer recall of needle entries", _pct(ix["recall"])),
                     ("  (random top-k would give)", _pct(ix["chance"]))]
            for layer, d in ix["layers"].items():
                rows.append((f"  layer {layer} (CSA): hit / recall", f"{_pct(d['hit'])} / "
                             f"{_pct(d['recall'])} over {d['queries']} prompts"))
    elif suite == "mc":
        rows.append(("items", f"{s['items']}"))
        for key, label in (("acc", "accuracy (letter log-likelihood)"),
                           ("acc_text", "accuracy (choice text log-likelihood)"),
                           ("acc_norm", "accuracy (text log-likelihood per byte)"),
                           ("em", "exact match (generated letter)")):
            if key in s:
                rows.append((label, _pct(s[key])))
        if "unparsed" in s:
            rows.append(("  replies naming no choice", f"{s['unparsed']}"))
        if "chance" in s:
            rows.append(("chance", _pct(s["chance"])))
        for subject, acc in s.get("by_subject", {}).items():
            rows.append((f"  {subject}", _pct(acc)))
    elif suite == "math":
        rows += [("items", f"{s['items']}"), ("exact match", _pct(s["em"])),
                 ("  no final answer found", f"{s['unparsed']}")]
    elif suite == "tasks":
        rows += [("items", f"{s['items']}"), ("accuracy", _pct(s["accuracy"]))]
        for domain, acc in s["by_domain"].items():
            rows.append((f"  {domain}", _pct(acc)))
    for note in results.get("skipped", []):
        rows.append((f"{note['metric']}", f"skipped: {note['reason']}"))
    return rows


def format_table(results: dict[str, Any]) -> str:
    rows = table_rows(results)
    width = max(len(k) for k, _ in rows) + 2
    head = f"dsv4 eval {results['suite']}: {results['model']}"
    lines = [head, "-" * min(100, max(len(head), width + 20))]
    lines += [f"{k:<{width}}{v}" for k, v in rows]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNGs for the suites that have something to draw; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    suite, s = results["suite"], results["summary"]
    written = []
    if suite == "niah":
        written.append(_niah_plot(s, results["model"], out_dir / "niah.png"))
    elif suite == "ppl" and s.get("loss_by_context"):
        written.append(_ppl_plot(s, results["model"], out_dir / "loss_by_context.png"))
    elif suite == "mc" and s.get("by_subject"):
        written.append(_bars(s["by_subject"], f"accuracy by subject: {results['model']}",
                             out_dir / "by_subject.png"))
    elif suite == "tasks" and s.get("by_domain"):
        written.append(_bars(s["by_domain"], f"accuracy by domain: {results['model']}",
                             out_dir / "by_domain.png"))
    return written


def _save(fig, path: Path) -> Path:
    from dsv4.files import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _heatmap(ax, grid, lengths, depths, title):
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    image = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n)
                                        for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(d * 100)}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=8)
    return image


def _niah_plot(s: dict, model: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    panels = [("retrieval accuracy", s["accuracy_grid"])]
    if s.get("indexer"):
        panels.append(("CSA indexer recall of the needle's entries", s["indexer"]["recall_grid"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels):
        image = _heatmap(ax, grid, s["lengths"], s["depths"], title)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"needle in a haystack: {model}", fontsize=9)
    return _save(fig, path)


def _ppl_plot(s: dict, model: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buckets = s["loss_by_context"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([b["from_tokens"] for b in buckets], [b["nats_per_token"] for b in buckets], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context before the predicted token")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"loss by context: {model}", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bars(values: dict[str, float], title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(values) + 2), 4))
    ax.bar(list(values), list(values.values()))
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)

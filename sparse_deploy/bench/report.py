"""Formatting of benchmark numbers for people: a side-by-side table and a bar chart. No measuring here."""

from __future__ import annotations

from pathlib import Path

from sparse_deploy.errors import ConfigError
from sparse_deploy.bench.comparison import Comparison
from sparse_deploy.bench.protocol import ModelBench

MiB = 2**20


def _metrics(model: ModelBench) -> list[tuple[str, float | None, str]]:
    """(label, value, format) rows; latencies are medians unless the label says otherwise."""
    rows = [("file size (MiB)", model.file_bytes / MiB, ".1f"), ("load time (s)", model.load_s, ".2f"),
            ("peak RSS (MiB)", model.peak_rss_bytes / MiB, ".0f")]
    if model.kind == "decoder":
        rows += [("prefill (ms)", model.prefill_ms.p50_ms, ".1f"),
                 ("decode p50 (ms/token)", model.decode_ms.p50_ms, ".2f"),
                 ("decode p90 (ms/token)", model.decode_ms.p90_ms, ".2f"),
                 ("decode p99 (ms/token)", model.decode_ms.p99_ms, ".2f"),
                 ("tokens/s", model.tokens_per_s, ".1f")]
    else:
        rows += [("batch-1 latency (ms)", model.batch1_ms.p50_ms, ".2f"),
                 ("sentences/s, batch 1", model.sentences_per_s_batch1, ".1f"),
                 ("sentences/s, batch 32", model.sentences_per_s_batch32, ".1f")]
    return rows


def format_comparison(comparison: Comparison, names: tuple[str, str, str] = ("model", "dense ONNX", "torch eager")
                      ) -> str:
    """A plain-text table: one column per model, then the ratios model/baseline."""
    models = [(names[0], comparison.model)]
    models += [(names[1], comparison.dense)] if comparison.dense else []
    models += [(names[2], comparison.torch)] if comparison.torch else []
    header = f"{'':<24}" + "".join(f"{name:>14}" for name, _ in models)
    header += "".join(f"{'vs ' + name:>16}" for name, _ in models[1:])
    lines = [header]
    columns = [_metrics(m) for _, m in models]
    for i, (label, value, fmt) in enumerate(columns[0]):
        line = f"{label:<24}" + "".join(f"{col[i][1]:>14{col[i][2]}}" for col in columns)
        line += "".join(f"{value / col[i][1]:>15.2f}x" if col[i][1] else f"{'-':>16}" for col in columns[1:])
        lines.append(line)
    facts = comparison.machine
    if facts:
        lines.append(f"machine: {facts.get('cpu')}, {facts.get('cores')} cores, {facts.get('threads')} threads, "
                     f"onnxruntime {facts.get('onnxruntime_version')}")
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path: str | Path, title: str = "") -> Path:
    """A PNG with one small bar chart per metric, the models side by side, values printed on the bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'sparse-deploy[plot]'") from None
    models = [("this model", comparison.model)]
    models += [("dense ONNX", comparison.dense)] if comparison.dense else []
    models += [("torch eager", comparison.torch)] if comparison.torch else []
    wanted = {"file size (MiB)", "load time (s)", "peak RSS (MiB)", "decode p50 (ms/token)", "tokens/s",
              "batch-1 latency (ms)", "sentences/s, batch 32"}
    panels = [row for row in _metrics(comparison.model) if row[0] in wanted]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    colors = ["#2a9d8f", "#8d99ae", "#e76f51"]
    for ax, (label, _, fmt) in zip(axes, panels):
        values = [dict((r[0], r[1]) for r in _metrics(m))[label] for _, m in models]
        bars = ax.bar([n for n, _ in models], values, color=colors[: len(models)])
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:{fmt}}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=9)
        better = "higher is better" if "/s" in label else "lower is better"
        ax.set_title(f"{label}\n({better})", fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.margins(y=0.2)
    facts = comparison.machine
    fig.suptitle(title or f"{facts.get('cpu', '')}, {facts.get('threads', '?')} threads", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

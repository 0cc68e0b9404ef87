"""Pictures of results: loss curves drawn from a run's `metrics.jsonl`, confusion matrices, length histograms."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: str | Path) -> Path:
    """Write `fig` to `png` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)


def plot_metrics(metrics_file: str | Path, png: str | Path, title: str = "") -> Path:
    """Draw training loss (every log) and validation loss (every eval) against the step."""
    plt = _pyplot()
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or Path(metrics_file).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, png)


def plot_confusion(counts: list[list[int]], labels: list[str], png: str | Path, title: str = "") -> Path:
    """A confusion matrix as a heat map: rows are the gold labels, columns the predictions."""
    plt = _pyplot()
    size = max(4.0, 0.45 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    largest = max(max(row) for row in counts) or 1
    if len(labels) <= 25:
        for i, row in enumerate(counts):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                        color="white" if n > largest / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, png)


def plot_lengths(series: dict[str, list[int]], png: str | Path, title: str = "", unit: str = "words") -> Path:
    """Histograms of text lengths, one per series (e.g. references against predictions)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    longest = max((max(v) for v in series.values() if v), default=1)
    bins = range(0, longest + 2, max(1, (longest + 1) // 40))
    for name, lengths in series.items():
        ax.hist(lengths, bins=bins, alpha=0.5, label=f"{name} (mean {sum(lengths) / max(len(lengths), 1):.1f})")
    ax.set_xlabel(f"length ({unit})")
    ax.set_ylabel("texts")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, png)


def plot_panels(records: list[dict], panels: dict[str, list[str]], png: str | Path, title: str = "") -> Path:
    """One panel per entry of `panels` (its title: the keys it draws against the step), from metrics records
    (`{"step": .., KEY: ..}` dicts); a key no record has is left out, a panel with none says so."""
    plt = _pyplot()
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), dpi=110, squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", label=key, markersize=3, linewidth=1.2)
                drawn = True
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, png)

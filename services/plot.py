"""`loraloop plot RUN_DIR`: reward, KL, entropy and response-length curves to a PNG (and,
for PPO with a critic, its value loss and explained variance)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PANELS = [("reward/mean", "mean reward"), ("actor/kl", "KL to base"), ("actor/entropy", "entropy"),
          ("response_length/mean", "response length (tokens)")]
CRITIC_PANELS = [("critic/vf_loss", "critic value loss"),
                 ("critic/explained_var", "critic explained variance (of returns)")]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.learner.metrics import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        raise SystemExit(f"{run_dir}: no metrics.jsonl rows to plot")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    panels = PANELS + (CRITIC_PANELS if any("critic/vf_loss" in r for r in rows) else [])
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(10, 3.25 * (len(panels) // 2)), constrained_layout=True)
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys, strict=True) if isinstance(y, (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=0.8, alpha=0.5)
            if key == "reward/mean" and len(pts) >= 10:  # a moving average to read the trend
                w = max(5, len(pts) // 20)
                ma = [sum(y for _, y in pts[max(0, i - w + 1) : i + 1]) / len(pts[max(0, i - w + 1) : i + 1])
                      for i in range(len(pts))]
                ax.plot([s for s, _ in pts], ma, lw=2, label=f"moving mean ({w} steps)")
                ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"loraloop run: {Path(run_dir).resolve().name} ({len(rows)} steps)")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraloop plot", description=__doc__)
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", help="PNG path (default <run_dir>/curves.png)")
    a = p.parse_args(argv)
    print(plot_run(a.run_dir, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

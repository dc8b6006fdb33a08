"""Loss and accuracy curves as a PNG next to a run (matplotlib is optional: no PNG without it)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["save_curves"]


def save_curves(run_dir: str | Path) -> Path | None:
    """Write run_dir/curves.png from steps.jsonl and metrics.jsonl; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'kdlib[plot]'); no curves.png")
        return None
    run = Path(run_dir)
    # a step whose loss was not finite is logged with loss null (the run stopped there): not drawn
    steps = [s for s in map(json.loads, (run / "steps.jsonl").read_text().splitlines()) if s["loss"] is not None]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(m["epoch"], m["eval"]) for m in metrics if "eval" in m]
    final = next((m["final_eval"] for m in metrics if "final_eval" in m), None)

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"train loss ({run.name})")
    ax_loss.set_yscale("log" if steps and min(s["loss"] for s in steps) > 0 else "linear")
    if final:  # the end-of-training evaluation is the last point
        evals.append((max((m["epoch"] for m in metrics if "epoch" in m), default=0), final))
    if evals:
        epochs = [e + 1 for e, _ in evals]
        ax_acc.plot(epochs, [r["top1"] for _, r in evals], marker="o", label="test top-1")
        if all("agreement" in r for _, r in evals):
            ax_acc.plot(epochs, [r["agreement"] for _, r in evals], marker="s", label="agreement with teacher")
        ax_acc.set(xlabel="epoch", ylabel="fraction", title="test split")
        ax_acc.legend()
    else:
        ax_acc.set_axis_off()
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

"""The demo's one picture: each student's test top-1 against its training seconds (matplotlib optional)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_demo_plot"]

_STYLE = {"cached": ("tab:blue", "o", "-"), "online": ("tab:red", "s", "--"), "ce": ("tab:gray", "^", ":")}


def save_demo_plot(result: dict, path: str | Path) -> Path | None:
    """Write the picture of a `run_demo` result to `path`; None (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'kdlib[plot]'); no demo.png")
        return None
    teacher = result["teacher"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cached_colors = iter(["tab:blue", "tab:green", "tab:purple", "tab:cyan"])
    for r in result["students"]:
        color, marker, ls = _STYLE[r["kind"]]
        if r["kind"] == "cached":
            color = next(cached_colors)
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(
            xs,
            ys,
            marker=marker,
            ls=ls,
            color=color,
            lw=1.6,
            ms=4,
            label=f"{r['name']}: {r['top1']:.4f} in {r['train_s']:.0f} s",
        )
    ax.axhline(
        teacher["top1"],
        color="black",
        lw=0.8,
        ls="-.",
        label=f"teacher {teacher['arch']}: {teacher['top1']:.4f} "
        f"(once: {teacher['train_s']:.0f} s train + {teacher['precompute_s']:.0f} s precompute)",
    )
    s = result["settings"]
    ax.set(
        xlabel="student training seconds (2-core CPU; start-up and evaluations not counted)",
        ylabel="test top-1 (after each epoch)",
        title=f"Fashion-MNIST, {s['limit']} training images, {s['epochs']} epochs per student",
    )
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

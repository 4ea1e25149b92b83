"""The per-block widths of ``shrink --allocation sensitivity`` as a picture (``widths.png``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .shrink import ShrinkRun

def plot_widths(run: ShrinkRun, path) -> bool:
    """Each block's kept MLP width and query heads against the uniform plan's, one PNG;
    ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    plan = run.plan
    count = max(len(plan.mlp_blocks), len(plan.heads_blocks))
    blocks = list(range(count))
    panels = [(label, [at(i) for i in blocks], old, new) for label, at, old, new, on in (
        ("MLP neurons kept", plan.mlp_at, plan.mlp_old, plan.mlp_new, plan.mlp_blocks),
        ("query heads kept", plan.heads_at, plan.heads_old, plan.heads_new, plan.heads_blocks))
        if on]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, (label, values, old, new) in zip(axes[:, 0], panels, strict=True):
        ax.bar(blocks, values, color="tab:blue")
        ax.axhline(new, color="tab:red", ls="--", lw=1, label=f"uniform ({new})")
        ax.axhline(old, color="grey", ls=":", lw=1, label=f"dense ({old})")
        ax.set_ylabel(label)
        ax.legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("decoder block")
    axes[0, 0].set_title(f"shrink --allocation sensitivity ({run.settings.method})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

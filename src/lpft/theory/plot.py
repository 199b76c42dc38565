"""Figure of a theory sweep: OOD and ID error vs feature error, and where features moved."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lpft.theory.simulate import METHODS, summarise  # noqa: E402

LABELS: dict[str, str] = {
    "lp": "LP (train head only)",
    "ft_random": "FT, random head",
    "ft_zero": "FT, zero head",
    "lpft": "LP-FT (FT from LP head)",
}
COLORS: dict[str, str] = {"lp": "C0", "ft_random": "C3", "ft_zero": "C1", "lpft": "C2"}
MARKERS: dict[str, str] = {"lp": "o", "ft_random": "s", "ft_zero": "D", "lpft": "^"}
STYLES: dict[str, dict] = {
    "lp": {"linewidth": 4, "alpha": 0.6},
    "ft_random": {},
    "ft_zero": {},
    "lpft": {"linestyle": "--"},
}
# errors below this are an exact fit up to round-off; drawn at the floor so log axes work
FLOOR = 1e-12
EPS_LABEL = r"feature error $\epsilon = \min_U \|B_0 - U B_\star\|_F$ (U: rotation)"


def _series(
    stats: dict, eps: list[float], method: str, metric: str, floor: float = FLOOR
) -> tuple[np.ndarray, ...]:
    rows = [stats[(e, method)] for e in eps]
    return tuple(
        np.maximum([r[f"{metric}{suffix}"] for r in rows], floor) for suffix in ("", "_min", "_max")
    )


def plot_theory(result: dict, path: str | Path) -> Path:
    """Write the three-panel figure for ``simulate``'s result to ``path`` (PNG)."""
    settings = result["settings"]
    stats = summarise(result)
    eps = sorted({e for e, _ in stats})
    methods = [m for m in METHODS if any((e, m) in stats for e in eps)]

    fig, axes = plt.subplots(1, 3, figsize=(17, 6))
    panels = [
        ("ood_error", "OOD test error (inputs with mass outside the training span S)",
         r"expected squared error $E(f(x) - y)^2$, $x \sim N(0, I_d)$"),
        ("id_error", "ID test error (inputs inside the training span S)",
         r"expected squared error $E(f(x) - y)^2$, $x \sim N(0, P_S)$"),
    ]
    for ax, (metric, title, ylabel) in zip(axes, panels):
        for method in methods:
            mean, low, high = _series(stats, eps, method, metric)
            ax.plot(eps, mean, marker=MARKERS[method], color=COLORS[method],
                    label=LABELS[method], **STYLES[method])
            ax.fill_between(eps, low, high, color=COLORS[method], alpha=0.15, linewidth=0)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    axes[1].axhline(FLOOR, color="grey", linestyle=":", linewidth=1)
    axes[1].annotate(
        f"FT (both heads) and LP-FT fit S exactly: error < {FLOOR:.0e}, drawn here",
        (eps[0], FLOOR), xytext=(0, 6), textcoords="offset points", fontsize=8, color="grey",
    )
    axes[0].axhline(settings["v_star_norm"] ** 2, color="grey", linestyle=":", linewidth=1)
    axes[0].annotate(
        "error of always predicting 0", (eps[0], settings["v_star_norm"] ** 2),
        xytext=(0, -12), textcoords="offset points", fontsize=8, color="grey",
    )

    ax = axes[2]
    for method in [m for m in methods if m != "lp"]:
        for metric, style, where in (
            ("feature_change_in_span", "-", "on S"),
            ("feature_change_orthogonal", "--", "orthogonal to S"),
        ):
            mean, low, high = _series(stats, eps, method, metric, floor=1e-18)
            ax.plot(eps, mean, style, marker=MARKERS[method], color=COLORS[method],
                    label=f"{LABELS[method]}, {where}")
    ax.set_title("How much fine-tuning moved the features B")
    ax.set_ylabel(r"relative change $\|(B - B_0) P\|_F \,/\, \|B_0 P\|_F$")
    ax.legend(fontsize=8, loc="center right")
    ax.text(0.02, 0.1, "P projects onto S (solid) or onto its complement (dashed).\n"
            "Orthogonal to S, B is unchanged up to float64 round-off.\n"
            "LP never changes B, so it is not shown.",
            transform=ax.transAxes, fontsize=8, color="dimgrey")

    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(EPS_LABEL)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=9, loc="lower right")

    fig.suptitle(
        r"Two-layer linear network $f(x) = v^\top B x$: fine-tuning distorts pretrained "
        "features and loses OOD accuracy; linear probing and LP-FT keep it", fontsize=13,
    )
    d, m = settings["d"], settings["m"]
    fig.text(
        0.5, 0.045,
        f"OOD = test inputs outside the training span: the {settings['n']} training inputs "
        f"span only a {m}-dimensional subspace S of $R^{{{d}}}$; ID test inputs lie in S, OOD test "
        f"inputs $x \\sim N(0, I_{{{d}}})$ have {100 * (d - m) / d:.0f}% of their variance "
        "outside S.",
        ha="center", fontsize=10,
    )
    fig.text(
        0.5, 0.01,
        f"Features $B \\in R^{{{settings['k']} \\times {d}}}$, true weights "
        f"$w_\\star = B_\\star^\\top v_\\star$ with $\\|w_\\star\\| = "
        f"{settings['v_star_norm']:g}$. FT / LP-FT: {settings['steps']} full-batch gradient "
        f"steps (lr {settings['lr']:g}) on v and B. Lines: mean over {settings['seeds']} random "
        "instances; bands: min to max.",
        ha="center", fontsize=9, color="dimgrey",
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

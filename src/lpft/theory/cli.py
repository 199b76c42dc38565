"""``lpft theory``: simulate the two-layer linear network results, write JSON and a figure."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lpft.commands.common import add_deprecated_alias, new_table
from lpft.theory.simulate import METHODS, TheorySettings, simulate, summarise

if TYPE_CHECKING:
    from rich.table import Table

_DEFAULTS = TheorySettings()


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``theory`` sub-command."""
    p = subparsers.add_parser(
        "theory",
        help="simulate LP, FT and LP-FT on two-layer linear networks (the paper's theory)",
        description=(
            "Simulate f(x) = v^T B x trained on inputs spanning a subspace S, sweeping the "
            "pretrained feature error eps. Writes every run to JSON and a figure of ID/OOD "
            "error and feature change."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="folder for theory.json and theory.png")
    p.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="JSON path (default: DIR/theory.json)")
    p.add_argument("--png", type=Path, metavar="FILE", help="figure path (default: DIR/theory.png)")
    add_deprecated_alias(p, "--out-dir", "--out", dest="out")
    add_deprecated_alias(p, "--out-json", "--json", dest="json_path")
    add_deprecated_alias(p, "--out-png", "--png", dest="png")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--eps", type=float, nargs="+", default=list(_DEFAULTS.eps),
                   help="feature errors min_U ||B0 - U B*||_F to sweep")
    p.add_argument("--seeds", type=int, default=_DEFAULTS.seeds, help="random instances per eps")
    p.add_argument("--d", type=int, default=_DEFAULTS.d, help="input dimension")
    p.add_argument("--k", type=int, default=_DEFAULTS.k, help="feature dimension (k < d)")
    p.add_argument("--m", type=int, default=_DEFAULTS.m, help="dimension of the training span S")
    p.add_argument("--n", type=int, default=_DEFAULTS.n, help="number of training examples")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="gradient-descent steps")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="gradient-descent step size")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(_DEFAULTS.methods),
                   help="lp; ft_random / ft_zero (FT from a random or zero head); lpft")
    p.add_argument("--head-scale", type=float, default=_DEFAULTS.head_scale,
                   help="random head v0 ~ N(0, (head_scale*||v*||)^2/k I): expected norm ~ this*||v*||")
    p.add_argument("--v-star-norm", type=float, default=_DEFAULTS.v_star_norm,
                   help="norm of the true head v* (= ||w*||)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.base_seed, help="base random seed")
    p.set_defaults(func=run)
    return p


def summary_table(result: dict) -> Table:
    """Mean over seeds of ID/OOD error per eps and method."""
    rows = [[method, f"{eps:g}", *(f"{st[key]:.2e}" for key in ("id_error", "ood_error", "feature_change_in_span")),
             f"{st['feature_change_orthogonal']:.1e}", f"{st['train_mse_max']:.1e}"]
            for (eps, method), st in summarise(result).items()]
    return new_table("theory: mean over seeds (expected squared error)",
                     ["method", "eps", "ID error", "OOD error", "feature change on S", "off S", "train MSE"], rows)


def run(args: argparse.Namespace) -> int:
    """Simulate, write JSON (and the figure), print a summary table and one line saying what was written."""
    from rich.console import Console  # not lpft.commands.common.console, which would import torch

    settings = TheorySettings(
        eps=tuple(args.eps), seeds=args.seeds, d=args.d, k=args.k, m=args.m, n=args.n,
        steps=args.steps, lr=args.lr, methods=tuple(dict.fromkeys(args.methods)),
        v_star_norm=args.v_star_norm, head_scale=args.head_scale, base_seed=args.seed,
    )
    start = time.perf_counter()
    result = simulate(settings, progress=True)  # drawn only on a terminal, unless switched off (lpft.progress)
    json_path = args.json_path or args.out / "theory.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    written = [json_path]
    if not args.no_plot:
        from lpft.theory.plot import plot_theory

        written.append(plot_theory(result, args.png or args.out / "theory.png"))
    console = Console()
    console.print(summary_table(result))
    console.print(f"wrote {len(result['runs'])} runs to {' and '.join(map(str, written))} in "
                  f"{time.perf_counter() - start:.1f} s", markup=False)
    return 0

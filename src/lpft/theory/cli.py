"""``lpft theory``: simulate the two-layer linear network results, write JSON and a figure."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from lpft.theory.simulate import METHODS, TheorySettings, simulate, summarise

logger = logging.getLogger(__name__)
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out-dir", type=Path, default=Path("."), help="folder for default outputs")
    p.add_argument("--out-json", type=Path, help="JSON path (default OUT_DIR/theory.json)")
    p.add_argument("--out-png", type=Path, help="figure path (default OUT_DIR/theory.png)")
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


def _print_table(result: dict) -> None:
    """Mean over seeds of ID/OOD error per eps and method."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="theory: mean over seeds (expected squared error)")
    for col in ("eps", "method", "ID error", "OOD error", "feature change on S", "off S", "train MSE"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for (eps, method), st in summarise(result).items():
        table.add_row(
            f"{eps:g}", method, f"{st['id_error']:.2e}", f"{st['ood_error']:.2e}",
            f"{st['feature_change_in_span']:.2e}", f"{st['feature_change_orthogonal']:.1e}",
            f"{st['train_mse_max']:.1e}",
        )
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Simulate, write JSON (and the figure), print a summary table."""
    settings = TheorySettings(
        eps=tuple(args.eps), seeds=args.seeds, d=args.d, k=args.k, m=args.m, n=args.n,
        steps=args.steps, lr=args.lr, methods=tuple(dict.fromkeys(args.methods)),
        v_star_norm=args.v_star_norm, head_scale=args.head_scale, base_seed=args.seed,
    )
    start = time.perf_counter()
    result = simulate(settings, progress=True)
    out_json = args.out_json or args.out_dir / "theory.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    logger.info("wrote %d runs to %s", len(result["runs"]), out_json)
    if not args.no_plot:
        from lpft.theory.plot import plot_theory

        logger.info("wrote figure %s", plot_theory(result, args.out_png or args.out_dir / "theory.png"))
    _print_table(result)
    logger.info("theory sweep took %.1f s", time.perf_counter() - start)
    return 0

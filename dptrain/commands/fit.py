"""`dptrain fit RESULTS.csv [MORE.csv ...] --out LAW.json`: fit the DP scaling law every way, with
holdout checks."""
from __future__ import annotations

from dptrain.scaling import LAW_METHODS


def register(sub) -> None:
    parser = sub.add_parser("fit", help="fit a DP scaling law L(M, T, sigma_bar) to sweep results")
    parser.add_argument("results", nargs="+", help="sweep results CSV(s), fitted together")
    parser.add_argument("--out", required=True, help="law JSON to write")
    parser.add_argument("--holdout", default="0.2,largest-model,late",
                        help="comma-separated rules holding out runs to measure prediction error: a "
                             "fraction (random runs), 'largest-model', 'longest', 'late' (each run "
                             "fitted on its first half, predicted at its end; for sweeps with a "
                             "constant learning rate) or 'none' (default 0.2,largest-model,late)")
    parser.add_argument("--params", choices=["total", "nonembed"], default="total",
                        help="which parameter count M means (default total)")
    parser.add_argument("--default", choices=LAW_METHODS, default=None,
                        help="method the planner uses by default (default: the lowest worst holdout error)")
    parser.add_argument("--bootstrap", type=int, default=100, metavar="N",
                        help="parametric refits on resampled runs, for prediction intervals "
                             "(default 100; 0 for none)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.errors import UserError
    from dptrain.scaling.fit import fit_all
    from dptrain.scaling.law import VALIDATION_BAR, save_laws
    from dptrain.scaling.results import read_results

    runs = [run for path in args.results for run in read_results(path)]
    if len({r.run_id for r in runs}) < len(runs):
        raise UserError("the results files share run ids: a run may be fitted only once")
    rules = [] if args.holdout == "none" else [r.strip() for r in args.holdout.split(",") if r.strip()]
    if args.bootstrap < 0:
        raise UserError("--bootstrap must be 0 or more")
    laws = fit_all(runs, rules, args.params, bootstrap=args.bootstrap)
    # with no holdout, the paper's form; else the method whose worst rule errs least
    default = args.default or ("parametric" if not rules else min(laws, key=lambda k: laws[k].worst_holdout_error()))
    if default not in laws:
        raise UserError(f"--default {default}: not fitted (parametric-batch needs runs at two batch sizes)")
    save_laws(args.out, laws, default)
    v = next(iter(laws.values())).validity
    print(f"{len(runs)} runs; M {v['M'][0]:.3g}..{v['M'][1]:.3g}, T {v['T'][0]:.3g}..{v['T'][1]:.3g}, "
          f"sigma_bar {v['sigma_bar'][0]:.3g}..{v['sigma_bar'][1]:.3g}, batch {v['batch'][0]:.3g}..{v['batch'][1]:.3g}")
    for name, law in laws.items():
        errs = "; ".join(f"{rule} ({len(h['runs'])} runs): {h['mean_abs_rel_error']:.2%} mean, "
                         f"{h['max_abs_rel_error']:.2%} max" for rule, h in law.holdout.items()) or "no holdout"
        print(f"{name:17s} {errs}{'  [default]' if name == default else ''}")
    if not laws[default].validated():
        print(f"not validated: the {default} law does not predict both a larger model ('largest-model') "
              f"and longer runs ('late' or 'longest') within {VALIDATION_BAR:.0%}; do not ship it")
    print(f"wrote {args.out}")
    return 0

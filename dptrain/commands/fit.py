"""`dptrain fit RESULTS.csv --out LAW.json`: fit the DP scaling law both ways, with a holdout check."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("fit", help="fit a DP scaling law L(M, T, sigma_bar) to sweep results")
    parser.add_argument("results", help="sweep results CSV")
    parser.add_argument("--out", required=True, help="law JSON to write")
    parser.add_argument("--holdout", default="0.2",
                        help="runs held out to measure prediction error: a fraction (random runs), "
                             "'largest-model', 'longest' or 'none' (default 0.2)")
    parser.add_argument("--params", choices=["total", "nonembed"], default="total",
                        help="which parameter count M means (default total)")
    parser.add_argument("--default", choices=["parametric", "semiparametric"], default=None,
                        help="method the planner uses by default (default: lower holdout error)")
    parser.add_argument("--bootstrap", type=int, default=100, metavar="N",
                        help="parametric refits on resampled runs, for prediction intervals "
                             "(default 100; 0 for none)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.errors import UserError
    from dptrain.scaling.fit import fit_all
    from dptrain.scaling.law import save_laws
    from dptrain.scaling.results import read_results

    runs = read_results(args.results)
    holdout = None if args.holdout == "none" else args.holdout
    if args.bootstrap < 0:
        raise UserError("--bootstrap must be 0 or more")
    laws = fit_all(runs, holdout, args.params, bootstrap=args.bootstrap)
    default = args.default or min(
        laws, key=lambda k: laws[k].holdout.get("mean_abs_rel_error", 0 if k == "parametric" else 1))
    save_laws(args.out, laws, default)
    v = next(iter(laws.values())).validity
    print(f"{len(runs)} runs; M {v['M'][0]:.3g}..{v['M'][1]:.3g}, T {v['T'][0]:.3g}..{v['T'][1]:.3g}, "
          f"sigma_bar {v['sigma_bar'][0]:.3g}..{v['sigma_bar'][1]:.3g}")
    for name, law in laws.items():
        h = law.holdout
        err = (f"holdout ({len(h['runs'])} runs, {h['rule']}): mean abs rel error "
               f"{h['mean_abs_rel_error']:.2%}, max {h['max_abs_rel_error']:.2%}") if h else "no holdout"
        print(f"{name:15s} {err}{'  [default]' if name == default else ''}")
    print(f"wrote {args.out}")
    return 0

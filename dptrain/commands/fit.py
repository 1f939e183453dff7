"""`dptrain fit RESULTS.csv [MORE.csv ...] --out LAW.json`: fit the DP scaling law every way, with
holdout checks."""
from __future__ import annotations

from dptrain.scaling import LAW_METHODS


def register(sub) -> None:
    parser = sub.add_parser("fit", help="fit a DP scaling law L(M, T, sigma_bar) to sweep results")
    parser.add_argument("results", nargs="+",
                        help="sweep results CSV(s) and/or run folders (a finished run's folder, or any folder "
                             "above them: every result.json under it), fitted together")
    parser.add_argument("--out", required=True, help="law JSON to write")
    parser.add_argument("--holdout", default="0.2,largest-model,late",
                        help="comma-separated rules holding out runs to measure prediction error: a "
                             "fraction (random runs), 'largest-model', 'longest', 'late' (each run "
                             "fitted on its first half, predicted at its end; for sweeps with a "
                             "constant learning rate) or 'none' (default 0.2,largest-model,late)")
    parser.add_argument("--params", choices=["total", "nonembed"], default="total",
                        help="which parameter count M means (default total)")
    parser.add_argument("--default", choices=LAW_METHODS, default=None,
                        help="method the planner uses by default (default: the lowest leave-one-cell-out "
                             "error; with --no-calibration, the lowest worst holdout error)")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="parametric refits on resampled runs, kept in the file as the spread of "
                             "the coefficients (default 0: the prediction interval is calibrated on "
                             "held-out cells instead)")
    parser.add_argument("--no-calibration", dest="calibration", action="store_false",
                        help="skip the leave-one-cell-out and leave-one-size-out refits (one fit per "
                             "cell and per size and method): no errors for them and no prediction interval")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to fit (default: every one the runs can inform)")
    parser.add_argument("--spec", action="append", default=[], metavar="SPEC.yaml",
                        help="sweep spec the results came from (repeatable): records the optimizer, "
                             "schedule, learning rate and clip norm the law holds for")
    parser.add_argument("--data", metavar="PREPARED",
                        help="the sweep's prepared data folder: records its corpus fingerprint, tokenizer "
                             "and sequence length (default: a spec's data folder, where it exists here)")
    parser.add_argument("--corpus", metavar="NAME", help="a name for the sweep's corpus, recorded in the law")
    parser.set_defaults(func=run)


def _errors(what: str, e: dict, unit: str) -> str:
    if e.get("mean_abs_rel_error") is None:
        return f"{what}: none could be refitted"
    skipped = f", {len(e['skipped'])} skipped" if e.get("skipped") else ""
    return (f"{what} ({e['groups']} {unit}{skipped}): {e['mean_abs_rel_error']:.2%} mean, "
            f"{e['max_abs_rel_error']:.2%} max")


def describe_calibration(law) -> str:
    """One line: leave-one-cell-out and leave-one-size-out errors, seed spread, interval factors."""
    c = law.calibration
    seed = (f"seed spread {c['seed_spread']:.2%} ({c['seed_groups']} groups of runs differing only in seed)"
            if c.get("seed_spread") is not None else "seed spread not measured (no runs differ only in seed)")
    factors = (f"90% interval x{c['factors'][0]:.4f}..x{c['factors'][1]:.4f}" if c.get("factors")
               else "no interval")
    return "; ".join([_errors("leave-one-cell-out", law.leave_one_cell_out, "cells"),
                      _errors("leave-one-size-out", law.leave_one_size_out, "sizes"), seed, factors])


def describe_skipped(laws: dict) -> list[str]:
    """One line per skipped holdout rule and reason, naming the methods where not all."""
    by_reason: dict[tuple, list[str]] = {}
    for name, law in laws.items():
        for rule, why in law.skipped_holdouts.items():
            by_reason.setdefault((rule, why), []).append(name)
    return [f"skipped holdout {rule!r}" + ("" if len(names) == len(laws) else f" for {', '.join(names)}")
            + f": {why}" for (rule, why), names in by_reason.items()]


def describe_choice(choice: dict, calibration: bool = True) -> list[str]:
    """How the default method was chosen, and the nested estimate of that choice's error."""
    per = choice.get("per_method")
    if choice["rule"] == "worst holdout rule":
        why = "no cell could be refitted" if calibration else "--no-calibration"
        return [f"default {choice['chosen']}: the lowest worst holdout error (no leave-one-cell-out errors: {why}); "
                "measured on the holdouts printed above, so it flatters the choice"]
    if choice["rule"] == "none measured":
        return [f"default {choice['chosen']}: no holdout or leave-one-cell-out error to choose on"]
    lines = []
    if per:
        ranked = sorted(per, key=lambda k: per[k]["mean_abs_rel_error"])
        lines.append(f"leave-one-cell-out mean error on the {choice['cells']} cells every method predicted: "
                     + ", ".join(f"{k} {per[k]['mean_abs_rel_error']:.2%}" for k in ranked))
    if choice["rule"] == "given (--default)":
        lines.append(f"default {choice['chosen']}: given (--default)"
                     + (f"; the lowest leave-one-cell-out error is {choice['lowest']}'s" if per else ""))
    else:
        lines.append(f"default {choice['chosen']}: the lowest leave-one-cell-out mean error")
    nested = choice.get("nested")
    if nested:
        picks = ", ".join(f"{k} {v}" for k, v in nested["inner_choices"].items())
        lines.append(f"nested leave-one-cell-out error of the method choice: {nested['mean_abs_rel_error']:.2%} "
                     f"mean, {nested['max_abs_rel_error']:.2%} max (each cell scored with the method chosen "
                     f"on the other cells: {picks}; their residuals come from fits that saw it)")
    return lines


def describe_shape(law) -> list[str]:
    """The epsilon-shape verdict of `law` at a few budgets inside its compute range."""
    from dptrain.scaling.plan import shape_in_range

    shapes, setting = shape_in_range(law)
    if not shapes:
        return []
    n = f"N {setting['data_size']:,}" + ("" if setting["data_size_known"]
                                          else " (assumed: the law records no corpus size)")
    eps = ", ".join(f"{r.epsilon:g}" for r in shapes[0].rows)
    return ([f"epsilon shape of the {law.method} law (eps {eps}; {n}, delta {setting['delta']:g}, "
             f"seq len {setting['seq_len']}; does a tighter epsilon plan a larger model?):"]
            + [f"  compute {s.compute:.3g}: {s.describe()}" for s in shapes])


def run(args) -> int:
    from dptrain.errors import UserError
    from dptrain.scaling.fit import applicable_methods, check_rule, default_method, fit_all
    from dptrain.scaling.law import VALIDATION_BAR, save_laws
    from dptrain.scaling.provenance import describe, fit_provenance
    from dptrain.scaling.results import best_learning_rates, collect_results

    runs = collect_results(args.results)
    if len({r.run_id for r in runs}) < len(runs):
        raise UserError("the results share run ids (a run in two files, or a CSV and its run folders): "
                        "a run may be fitted only once")
    runs, learning_rates = best_learning_rates(runs)  # a sweep over rates: each cell's best
    rules = [] if args.holdout == "none" else [r.strip() for r in args.holdout.split(",") if r.strip()]
    for rule in rules:  # a misspelled rule is an error before any fit
        check_rule(rule)
    if args.bootstrap < 0:
        raise UserError("--bootstrap must be 0 or more")
    methods = None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        wrong = [m for m in methods if m not in LAW_METHODS]
        if wrong or not methods:
            raise UserError(f"--methods {args.methods}: expected some of {', '.join(LAW_METHODS)}")
        unfit = [m for m in methods if m not in applicable_methods(runs)]
        if unfit:
            raise UserError(f"--methods: {', '.join(unfit)} needs runs at two batch sizes")
    fitted_on = fit_provenance(runs, args.results, args.spec, args.data, args.corpus, learning_rates)
    if learning_rates:
        print(f"learning rates {', '.join(f'{x:g}' for x in learning_rates['grid'])}: each cell's best kept "
              f"({len(runs)} runs once folded, one per cell and seed)")
    laws = fit_all(runs, rules, args.params, methods=methods, bootstrap=args.bootstrap,
                   calibration=args.calibration)
    if args.default is not None and args.default not in laws:
        raise UserError(f"--default {args.default}: not fitted (parametric-batch needs runs at two batch sizes)")
    default, choice = default_method(laws, args.default)
    save_laws(args.out, laws, default, fitted_on, choice)
    v = next(iter(laws.values())).validity
    print(f"{len(runs)} runs; M {v['M'][0]:.3g}..{v['M'][1]:.3g}, T {v['T'][0]:.3g}..{v['T'][1]:.3g}, "
          f"sigma_bar {v['sigma_bar'][0]:.3g}..{v['sigma_bar'][1]:.3g}, batch {v['batch'][0]:.3g}..{v['batch'][1]:.3g}")
    print(f"fitted on: {describe(fitted_on)}")
    c = fitted_on["compute"]
    print(f"compute: {c['per_run'][0]:.3g}..{c['per_run'][1]:.3g} FLOPs per run, {c['total']:.3g} in all "
          "(6 M B S T, hardware-independent)")
    for name, law in laws.items():
        errs = "; ".join(f"{rule} ({len(h['runs'])} runs): {h['mean_abs_rel_error']:.2%} mean, "
                         f"{h['max_abs_rel_error']:.2%} max" for rule, h in law.holdout.items()) or "no holdout"
        print(f"{name:17s} {errs}{'  [default]' if name == default else ''}")
        if law.calibration:
            print(f"{'':17s} {describe_calibration(law)}")
    for line in describe_skipped(laws) + describe_choice(choice, args.calibration):
        print(line)
    if rules and not laws[default].holdout:
        print(f"not validated: every holdout rule was skipped for the {default} law, so nothing measured "
              "whether it predicts a larger model or longer runs; do not ship it")
    elif not laws[default].validated():
        print(f"not validated: the {default} law does not predict both a larger model ('largest-model') "
              f"and longer runs ('late' or 'longest') within {VALIDATION_BAR:.0%}; do not ship it")
    laws[default].fitted_on = fitted_on
    for line in describe_shape(laws[default]):
        print(line)
    print(f"wrote {args.out}")
    return 0

"""`dptrain plan`: the compute-optimal (model size, batch, steps, noise) for a privacy budget."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict

from dptrain.scaling import LAW_METHODS


def law_holdout_summary(law) -> dict:
    return {rule: {"mean_abs_rel_error": h["mean_abs_rel_error"], "max_abs_rel_error": h["max_abs_rel_error"]}
            for rule, h in law.holdout.items()}


def describe_holdout(law) -> str:
    parts = [f"{rule} {h['mean_abs_rel_error']:.1%}" for rule, h in law.holdout.items()]
    for name, e in (("leave-one-cell-out", law.leave_one_cell_out), ("leave-one-size-out", law.leave_one_size_out)):
        if e.get("mean_abs_rel_error") is not None:
            parts.append(f"{name} {e['mean_abs_rel_error']:.1%} (max {e['max_abs_rel_error']:.1%})")
    return ", ".join(parts) or "none recorded"


def leave_out_summary(e: dict) -> dict | None:
    return {k: e[k] for k in ("mean_abs_rel_error", "max_abs_rel_error", "groups")} if e else None


def register(sub) -> None:
    parser = sub.add_parser("plan", help="choose model size, batch size and steps for a compute "
                                         "and privacy budget with a scaling law")
    parser.add_argument("--compute", type=float, required=True, help="FLOPs, C = 6 M B S T")
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--delta", type=float, required=True)
    parser.add_argument("--data-size", type=int, required=True,
                        help="training examples N: sequences, or documents / groups with --unit")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: that of --data, else 1024)")
    parser.add_argument("--data", metavar="PREPARED",
                        help="your prepared data: its corpus fingerprint, vocabulary and sequence length "
                             "are checked against what the law was fitted on")
    parser.add_argument("--unit", choices=["sequence", "document", "group"], default="sequence",
                        help="privacy unit: the batch then counts units, each of up to "
                             "--sequences-per-unit sequences")
    parser.add_argument("--sequences-per-unit", type=int, default=1, metavar="K",
                        help="k = privacy.max_sequences_per_unit (document or group units)")
    parser.add_argument("--law", default=None,
                        help="law JSON from `dptrain fit` (default: the law shipped with dptrain)")
    parser.add_argument("--method", choices=LAW_METHODS, default=None,
                        help="which law in the file (default: the file's default)")
    parser.add_argument("--top", type=int, default=5, help="rows to show (default 5)")
    parser.add_argument("--min-params", type=float, default=None,
                        help="smallest model searched (default: the smallest the law was fitted on; "
                             "a plan on that bound is flagged, since a smaller model may do better)")
    parser.add_argument("--max-params", type=float, default=1e12)
    parser.add_argument("--max-steps", type=float, default=1e7, help="largest T searched (default 1e7)")
    parser.add_argument("--max-batch", type=float, default=None,
                        help="largest expected batch B searched (default: the data size)")
    parser.add_argument("--allow-extrapolation", action="store_true",
                        help="show a best plan lying more than 3x outside the law's fitted range "
                             "(refused by default: its loss is a guess)")
    parser.add_argument("--confirm-pld", action="store_true",
                        help="recalibrate the best plan's sigma with the PLD accountant, the one "
                             "the trainer uses (a few seconds; always done with --write-config)")
    parser.add_argument("--mechanism", choices=("dpsgd", "bandmf", "blt"), default="dpsgd",
                        help="the written config's privacy.mechanism (the law predicts DP-SGD's loss)")
    parser.add_argument("--check-shape", action="store_true",
                        help="also plan at other epsilons (same compute and search) and check that a tighter "
                             "epsilon never plans a larger model, as McKenna et al. 2025 find")
    parser.add_argument("--shape-epsilons", default=None, metavar="E,...",
                        help="the epsilons of --check-shape (default: epsilon x 1/4, 1/2, 1, 2, 4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--write-config", metavar="FILE",
                        help="write a `dptrain train` config for the best plan")
    parser.add_argument("--data-path", metavar="DIR",
                        help="prepared data folder for --write-config (needed with it unless --data "
                             "names it; if it exists, its training split must hold --data-size sequences)")
    parser.add_argument("--plot-dir", metavar="DIR", help="write planner figures (PNG) here")
    parser.set_defaults(func=run)


def shape_epsilons(args) -> list[float]:
    """The epsilons of --check-shape: --shape-epsilons, else the plan's epsilon x 1/4 .. 4."""
    from dptrain.errors import UserError

    if args.shape_epsilons is None:
        return [args.epsilon * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    try:
        values = [float(e) for e in args.shape_epsilons.split(",") if e.strip()]
    except ValueError:
        values = []
    if len(values) < 2 or not all(math.isfinite(e) and e > 0 for e in values):
        raise UserError(f"--shape-epsilons {args.shape_epsilons}: expected two or more finite epsilons > 0, "
                        "comma-separated")
    return values


def print_shape(shape) -> None:
    print(f"epsilon shape at compute {shape.compute:.3g} (same search; does a tighter epsilon plan a larger model?)")
    print(f"{'epsilon':>8} {'params M':>10} {'batch':>7} {'steps':>9} {'sigma_bar':>10} {'loss':>7} "
          f"{'outside':>8}  optimum")
    for r in shape.rows:
        if r.params is None:
            print(f"{r.epsilon:8g} {'-':>10}  no plan: {r.error}")
            continue
        print(f"{r.epsilon:8g} {r.params:10.3g} {r.batch_size:7d} {r.steps:9d} {r.sigma_bar:10.3g} {r.loss:7.4f} "
              f"{(f'{r.outside:.3g}x' if r.outside > 1 else 'inside'):>8}  "
              + ("interior" if r.interior else f"on bound: {', '.join(r.edges)}"))
    print(f"epsilon shape: {shape.describe()}")


def check_numbers(args) -> None:
    """UserError, before any search or write, for a budget no private plan can have."""
    from dptrain.errors import UserError

    for name in ("compute", "min_params", "max_params", "max_steps", "max_batch"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value:g}")
    if args.seq_len < 1 or args.data_size < 1:
        raise UserError("--seq-len and --data-size must be at least 1")
    if math.isinf(args.epsilon):
        raise UserError("epsilon inf is no privacy guarantee: `dptrain plan` plans private runs; "
                        "give a finite epsilon (the non-private optimum is the Chinchilla rule, "
                        "about sqrt(compute / 120) parameters)")
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise UserError(f"epsilon must be a finite number > 0, got {args.epsilon:g}")
    if not 0 < args.delta < 1:
        raise UserError(f"delta must be in (0, 1), got {args.delta:g}")
    if args.delta >= 1 / args.data_size:
        raise UserError(f"delta {args.delta:g} >= 1/N = {1 / args.data_size:.3g} (N = "
                        f"{args.data_size:,} {args.unit}s): publishing one {args.unit} outright "
                        "at random meets it; use delta well below 1/N")
    if args.min_params is not None and args.min_params > args.max_params:
        raise UserError(f"--min-params {args.min_params:g} is above --max-params {args.max_params:g}")


def run(args) -> int:
    from dptrain.errors import UserError
    from dptrain.scaling.law import VALIDATION_BAR, load_law
    from dptrain.scaling.plan import (MAX_EXTRAPOLATION, SATURATION_GAIN, SHIPPED_LAW, check_planned_data,
                                      chinchilla_params, describe_extrapolation, epsilon_shape, plan,
                                      saturation, with_pld_sigma, write_training_config)
    from dptrain.scaling.provenance import check_against, data_facts, describe

    if args.top < 1:
        raise UserError("--top must be at least 1")
    if args.data is not None:
        yours = data_facts(args.data)
        args.seq_len = yours["seq_len"] if args.seq_len is None else args.seq_len
        args.data_path = args.data if args.data_path is None else args.data_path
    args.seq_len = 1024 if args.seq_len is None else args.seq_len
    check_numbers(args)
    epsilons = shape_epsilons(args) if args.check_shape else []
    if args.sequences_per_unit < 1 or (args.unit == "sequence" and args.sequences_per_unit != 1):
        raise UserError("--sequences-per-unit must be at least 1, and 1 unless --unit is document or group")
    # A sampled unit costs k rows of seq-len tokens: the law sees it as one example of k * seq-len
    # tokens (it was fitted on sequences; the report says so).
    example_tokens = args.seq_len * args.sequences_per_unit
    if args.write_config and args.data_path is None:
        raise UserError("--write-config needs --data-path: the prepared data the plan's "
                        f"{args.data_size:,} sequences are (its sampling rate depends on them)")
    if args.write_config:
        check_planned_data(args.data_path, args.data_size, args.seq_len, args.unit)
    if args.law is None:
        if not SHIPPED_LAW.is_file():
            raise UserError("no scaling law ships with this version yet: fit one with "
                            "`dptrain fit RESULTS.csv --out LAW.json` and pass --law LAW.json")
        args.law = str(SHIPPED_LAW)
    law = load_law(args.law, args.method)
    # the law applies to one example of example_tokens; the data check reads --seq-len itself
    check = check_against(law.fitted_on, args.seq_len, args.data)
    if args.unit != "sequence" and check["matches"]:
        check = {**check, "matches": False, "differences": [
            f"planned in {args.unit}s of {example_tokens} tokens; the law was fitted on single sequences"]}
    usable = law.validated() and check["matches"]
    bounds = {"min_params": args.min_params, "max_params": args.max_params}
    budget = (args.epsilon, args.delta, args.data_size, example_tokens)
    if args.max_steps < 10 or (args.max_batch is not None and args.max_batch < 16):
        raise UserError("--max-steps must be at least 10 and --max-batch at least 16")
    search = {"max_steps": int(args.max_steps),
              "max_batch": None if args.max_batch is None else int(args.max_batch)}
    plans = plan(law, args.compute, *budget, top=args.top, **search, **bounds)
    v = law.validity
    fitted = (f"M {v['M'][0]:.3g}..{v['M'][1]:.3g}, T {v['T'][0]:.3g}..{v['T'][1]:.3g}, sigma_bar "
              f"{v['sigma_bar'][0]:.3g}..{v['sigma_bar'][1]:.3g}"
              + (f", batch {v['batch'][0]:.3g}..{v['batch'][1]:.3g}" if law.reads_batch else ""))
    if plans[0].extrapolation > MAX_EXTRAPOLATION and not args.allow_extrapolation:
        raise UserError(f"the best plan lies outside the law's fitted range ({fitted}) by up to "
                        f"{plans[0].extrapolation:.3g}x ({describe_extrapolation(plans[0])}); its loss "
                        "is a guess. Fit a law on runs nearer this budget, or pass --allow-extrapolation")
    if args.confirm_pld or args.write_config:  # a written config gets the trainer's own accountant's σ
        plans[0] = with_pld_sigma(law, plans[0], args.epsilon, args.delta, args.data_size)
    best = plans[0]
    outside = [p for p in plans if p.extrapolation > 1]
    if outside:
        print(f"warning: {len(outside)} of {len(plans)} plans lie outside the law's fitted range "
              f"({fitted}): their losses are extrapolated", file=sys.stderr)
    sat = saturation(law, args.compute, *budget, **search, **bounds)
    nonprivate = chinchilla_params(args.compute)
    shape = (epsilon_shape(law, args.compute, epsilons, args.delta, args.data_size, example_tokens,
                           **search, **bounds) if args.check_shape else None)

    if args.json:
        json.dump({"plans": [asdict(p) for p in plans], "law_method": law.method,
                   "law_validity": law.validity, "law_holdout": law_holdout_summary(law),
                   "law_validated": law.validated(),
                   "law_leave_one_cell_out": leave_out_summary(law.leave_one_cell_out),
                   "law_leave_one_size_out": leave_out_summary(law.leave_one_size_out),
                   "law_fitted_on": law.fitted_on,
                   "data_check": {"matches": check["matches"], "differences": check["differences"]},
                   "validated_for_this_plan": usable,
                   "saturation": [{"compute": c, "best_loss": l, "gain": None if math.isnan(g) else g}
                                  for c, l, g in sat],
                   "nonprivate_params_chinchilla": nonprivate,
                   **({"epsilon_shape": shape.to_dict()} if shape else {})}, sys.stdout, indent=1)
        print()
    else:
        print(f"compute {args.compute:.3g} FLOPs, eps {args.epsilon:g}, delta {args.delta:g}, "
              f"N {args.data_size:,} {args.unit}s, seq len {args.seq_len}; law: {law.method} ({args.law})")
        if args.unit != "sequence":
            print(f"planned in {args.unit}s: batch = expected {args.unit}s per step, each up to "
                  f"{args.sequences_per_unit} sequences ({example_tokens} tokens); the law was fitted on "
                  f"sequence-level runs and is applied to a {args.unit} as one example of {example_tokens} "
                  "tokens, which no fitted run checks")
        head = (f"{'params M':>10} {'config':>14} {'batch':>9} {'steps':>9} {'sigma':>8} "
                f"{'sigma_bar':>10} {'tok/param':>10} {'compute':>9} {'loss':>7} {'90% interval':>15} "
                f"{'outside':>8}")
        print(head)
        for p in plans:
            print(f"{p.params:10.3g} {p.nearest_config + f' ({p.nearest_params:.2g})':>14} "
                  f"{p.batch_size:9d} {p.steps:9d} {p.sigma:8.4g} {p.sigma_bar:10.3g} "
                  f"{p.tokens_per_param:10.3g} {p.compute:9.3g} {p.loss:7.4f} "
                  f"{(f'{p.interval[0]:.3f}..{p.interval[1]:.3f}' if p.interval else '-'):>15} "
                  f"{(f'{p.extrapolation:.3g}x' if p.extrapolation > 1 else 'inside'):>8}"
                  + (f"  [on bound: {', '.join(p.edges)}]" if p.edges else ""))
        print(f"best: {describe_extrapolation(best)}")
        print(f"law fitted on {fitted}")
        print(f"law fitted on: {describe(law.fitted_on)}")
        for line in check["differences"]:
            print(f"data check: {line}")
        if check["matches"]:
            print("data check: your data is the law's corpus, at its sequence length")
        print(f"law holdout errors (mean): {describe_holdout(law)}"
              + ("" if law.validated() else f"; NOT validated to {VALIDATION_BAR:.0%} on a larger model and "
                 "longer runs: treat the predicted losses as rough"))
        print(f"sigma from the {best.accountant.upper()} accountant"
              + ("" if best.accountant == "pld" else " (an upper bound; --confirm-pld tightens it)"))
        print(f"non-private optimum (Chinchilla rule): {nonprivate:.3g} params, "
              f"{nonprivate / best.params:.3g}x the private one")
        print("best loss by compute: " + ", ".join(f"{c:.2g}: {l:.4f}" for c, l, _ in sat))
        here = next((g for c, _, g in sat if c > args.compute), None)
        if here is not None and here < SATURATION_GAIN:
            print(f"saturated: 10x more compute improves the predicted loss by {here:.2%} "
                  f"(< {SATURATION_GAIN:.0%}); more data or a larger epsilon is what helps")
        elif here is not None:
            print(f"not saturated: 10x more compute improves the predicted loss by {here:.2%}")
        if shape:
            print_shape(shape)
    if args.write_config:
        write_training_config(args.write_config, best, args.epsilon, args.delta, args.seq_len,
                              args.data_path, unit=args.unit, sequences_per_unit=args.sequences_per_unit,
                              mechanism=args.mechanism,
                              notes=[f"law {law.method}, holdout errors (mean): {describe_holdout(law)}; "
                                     + ("validated, on data that is the law's corpus at its sequence length"
                                        if usable else "not validated for this plan"
                                        + ("" if law.validated() else ": the law fails its own holdout bar"))]
                              + [f"data check: {line}" for line in check["differences"]]
                              + [f"law fitted on: {describe(law.fitted_on)}"],
                              fitted_on=law.fitted_on)
        print(f"wrote {args.write_config}", file=sys.stderr if args.json else sys.stdout)
    if args.plot_dir:
        from dptrain.scaling.plots import plot_planner

        computes = [args.compute * 10.0 ** (k / 2) for k in range(-4, 7)]
        epsilons = sorted({args.epsilon, *(e for e in (1.0, 2.0, 8.0))})
        paths = plot_planner(law, args.plot_dir, computes, epsilons, args.delta, args.data_size,
                             example_tokens)
        print("wrote " + ", ".join(map(str, paths)), file=sys.stderr if args.json else sys.stdout)
    return 0

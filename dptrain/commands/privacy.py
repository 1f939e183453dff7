"""`dptrain privacy epsilon|noise`: the (epsilon, delta) of a DP-SGD, BandMF or BLT run, or the noise for a budget.

`--mechanism bandmf --bands b`: amplified BandMF with cyclic Poisson sampling at overall rate q,
accounted as ⌈steps / b⌉ subsampled Gaussian rounds at rate b·q (dptrain.privacy.bandmf).
`--mechanism blt [--buffers d]`: BLT over P = 1/q parts taken in turn, the strategy optimised as a
training run would, accounted as the Gaussian mechanism at σ / sensitivity (dptrain.privacy.blt).

The default accountant, pld, is a certified upper bound; prv's figure is printed as an estimate.
"""
from __future__ import annotations

import json
import math
import sys

ACCOUNTANT_CHOICES = ("pld", "rdp", "prv", "all")
# Outside this range the accountants' arithmetic under- or overflows; epsilon there is either
# astronomically large (tiny sigma) or pinned at the accountants' resolution (huge sigma).
SIGMA_RANGE = (1e-3, 1e6)
# Publishing each example outright with probability delta is (0, delta)-DP: a delta this large
# allows releasing a tenth of the data, so no epsilon at it means anything.
MEANINGLESS_DELTA = 0.1


def register(sub) -> None:
    parser = sub.add_parser("privacy", help="privacy accounting of DP-SGD and BandMF runs")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    eps = actions.add_parser("epsilon", help="epsilon spent by a run (Poisson-subsampled Gaussian)")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="sigma (noise std / clip)")
    _common(eps)
    eps.set_defaults(func=run_epsilon)

    noise = actions.add_parser("noise", help="smallest noise multiplier that meets a budget")
    noise.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    _common(noise)
    noise.set_defaults(func=run_noise)


def _common(parser) -> None:
    parser.add_argument("--sampling-rate", type=float, required=True, help="q = expected batch / N")
    parser.add_argument("--steps", type=int, required=True, help="number of noisy steps")
    parser.add_argument("--delta", type=float, required=True)
    parser.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default="pld")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="truncated Poisson sampling: largest batch kept (needs --dataset-size)")
    parser.add_argument("--dataset-size", type=int, default=None, help="number of examples")
    parser.add_argument("--mechanism", choices=("dpsgd", "bandmf", "blt"), default="dpsgd",
                        help="dpsgd: independent noise; bandmf: banded correlated noise, cyclic Poisson sampling; "
                             "blt: buffered correlated noise, 1/q parts in turn, no amplification")
    parser.add_argument("--bands", type=int, default=None, help="bandmf's bands b (b·q <= 1)")
    parser.add_argument("--buffers", type=int, default=None, help="blt's buffers d (default: chosen, at most 4; 0: "
                        "C⁻¹ = I − λS, the noise regenerated from its streams)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _events(args) -> tuple[float, int, float]:
    """(rate, count, sensitivity) the accountants compose at σ / sensitivity: DP-SGD's q and steps,
    BandMF's rounds, or BLT's one Gaussian."""
    from dptrain.errors import UserError
    from dptrain.privacy import blt
    from dptrain.privacy.bandmf import accounted

    if args.buffers is not None and args.mechanism != "blt":
        raise UserError("--buffers applies to --mechanism blt only")
    if args.mechanism in ("bandmf", "blt") and not 0 < args.sampling_rate <= 1:
        raise UserError(f"sampling rate must be in (0, 1], got {args.sampling_rate:g}")
    if args.mechanism == "blt":
        if args.bands is not None or args.max_batch_size is not None or args.dataset_size is not None:
            raise UserError("--mechanism blt takes neither --bands nor truncated Poisson sampling")
        parts = blt.parts_for(args.sampling_rate, args.steps)
        strategy = (blt.optimize_blt(args.steps, parts, args.buffers) if args.buffers is not None
                    else blt.choose_buffers(args.steps, parts))
        return 1.0, 1, blt.sensitivity(strategy, parts, args.steps)
    if args.mechanism == "dpsgd":
        if args.bands is not None:
            raise UserError("--bands applies to --mechanism bandmf only")
        return args.sampling_rate, args.steps, 1.0
    if args.bands is None:
        raise UserError("--mechanism bandmf needs --bands (dptrain plan, or a training config, chooses them)")
    if args.max_batch_size is not None or args.dataset_size is not None:
        raise UserError("truncated Poisson sampling (--max-batch-size) is not supported with --mechanism bandmf")
    return (*accounted(args.bands, args.sampling_rate, args.steps), 1.0)


def _accountants(choice: str, truncated: bool) -> list[str]:
    from dptrain.errors import UserError

    if choice == "all":
        return ["pld"] if truncated else ["pld", "rdp", "prv"]
    if truncated and choice != "pld":
        raise UserError(f"the {choice} accountant cannot account truncated Poisson sampling; "
                        "use pld")
    return [choice]


def check_noise_multiplier(sigma: float) -> None:
    """UserError unless sigma is 0 (no noise) or inside SIGMA_RANGE."""
    from dptrain.errors import UserError

    lo, hi = SIGMA_RANGE
    if not (math.isfinite(sigma) and sigma >= 0):
        raise UserError(f"noise multiplier must be a finite number >= 0, got {sigma:g}")
    if not (sigma == 0 or lo <= sigma <= hi):
        raise UserError(f"noise multiplier {sigma:g} is outside [{lo:g}, {hi:g}] (or 0 for no noise): "
                        "below, epsilon is astronomically large; above, the accountants cannot "
                        "resolve it")


def check_delta(delta: float, dataset_size: int | None) -> None:
    """UserError for a delta outside (0, 1) or too large to mean anything; a warning on stderr
    for delta >= 1/N when the dataset size N is known."""
    from dptrain.errors import UserError

    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta:g}")
    if delta >= MEANINGLESS_DELTA:
        raise UserError(f"delta {delta:g} is no guarantee: publishing each example outright with "
                        f"probability {delta:g} meets it; use delta well below 1/N (the number "
                        "of examples), e.g. 1e-5 or smaller")
    if dataset_size and delta >= 1 / dataset_size:
        print(f"warning: delta {delta:g} >= 1/N = {1 / dataset_size:.3g} (N = {dataset_size:,}): "
              "publishing one example outright at random meets it; use delta well below 1/N",
              file=sys.stderr)


def run_epsilon(args) -> int:
    from dptrain.privacy.accounting import EstimateUnavailable, epsilon, is_upper_bound

    check_noise_multiplier(args.noise_multiplier)
    check_delta(args.delta, args.dataset_size)
    truncated = args.max_batch_size is not None or args.dataset_size is not None
    rate, count, sens = _events(args)
    results, declined = {}, []
    for a in _accountants(args.accountant, truncated):
        try:
            results[a] = epsilon(args.noise_multiplier / sens, rate, count, args.delta, a,
                                 dataset_size=args.dataset_size, max_batch_size=args.max_batch_size)
        except EstimateUnavailable as err:
            if args.accountant != "all":
                raise
            declined.append(str(err))
    if args.json:
        print(json.dumps({"noise_multiplier": args.noise_multiplier,
                          "sampling_rate": args.sampling_rate, "steps": args.steps,
                          "delta": args.delta, "dataset_size": args.dataset_size,
                          "max_batch_size": args.max_batch_size, "mechanism": args.mechanism,
                          "bands": args.bands, **_blt_fields(args, sens), "epsilon": results,
                          "upper_bounds": [a for a in results if is_upper_bound(a)]}))
    else:
        for name, value in results.items():
            kind = "upper bound" if is_upper_bound(name) else "estimate, not a guarantee"
            print(f"epsilon ({name}) = {value:.4f} at delta = {args.delta:g} ({kind})")
        if args.accountant == "all" and truncated:
            print("rdp, prv: not applicable to truncated Poisson sampling")
        for reason in declined:
            print(reason)
    return 0


def _blt_fields(args, sens: float) -> dict:
    return {} if args.mechanism != "blt" else {"sensitivity": sens}


def run_noise(args) -> int:
    from dptrain.privacy.accounting import calibrate_noise

    check_delta(args.delta, args.dataset_size)
    truncated = args.max_batch_size is not None or args.dataset_size is not None
    rate, count, sens = _events(args)
    results = {a: sens * calibrate_noise(args.epsilon, args.delta, rate, count, a,
                                         dataset_size=args.dataset_size,
                                         max_batch_size=args.max_batch_size)
               for a in _accountants(args.accountant, truncated)}
    if args.json:
        print(json.dumps({"epsilon": args.epsilon, "delta": args.delta,
                          "sampling_rate": args.sampling_rate, "steps": args.steps,
                          "dataset_size": args.dataset_size,
                          "max_batch_size": args.max_batch_size, "mechanism": args.mechanism,
                          "bands": args.bands, **_blt_fields(args, sens), "noise_multiplier": results}))
    else:
        for name, value in results.items():
            print(f"noise multiplier ({name}) = {value:.4f} for epsilon <= {args.epsilon:g} "
                  f"at delta = {args.delta:g}")
    return 0

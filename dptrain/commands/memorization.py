"""`dptrain memorization CHECKPOINT`: the extraction test and planted-secret exposure of a trained model."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("memorization", help="extraction test and secret exposure of a checkpoint")
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/step-*) or a run folder (latest one)")
    parser.add_argument("--data", default=None,
                        help="prepared folder it was trained on (default: from the checkpoint's train_config.yaml)")
    parser.add_argument("--num-sequences", type=int, default=200, help="training sequences to test (default 200)")
    parser.add_argument("--prefix-len", type=int, default=50)
    parser.add_argument("--suffix-len", type=int, default=50)
    parser.add_argument("--references", type=int, default=1000,
                        help="reference secrets per planted secret for exposure (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="which sequences and references are drawn")
    parser.add_argument("--out", default=None,
                        help="folder for the results, made owner-only: they are private "
                             "(default: <run>/private/memorization/<step-*>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.audit.extraction import FIGURE_FILES, REPORT_FILE, SUMMARY_FILE, run_memorization
    from dptrain.errors import UserError

    if args.num_sequences <= 0 or args.references <= 0:
        raise UserError("--num-sequences and --references must be positive")
    report = run_memorization(args.checkpoint, data=args.data, num_sequences=args.num_sequences,
                              prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                              num_references=args.references, seed=args.seed, out=args.out,
                              progress=not args.no_progress)
    # The results come from training sequences without noise: say where they are, print none of them.
    figures = [name for name in FIGURE_FILES if name in report["figures"].values()]
    print(f"written, private (owner-only, computed from training data without noise): {REPORT_FILE}, "
          f"{SUMMARY_FILE} (summary), {', '.join(figures)} in {report['folder']}; "
          "nothing was added to privacy_report.json")
    return 0

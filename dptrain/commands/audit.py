"""`dptrain audit CONFIG [key=value ...]`: one training run with canaries, and an audited lower bound on ε."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser("audit", help="train once with fair-coin canaries and bound epsilon from below")
    parser.add_argument("config", help="training config YAML (as for `dptrain train`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    parser.add_argument("--significance", type=float, default=0.05)
    parser.add_argument("--scorers", default="loss,gradient",
                        help="comma-separated: loss (final model), gradient (alignment with the update)")
    parser.add_argument("--out-dir", default=None,
                        help="run folder (default: the config's out_dir with '-audit' appended)")
    parser.add_argument("--seed", type=int, default=None,
                        help="fix canaries and coins (tests only: a real audit uses fresh OS entropy)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.audit.pipeline import SCORERS, finish_audit, keep_initial_weights, prepare_audit, summary
    from dptrain.errors import UserError
    from dptrain.train.config import load_train_config
    from dptrain.train.trainer import Trainer

    scorers = tuple(s.strip() for s in args.scorers.split(",") if s.strip())
    unknown = set(scorers) - set(SCORERS)
    if unknown or not scorers:
        raise UserError(f"--scorers must name some of {', '.join(SCORERS)}, got {args.scorers!r}")
    if args.canaries < 2:
        raise UserError(f"--canaries must be at least 2, got {args.canaries}")
    if not 0 < args.significance < 1:
        raise UserError(f"--significance must lie in (0, 1), got {args.significance}")
    cfg = load_train_config(args.config, args.overrides)
    cfg.out_dir = args.out_dir or f"{cfg.out_dir.rstrip('/')}-audit"
    setup = prepare_audit(cfg, args.canaries, seed=args.seed)
    trainer = Trainer(setup.cfg, config_dir=Path(args.config).parent)
    initial = keep_initial_weights(trainer, setup)
    trainer.fit()
    report = finish_audit(trainer, setup, initial, significance=args.significance, scorers=scorers,
                          progress=setup.cfg.logging.progress)
    print(summary(report))
    print(f"run folder: {trainer.out_dir} (audit_report.json, audit_scores_*.png, epsilon_by_step.png, "
          "privacy_report.json)")
    print(f"kept private (owner-only, never share): {', '.join(report['kept_private'])} in {trainer.out_dir}")
    return 0

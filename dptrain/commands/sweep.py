"""`dptrain sweep SPEC`: train every run of a scaling sweep, appending each to the results CSV."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("sweep", help="run a scaling sweep (model x batch x sigma_bar x steps) with "
                                          "the private trainer; finished runs are skipped")
    parser.add_argument("spec", help="sweep spec YAML (see scaling/sweep-cpu.yaml)")
    parser.add_argument("--only", nargs="+", metavar="MODEL",
                        help="run only these model configs (by file stem, e.g. ladder-1)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs still to do, train none")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.scaling.sweep import run_sweep

    todo = run_sweep(args.spec, only=args.only, dry_run=args.dry_run)
    if args.dry_run:
        for r in todo:
            print(f"{r.run_id}  (sigma {r.sigma:.4g})")
    print(f"{len(todo)} run(s) {'to do' if args.dry_run else 'trained'}")
    return 0

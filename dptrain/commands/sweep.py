"""`dptrain sweep run SPEC`: train the runs of a scaling sweep; `dptrain sweep design`: a sweep
spec sized to a compute budget on the user's prepared data."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("sweep", help="scaling sweeps: design one for a budget, run it")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    run_p = actions.add_parser("run", help="train the sweep's runs (model x batch x sigma_bar x steps x lr x "
                                           "seed) with the private trainer; finished runs are skipped")
    run_p.add_argument("spec", help="sweep spec YAML (see scaling/sweep-cpu-v3.yaml, or `dptrain sweep design`)")
    run_p.add_argument("--only", nargs="+", metavar="MODEL",
                       help="run only these model configs (by file stem, e.g. ladder-1)")
    run_p.add_argument("--dry-run", action="store_true", help="list the runs still to do, train none")
    run_p.add_argument("--index", type=int, metavar="I",
                       help="train only run number I of the spec (0-based; a job array's task id: "
                            "$SLURM_ARRAY_TASK_ID, $JOB_COMPLETION_INDEX); nothing when it is finished")
    run_p.add_argument("--count", action="store_true",
                       help="print the number of runs in the spec (the size of a job array) and stop")
    run_p.add_argument("--jobs", type=int, default=1,
                       help="runs trained at once, each in a process of its own (give each base "
                            "runtime.threads cores)")
    run_p.set_defaults(func=run)

    design_p = actions.add_parser("design", help="write a sweep spec (model ladder, sigma_bar, learning "
                                                 "rates, steps) sized to a compute budget on your data")
    design_p.add_argument("--data", required=True, metavar="PREPARED",
                          help="your prepared data folder (`dptrain data prepare`); a public proxy of the "
                               "private corpus where one exists: a sweep on private data spends its budget")
    design_p.add_argument("--core-hours", type=float, default=None,
                          help="compute budget in CPU core-hours (each run uses one core)")
    design_p.add_argument("--gpu-hours", type=float, default=None,
                          help="compute budget in GPU-hours (each run uses one GPU; step times are measured "
                               "on this machine's GPU)")
    design_p.add_argument("--epsilon", default="2,16", metavar="LO,HI",
                          help="range of target epsilons the law should serve (sets the sigma_bar levels)")
    design_p.add_argument("--delta", type=float, default=None,
                          help="delta of the planned runs (default: 1/N^1.1 of the data's N sequences)")
    design_p.add_argument("--batch", type=int, default=32, help="expected batch size of the sweep's runs")
    design_p.add_argument("--learning-rates", default="6e-3,1.2e-2,2.4e-2", metavar="LR,LR,...",
                          help="peak learning rates tried in every cell (AdamW, constant after warm-up)")
    design_p.add_argument("--out", required=True, metavar="SPEC.yaml",
                          help="spec to write; the model ladder goes into models/ beside it")
    design_p.add_argument("--runs-dir", default=None,
                          help="where the runs' folders go (default: runs/<spec name>)")
    design_p.set_defaults(func=design)


def run(args) -> int:
    from dptrain.errors import UserError
    from dptrain.scaling.sweep import load_spec, expand, run_index, run_sweep
    from pathlib import Path

    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if args.count:
        print(len(expand(load_spec(args.spec), Path(args.spec).parent)))
        return 0
    if args.index is not None:
        if args.only or args.dry_run or args.jobs > 1:
            raise UserError("--index trains one run: it takes no --only, --dry-run or --jobs")
        row = run_index(args.spec, args.index)
        print(f"run {args.index} already finished" if row is None else
              f"{row.run_id}: final loss {row.final_loss():.4f} in {row.wall_time_s:.0f} s")
        return 0
    todo = run_sweep(args.spec, only=args.only, dry_run=args.dry_run, jobs=args.jobs)
    if args.dry_run:
        for r in todo:
            print(f"{r.run_id}  (sigma {r.sigma:.4g})")
    print(f"{len(todo)} run(s) {'to do' if args.dry_run else 'trained'}")
    return 0


def design(args) -> int:
    from dptrain.errors import UserError
    from dptrain.scaling.design import design_sweep, parse_range

    budgets = [b for b in (args.core_hours, args.gpu_hours) if b is not None]
    if len(budgets) != 1 or not budgets[0] > 0:
        raise UserError("give one positive budget: --core-hours or --gpu-hours")
    lrs = [float(x) for x in args.learning_rates.split(",") if x.strip()]
    design_sweep(args.data, args.out, hours=budgets[0], gpu=args.gpu_hours is not None,
                 epsilons=parse_range(args.epsilon), delta=args.delta, batch=args.batch,
                 learning_rates=lrs, runs_dir=args.runs_dir)
    return 0

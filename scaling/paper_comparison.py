"""The planner's answers at the budgets of published DP scaling results, side by side with them.

Rows: McKenna et al. 2025 (arXiv 2501.18914), Table 2 (compute at which the loss saturates, for a
data size N and ε) and VaultGemma 1B (model card and report). Their δ and sequence length are taken
as 1e-10 and 1024 tokens here. The planner runs with the law given (default: the shipped one) and
extrapolation allowed, so the table shows how far off a law fitted on small CPU runs is at GPU scale.
From the repository root:

    python scaling/paper_comparison.py [--law LAW.json] [--method parametric]
"""
from __future__ import annotations

import argparse

from dptrain.scaling.law import load_law
from dptrain.scaling.plan import SHIPPED_LAW, plan

SEQ_LEN, DELTA = 1024, 1e-10
# (source, N sequences, epsilon, compute C) -> published (M, B, T, loss or None)
PUBLISHED = [
    ("McKenna et al. Table 2", 1e7, 1.0, 3.8e19, (1.7e7, 7.8e4, 9.6e3, 3.73)),
    ("McKenna et al. Table 2", 1e8, 1.0, 5.2e21, (1.3e8, 2.2e5, 5.8e4, 2.26)),
    ("McKenna et al. Table 2", 1e9, 4.0, 1.0e23, (3.3e8, 8.8e5, 1.1e5, 1.23)),
    # 1.04e9 parameters, ~518K sequences per batch, 1e5 steps, q = 5.3e-5 -> N ~ 9.8e9, eps 2
    ("VaultGemma 1B", 9.8e9, 2.0, 6 * 1.04e9 * 5.18e5 * SEQ_LEN * 1e5, (1.04e9, 5.18e5, 1e5, None)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--law", default=str(SHIPPED_LAW))
    ap.add_argument("--method", default=None)
    args = ap.parse_args()
    law = load_law(args.law, args.method)
    print(f"law: {law.method} ({args.law}); delta {DELTA:g}, {SEQ_LEN} tokens per sequence\n")
    print("| source | N | ε | C | published M / B / T / loss | planner M / B / T / σ̄ / loss | "
          "M ratio | B ratio | tokens/param (published, planner) | outside fitted range |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for source, n, eps, compute, (m, b, t, loss) in PUBLISHED:
        p = plan(law, compute, eps, DELTA, int(n), SEQ_LEN, top=1)[0]
        published_loss = "-" if loss is None else f"{loss:.2f}"
        tpp = b * t * SEQ_LEN / m
        print(f"| {source} | {n:.2g} | {eps:g} | {compute:.2g} | {m:.2g} / {b:.2g} / {t:.2g} / {published_loss} | "
              f"{p.params:.2g} / {p.batch_size:.2g} / {p.steps:.2g} / {p.sigma_bar:.2g} / {p.loss:.3g} | "
              f"{p.params / m:.2g} | {p.batch_size / b:.2g} | {tpp:.3g}, {p.tokens_per_param:.3g} | "
              + ", ".join(f"{k} {v:.2g}x" for k, v in p.outside.items() if v > 1) + " |")


if __name__ == "__main__":
    main()

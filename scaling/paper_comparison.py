"""The planner's answers at the budgets of published DP scaling results, side by side with them.

Rows: McKenna et al. 2025 (arXiv 2501.18914), Table 2 (compute at which the loss saturates, for a
data size N and ε) and VaultGemma 1B (model card and report). δ is taken as 1e-10. Sequence length:
512 tokens for McKenna et al. (BERT-style models; their budgets satisfy C = 6·M·B·T·512, which each
row checks), 1024 for VaultGemma. The planner runs with the law given (default: the shipped one) and
extrapolation allowed, so the table shows how far off a law fitted on small CPU runs is at GPU scale.
From the repository root:

    python scaling/paper_comparison.py [--law LAW.json] [--method parametric]
"""
from __future__ import annotations

import argparse

from dptrain.scaling.law import load_law
from dptrain.scaling.plan import SHIPPED_LAW, plan

DELTA = 1e-10
# (source, N sequences, epsilon, compute C, tokens per sequence) -> published (M, B, T, loss or None)
PUBLISHED = [
    ("McKenna et al. Table 2", 1e7, 1.0, 3.8e19, 512, (1.7e7, 7.8e4, 9.6e3, 3.73)),
    ("McKenna et al. Table 2", 1e8, 1.0, 5.2e21, 512, (1.3e8, 2.2e5, 5.8e4, 2.26)),
    ("McKenna et al. Table 2", 1e9, 4.0, 1.0e23, 512, (3.3e8, 8.8e5, 1.1e5, 1.23)),
    # 1.04e9 parameters, ~518K sequences per batch, 1e5 steps, q = 5.3e-5 -> N ~ 9.8e9, eps 2
    ("VaultGemma 1B", 9.8e9, 2.0, 6 * 1.04e9 * 5.18e5 * 1024 * 1e5, 1024, (1.04e9, 5.18e5, 1e5, None)),
]
# The published rows' rounding: C / (6 M B T L) stays within this of 1.
BUDGET_TOLERANCE = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--law", default=str(SHIPPED_LAW))
    ap.add_argument("--method", default=None)
    args = ap.parse_args()
    law = load_law(args.law, args.method)
    print(f"law: {law.method} ({args.law}); delta {DELTA:g}; tokens per sequence as published (512 or 1024)\n")
    print("| source | N | ε | C | L | published M / B / T / loss | planner M / B / T / σ̄ / loss | "
          "M ratio | B ratio | tokens/param (published, planner) | outside fitted range |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for source, n, eps, compute, seq_len, (m, b, t, loss) in PUBLISHED:
        if abs(compute / (6 * m * b * t * seq_len) - 1) > BUDGET_TOLERANCE:
            raise SystemExit(f"{source}: C {compute:.3g} is not 6·M·B·T·{seq_len}: check the transcription")
        p = plan(law, compute, eps, DELTA, int(n), seq_len, top=1)[0]
        published_loss = "-" if loss is None else f"{loss:.2f}"
        tpp = b * t * seq_len / m
        print(f"| {source} | {n:.2g} | {eps:g} | {compute:.2g} | {seq_len} | {m:.2g} / {b:.2g} / {t:.2g} / {published_loss} | "
              f"{p.params:.2g} / {p.batch_size:.2g} / {p.steps:.2g} / {p.sigma_bar:.2g} / {p.loss:.3g} | "
              f"{p.params / m:.2g} | {p.batch_size / b:.2g} | {tpp:.3g}, {p.tokens_per_param:.3g} | "
              + ", ".join(f"{k} {v:.2g}x" for k, v in p.outside.items() if v > 1) + " |")


if __name__ == "__main__":
    main()

"""DP scaling laws (McKenna et al. 2025): sweep results, law fits, compute-optimal planning, plots."""

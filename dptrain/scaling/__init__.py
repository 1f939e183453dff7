"""DP scaling laws (McKenna et al. 2025): sweep results, law fits, compute-optimal planning, plots."""

# The law methods, in fitting order; here (no imports) so the CLI can offer them without loading scipy.
LAW_METHODS = ("parametric", "parametric-decay", "parametric-batch", "ceiling", "semiparametric")

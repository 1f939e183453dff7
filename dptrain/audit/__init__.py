"""Empirical privacy: one-run audits, canary scoring, memorization and exposure, report plots."""
from dptrain.audit.canaries import (draw_inclusion, gradient_alignment_scores, loss_scores,
                                    random_canaries, weight_delta)
from dptrain.audit.memorization import (ExposureResult, MemorizationResult, edit_distance, exposure,
                                        exposure_from_log_likelihoods, greedy_generate,
                                        memorization_test, random_secrets, sample_windows)
from dptrain.audit.one_run import (OneRunAudit, best_epsilon_lower_bound, epsilon_lower_bound,
                                   max_certifiable_epsilon, p_value)

__all__ = [
    "OneRunAudit", "best_epsilon_lower_bound", "epsilon_lower_bound", "max_certifiable_epsilon", "p_value",
    "draw_inclusion", "random_canaries", "loss_scores", "gradient_alignment_scores", "weight_delta",
    "MemorizationResult", "ExposureResult", "memorization_test", "greedy_generate", "edit_distance",
    "exposure", "exposure_from_log_likelihoods", "random_secrets", "sample_windows",
]

"""Private training: config, sampler-to-checkpoint loop, privacy report."""

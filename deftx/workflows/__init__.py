"""Workflows: the NusaX pipeline, the results experiments and the sweeps, built from jobs; imported
by the command line (and the ray_jobs/ entry points through it)."""

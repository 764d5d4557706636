"""Launching the paper's experiments on SLURM: the campaign of jobs and what it costs."""

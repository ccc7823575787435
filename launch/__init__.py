"""Launching runs: `python launch/submit.py` (SLURM through submitit, or local processes)."""

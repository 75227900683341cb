"""Launching runs on a cluster: the Slurm job scripts (`slurm.py`)."""

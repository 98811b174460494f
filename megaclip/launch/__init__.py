"""Launch helpers for `megaclip train`: hostfiles, SLURM nodelists, rank layout, command lines.

Used by launch/deepspeed.sh, launch/slurm.sbatch and launch/torchrun.sh (see docs/launch.md).
Importing this package must stay cheap: no torch, no deepspeed.
"""

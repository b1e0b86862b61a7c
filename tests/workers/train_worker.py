"""Rank entry point for the trainer tests: exactly what `deepspeed --module meo_ds.train` runs."""
import sys

from meo_ds.train import main

if __name__ == "__main__":
    sys.exit(main())

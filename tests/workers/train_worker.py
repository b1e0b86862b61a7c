"""Rank entry point for the trainer tests: exactly what `deepspeed --module meo_ds.train` runs."""
from meo_ds.train import cli

if __name__ == "__main__":
    cli()

"""Rank entry point for the meo-eval launch test: what `deepspeed --module meo_ds.checkpoint_eval ARGS`
runs, for several argument sets separated by `--next` in one launch (saves a launch per set)."""
import sys

from meo_ds import checkpoint_eval as ce
from meo_ds.distributed import exit_process

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sets, current = [], []
    for a in argv + ["--next"]:
        if a == "--next":
            sets.append(current)
            current = []
        else:
            current.append(a)
    rank = ce.start_ranks()
    for args in sets:
        code = ce.evaluate_and_report(ce.parse_args(args), rank)
        if code:
            exit_process(code)
    ce.stop_ranks()
    exit_process(0)

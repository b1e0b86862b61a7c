"""HuggingFace export of meo_ds checkpoints (see meo_ds/export/cli.py for the command line)."""

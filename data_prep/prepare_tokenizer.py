"""`meo-prepare tokenizer` from a checkout: python data_prep/prepare_tokenizer.py --help"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meo_ds.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenizer", *sys.argv[1:]]))

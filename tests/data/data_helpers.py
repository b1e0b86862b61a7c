"""Corpora the data tests build for themselves (no downloads)."""
import random

WORDS = ("the model routes every token to an expert while the gate learns a balanced load across "
         "layers and ranks so that training stays fast and stable über naïve café").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]

"""HuggingFace `tokenizers` tokenizers (tokenizer.json), as shipped by Qwen2 or Llama 3, for LM corpora.

`load_tokenizer(path)` is the one entry point of every tokenizer user: a SentencePiece
tokenizer.model (what meo_ds trains; `meo_ds.data.tokenizer.Tokenizer`) or a HuggingFace
tokenizer.json (`HFTokenizer`). Both offer vocab_size, pad/unk/bos/eos ids (None when the
tokenizer has none), encode_batch, decode, checksum, special_ids, `kind` and `files` (what a
corpus ships). A directory holding both is read as SentencePiece (the format meo_ds's corpora
always used, so their checksums do not change).

Choices for HFTokenizer:
- Special tokens come from tokenizer_config.json (`bos_token`, `eos_token`, `pad_token`,
  `unk_token`: a string or {"content": ...}), else special_tokens_map.json, beside
  tokenizer.json; a token the vocabulary lacks is an error. Qwen2 has no bos and often no pad.
- Encoding uses the tokenizer's own post-processor (`add_special_tokens=True`): Llama 3's adds
  bos at the start of each text, Qwen2's adds nothing, as the model saw in pretraining. LM corpora
  then append eos to every document (meo_ds/data/lm.py), so an HF tokenizer without eos is
  refused for LM data.
- The LM packs documents without padding; where a pad id is needed and the tokenizer has none,
  `pad_id` is the eos id (as HF's own causal-LM recipes do); `special_ids()` records it.
- The checksum is the sha256 of the files shipped (tokenizer.json and the special-token files),
  so changing a special token changes the corpus key.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

HF_FILE = "tokenizer.json"
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SP_FILE = "tokenizer.model"


class HFTokenizer:
    """A tokenizer.json loaded with the `tokenizers` library, with its special ids."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        """`path`: tokenizer.json, or a directory holding it (with tokenizer_config.json etc.)."""
        from tokenizers import Tokenizer as Backend

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / HF_FILE
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self.backend = Backend.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(f"{self.path}: not a HuggingFace tokenizer.json ({err})") from None
        self.files = [HF_FILE] + [name for name in SPECIAL_FILES if (self.path.parent / name).is_file()]
        tokens = special_tokens(self.path.parent)
        self._ids = {name: self._token_id(name, tok) for name, tok in tokens.items()}

    def _token_id(self, name: str, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise ValueError(f"{self.path.parent}: the {name} token {token!r} of its tokenizer_config.json / "
                             f"special_tokens_map.json is not in {self.path.name}'s vocabulary; fix that file")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def unk_id(self) -> Optional[int]:
        return self._ids["unk"]

    @property
    def bos_id(self) -> Optional[int]:
        return self._ids["bos"]

    @property
    def eos_id(self) -> Optional[int]:
        return self._ids["eos"]

    @property
    def pad_id(self) -> Optional[int]:
        return self._ids["pad"] if self._ids["pad"] is not None else self._ids["eos"]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids, dropping special tokens."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def checksum(self) -> str:
        return files_checksum(self.path.parent, self.files)

    def special_ids(self) -> dict[str, Optional[int]]:
        return {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id}

    def special_tokens(self) -> dict[str, Optional[str]]:
        """The special token strings (pad falls back to eos, as pad_id does)."""
        return {name: None if tid is None else self.backend.id_to_token(tid) for name, tid in self.special_ids().items()}

    def __getstate__(self) -> dict:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def files_checksum(directory: Path, files: Sequence[str]) -> str:
    """sha256 over the named files of `directory` (names and contents, in order)."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    return h.hexdigest()


def special_tokens(directory: Path) -> dict[str, Optional[str]]:
    """{pad, unk, bos, eos} -> token string or None, from tokenizer_config.json else special_tokens_map.json."""
    found: dict[str, Optional[str]] = {"pad": None, "unk": None, "bos": None, "eos": None}
    for name in reversed(SPECIAL_FILES):  # tokenizer_config.json read last: it wins
        path = directory / name
        if not path.is_file():
            continue
        try:
            tree = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        for key in found:
            value = tree.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def tokenizer_file(path: str | os.PathLike) -> Path:
    """A directory's tokenizer.model, else its tokenizer.json (else the former, missing); a file as it is."""
    path = Path(path)
    if path.is_dir() and not (path / SP_FILE).is_file() and (path / HF_FILE).is_file():
        return path / HF_FILE
    return path / SP_FILE if path.is_dir() else path


def load_tokenizer(path: str | os.PathLike):
    """A SentencePiece `Tokenizer` or an `HFTokenizer` for `path`: a tokenizer.model or tokenizer.json
    file, or a directory holding one (tokenizer.model first)."""
    from meo_ds.data.tokenizer import Tokenizer

    path = Path(path)
    if path.is_dir():
        if (path / SP_FILE).is_file():
            return Tokenizer(path / SP_FILE)
        if (path / HF_FILE).is_file():
            return HFTokenizer(path / HF_FILE)
        raise FileNotFoundError(f"{path} holds neither a SentencePiece {SP_FILE} nor a HuggingFace {HF_FILE}; pass "
                                f"a tokenizer directory (from `meo-prepare tokenizer`, or a HuggingFace model's)")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return HFTokenizer(path) if path.suffix == ".json" else Tokenizer(path)

"""Reading text files, compressed or not: the one place every text path of the library goes through (training
data, eval.py perplexity / passkey filler, sala select, benchmarks), so the shipped `data/*.txt.xz` files and a
user's plain `.txt` are passed the same way."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

from lizard_jax.cli import InputError

# a suffix picks the decompressor; anything else is read as plain UTF-8
OPENERS = {".xz": lzma.open, ".gz": gzip.open}


def read_text(path: str | Path, what: str = "text file") -> str:
    """The whole UTF-8 text of `path` (`.xz` / `.gz` decompressed). Errors name `what` (a flag like "--text" or a
    config key like "data.paths") and the file: FileNotFoundError / IsADirectoryError for a missing path or a
    folder, InputError for a corrupt, non-UTF-8 or empty file."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {p} is a folder; expected a UTF-8 text file (.txt, .txt.xz or .txt.gz)")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file")
    opener = OPENERS.get(p.suffix.lower())
    try:
        if opener is None:
            text = p.read_text(encoding="utf-8")
        else:
            with opener(p, "rt", encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {p} is not UTF-8 text ({e.reason})") from None
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
        raise InputError(f"{what} {p} is not a valid {p.suffix} file ({e})") from None
    if not text.strip():
        raise InputError(f"{what} {p} is empty; expected text")
    return text

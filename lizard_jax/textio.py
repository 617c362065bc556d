"""Reading text files, compressed or not: the one place every text path of the library goes through (training
data, eval.py perplexity / passkey filler, sala select, benchmarks), so the shipped `data/*.txt.xz` files and a
user's plain `.txt` are passed the same way."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

# a suffix picks the decompressor; anything else is read as plain UTF-8
OPENERS = {".xz": lzma.open, ".gz": gzip.open}


class TextFileError(ValueError):
    """A text file that is missing, not a file, corrupt (bad compression or not UTF-8) or empty."""


def read_text(path: str | Path) -> str:
    """The whole UTF-8 text of `path` (`.xz` / `.gz` decompressed); TextFileError names the file and what is
    wrong with it."""
    p = Path(path)
    if not p.exists():
        raise TextFileError(f"text file not found: {p}")
    if not p.is_file():
        raise TextFileError(f"{p} is not a file (expected a .txt, .txt.xz or .txt.gz text file)")
    opener = OPENERS.get(p.suffix.lower())
    try:
        if opener is None:
            text = p.read_text(encoding="utf-8")
        else:
            with opener(p, "rt", encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:
        raise TextFileError(f"{p} is not UTF-8 text ({e.reason})") from None
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
        raise TextFileError(f"{p} is not a valid {p.suffix} file ({e})") from None
    if not text.strip():
        raise TextFileError(f"{p} is empty: expected text")
    return text

"""Training data: documents -> tokens -> packed fixed-length sequences, deterministic and resumable.

Local sources (text, jsonl) are tokenized once (cached as .npy in the run folder, keyed by the files' contents
and the tokenizer) and cut into `seq_len + 1`-token sequences; each epoch visits them in a seeded permutation.
TFDS sources stream documents in the dataset's fixed order (no file shuffling) and pack on the fly. In both
cases the data position is one integer, the number of sequences consumed, so a resumed run sees exactly the
batches it would have seen.

Packed documents (`data.segment_ids: true`): each batch also carries per-row segment ids (1, 2, ... for the
documents in the row, a new one after every EOS; 0 would be padding, which this packer never needs) and
per-document positions (0 at each document's first token; a row that starts inside a document starts it at 0, as
every row did before). Both are derived from the row's tokens alone, so the sequences, the data position and the
on-disk token cache are the same as without segment ids (one cache serves both settings). The losses then
score no target that starts a new document (`train.losses.split_batch`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from lizard_jax.cli import InputError
from lizard_jax.textio import read_text
from lizard_jax.train.config import DataConfig


class DataError(InputError):
    """Training data that cannot be used: a corrupt record, a missing field, an unknown dataset, too few tokens."""


def read_documents(cfg: DataConfig) -> Iterator[str]:
    """Raw documents in a fixed order."""
    if cfg.source == "text":
        for p in cfg.paths:
            text = read_text(p, "data.paths")
            for doc in text.split("\n\n"):
                if doc.strip():
                    yield doc.strip("\n")
    elif cfg.source == "jsonl":
        for p in cfg.paths:
            for n, line in enumerate(read_text(p, "data.paths").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: not valid JSON: {e}") from None
                yield _format(obj, cfg, f"{p}:{n}")
    else:
        import tensorflow_datasets as tfds

        builder = tfds_builder(cfg)
        builder.download_and_prepare()
        for ex in tfds.as_numpy(builder.as_dataset(split=cfg.tfds_split, shuffle_files=False)):
            yield _format({k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in ex.items()}, cfg,
                          cfg.tfds_name)


def tfds_builder(cfg: DataConfig):
    """The TFDS builder of `data.tfds_name`. TFDS finds a name in its own registry and in `tfds_data_dir`, so an
    unknown name fails here without the network."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.source 'tfds' needs TensorFlow Datasets: pip install tensorflow-datasets") from None
    try:
        return tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)
    except tfds.core.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)  # the community list would need the network
        close = difflib.get_close_matches(cfg.tfds_name.split("/")[0], known, n=3)
        raise DataError(f"data.tfds_name {cfg.tfds_name!r}: no such TFDS dataset"
                        + (f"; close names: {close}" if close else "")) from None


def _format(obj: dict, cfg: DataConfig, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object (a record with fields), got {type(obj).__name__}")
    if cfg.template is not None:
        try:
            return cfg.template.format(**obj)
        except KeyError as e:
            raise DataError(f"{where}: data.template field {e} missing; record has {sorted(obj)}") from None
    if cfg.text_key not in obj:
        raise DataError(f"{where}: no {cfg.text_key!r} field (data.text_key); record has {sorted(obj)}")
    return str(obj[cfg.text_key])


def document_segments(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, per-document positions) of packed rows `tokens [..., n]` int32, each `[..., n]` int32: a
    document starts at a row's first token and after every EOS (the EOS ends its document); ids count from 1
    within each row."""
    tokens = np.asarray(tokens)
    starts = np.ones(tokens.shape, bool)
    starts[..., 1:] = tokens[..., :-1] == eos_id
    seg = np.cumsum(starts, axis=-1, dtype=np.int32)
    idx = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int32), tokens.shape)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
    return seg, pos.astype(np.int32)


def tokenize_documents(docs, tokenizer, eos_id: int) -> Iterator[list[int]]:
    for doc in docs:
        yield tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos_id]


class PackedData:
    """Batches of `[batch, seq_len + 1]` int32 token windows; `position` counts sequences consumed. With
    `cfg.segment_ids` a batch is a dict of three such arrays: tokens, segment_ids, positions (module doc)."""

    def __init__(self, cfg: DataConfig, tokenizer, eos_id: int, *, seed: int = 0, cache_dir: str | Path | None = None,
                 seq_len: int | None = None, batch_size: int | None = None):
        self.cfg = cfg
        self.seq_len = seq_len or cfg.seq_len
        self.batch_size = batch_size or cfg.batch_size
        self.seed = seed
        self.position = 0
        self._tokenizer, self._eos = tokenizer, eos_id
        self._tokens = None
        self._stream = None
        if cfg.source in ("text", "jsonl"):
            self._tokens = self._local_tokens(cache_dir)
            self.num_sequences = (len(self._tokens) - 1) // self.seq_len
            if self.num_sequences < self.batch_size:
                raise DataError(
                    f"data.paths {list(cfg.paths)} give {len(self._tokens)} tokens, fewer than one batch of "
                    f"{self.batch_size} sequences of {self.seq_len} + 1 tokens ({self.batch_size * self.seq_len + 1}): "
                    "give more text or a smaller batch_size / seq_len")
        else:
            tfds_builder(cfg)  # an unknown dataset fails now, before the first step compiles
            self.num_sequences = None

    @property
    def num_tokens(self) -> int | None:
        return None if self._tokens is None else len(self._tokens)

    def _local_tokens(self, cache_dir) -> np.ndarray:
        h = hashlib.sha256()
        for p in self.cfg.paths:
            h.update(Path(p).read_bytes() if Path(p).is_file() else p.encode())
        h.update(json.dumps([self.cfg.source, self.cfg.text_key, self.cfg.template, self.cfg.max_tokens]).encode())
        h.update(repr(sorted(self._tokenizer.get_vocab().items())[:64]).encode())
        h.update(str(len(self._tokenizer)).encode())
        path = Path(cache_dir) / f"tokens-{h.hexdigest()[:16]}.npy" if cache_dir else None
        if path is not None and path.is_file():
            return np.load(path)
        ids: list[int] = []
        for doc in tokenize_documents(read_documents(self.cfg), self._tokenizer, self._eos):
            ids.extend(doc)
            if self.cfg.max_tokens and len(ids) >= self.cfg.max_tokens:
                break
        toks = np.asarray(ids[: self.cfg.max_tokens] if self.cfg.max_tokens else ids, np.int32)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, toks)
            tmp.replace(path)
        return toks

    def _sequence(self, index: int) -> np.ndarray:
        n = self.num_sequences
        epoch, i = divmod(index, n)
        if self.cfg.shuffle:
            i = int(np.random.default_rng([self.seed, epoch]).permutation(n)[i])
        return self._tokens[i * self.seq_len: (i + 1) * self.seq_len + 1]

    def _stream_sequences(self) -> Iterator[np.ndarray]:
        buf: list[int] = []
        for doc in tokenize_documents(read_documents(self.cfg), self._tokenizer, self._eos):
            buf.extend(doc)
            while len(buf) >= self.seq_len + 1:
                yield np.asarray(buf[: self.seq_len + 1], np.int32)
                buf = buf[self.seq_len:]

    def next_batch(self) -> np.ndarray | dict[str, np.ndarray]:
        """The next `[batch, seq_len + 1]` batch (with `segment_ids`: {"tokens", "segment_ids", "positions"},
        each `[batch, seq_len + 1]` int32); advances `position`."""
        tokens = self._next_tokens()
        if not self.cfg.segment_ids:
            return tokens
        seg, pos = document_segments(tokens, self._eos)
        return {"tokens": tokens, "segment_ids": seg, "positions": pos}

    def _next_tokens(self) -> np.ndarray:
        b = self.batch_size
        if self._tokens is not None:
            out = np.stack([self._sequence(self.position + j) for j in range(b)])
        else:
            if self._stream is None:  # resume: replay the stream up to the saved position
                self._stream = self._stream_sequences()
                for _ in range(self.position):
                    next(self._stream)
            try:
                out = np.stack([next(self._stream) for _ in range(b)])
            except StopIteration:  # a finished stream starts over: one more epoch in the same order
                self._stream = None
                self.position = 0
                return self._next_tokens()
        self.position += b
        return out

    def state(self) -> dict:
        return {"position": int(self.position), "seq_len": self.seq_len, "batch_size": self.batch_size,
                "segment_ids": bool(self.cfg.segment_ids)}

    def restore(self, state: dict) -> None:
        if state.get("seq_len") != self.seq_len:
            raise DataError(f"checkpoint data seq_len {state.get('seq_len')} != configured {self.seq_len}")
        saved = bool(state.get("segment_ids", False))  # checkpoints from before the option packed without them
        if saved != bool(self.cfg.segment_ids):
            raise DataError(f"checkpoint was trained with data.segment_ids {str(saved).lower()}, the config says "
                            f"{str(bool(self.cfg.segment_ids)).lower()}: resume with the setting it was trained with")
        self.position = int(state["position"])
        self._stream = None

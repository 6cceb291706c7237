"""Real text without a download: the standard library's own Python source.

    corpus = stdlib_corpus(max_files=None)      the .py files of the running Python's
                                                standard library, in sorted order, split by file
    corpus.describe()                           files, bytes and a content hash per split
    ByteTokenizer()                             vocab 256: a token is a byte
    BPETokenizer.train(corpus.train_texts(), vocab_size=1024)
                                                byte-pair encoding learned here, by hand
    tok.encode(data) -> ids (N,)  tok.decode(ids) -> data    exact round trip, any bytes
    Batcher(stream, context, batch_size, seed)  (B, T+1) windows from a seeded stream;
                                                state_dict() resumes bit for bit

What the corpus holds: every `.py` file under sysconfig's "stdlib" path except
those under `site-packages` (third-party code, different on every machine),
under a directory named `test`, `tests` or `idle_test` (the test suites: a
third of the bytes, with deliberately broken and generated files), under
`encodings` and `pydoc_data` (generated tables and help text, not code) and under
`__pycache__`. Files are read as bytes, in the order of their sorted relative
paths. A file goes to the validation split when the first two bytes of the
SHA-256 of its relative path, read as a number, fall below `val_share` of
65536: the split depends on the path only, so adding or removing files never
moves another file across it. The content hash covers every path and every
byte in order, so two machines can tell whether they read the same text
(different Python versions will not).

The BPE tokenizer first cuts the bytes into chunks (an identifier or number
with one optional leading space, a run of punctuation, a newline with the
indentation after it, a run of other white space) and merges pairs only
inside a chunk, so a token never spans a word and its neighbour. Shape
letters: N tokens of a stream, B rows of a batch, T positions of a row.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections import Counter
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .module import rng_state, set_rng_state

SKIP_DIRS = ("site-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
             "pydoc_data")


# ---------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Corpus:
    """The files of one corpus: relative paths, their bytes, and which are validation."""
    root: str
    paths: tuple          # relative POSIX paths, sorted
    data: tuple           # bytes of each file
    is_val: tuple         # bool per file

    def split(self, which: str) -> list[bytes]:
        """The bytes of every file of one split ("train" or "val"), in corpus order."""
        if which not in ("train", "val"):
            raise ValueError(f"Corpus.split: which must be 'train' or 'val', got {which!r}")
        want = which == "val"
        return [d for d, v in zip(self.data, self.is_val) if v == want]

    def split_paths(self, which: str) -> list[str]:
        want = {"train": False, "val": True}[which]
        return [p for p, v in zip(self.paths, self.is_val) if v == want]

    def content_hash(self) -> str:
        """SHA-256 over every (path, length, bytes) in order: the same text, the same hash."""
        h = hashlib.sha256()
        for path, data in zip(self.paths, self.data):
            h.update(path.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
        return h.hexdigest()

    def describe(self) -> dict:
        """Files and bytes per split and the content hash (first 16 hex digits)."""
        out = {"root": self.root, "hash": self.content_hash()[:16]}
        for which in ("train", "val"):
            texts = self.split(which)
            out[which] = {"files": len(texts), "bytes": int(sum(len(t) for t in texts))}
        return out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_paths(root) -> list[str]:
    """Sorted relative paths of the corpus's .py files under root (see the module docstring)."""
    root = Path(root)
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        found.append(rel.as_posix())
    return sorted(found)


def is_validation(rel_path: str, val_share: float) -> bool:
    """The file's split from its path alone: SHA-256's first two bytes below val_share * 65536."""
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:2], "big") < val_share * 65536


def stdlib_corpus(max_files: int | None = None, val_share: float = 0.1, root=None) -> Corpus:
    """The standard library's .py files as a Corpus.

    max_files: keep the first max_files paths of an evenly spaced selection over the
    sorted list (None: all), so a quick run still sees many packages; val_share:
    expected share of files in validation. Both splits must end up non-empty.
    """
    if max_files is not None and (not isinstance(max_files, int) or max_files < 2):
        raise ValueError(f"stdlib_corpus: max_files must be an integer >= 2 or None, got {max_files!r}")
    if not 0.0 < val_share < 1.0:
        raise ValueError(f"stdlib_corpus: val_share must be in (0, 1), got {val_share}")
    root = Path(root) if root is not None else stdlib_root()
    paths = corpus_paths(root)
    if max_files is not None and max_files < len(paths):
        picks = np.linspace(0, len(paths) - 1, max_files).round().astype(int)   # (max_files,)
        paths = [paths[i] for i in sorted(set(picks.tolist()))]
    is_val = [is_validation(p, val_share) for p in paths]
    if max_files is not None and not any(is_val):
        is_val[-1] = True          # a tiny corpus still needs a validation file
    if all(is_val) or not any(is_val):
        raise ValueError(f"stdlib_corpus: {len(paths)} files under {root} leave a split empty")
    data = tuple((root / p).read_bytes() for p in paths)
    return Corpus(str(root), tuple(paths), data, tuple(is_val))


# ---------------------------------------------------------------- tokenizers

class ByteTokenizer:
    """A token is a byte: vocab 256, encode and decode are exact for any bytes."""
    kind = "byte"
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(_as_bytes("ByteTokenizer.encode", data), dtype=np.uint8).astype(np.int64)  # (N,)

    def decode(self, ids) -> bytes:
        ids = _check_ids("ByteTokenizer.decode", ids, 256)                 # (N,)
        return ids.astype(np.uint8).tobytes()

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)]

    def to_dict(self) -> dict:
        return {"kind": "byte"}


def _as_bytes(fn: str, data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"{fn}: data must be bytes or str, got {type(data).__name__}")
    return bytes(data)


def _check_ids(fn: str, ids, vocab: int) -> np.ndarray:
    ids = np.asarray(ids)                                                  # (N,)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{fn}: ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{fn}: token id {bad} is outside [0, {vocab})")
    return ids.astype(np.int64)


# an identifier or number with an optional leading space; punctuation with an optional
# leading space; a newline and the indentation after it; other white space; any other byte
CHUNK = re.compile(rb" ?[A-Za-z_][A-Za-z0-9_]*| ?[0-9]+| ?[^\sA-Za-z0-9_]+|\n[ \t]*|[ \t]+|\s|.", re.S)


def chunks(data: bytes) -> list[bytes]:
    """The pieces BPE merges inside; their concatenation is data."""
    return CHUNK.findall(data)


class BPETokenizer:
    """Byte-pair encoding: 256 byte tokens, then one token per learned merge (id 256 + rank)."""
    kind = "bpe"

    def __init__(self, merges):
        merges = [tuple(int(v) for v in m) for m in merges]
        self.merges = merges
        self.ranks = {pair: 256 + r for r, pair in enumerate(merges)}   # pair -> new id
        table = [bytes([i]) for i in range(256)]
        for r, (a, b) in enumerate(merges):
            if not (0 <= a < 256 + r and 0 <= b < 256 + r):
                raise ValueError(f"BPETokenizer: merge {r} = ({a}, {b}) names an id >= {256 + r}")
            table.append(table[a] + table[b])
        self.table = table
        self.vocab_size = len(table)
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def train(cls, texts, vocab_size: int = 1024, max_bytes: int | None = 4_000_000):
        """Learn vocab_size - 256 merges from texts (a list of bytes), at most max_bytes of them."""
        if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 65536:
            raise ValueError(f"BPETokenizer.train: vocab_size must be in [257, 65536], got {vocab_size!r}")
        return cls(learn_merges(_word_counts(texts, max_bytes), vocab_size - 256))

    def encode_chunk(self, chunk: bytes) -> list[int]:
        """Apply the merges to one chunk, lowest rank first (cached per distinct chunk)."""
        hit = self._cache.get(chunk)
        if hit is not None:
            return hit
        ids, ranks = list(chunk), self.ranks
        while len(ids) > 1:
            best = min((ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(ids, ids[1:])))
            if best[0] == 1 << 30:
                break
            new, pair = best[0], self.merges[best[0] - 256]
            ids = _merge_word(ids, pair, new)
        self._cache[chunk] = ids
        return ids

    def encode(self, data) -> np.ndarray:
        data = _as_bytes("BPETokenizer.encode", data)
        out = []
        for c in chunks(data):
            out.extend(self.encode_chunk(c))
        return np.array(out, dtype=np.int64)                               # (N,)

    def decode(self, ids) -> bytes:
        ids = _check_ids("BPETokenizer.decode", ids, self.vocab_size)      # (N,)
        table = self.table
        return b"".join(table[i] for i in ids.tolist())

    def token_bytes(self) -> list[bytes]:
        return list(self.table)

    def to_dict(self) -> dict:
        return {"kind": "bpe", "merges": [list(m) for m in self.merges]}


def _merge_word(ids: list, pair: tuple, new: int) -> list:
    """ids with every non-overlapping occurrence of pair (left to right) replaced by new."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _word_counts(texts, max_bytes) -> dict:
    """How often each chunk occurs in texts; with max_bytes, only the same leading share of
    every text is read (about max_bytes in all), so every file has its say."""
    texts = list(texts)
    total = sum(len(t) for t in texts)
    share = 1.0 if max_bytes is None or total <= max_bytes else max_bytes / total
    counts: dict[bytes, int] = {}
    for data in texts:
        for c in chunks(data[:int(np.ceil(len(data) * share))]):
            counts[c] = counts.get(c, 0) + 1
    return counts


def learn_merges(word_counts: dict, num_merges: int) -> list:
    """Greedy BPE: merge the most frequent adjacent pair (ties: the smaller pair), repeat.

    Pair counts are kept up to date incrementally: a merge only revisits the
    words that contain its pair (a pair -> words index), and a heap of
    (-count, pair) entries, checked against the live count when popped,
    finds the most frequent pair without scanning them all.
    """
    words = [list(w) for w in word_counts]
    freq = list(word_counts.values())
    pairs: dict[tuple, int] = {}
    where: dict[tuple, set] = {}
    for w, ids in enumerate(words):
        _count_pairs(ids, freq[w], w, pairs, where)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        neg, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -neg:
            continue                        # a stale entry: the count has changed since
        new_id = 256 + len(merges)
        merges.append(best)
        touched: set = set()
        for w in where.pop(best):
            old = words[w]
            words[w] = _merge_word(old, best, new_id)
            _apply_change(old, words[w], freq[w], w, pairs, where, touched)
        for p in touched:
            if p in pairs:
                heapq.heappush(heap, (-pairs[p], p))
    return merges


def _count_pairs(ids: list, weight: int, w: int, pairs: dict, where: dict) -> None:
    """Add weight to the count of every adjacent pair of word w."""
    for p in zip(ids, ids[1:]):
        pairs[p] = pairs.get(p, 0) + weight
        where.setdefault(p, set()).add(w)


def _apply_change(old: list, new: list, weight: int, w: int, pairs: dict, where: dict,
                  touched: set) -> None:
    """Move word w's pair counts from its old ids to its new ones, touching only what changed
    (the index may keep a word under a pair it lost: a later visit then changes nothing)."""
    before, after = Counter(zip(old, old[1:])), Counter(zip(new, new[1:]))
    for p in before.keys() | after.keys():
        d = after.get(p, 0) - before.get(p, 0)
        if d:
            touched.add(p)
            c = pairs.get(p, 0) + d * weight
            if c:
                pairs[p] = c
            else:
                pairs.pop(p, None)
            if d > 0:
                where.setdefault(p, set()).add(w)


def tokenizer_from_dict(d: dict):
    """A tokenizer back from its to_dict() (what a run directory stores)."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(d["merges"])
    raise ValueError(f"tokenizer_from_dict: kind must be 'byte' or 'bpe', got {kind!r}")


def save_tokenizer(tok, path) -> None:
    Path(path).write_text(json.dumps(tok.to_dict()))


def load_tokenizer(path):
    return tokenizer_from_dict(json.loads(Path(path).read_text()))


def make_tokenizer(kind: str, corpus: Corpus, vocab_size: int = 1024):
    """"byte", or "bpe" trained on the corpus's training split."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(corpus.split("train"), vocab_size)
    raise ValueError(f"make_tokenizer: kind must be 'byte' or 'bpe', got {kind!r}")


# ---------------------------------------------------------------- streams and batches

def encode_stream(tok, texts) -> tuple[np.ndarray, np.ndarray]:
    """The files' tokens end to end, and each token's length in bytes.   -> (N,), (N,)"""
    ids = [tok.encode(t) for t in texts]
    stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)     # (N,)
    lengths = np.array([len(b) for b in tok.token_bytes()], dtype=np.int64)  # (V,)
    return stream, lengths[stream]                                           # (N,), (N,)


class Batcher:
    """(B, T+1) windows of a token stream at offsets drawn from a seeded generator.

    Row b of a batch is stream[o_b : o_b + T + 1] with o_b uniform over every
    offset that fits; inputs are [:, :-1] and targets [:, 1:]. state_dict()
    holds the generator's state, so a restored batcher draws the same batches.
    """

    def __init__(self, stream, context: int, batch_size: int, seed: int = 0):
        stream = np.asarray(stream)                                        # (N,)
        if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
            raise ValueError(f"Batcher: stream must be a 1-D integer array, got {stream.shape} {stream.dtype}")
        for name, v in (("context", context), ("batch_size", batch_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Batcher: {name} must be an integer >= 1, got {v!r}")
        if len(stream) < context + 1:
            raise ValueError(f"Batcher: the stream has {len(stream)} tokens, fewer than "
                             f"context + 1 = {context + 1}")
        self.stream, self.context, self.batch_size = stream, int(context), int(batch_size)
        self.rng = np.random.default_rng(seed)

    def offsets(self) -> np.ndarray:
        return self.rng.integers(0, len(self.stream) - self.context, self.batch_size)  # (B,)

    def windows(self, offsets) -> np.ndarray:
        cols = np.arange(self.context + 1)                                 # (T+1,)
        return self.stream[np.asarray(offsets)[:, None] + cols]            # (B, T+1)

    def views(self):
        """(inputs, targets): row o of each is the window at offset o, [:-1] and [1:], as
        read-only views of the stream. Drawing rows rng.integers(0, len(inputs), B) from
        the same generator gives exactly next()'s batches: a trainer that samples rows of
        (x, target) arrays draws this batcher's stream.   -> (N - T, T), (N - T, T)"""
        win = np.lib.stride_tricks.sliding_window_view
        return win(self.stream[:-1], self.context), win(self.stream[1:], self.context)

    def next(self) -> np.ndarray:
        """The next (B, T+1) batch of token ids."""
        return self.windows(self.offsets())                                # (B, T+1)

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng)}                                # (6,) uint64

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != {"rng"} or np.shape(sd["rng"]) != (6,):
            raise ValueError(f"Batcher.load_state_dict: expected {{'rng': (6,) uint64}}, got keys {sorted(sd)}")
        set_rng_state(self.rng, sd["rng"])


def eval_windows(stream: np.ndarray, context: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive windows stream[iT : iT + T + 1]: every token after the first is a target
    exactly once (the context restarts every T tokens).   -> (B, T+1)"""
    count = (len(stream) - 1) // context
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"eval_windows: {len(stream)} tokens hold no window of context {context}")
    starts = np.arange(count) * context                                    # (B,)
    return stream[starts[:, None] + np.arange(context + 1)]                # (B, T+1)

"""The specialisation atlas: which experts take which kinds of Python token, against chance.

    label_bytes(source) -> (n_bytes,)          each byte's syntactic class from Python's
                                               own `tokenize` module (CLASSES)
    token_classes(tok, source) -> ids, classes the tokens of source and each one's class
    first_choices(model, windows) -> {block: (N,)}   each MoE block's first-choice expert
    atlas(experts, classes, num_experts, context)    the measures and their shuffled baseline

Classes (Y of them): a NAME is a `keyword` (hard or soft), a `builtin` (a name in
`builtins`) or an `identifier`; OP is `operator`; NUMBER, STRING (docstrings and
f-strings included), COMMENT as named; NEWLINE and NL are `newline`; INDENT and the
bytes between tokens are `whitespace`. A byte that tokenize does not reach (a file it
rejects) is `other`.

A BPE token takes the class of its first byte that is not a space or a tab (a token of
spaces and tabs only takes `whitespace`): " def" is a keyword, "\\n    " a newline.
With top-K routing the atlas uses each token's first choice (its largest weight).

The baseline: the same first choices, randomly permuted among the tokens. Every
expert keeps exactly its load; any link between expert and class, or between
neighbours, is destroyed. Each measure is recomputed on R such shuffles, and the
2.5th and 97.5th percentiles give the chance interval a real measure is compared with.
Shape letters: N tokens, E experts, Y classes (README glossary), B windows of T positions.
"""
from __future__ import annotations

import builtins
import io
import keyword
import token as token_module
import tokenize
from typing import NamedTuple

import numpy as np

CLASSES = ("keyword", "builtin", "identifier", "operator", "number", "string", "comment",
           "newline", "whitespace", "other")
CLASS_ID = {name: j for j, name in enumerate(CLASSES)}
BUILTINS = frozenset(dir(builtins))
TOKEN_CLASS = {token_module.OP: "operator", token_module.NUMBER: "number",
               token_module.STRING: "string", token_module.COMMENT: "comment",
               token_module.NEWLINE: "newline", token_module.NL: "newline",
               token_module.INDENT: "whitespace"}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):      # Python >= 3.12
    if hasattr(token_module, _name):
        TOKEN_CLASS[getattr(token_module, _name)] = "string"


# ---------------------------------------------------------------- labels

def name_class(name: str) -> str:
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return "keyword"
    return "builtin" if name in BUILTINS else "identifier"


def label_chars(text: str) -> np.ndarray:
    """Each character's class id; characters no token covers are whitespace.   -> (n_chars,)"""
    labels = np.full(len(text), CLASS_ID["whitespace"], dtype=np.int8)   # (n_chars,)
    starts = [0]
    for line in text.split("\n")[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    try:
        for tk in tokenize.generate_tokens(io.StringIO(text).readline):
            if tk.type == token_module.NAME:
                cls = name_class(tk.string)
            else:
                cls = TOKEN_CLASS.get(tk.type)
            if cls is None or tk.start == tk.end:
                continue
            a = starts[tk.start[0] - 1] + tk.start[1] if tk.start[0] <= len(starts) else len(text)
            b = starts[tk.end[0] - 1] + tk.end[1] if tk.end[0] <= len(starts) else len(text)
            labels[a:b] = CLASS_ID[cls]
    except (tokenize.TokenError, SyntaxError):
        labels[:] = CLASS_ID["other"]
    return labels


def label_bytes(source: bytes) -> np.ndarray:
    """Each byte's class id (a character's bytes share its class).   -> (n_bytes,) int8"""
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError:
        return np.full(len(source), CLASS_ID["other"], dtype=np.int8)    # (n_bytes,)
    chars = label_chars(text)                                            # (n_chars,)
    if text.isascii():
        return chars
    widths = np.array([len(c.encode("utf-8")) for c in text], dtype=np.int64)  # (n_chars,)
    return np.repeat(chars, widths)                                      # (n_bytes,)


def token_classes(tok, source: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of source and each token's class (its first byte that is not a space or a
    tab; whitespace for a blank token).   -> ids (N,), classes (N,)"""
    ids = tok.encode(source)                                             # (N,)
    byte_labels = label_bytes(source)                                    # (n_bytes,)
    lengths = np.array([len(b) for b in tok.token_bytes()])[ids]         # (N,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (N,)
    raw = np.frombuffer(source, dtype=np.uint8)                          # (n_bytes,)
    blank = (raw == ord(" ")) | (raw == ord("\t"))                       # (n_bytes,)
    idx = np.where(blank, len(raw), np.arange(len(raw)))                 # (n_bytes,)
    next_solid = np.minimum.accumulate(idx[::-1])[::-1]                  # (n_bytes,)
    first = next_solid[starts] if len(ids) else starts                   # (N,)
    first = np.where(first < starts + lengths, first, starts)            # (N,)
    return ids, byte_labels[first].astype(np.int64)                      # (N,), (N,)


def stream_classes(tok, texts) -> tuple[np.ndarray, np.ndarray]:
    """token_classes over several files, end to end (as text.encode_stream joins them)."""
    pairs = [token_classes(tok, t) for t in texts]
    return (np.concatenate([p[0] for p in pairs]),                       # (N,)
            np.concatenate([p[1] for p in pairs]))                       # (N,)


# ---------------------------------------------------------------- routing of a model

def first_choices(model, windows, batch: int = 16) -> dict:
    """Each routed block's first-choice expert for every position of windows (eval mode).

    windows: (B, T) token ids; returns {block name: (B T,)} in row-major order."""
    found: dict[str, list] = {}
    model.eval()
    try:
        for i in range(0, len(windows), batch):
            model.forward(windows[i:i + batch])                          # (b, T, V)
            for name, stats in model.routing_stats():
                if stats.ids is None:
                    raise ValueError(f"first_choices: block {name} does not report ids "
                                     f"(tokens do not choose experts)")
                found.setdefault(name, []).append(stats.ids[:, 0])       # (b T,)
    finally:
        model.train()
    return {name: np.concatenate(parts) for name, parts in found.items()}   # (B T,) each


# ---------------------------------------------------------------- the measures

class Measures(NamedTuple):
    share: np.ndarray          # (E, Y) P(class j | expert e) / P(class j): 1 = no preference
    entropy: np.ndarray        # (E,) H(class | expert e) in bits: lower = more selective
    mutual_info: float         # I(expert; class) in bits
    repeat: float              # share of neighbouring positions with the same first choice


def measures(experts, classes, num_experts: int, num_classes: int, context: int) -> Measures:
    """The atlas's measures of one assignment.   experts, classes: (N,), N a multiple of context."""
    counts = np.bincount(experts * num_classes + classes,
                         minlength=num_experts * num_classes).reshape(num_experts, num_classes)  # (E, Y)
    counts = counts.astype(np.float64)
    n = counts.sum()
    p_e, p_j = counts.sum(1) / n, counts.sum(0) / n                      # (E,), (Y,)
    cond = counts / np.maximum(counts.sum(1, keepdims=True), 1)          # (E, Y)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(p_j > 0, cond / p_j, np.nan)                    # (E, Y)
        logs = np.where(cond > 0, np.log2(np.where(cond > 0, cond, 1)), 0.0)     # (E, Y)
        joint = counts / n                                               # (E, Y)
        ratio = np.where(joint > 0, joint / np.outer(p_e, p_j), 1.0)     # (E, Y)
    entropy = -(cond * logs).sum(1)                                      # (E,)
    mutual = float((joint * np.log2(ratio)).sum())
    rows = experts.reshape(-1, context)                                  # (B, T)
    repeat = float(np.mean(rows[:, 1:] == rows[:, :-1]))
    return Measures(share, entropy, mutual, repeat)


class Atlas(NamedTuple):
    real: Measures
    low: Measures              # 2.5th percentile of each measure over the shuffles
    high: Measures             # 97.5th percentile
    counts: np.ndarray         # (E, Y) tokens of class j whose first choice is e
    shuffles: int


def atlas(experts, classes, num_experts: int, context: int, shuffles: int = 200,
          seed: int = 0) -> Atlas:
    """The measures of the real routing and their chance interval under shuffled routing."""
    experts, classes = np.asarray(experts, dtype=np.int64), np.asarray(classes, dtype=np.int64)  # (N,) x2
    if experts.shape != classes.shape or experts.ndim != 1:
        raise ValueError(f"atlas: experts {experts.shape} and classes {classes.shape} must be "
                         f"equal 1-D shapes")
    if experts.size % context or experts.size == 0:
        raise ValueError(f"atlas: {experts.size} tokens are not whole windows of context {context}")
    if experts.min() < 0 or experts.max() >= num_experts:
        raise ValueError(f"atlas: expert ids must lie in [0, {num_experts}), got {experts.max()}")
    if not isinstance(shuffles, int) or shuffles < 2:
        raise ValueError(f"atlas: shuffles must be an integer >= 2, got {shuffles!r}")
    j = len(CLASSES)
    real = measures(experts, classes, num_experts, j, context)
    rng = np.random.default_rng(seed)
    runs = [measures(rng.permutation(experts), classes, num_experts, j, context)
            for _ in range(shuffles)]
    low, high = (Measures(*[np.percentile(np.array(field), q, axis=0) for field in zip(*runs)])
                 for q in (2.5, 97.5))
    counts = np.bincount(experts * j + classes, minlength=num_experts * j).reshape(num_experts, j)  # (E, Y)
    return Atlas(real, low, high, counts, shuffles)


def conditional_mi(experts, classes, tokens, num_experts: int, num_classes: int) -> float:
    """I(expert; class | token) in bits: how much the class tells about the expert among
    tokens with the same id (0 when routing depends on the token id alone)."""
    v = int(tokens.max()) + 1
    joint = np.bincount((tokens * num_experts + experts) * num_classes + classes,
                        minlength=v * num_experts * num_classes).reshape(v, num_experts, num_classes)  # (V, E, Y)
    joint = joint.astype(np.float64) / len(tokens)                       # (V, E, Y) p(v, e, c)
    p_v = joint.sum((1, 2), keepdims=True)                               # (V, 1, 1)
    p_ve = joint.sum(2, keepdims=True)                                   # (V, E, 1)
    p_vc = joint.sum(1, keepdims=True)                                   # (V, 1, Y)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(joint > 0, joint * p_v / (p_ve * p_vc), 1.0)    # (V, E, Y)
    return float((joint * np.log2(ratio)).sum())


def shuffle_within(experts, tokens, rng) -> np.ndarray:
    """The experts permuted at random among positions holding the same token id.   -> (N,)"""
    grouped = np.argsort(tokens, kind="stable")                          # (N,)
    mixed = np.lexsort((rng.random(len(tokens)), tokens))                # (N,)
    out = np.empty_like(experts)                                         # (N,)
    out[mixed] = experts[grouped]
    return out


def context_atlas(experts, classes, tokens, num_experts: int, shuffles: int = 200,
                  seed: int = 0) -> tuple[float, float, float]:
    """I(expert; class | token) and its 95% interval when the experts are shuffled among
    positions of the same token: does the router tell the same token apart by its syntax?
    -> (real, low, high) in bits."""
    experts, classes, tokens = (np.asarray(a, dtype=np.int64) for a in (experts, classes, tokens))
    if not experts.shape == classes.shape == tokens.shape:
        raise ValueError(f"context_atlas: experts {experts.shape}, classes {classes.shape} and "
                         f"tokens {tokens.shape} must have one shape")
    j = len(CLASSES)
    rng = np.random.default_rng(seed)
    real = conditional_mi(experts, classes, tokens, num_experts, j)
    runs = [conditional_mi(shuffle_within(experts, tokens, rng), classes, tokens, num_experts, j)
            for _ in range(shuffles)]
    return real, float(np.percentile(runs, 2.5)), float(np.percentile(runs, 97.5))


def strongest(at: Atlas, count: int = 4) -> list[tuple]:
    """The expert-class pairs outside chance with the most tokens above what chance gives.
    -> [(e, j, excess tokens)]"""
    n = at.counts.sum()
    expected = np.outer(at.counts.sum(1), at.counts.sum(0)) / max(n, 1)  # (E, Y)
    excess = np.where(outside(at), at.counts - expected, -np.inf)        # (E, Y)
    order = np.argsort(-excess, axis=None)[:count]                       # (count,)
    return [(*np.unravel_index(i, excess.shape), float(excess.flat[i])) for i in order
            if np.isfinite(excess.flat[i]) and excess.flat[i] > 0]


def outside(at: Atlas) -> np.ndarray:
    """(E, Y) True where the real share lies outside the shuffled 95% interval."""
    return (at.real.share < at.low.share) | (at.real.share > at.high.share)


def summary(at: Atlas, name: str = "") -> str:
    """Lines a chapter prints: mutual information, repeats, and selectivity against chance."""
    r, lo, hi = at.real, at.low, at.high
    sig = outside(at) & (at.counts.sum(0) > 0)[None, :]
    lines = [f"{name}: I(expert; class) {r.mutual_info:.3f} bits "
             f"(shuffled 95%: {lo.mutual_info:.3f}-{hi.mutual_info:.3f}); "
             f"same expert as the previous token {r.repeat:.1%} "
             f"(shuffled {lo.repeat:.1%}-{hi.repeat:.1%})",
             f"   class entropy per expert (bits) {np.array2string(r.entropy, precision=2)}; "
             f"shuffled about {np.median(lo.entropy):.2f}-{np.median(hi.entropy):.2f}; "
             f"{int(sig.sum())} of {int(np.isfinite(r.share).sum())} expert-class shares "
             f"outside chance"]
    return "\n".join(lines)


# ---------------------------------------------------------------- figures

def share_heatmap(ax, at: Atlas, title: str, min_count: int = 20):
    """Expert x class share relative to uniform, log2 colour scale (white = 1 = chance); a dot
    marks a share outside the shuffled 95% interval. Classes seen fewer than min_count times
    are left out.   -> the image (for a colour bar)."""
    keep = np.flatnonzero(at.counts.sum(0) >= min_count)                 # (Y',)
    share = at.real.share[:, keep]                                       # (E, Y')
    img = ax.imshow(np.log2(np.clip(share, 0.25, 4.0)), cmap="RdBu_r", vmin=-2, vmax=2,
                    aspect="auto")
    sig = outside(at)[:, keep]                                           # (E, Y')
    ys, xs = np.nonzero(sig)                                             # (outside,) x2
    ax.scatter(xs, ys, s=6, c="k", marker="o")
    ax.set_xticks(range(len(keep)))
    ax.set_xticklabels([CLASSES[j] for j in keep], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(share.shape[0]))
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=9)
    return img


def routing_snippet(ax, pieces, experts, num_experts: int, title: str, fontsize: float = 7.5):
    """Source text with each token's characters on the colour of its first-choice expert.

    pieces: the bytes of each token, in order (ASCII text reads best); experts: (N,)."""
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10")
    line = col = width = 0
    for piece, e in zip(pieces, experts):
        for ch in piece.decode("utf-8", errors="replace"):
            if ch == "\n":
                line, col = line + 1, 0
                continue
            ax.add_patch(plt.Rectangle((col, line), 1, 1, color=cmap(int(e) % 10), alpha=0.55,
                                       lw=0))
            if ch != " ":
                ax.text(col + 0.5, line + 0.55, ch, ha="center", va="center", fontsize=fontsize,
                        family="monospace")
            col += 1
            width = max(width, col)
    ax.set_xlim(0, width)
    ax.set_ylim(line + 1, 0)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return [plt.Rectangle((0, 0), 1, 1, color=cmap(e % 10), alpha=0.55) for e in range(num_experts)]

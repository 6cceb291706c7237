"""Chapter 9's data: the stdlib corpus, byte and BPE tokenizers, the batcher, the atlas.

The round trips run on every file of the corpus; BPE is trained on a 1 MB sample of the
training split (vocab 512) to stay fast, and the chapter's run checks its full tokenizer.
"""
import numpy as np
import pytest

from moe_np import atlas, text


@pytest.fixture(scope="module")
def corpus():
    return text.stdlib_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return text.BPETokenizer(text.learn_merges(text._word_counts(corpus.split("train"), 1_000_000),
                                               256))


# -- the corpus ----------------------------------------------------------------------------

def test_corpus_is_deterministic_and_split_by_file(corpus):
    again = text.stdlib_corpus()
    assert again.content_hash() == corpus.content_hash()
    assert list(corpus.paths) == sorted(corpus.paths)
    d = corpus.describe()
    assert d["train"]["files"] > 5 * d["val"]["files"] > 0
    assert d["train"]["bytes"] + d["val"]["bytes"] == sum(len(x) for x in corpus.data)
    assert not set(corpus.split_paths("train")) & set(corpus.split_paths("val"))
    assert not any(p.startswith(("site-packages/", "test/", "encodings/")) for p in corpus.paths)
    # a file's split depends on its path only: a smaller corpus keeps each file's side
    small = text.stdlib_corpus(max_files=40)
    side = dict(zip(corpus.paths, corpus.is_val))
    assert sum(side[p] != v for p, v in zip(small.paths, small.is_val)) <= 1   # the forced one


def test_content_hash_sees_one_byte(corpus):
    changed = text.Corpus(corpus.root, corpus.paths, (corpus.data[0] + b" ",) + corpus.data[1:],
                          corpus.is_val)
    assert changed.content_hash() != corpus.content_hash()


def test_corpus_bad_input():
    with pytest.raises(ValueError, match="max_files"):
        text.stdlib_corpus(max_files=1)
    with pytest.raises(ValueError, match="val_share"):
        text.stdlib_corpus(val_share=1.5)


# -- tokenizers ----------------------------------------------------------------------------

def test_byte_round_trip_every_file(corpus):
    tok = text.ByteTokenizer()
    for data in corpus.data:
        ids = tok.encode(data)
        assert ids.max(initial=0) < 256 and tok.decode(ids) == data


def test_chunks_cover_every_byte(corpus):
    for data in corpus.data[::25]:
        assert b"".join(text.chunks(data)) == data


def test_bpe_round_trip_every_file(corpus, bpe):
    assert bpe.vocab_size == 512
    total_bytes = total_tokens = 0
    for data in corpus.data:
        ids = bpe.encode(data)
        assert bpe.decode(ids) == data
        total_bytes, total_tokens = total_bytes + len(data), total_tokens + len(ids)
    assert total_bytes / total_tokens > 2.0          # it compresses Python source
    odd = "héllo\x00\r\n\tλ = 'ü'  # ☃\n".encode() + bytes(range(256))
    assert bpe.decode(bpe.encode(odd)) == odd


def test_bpe_saved_and_loaded(bpe, tmp_path):
    text.save_tokenizer(bpe, tmp_path / "tok.json")
    again = text.load_tokenizer(tmp_path / "tok.json")
    sample = b"def __init__(self, x):\n        return self.x + 1\n"
    assert again.merges == bpe.merges
    assert np.array_equal(again.encode(sample), bpe.encode(sample))


def test_bpe_learns_by_hand():
    """'ab' occurs 3 times, 'bc' twice: the first merge is (a, b) -> 256, then (256, c)
    from 'abc' twice (ties go to the smaller pair)."""
    merges = text.learn_merges({b"abc": 2, b"ab": 1, b"bc": 0 + 1}, 2)
    assert merges == [(ord("a"), ord("b")), (256, ord("c"))]
    tok = text.BPETokenizer(merges)
    assert tok.encode(b"abcab").tolist() == [257, 256]


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="token id 300"):
        text.ByteTokenizer().decode(np.array([1, 300]))
    with pytest.raises(ValueError, match="merge 0"):
        text.BPETokenizer([(256, 1)])
    with pytest.raises(ValueError, match="kind"):
        text.tokenizer_from_dict({"kind": "words"})


# -- the batcher ---------------------------------------------------------------------------

def test_batcher_windows_and_resume():
    stream = np.arange(1000) % 251
    b = text.Batcher(stream, context=16, batch_size=4, seed=3)
    first = b.next()
    assert first.shape == (4, 17)
    assert all(np.array_equal(np.diff(row) % 251, np.ones(16)) for row in first)   # contiguous
    b.next()
    state = b.state_dict()
    ahead = [b.next() for _ in range(3)]
    again = text.Batcher(stream, context=16, batch_size=4, seed=99)
    again.load_state_dict(state)
    assert all(np.array_equal(x, again.next()) for x in ahead)
    with pytest.raises(ValueError, match="context"):
        text.Batcher(stream[:10], context=16, batch_size=4)


def test_eval_windows_score_each_token_once():
    stream = np.arange(50)
    w = text.eval_windows(stream, 8)
    assert w.shape == (6, 9)
    assert np.array_equal(w[:, 1:].ravel(), np.arange(1, 49))


# -- the atlas: labels ---------------------------------------------------------------------

def test_labels_by_hand():
    src = b"if x:  # hi\n    print(len('a'), 10)\n"
    code = dict(zip(atlas.CLASSES, "kbionscNw?"))
    got = "".join(code[atlas.CLASSES[j]] for j in atlas.label_bytes(src))
    assert got == "kkwiowwccccN" + "wwww" + "bbbbbo" + "bbbo" + "sss" + "oow" + "nnoN"


def test_token_class_is_first_solid_byte(bpe):
    src = b"def f(x):\n    return x if x else None\n"
    ids, cls = atlas.token_classes(bpe, src)
    pieces = [bpe.table[i] for i in ids]
    assert b"".join(pieces) == src
    assert b" None" in pieces and b"\n    " in pieces
    for piece, c in zip(pieces, cls):
        if piece.strip(b" \t") in (b"if", b"else", b"return", b"def", b"None"):
            assert atlas.CLASSES[c] == "keyword", piece
        if piece.startswith(b"\n"):
            assert atlas.CLASSES[c] == "newline", piece


def test_every_validation_file_is_labelled(corpus):
    for data in corpus.split("val"):
        cls = atlas.label_bytes(data)
        assert len(cls) == len(data) and not (cls == atlas.CLASS_ID["other"]).any()


# -- the atlas: the shuffled baseline ------------------------------------------------------

def _random_routing(seed, n=16384, e=8):
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, len(atlas.CLASSES) - 1, n)
    experts = rng.integers(0, e, n)
    return experts, classes


def test_shuffled_routing_is_at_chance():
    experts, classes = _random_routing(0)
    at = atlas.atlas(experts, classes, 8, context=64, shuffles=100)
    seen = at.counts.sum(0) > 0
    assert np.allclose(at.real.share[:, seen], 1.0, atol=0.3)
    assert at.low.mutual_info <= at.real.mutual_info <= at.high.mutual_info
    assert at.low.repeat <= at.real.repeat <= at.high.repeat
    assert atlas.outside(at)[:, seen].mean() < 0.15         # about 5% by construction


def test_planted_specialisation_is_found():
    experts, classes = _random_routing(1)
    planted = np.where(classes == atlas.CLASS_ID["keyword"], 3, experts)   # expert 3 takes keywords
    at = atlas.atlas(planted, classes, 8, context=64, shuffles=100)
    k = atlas.CLASS_ID["keyword"]
    assert at.real.share[3, k] > at.high.share[3, k] > 1.0
    assert at.real.mutual_info > at.high.mutual_info
    # neighbours that keep their expert: a copy of the previous token's choice is found
    sticky = experts.copy()
    sticky[1::2] = sticky[0::2]
    assert atlas.atlas(sticky, classes, 8, context=64, shuffles=50).real.repeat > 0.5


def test_context_measure_separates_syntax_from_token_identity():
    rng = np.random.default_rng(2)
    n = 16384
    tokens, classes = rng.integers(0, 20, n), rng.integers(0, 9, n)
    by_token = tokens % 8                                    # routing by the token id alone
    real, low, high = atlas.context_atlas(by_token, classes, tokens, 8, shuffles=50)
    assert real == low == high == 0.0
    noisy = np.where(rng.random(n) < 0.5, by_token, rng.integers(0, 8, n))
    real, low, high = atlas.context_atlas(noisy, classes, tokens, 8, shuffles=50)
    assert low <= real <= high                               # chance, although I(e; c | v) > 0
    by_class = np.where(rng.random(n) < 0.5, by_token, classes % 8)   # the class moves the choice
    real, low, high = atlas.context_atlas(by_class, classes, tokens, 8, shuffles=50)
    assert real > 2 * high
    assert atlas.atlas(by_token, classes, 8, context=64, shuffles=50).real.mutual_info < 0.05


def test_atlas_bad_input():
    with pytest.raises(ValueError, match="whole windows"):
        atlas.atlas(np.zeros(10, int), np.zeros(10, int), 2, context=3)
    with pytest.raises(ValueError, match="expert ids"):
        atlas.atlas(np.full(6, 5), np.zeros(6, int), 2, context=3)

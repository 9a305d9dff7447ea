"""The length-bucketing batcher: little padding, nothing lost, same scores as plain batches."""
import numpy as np
import pytest
import torch

import hsvfast
from conftest import DATA_DIR, _missing, requires_cuda
from hsvfast.batching import BucketedBatches
from tiny_models import byte_level_bpe_tokenizer, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def read_sst2_train(n):
    path = DATA_DIR / "sst2" / "train.tsv"
    if not path.exists():
        _missing(str(path))
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1 : n + 1]]
    return [r[1] for r in rows], [int(r[0]) for r in rows]


def test_padding_waste_below_ten_percent_on_sst2(tokenizer):
    texts, labels = read_sst2_train(4096)
    batches = BucketedBatches(texts, labels, tokenizer, batch_size=64)
    seen = list(batches)
    assert len(seen) == len(batches) == 64
    assert batches.padding.efficiency >= 0.90
    assert sum(len(b["labels"]) for b in seen) == 4096
    assert sorted(torch.cat([b["labels"] for b in seen]).tolist()) == sorted(labels)
    real = sum(int(b["attention_mask"].sum()) for b in seen)
    assert real == batches.padding.real_tokens


def test_same_scores_as_unsorted_batches(tokenizer, minilm_path):
    from transformers import AutoModel

    texts, labels = read_sst2_train(300)
    model = AutoModel.from_pretrained(minilm_path).eval()
    plain = []
    for start in range(0, 300, 50):
        enc = dict(tokenizer(texts[start : start + 50], padding=True, return_tensors="pt",
                             return_special_tokens_mask=True))
        enc["labels"] = torch.tensor(labels[start : start + 50])
        plain.append(enc)
    a = hsvfast.score(model, plain, layers=[0, 5])
    b = hsvfast.score(model, BucketedBatches(texts, labels, tokenizer, batch_size=32, chunk_batches=4), layers=[0, 5])
    # Different padding changes the forward's float32 rounding, nothing else.
    np.testing.assert_allclose(a.metrics["variability"], b.metrics["variability"], rtol=1e-4)
    assert a.class_counts == b.class_counts


def test_sentence_pairs_and_string_labels(tokenizer):
    first = ["the cat sat", "a dog ran far away", "it rained"]
    second = ["on the mat", "quickly", "all day long today"]
    batches = list(BucketedBatches(first, ["yes", "no", "yes"], tokenizer, text_pairs=second, batch_size=2))
    assert [len(b["labels"]) for b in batches] == [2, 1]
    assert all(isinstance(b["labels"], list) for b in batches)
    assert any(int(b["token_type_ids"].max()) == 1 for b in batches)


def test_mismatched_lengths_are_refused(tokenizer):
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        BucketedBatches(["a", "b"], [0], tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        BucketedBatches(["a"], [0], tokenizer, batch_size=0)
    with pytest.raises(TypeError, match=r"texts\[1\] is None, not a string"):
        BucketedBatches(["a", None], [0, 1], tokenizer)
    with pytest.raises(TypeError, match=r"text_pairs\[0\] is nan"):
        BucketedBatches(["a", "b"], [0, 1], tokenizer, text_pairs=[float("nan"), "c"])


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 8.5}, "batch_size must be a positive integer, got 8.5"),
    ({"max_length": 0}, "max_length must be a positive integer"),
    # The tokenizer itself would not truncate at all below its special tokens: the batches would be full length.
    ({"max_length": 2}, "max_length=2 leaves no room for text: the tokenizer adds 2 special tokens to each text"),
    ({"max_length": 3, "text_pairs": ["c", "d"]}, "max_length=3 .* adds 3 special tokens to each pair"),
    ({"labels": [0.5, 1.0]}, "labels have dtype float64"),
    ({"labels": ["pos", None]}, "label None at position 1: examples without a label cannot be scored"),
])
def test_bad_arguments_are_refused_when_the_batcher_is_made(tokenizer, kwargs, match):
    arguments = {"texts": ["a b c d", "e f g h"], "labels": [0, 1], "tokenizer": tokenizer, **kwargs}
    with pytest.raises((TypeError, ValueError), match=match):
        BucketedBatches(**arguments)
    assert [len(b["input_ids"][0]) for b in BucketedBatches(["a b c d"], [0], tokenizer, max_length=3)] == [3]


def _reference_batch(tokenizer, texts, pairs, rows, max_length):
    """What transformers makes of these rows: tokenised together, padded on the right."""
    encoded = tokenizer([texts[r] for r in rows], [pairs[r] for r in rows] if pairs else None, truncation=True,
                        max_length=max_length, padding=True, return_special_tokens_mask=True, return_tensors="pt")
    return dict(encoded)


@pytest.fixture(scope="module", params=["minilm_wordpiece", "byte_level_bpe"])
def any_tokenizer(request):
    if request.param == "minilm_wordpiece":
        return request.getfixturevalue("tokenizer")
    return byte_level_bpe_tokenizer(read_sst2_train(2000)[0])


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_batches_equal_what_the_tokenizer_makes_padded_on_the_right(any_tokenizer, pairs, padding_side):
    tokenizer = any_tokenizer
    texts, _ = read_sst2_train(200)
    second = texts[100:] + texts[:100] if pairs else None
    max_length = 24  # truncates the longer texts and pairs
    original = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        batcher = BucketedBatches(texts, list(range(200)), tokenizer, text_pairs=second, batch_size=16,
                                  max_length=max_length, chunk_batches=3)
        seen = []
        for batch in batcher:
            rows = batch["labels"].tolist()  # labels are the row numbers
            seen += rows
            tokenizer.padding_side = "right"
            expected = _reference_batch(tokenizer, texts, second, rows, max_length)
            tokenizer.padding_side = padding_side
            assert set(batch) == set(expected) | {"labels"}
            for key, value in expected.items():
                assert batch[key].dtype == torch.long and torch.equal(batch[key], value), key
        assert sorted(seen) == list(range(200))
        assert batcher.padding.real_tokens == sum(len(tokenizer(t, p, truncation=True, max_length=max_length)["input_ids"])
                                                  for t, p in zip(texts, second or [None] * 200))
    finally:
        tokenizer.padding_side = original


def test_the_callers_tokenizer_is_left_alone(tokenizer):
    state = lambda: (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)  # noqa: E731
    before = state()
    list(BucketedBatches(["a short text", "and a longer one than that"], [0, 1], tokenizer, max_length=3))
    assert state() == before


def test_tokenizer_without_a_backend_gives_the_same_batches(tokenizer, monkeypatch):
    texts, labels = read_sst2_train(100)
    fast = list(BucketedBatches(texts, labels, tokenizer, batch_size=16, max_length=20))
    monkeypatch.setattr(hsvfast.batching, "_truncating_backend", lambda tokenizer, max_length: None)
    called = list(BucketedBatches(texts, labels, tokenizer, batch_size=16, max_length=20))
    assert len(fast) == len(called)
    for a, b in zip(fast, called):
        assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_tokenizer_without_a_pad_token_pads_with_end_of_sequence():
    decoder_like = tiny_tokenizer(pad_token=False)
    assert decoder_like.pad_token is None
    (batch,) = BucketedBatches(["the cat sat on the mat", "the cat"], [0, 1], decoder_like, batch_size=2)
    assert set(batch) == {"input_ids", "attention_mask", "special_tokens_mask", "labels"}
    assert batch["input_ids"].tolist() == [[2, 3, 0, 0, 0, 0, 0], [2, 3, 4, 5, 2, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert batch["special_tokens_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]]
    assert batch["labels"].tolist() == [1, 0]
    (padded,) = BucketedBatches(["the cat sat on the mat", "the cat"], [0, 1], tiny_tokenizer(), batch_size=2)
    assert padded["input_ids"][0].tolist() == [2, 3, 0, 7, 7, 7, 7]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_pinned_batches_need_a_cuda_device():
    with pytest.raises(ValueError, match="pin_memory=True"):
        BucketedBatches(["the cat"], [0], tiny_tokenizer(), pin_memory=True)


@requires_cuda
def test_pinned_batches_hold_the_same_values():
    texts = ["the cat sat on the mat", "the cat", "on the mat the cat sat", "sat"] * 5
    plain = list(BucketedBatches(texts, list(range(20)), tiny_tokenizer(), batch_size=8))
    pinned = list(BucketedBatches(texts, list(range(20)), tiny_tokenizer(), batch_size=8, pin_memory=True))
    for a, b in zip(plain, pinned):
        assert all(b[key].is_pinned() for key in b if key != "labels")
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_texts_of_no_token_are_batched_counted_and_scored_as_nothing_to_pool():
    """A tokenizer that adds no special tokens (GPT-2's) makes an empty text a sequence of no token: it is
    batched with an all-zero attention mask, and not counted by label_counts (score skips it)."""
    from tiny_models import tiny_model

    texts = ["the cat sat", "", "on the mat", "the", "", "mat on the cat", ""]
    labels = [0, 1, 2, 0, 1, 2, 1]
    batcher = BucketedBatches(texts, labels, tiny_tokenizer(eos=False), batch_size=3, chunk_batches=1)
    batches = list(batcher)
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(3, 3), (3, 4), (1, 0)]  # chunks of 3
    assert sorted(row for batch in batches for row in batch["labels"].tolist()) == sorted(labels)
    lengths = sorted(int(n) for batch in batches for n in batch["attention_mask"].sum(1))
    assert lengths == [0, 0, 0, 1, 3, 3, 4]
    assert batcher.label_counts("mean") == {0: 2, 2: 2} == batcher.label_counts("mean_all")
    # The last batch has no token at all: score skips it without running the model (which would fail on it).
    with pytest.warns(UserWarning, match="skipping"):
        report = hsvfast.score(tiny_model("gpt2"), batcher, pooling="mean_all")
    assert report.num_examples == 4 and report.num_skipped == 3 and report.class_counts == {0: 2, 2: 2}


def test_score_counts_the_batchers_classes_when_per_class_matrices_do_not_fit():
    from tiny_models import tiny_model

    texts = ["the cat sat", "on the mat", "the mat", "cat sat on the mat", "", "sat", "the cat", "mat on the cat"] * 6
    labels = [i % 3 for i in range(len(texts))]
    batcher = BucketedBatches(texts, labels, tiny_tokenizer(), batch_size=8)
    # The empty texts are only <eos>, a special token: nothing to pool under "mean", so not counted.
    expected = {c: sum(1 for t, y in zip(texts, labels) if y == c and t) for c in range(3)}
    assert batcher.label_counts("mean") == expected
    assert batcher.label_counts("mean_all") == {c: labels.count(c) for c in range(3)}
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match="skipping"):
        roomy = hsvfast.score(model, batcher)
    with pytest.warns(UserWarning, match="skipping"):
        tight = hsvfast.score(model, batcher, max_memory=100_000)  # < 3 classes × 4 layers × 32² float64
    assert roomy.stats.mode == "per_class" and tight.stats.mode == "balanced"
    assert tight.num_skipped == 6 and tight.class_counts == expected
    np.testing.assert_allclose(tight.metrics["variability"], roomy.metrics["variability"], rtol=1e-9)

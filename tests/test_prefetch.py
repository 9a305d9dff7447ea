"""Reading each batch's host facts one batch ahead (hsvfast.prefetch)."""
import numpy as np
import pytest
import torch

from hsvfast.prefetch import PreparedBatch, prepared_batches, read_ahead


def test_read_ahead_takes_the_next_item_before_yielding_one():
    taken = []

    def source():
        for i in range(4):
            taken.append(i)
            yield i

    seen = []
    for item in read_ahead(source()):
        seen.append((item, list(taken)))
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3])]
    assert list(read_ahead([])) == [] and list(read_ahead([7])) == [7]


def test_an_error_taking_the_next_item_comes_after_the_item_before_it():
    def failing():
        yield 0
        yield 1
        raise OSError("disk went away")

    seen = []
    with pytest.raises(OSError, match="disk went away"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [0, 1]


@pytest.mark.parametrize("labels", [torch.tensor([2, 0, 1]), np.array([2, 0, 1]), [2, 0, 1], ["b", "a", "c"]])
def test_host_batches_give_their_labels_and_poolable_rows(labels):
    batch = {"input_ids": torch.ones(3, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), "labels": labels}
    prepared = PreparedBatch(5, batch, "mean_all", None)
    got, poolable = prepared.labels_and_poolable()
    if isinstance(labels, torch.Tensor):  # handed over as an int64 array: no Python list per batch
        assert isinstance(got, np.ndarray) and got.dtype == np.int64
        got = got.tolist()
    assert got == list(np.asarray(labels).tolist()) and all(type(a) is type(b) for a, b in zip(got, np.asarray(labels).tolist()))
    assert poolable.dtype == bool and poolable.tolist() == [True, False, True]
    assert prepared.index == 5 and prepared.weights.shape == (3, 4)


def test_bad_batches_are_named_when_prepared():
    good = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": [0, 1]}
    with pytest.raises(TypeError, match="Regression targets"):
        list(prepared_batches([{**good, "labels": torch.tensor([0.5, 1.5])}], "mean_all", None))
    with pytest.raises(ValueError, match="batch 1 has no labels"):
        list(prepared_batches([good, {"input_ids": good["input_ids"]}], "mean_all", None))
    with pytest.raises(TypeError, match="batch 0 is a list"):
        list(prepared_batches([[1, 2]], "mean_all", None))
    assert [p.index for p in prepared_batches([good, good, good], "mean_all", None,
                                              skip=lambda index, batch: index == 1)] == [0, 2]

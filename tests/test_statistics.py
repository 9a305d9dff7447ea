"""Invariances of the streaming statistics on fixed token vectors."""
import numpy as np
import pytest
import torch

from hsvfast import Statistics
from hsvfast.statistics import per_class_bytes, stage_rows
from hsvfast.metrics import layer_metrics
from hsvfast.storage import load_statistics
import reference as ref
from conftest import DEVICES

DIM = 24


def corpus(seed=0, n=57, classes=3, max_len=9, offset=1e4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=n)
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)
    centres = rng.normal(size=(classes, DIM))
    tokens = [offset + centres[labels[i]] + rng.normal(scale=0.3, size=(lengths[i], DIM)) for i in range(n)]
    return tokens, labels


def batches(tokens, labels, order, batch_size, padding="right", pad_value=0.0):
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(tokens[i]) for i in rows)
        act = np.full((len(rows), width, DIM), pad_value)
        weights = np.zeros((len(rows), width), dtype=np.float32)
        for r, i in enumerate(rows):
            length = len(tokens[i])
            span = slice(0, length) if padding == "right" else slice(width - length, width)
            act[r, span] = tokens[i]
            weights[r, span] = 1.0
        yield torch.from_numpy(act), torch.from_numpy(weights), [int(labels[i]) for i in rows]


def accumulate(tokens, labels, order, batch_size, padding="right", dtype=torch.float64, complete=True,
               unpoolable=(), **kwargs):
    """Statistics of two layers (the tokens, and twice the tokens); rows in ``unpoolable`` have no token to pool."""
    stats = Statistics([0, 1], **kwargs)
    starts = range(0, len(order), batch_size)
    for start, (act, weights, batch_labels) in zip(starts, batches(tokens, labels, order, batch_size, padding)):
        poolable = np.array([i not in unpoolable for i in order[start : start + batch_size]])
        weights[~torch.from_numpy(poolable)] = 0.0
        plan = stats.plan_batch(batch_labels, poolable)
        act, weights = act.to(stats.device, dtype), weights.to(stats.device)
        for position in range(2):
            stats.fold(position, act * (position + 1), weights, plan)
        stats.finish_batch(plan)
    if complete:
        stats.check_complete()
    return stats


def summary(stats, position=0):
    moments = stats.class_moments(position)
    order = np.argsort([repr(label) for label in stats.labels])
    means = moments.means[order]
    result = {
        "counts": moments.counts[order],
        "centred_means": means - means.mean(0),
        "within_trace": torch.tensor(moments.within_trace),
        **{k: torch.tensor(v) for k, v in layer_metrics(moments).items()},
    }
    if moments.has_covariance:
        result["within"] = moments.within_matrix()
        directions = torch.linalg.qr(torch.randn(means.shape[1], 3, dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(0)))[0]
        result["within_quadratic"] = moments.within_quadratic(directions.to(means.device))
        torch.testing.assert_close(result["within_quadratic"].cpu(),
                                   ((result["within"].cpu() @ directions) * directions).sum(0), rtol=1e-9, atol=0)
    return {key: value.cpu() for key, value in result.items()}  # comparable with statistics on any device


def assert_same(a, b, rtol=1e-9):
    assert a.keys() == b.keys()
    for key in a:
        scale = float(a[key].abs().max())
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=rtol * scale, msg=key)


def test_matches_reference_on_pooled_features(kernel_backend):
    tokens, labels = corpus()
    stats = accumulate(tokens, labels, np.arange(len(labels)), 8)
    pooled = np.stack([t.mean(0) for t in tokens])
    for position in range(2):
        got = layer_metrics(stats.class_moments(position))
        features = pooled * (position + 1)
        assert ref.relative_error(got["variability"], ref.rank_aware_variability(features, labels)) <= 1e-9
        assert ref.relative_error(got["trace_ratio"], ref.trace_ratio(features, labels)) <= 1e-9
        _, within, _ = ref.class_moments(features, labels)
        np.testing.assert_allclose(stats.class_moments(position).within_matrix().numpy(), within, rtol=1e-7,
                                   atol=1e-9 * np.abs(within).max())


@pytest.mark.parametrize("device", DEVICES)
def test_staged_gram_updates_survive_layout_changes_and_saves(device, tmp_path):
    """Per-class rows are staged and folded R at a time: overflowing classes, classes that
    arrive late (capacity doubles), one batch larger than R, and a save in the middle all
    give the reference's numbers."""
    tokens, labels = corpus(seed=7, n=300, classes=6)
    order = np.argsort(-labels, kind="stable")  # class 5 first … classes 1 and 0 only at the end
    sizes = [5, 30, 3] + [9] * 40              # 30 rows of class 5 in one batch > R = DIM // 2
    stats = Statistics([0, 1], device=device)
    start = 0
    for step, size in enumerate(sizes):
        rows = order[start : start + size]
        start += size
        if not len(rows):
            break
        act, weights, batch_labels = next(batches(tokens, labels, rows, len(rows)))
        plan = stats.plan_batch(batch_labels, np.ones(len(rows), bool))
        for position in range(2):
            stats.fold(position, (act * (position + 1)).to(device), weights.to(device), plan)
        stats.finish_batch(plan)
        if step == 4:
            stats.save(tmp_path / "mid.safetensors")  # flushes; the pass goes on
            assert not stats._staged.any()
    assert np.sum(labels == 5) >= 35 and start >= len(order) and stats._stage_rows == 30
    pooled = np.stack([t.mean(0) for t in tokens])
    for position in range(2):
        features = pooled * (position + 1)
        got = layer_metrics(stats.class_moments(position))
        assert ref.relative_error(got["variability"], ref.rank_aware_variability(features, labels)) <= 1e-9
        _, within, _ = ref.class_moments(features, labels)
        np.testing.assert_allclose(stats.class_moments(position).within_matrix().cpu().numpy(), within, rtol=1e-7,
                                   atol=1e-9 * np.abs(within).max())


@pytest.mark.parametrize("device", DEVICES)
def test_layers_of_one_width_get_one_batched_gram_update_per_class(device, monkeypatch, tmp_path):
    """The per-class second moments of all layers live in one tensor (LayerStack): a flush is one
    batched GEMM per class. Same numbers as a GEMM per layer, through class growth, a save and a merge."""
    from hsvfast import statistics as statistics_module

    tokens, labels = corpus(seed=3, n=200, classes=5)
    order = np.argsort(-labels, kind="stable")  # classes arrive late: the capacity grows mid-pass
    stacked = accumulate(tokens, labels, order, 7, device=device)
    assert stacked._intact_stack() is not None
    stacked.save(tmp_path / "stacked.safetensors")
    monkeypatch.setattr(statistics_module.Statistics, "_intact_stack", lambda self: None)
    per_layer = accumulate(tokens, labels, order, 7, device=device)
    rtol = 1e-12 if device == "cpu" else 1e-10  # a GPU's float64 atomics add the sums in any order
    for position in range(2):
        assert_same(summary(stacked, position), summary(per_layer, position), rtol=rtol)
        loaded = load_statistics(tmp_path / "stacked.safetensors", device=device)
        assert_same(summary(loaded, position), summary(per_layer, position), rtol=rtol)
    monkeypatch.undo()
    half = len(order) // 2
    merged = accumulate(tokens, labels, order[:half], 7, device=device, complete=False)
    merged.merge(accumulate(tokens, labels, order[half:], 7, device=device, complete=False))
    for position in range(2):
        assert_same(summary(merged, position), summary(per_layer, position), rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_activations_on_another_device_are_refused(device):
    """The kernels take raw pointers: activations or weights elsewhere than the statistics are an error
    (a CPU kernel handed a GPU buffer would crash; the GPU run of this suite once did)."""
    stats = Statistics([0], device=device)
    plan = stats.plan_batch([0, 1], np.ones(2, bool))
    elsewhere = "meta" if device == "cpu" else "cpu"
    act, weights = torch.zeros(2, 3, DIM, device=elsewhere), torch.ones(2, 3, device=elsewhere)
    with pytest.raises(ValueError, match=r"activations on (meta|cpu).*move the activations and weights there"):
        stats.fold(0, act, weights, plan)
    with pytest.raises(ValueError, match=r"token weights on (meta|cpu)"):
        stats.fold(0, torch.zeros(2, 3, DIM, device=device), weights, plan)
    stats.fold(0, torch.ones(2, 3, DIM, device=device), torch.ones(2, 3, device=device), plan)  # the right place works
    stats.finish_batch(plan)
    assert stats.class_moments(0).counts.tolist() == [1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_features_from_anywhere_are_added_on_the_statistics_device(device):
    """add_features takes NumPy or a tensor on any device (the kernels would misread another
    device's buffer): same ν as the reference either way."""
    tokens, labels = corpus(seed=5, n=40, classes=3)
    pooled = np.stack([t.mean(0) for t in tokens])
    expected = ref.rank_aware_variability(pooled, labels)
    sources = [pooled, torch.from_numpy(pooled)] + ([torch.from_numpy(pooled).cuda()] if device == "cuda" else [])
    for source in sources:
        for where in {device, "cpu"}:
            stats = Statistics([0], device=where)
            stats.add_features(source, labels.tolist())
            got = layer_metrics(stats.class_moments(0))["variability"]
            assert ref.relative_error(got, expected) <= 1e-9, (type(source), where)


def test_layers_of_another_width_keep_their_own_second_moments():
    tokens, labels = corpus(seed=4, n=60, classes=3)
    pooled = np.stack([t.mean(0) for t in tokens])
    wider = np.concatenate([pooled, pooled[:, :2] ** 2 / 1e4], axis=1)
    stats = Statistics([0, 1])
    for start in range(0, len(labels), 8):
        rows = slice(start, start + 8)
        plan = stats.plan_batch(labels[rows].tolist(), np.ones(len(labels[rows]), bool))
        for position, features in enumerate((pooled, wider)):
            stats.fold(position, torch.from_numpy(features[rows]).unsqueeze(1), torch.ones(len(labels[rows]), 1), plan)
        stats.finish_batch(plan)
    assert stats._intact_stack() is None  # layer 1 is not in the stack: a GEMM per layer
    for position, features in enumerate((pooled, wider)):
        _, within, _ = ref.class_moments(features, labels)
        np.testing.assert_allclose(stats.class_moments(position).within_matrix().numpy(), within, rtol=1e-7,
                                   atol=1e-9 * np.abs(within).max())


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batch_size_order_and_padding_do_not_matter(kernel_backend, batch_size):
    tokens, labels = corpus(seed=1)
    baseline = summary(accumulate(tokens, labels, np.arange(len(labels)), 7))
    shuffled = np.random.default_rng(batch_size).permutation(len(labels))
    assert_same(baseline, summary(accumulate(tokens, labels, shuffled, batch_size)))
    assert_same(baseline, summary(accumulate(tokens, labels, shuffled, batch_size, padding="left")))


def test_split_and_merge(kernel_backend):
    tokens, labels = corpus(seed=2)
    order = np.random.default_rng(0).permutation(len(labels))
    whole = accumulate(tokens, labels, order, 6)
    parts = [accumulate(tokens, labels, order[k::3], 4) for k in range(3)]
    merged = parts[2].merge(parts[0]).merge(parts[1])
    for position in range(2):
        assert_same(summary(whole, position), summary(merged, position))


def test_merge_adopts_classes_missing_from_one_part():
    tokens, labels = corpus(seed=3)
    order = np.arange(len(labels))
    only_zero = order[labels == 0]
    rest = order[labels != 0]
    stats_zero = Statistics([0, 1])
    for act, weights, batch_labels in batches(tokens, labels, only_zero, 5):
        plan = stats_zero.plan_batch(batch_labels, np.ones(len(batch_labels), bool))
        for position in range(2):
            stats_zero.fold(position, act * (position + 1), weights, plan)
        stats_zero.finish_batch(plan)
    merged = stats_zero.merge(accumulate(tokens, labels, rest, 5))
    assert_same(summary(accumulate(tokens, labels, order, 5)), summary(merged))


def test_balanced_mode_equals_per_class_mode(kernel_backend):
    tokens, labels = corpus(seed=4, classes=5)
    counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    order = np.arange(len(labels))
    per_class = summary(accumulate(tokens, labels, order, 9))
    balanced = accumulate(tokens, labels, order, 9, class_counts=counts)
    assert balanced.mode == "balanced" and balanced.moments[0].second.dim() == 2
    assert_same(per_class, summary(balanced))
    halves = [accumulate(tokens, labels, order[k::2], 4, class_counts=counts, complete=False) for k in range(2)]
    merged = halves[0].merge(halves[1])
    merged.check_complete()
    assert_same(per_class, summary(merged))


@pytest.mark.parametrize("mode", ["per_class", "balanced"])
def test_rows_without_a_token_to_pool_are_left_out(mode, kernel_backend):
    tokens, labels = corpus(seed=8, classes=4)
    dropped = {3, 10, 11, 30, 56}  # row 3 is class 3's first row; 56 is the last row
    kept = np.array([i for i in range(len(labels)) if i not in dropped])
    counts = {int(c): int((labels[kept] == c).sum()) for c in np.unique(labels)}
    kwargs = {"class_counts": counts} if mode == "balanced" else {}
    stats = accumulate(tokens, labels, np.arange(len(labels)), 7, unpoolable=dropped, **kwargs)
    assert stats.mode == mode and stats.num_skipped == len(dropped) and stats.num_examples == len(kept)
    assert_same(summary(accumulate(tokens, labels, kept, 7)), summary(stats))


def test_half_precision_activations_match_their_float64_values(kernel_backend):
    tokens, labels = corpus(seed=5, offset=0.0)
    order = np.arange(len(labels))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        rounded = [torch.from_numpy(t).to(dtype).double().numpy() for t in tokens]
        expected = summary(accumulate(rounded, labels, order, 8))
        assert_same(expected, summary(accumulate(tokens, labels, order, 8, dtype=dtype)))


def test_negative_memory_cap_is_refused():
    with pytest.raises(ValueError, match="max_memory must be a number of bytes >= 0, got -1"):
        Statistics([0], max_memory=-1)


def test_many_classes_without_counts_hits_the_memory_cap():
    tokens, labels = corpus(seed=6, n=200, classes=40)
    with pytest.raises(MemoryError, match="class_counts"):
        accumulate(tokens, labels, np.arange(len(labels)), 50, max_memory=10 * 2 * 8 * DIM * DIM)


def test_capacity_grows_exactly_where_doubling_would_pass_the_cap(kernel_backend):
    """Classes arriving one by one grow the accumulators by doubling (2, 4, 8 …); where doubling would
    pass max_memory but the classes themselves fit, they get exactly the room they need."""
    tokens, labels = corpus(seed=9, n=80, classes=5)
    order = np.argsort(labels, kind="stable")  # class by class: the 5th class arrives at capacity 4
    fits_five = 2 * per_class_bytes(5, DIM)
    assert fits_five < 2 * per_class_bytes(8, DIM)
    stats = accumulate(tokens, labels, order, 6, max_memory=fits_five)
    assert stats.capacity == 5
    assert_same(summary(accumulate(tokens, labels, order, 6)), summary(stats))
    with pytest.raises(MemoryError, match="class_counts"):
        accumulate(tokens, labels, order, 6, max_memory=fits_five - 1)


def test_memory_cap_counts_the_staging_buffers():
    tokens, labels = corpus(seed=6, n=60, classes=3)  # all 3 classes in the first batch: capacity 3
    matrices_only = 2 * 3 * 8 * DIM * DIM  # 2 layers × 3 classes × d² float64
    staged = 2 * 8 * DIM * (3 * stage_rows(3, DIM) + 1)
    assert per_class_bytes(3, DIM) * 2 == matrices_only + staged
    with pytest.raises(MemoryError, match="staging"):
        accumulate(tokens, labels, np.arange(len(labels)), 8, max_memory=matrices_only + staged - 1)
    accumulate(tokens, labels, np.arange(len(labels)), 8, max_memory=matrices_only + staged)


def test_class_counts_must_match_what_was_seen():
    tokens, labels = corpus(seed=7)
    counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    counts[0] += 1
    with pytest.raises(ValueError, match="differ from the counts"):
        accumulate(tokens, labels, np.arange(len(labels)), 8, class_counts=counts)
    with pytest.raises(ValueError, match="not in class_counts"):
        accumulate(tokens, labels, np.arange(len(labels)), 8, class_counts={0: 5, 1: 5})
    with pytest.raises(ValueError, match="positive integers"):
        Statistics([0], class_counts={0: 0, 1: 3})


# ------------------------------------------------------------------------ properties (hypothesis)
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_CORPUS = corpus(seed=11, n=40, classes=3)
_WHOLE = summary(accumulate(*_CORPUS, np.arange(40), 40))


def _part(rows, batch_size):
    return accumulate(*_CORPUS, np.asarray(rows), batch_size, complete=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order_seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 39), max_size=4, unique=True),
       batch_size=st.integers(1, 16))
def test_any_split_and_batching_gives_the_same_statistics(order_seed, cuts, batch_size):
    order = np.random.default_rng(order_seed).permutation(40)
    bounds = [0, *sorted(cuts), 40]
    parts = [_part(order[a:b], batch_size) for a, b in zip(bounds, bounds[1:])]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    merged.check_complete()
    assert_same(_WHOLE, summary(merged))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_merge_is_commutative_and_associative(seed):
    order = np.random.default_rng(seed).permutation(40)
    rows = np.array_split(order, 3)
    a, b, c = (lambda: _part(rows[0], 5)), (lambda: _part(rows[1], 7)), (lambda: _part(rows[2], 3))
    left = a().merge(b()).merge(c())          # (a + b) + c
    right = a().merge(b().merge(c()))          # a + (b + c)
    swapped = c().merge(a()).merge(b())        # c + a + b
    for stats in (left, right, swapped):
        stats.check_complete()
    assert_same(summary(left), summary(right))
    assert_same(summary(left), summary(swapped))


@settings(max_examples=60, deadline=None)
@given(batches_=st.lists(st.lists(st.tuples(st.one_of(st.integers(-3, 5), st.booleans(), st.just(1 << 21)),
                                             st.booleans()), max_size=12), min_size=1, max_size=6))
def test_integer_labels_take_the_lookup_table_path_with_the_same_ids(batches_):
    """plan_batch's lookup table for integer labels numbers classes exactly as the row-by-row path
    (batches with negative, huge or bool labels take the row path and must leave the table consistent)."""
    fast, slow = Statistics([0]), Statistics([0])
    for rows in batches_:
        labels = [label for label, _ in rows]
        poolable = np.array([ok for _, ok in rows], dtype=bool)
        got = fast._class_ids(labels, poolable)
        want = slow._class_ids_by_row(labels, poolable)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
        assert fast.labels == slow.labels
        assert [type(label) for label in fast.labels] == [type(label) for label in slow.labels]


def test_labels_of_mixed_types_are_one_class_when_equal_and_refused_when_they_only_read_alike():
    stats = Statistics([0])
    ids, new = stats._class_ids([1, "a", True, 1.0, "b"], np.ones(5, bool))
    # Python's own equality decides: 1 == True == 1.0 are one class, "a" and "b" are others.
    assert ids.tolist() == [0, 1, 0, 0, 2] and stats.labels == [1, "a", "b"]
    assert new == [(0, 0), (1, 1), (2, 4)]
    # 1 and "1" were two classes (half a file's labels read as text): a data error, not a second class.
    with pytest.raises(ValueError, match=r"labels 1 and '1' read the same but are different classes"):
        stats._class_ids(["1"], np.ones(1, bool))
    assert stats.labels == [1, "a", "b"]

"""ν and the trace ratio against independent float64 references on random and adversarial features."""
import warnings

import numpy as np
import pytest
import torch

import hsvfast
import reference as ref


def gaussian_classes(rng, num_classes, dim, per_class, offset=0.0, spread=1.0, separation=1.0):
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.normal(scale=separation, size=(num_classes, dim))
    features = offset + centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return features, labels


@pytest.mark.parametrize("num_classes", [2, 3, 5, 11, 20])
@pytest.mark.parametrize("dim,offset", [(16, 0.0), (128, 1e4), (1024, 1e3)])
def test_matches_official_formula(num_classes, dim, offset):
    rng = np.random.default_rng(num_classes * 1000 + dim)
    features, labels = gaussian_classes(rng, num_classes, dim, per_class=40, offset=offset,
                                        spread=rng.uniform(0.5, 2.0, size=dim))
    expected = ref.official_variability(features, labels)
    assert ref.relative_error(hsvfast.variability(features, labels), expected) <= 1e-6
    assert ref.relative_error(hsvfast.trace_ratio(features, labels), ref.trace_ratio(features, labels)) <= 1e-9


def test_binary_closed_form():
    rng = np.random.default_rng(0)
    features, labels = gaussian_classes(rng, 2, 64, per_class=100, offset=3.0)
    assert ref.relative_error(hsvfast.variability(features, labels), ref.binary_variability(features, labels)) <= 1e-9


@pytest.mark.parametrize("case", ["huge_means_tiny_variance", "imbalance", "many_classes", "few_per_class",
                                  "wide_with_massive_activations"])
def test_adversarial(case):
    rng = np.random.default_rng(7)
    if case == "huge_means_tiny_variance":
        # Outlier dimensions: means of 1e4 with within-class std 1e-3 (cancellation bait).
        features, labels = gaussian_classes(rng, 7, 48, per_class=50, spread=1e-3, separation=1e-2)
        features[:, :5] += 1e4
    elif case == "imbalance":
        labels = np.concatenate([np.zeros(990, int), np.ones(10, int), np.full(100, 2)])
        features = rng.normal(size=(len(labels), 32)) + labels[:, None] * 0.5
    elif case == "many_classes":
        features, labels = gaussian_classes(rng, 77, 96, per_class=12, offset=50.0)
    elif case == "wide_with_massive_activations":
        # Llama-like residual stream: d = 2048, a few dimensions at 1e3. A d×d pinv of Σ_b (what
        # hand-written code does) inverts round-off there and returns ~1e14 (seen on Llama-1B).
        labels = rng.integers(0, 2, 2500)
        features = rng.normal(size=(len(labels), 2048)) + 0.05 * labels[:, None]
        features[:, :4] += 1e3
    else:
        features, labels = gaussian_classes(rng, 4, 200, per_class=3)  # N < d: Σ_w singular
    expected = ref.rank_aware_variability(features, labels)
    assert ref.relative_error(hsvfast.variability(features, labels), expected) <= 1e-6
    assert ref.relative_error(hsvfast.trace_ratio(features, labels), ref.trace_ratio(features, labels)) <= 1e-8


def test_float32_features_lose_nothing_against_float64():
    rng = np.random.default_rng(3)
    features, labels = gaussian_classes(rng, 3, 64, per_class=200, offset=100.0)
    features32 = features.astype(np.float32)
    expected = ref.official_variability(features32.astype(np.float64), labels)
    assert ref.relative_error(hsvfast.variability(torch.from_numpy(features32), labels), expected) <= 1e-9


def test_invariant_to_translation_scale_rotation():
    rng = np.random.default_rng(11)
    features, labels = gaussian_classes(rng, 4, 24, per_class=60)
    base = hsvfast.variability(features, labels)
    rotation, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    transformed = 37.5 * features @ rotation + rng.normal(scale=1e3, size=24)
    assert ref.relative_error(hsvfast.variability(transformed, labels), base) <= 1e-9
    assert ref.relative_error(hsvfast.trace_ratio(transformed, labels), hsvfast.trace_ratio(features, labels)) <= 1e-9


def test_labels_any_hashable_and_sparse_ids():
    rng = np.random.default_rng(5)
    features, labels = gaussian_classes(rng, 3, 10, per_class=30)
    mapped = np.array([3, 17, 42])[labels]
    names = [["neg", "neu", "pos"][k] for k in labels]
    base = hsvfast.variability(features, labels)
    assert hsvfast.variability(features, mapped) == pytest.approx(base, rel=1e-12)
    assert hsvfast.variability(features, names) == pytest.approx(base, rel=1e-12)


def test_coincident_class_means_give_infinity():
    features = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    assert hsvfast.variability(features, [0, 0, 1, 1]) == float("inf")


def test_classes_of_a_single_example_are_warned_about():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(12, 5)), ["a"] * 10 + ["b", "c"]
    with pytest.warns(UserWarning, match=r"2 class\(es\) have a single example \('b', 'c'\).*biases ν"):
        value = hsvfast.variability(features, labels)
    np.testing.assert_allclose(value, ref.official_variability(features, np.array(labels)), rtol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two examples per class: nothing to warn about
        hsvfast.variability(features[:6], ["a", "b", "c"] * 2)
    long_label = "a whole sentence read from the wrong column of the file, " * 3
    with pytest.warns(UserWarning, match=r"single example \('a whole sentence read from the wrong c…\)"):
        hsvfast.variability(features, ["a"] * 11 + [long_label])


def test_labels_of_one_example_each_are_refused():
    """Every class a singleton (a text column taken for the labels): Σ_w = 0, every layer would score 0."""
    features = np.random.default_rng(0).normal(size=(6, 4))
    for metric in (hsvfast.variability, hsvfast.trace_ratio):
        with pytest.raises(ValueError, match="each of the 6 classes has a single example.*label column"):
            metric(features, list("abcdef"))


@pytest.mark.parametrize("mode", ["per_class", "balanced"])
def test_all_layers_at_once_match_the_reference_layer_by_layer(mode):
    """metrics_of_layers stacks layers (one copy to the host, batched SVDs): every layer must still
    get its own numbers, whatever sits next to it — rank-deficient, coincident means, another width."""
    from hsvfast.metrics import metrics_of_layers

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 30)
    layers = []
    for scale in (1.0, 1e3, 1e-3):  # same width, very different sizes
        features, _ = gaussian_classes(rng, 4, 40, per_class=30)
        layers.append(features * scale)
    collinear = rng.normal(size=(len(labels), 40))
    collinear += np.outer(labels * 0.7, rng.normal(size=40))  # class means on a line: rank(Σ_b) = 1 < C − 1
    layers.append(collinear)
    halves = [rng.integers(-5, 6, size=(15, 40)).astype(float) for _ in range(4)]
    same_means = 7.0 + np.concatenate([np.concatenate([z, -z]) for z in halves])  # every class mean is exactly 7: Σ_b = 0
    layers.append(same_means)
    layers.append(gaussian_classes(rng, 4, 24, per_class=30)[0])  # another width: its own group
    counts = {c: 30 for c in range(4)} if mode == "balanced" else None
    stats = hsvfast.Statistics(list(range(len(layers))), class_counts=counts)
    plan = stats.plan_batch(labels.tolist(), np.ones(len(labels), bool))
    for position, features in enumerate(layers):
        stats.fold(position, torch.from_numpy(features).unsqueeze(1), torch.ones(len(labels), 1), plan)
    stats.finish_batch(plan)
    together = metrics_of_layers(stats.all_class_moments())
    for position, (features, got) in enumerate(zip(layers, together)):
        assert list(got) == ["variability", "trace_ratio"]
        if position == 4:  # no between-class spread at all
            assert got == {"variability": float("inf"), "trace_ratio": float("inf")}
            continue
        assert ref.relative_error(got["variability"], ref.rank_aware_variability(features, labels)) <= 1e-6
        assert ref.relative_error(got["trace_ratio"], ref.trace_ratio(features, labels)) <= 1e-9
    if mode == "per_class":  # family metrics are computed layer by layer next to the stacked ones
        chosen = metrics_of_layers(stats.all_class_moments(), ["nc1", "trace_ratio"])
        assert [list(m) for m in chosen] == [["nc1", "trace_ratio"]] * len(layers)
        assert chosen[2]["trace_ratio"] == together[2]["trace_ratio"]


@pytest.mark.parametrize(
    "features,labels,error,match",
    [
        (np.ones((4, 3)), np.array([0.5, 1.5, 0.5, 1.5]), TypeError, "Regression targets"),
        (np.random.default_rng(0).normal(size=(4, 3)), [1, 1, 1, 1], ValueError, "at least two labels"),
        (np.ones((4, 3)), [0, 1, 0], ValueError, "4 feature rows but 3 labels"),
        (np.ones(4), [0, 1, 0, 1], ValueError, "matrix"),
    ],
)
def test_bad_feature_input(features, labels, error, match):
    with pytest.raises(error, match=match):
        hsvfast.variability(features, labels)
    if error is ValueError and "at least" not in match:  # the same checks on Statistics.add_features itself
        with pytest.raises(error, match=match):  # (a label count off by one was a NumPy broadcasting error)
            hsvfast.Statistics([0]).add_features(torch.as_tensor(features), labels)


def test_nan_features_are_named():
    features = np.random.default_rng(0).normal(size=(6, 3))
    features[4, 1] = np.nan
    with pytest.raises(ValueError, match="layer 0: non-finite"):
        hsvfast.variability(features, [0, 1, 0, 1, 0, 1])

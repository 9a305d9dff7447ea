"""hsvfast.score end to end: real MiniLM on SST-2, tiny models of many architectures, bad input."""
import json
import warnings

import numpy as np
import pytest
import torch

import hsvfast
import reference as ref
from conftest import assert_same_statistics
from tiny_models import DECODERS, DEPTH, ENCODERS, random_batches, tiny_model

# ------------------------------------------------------------------------------------------ helpers


class _AfterTheLastBlock(Exception):
    pass


def capture_block_outputs(model, batches):
    """Every block's output for every batch, on the host, captured by our own hooks on the model's forward
    (stopped after the last block: the layers above may sit on another device than its output)."""
    blocks = hsvfast.find_blocks(model)
    device = next(model.parameters()).device
    captured = [[] for _ in blocks]

    def keep(k):
        def hook(module, args, output):
            captured[k].append((output[0] if isinstance(output, tuple) else output).detach().to("cpu", copy=True))
            if k == len(blocks) - 1:
                raise _AfterTheLastBlock
        return hook

    handles = [block.register_forward_hook(keep(k)) for k, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**{k: v.to(device) for k, v in batch.items()
                             if k in ("input_ids", "attention_mask", "token_type_ids")})
                except _AfterTheLastBlock:
                    pass
    finally:
        for h in handles:
            h.remove()
    return captured


def reference_features(captured_layer, batches, pooling):
    feats = []
    for hidden, batch in zip(captured_layer, batches):
        feats.append(ref.pool(hidden.numpy(), batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                              batch["special_tokens_mask"].numpy(), pooling))
    return np.concatenate(feats)


def all_labels(batches):
    return np.concatenate([b["labels"].numpy() for b in batches])


# ----------------------------------------------------------------------------- real model, real data


@pytest.fixture(scope="module")
def minilm_sst2(minilm_path, sst2_dev):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    texts, labels = sst2_dev
    order = np.argsort([len(t) for t in texts], kind="stable")  # length-sorted: little padding
    batches = []
    for start in range(0, len(order), 64):
        rows = order[start : start + 64]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                        return_tensors="pt", return_special_tokens_mask=True)
        enc["labels"] = torch.tensor([labels[i] for i in rows])
        batches.append(dict(enc))
    with torch.no_grad():
        hidden = [model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                        output_hidden_states=True).hidden_states for b in batches]
    return model, tokenizer, batches, hidden


@pytest.mark.parametrize("pooling", hsvfast.POOLINGS)
def test_minilm_sst2_all_layers_match_numpy_reference(minilm_sst2, pooling):
    model, _, batches, hidden = minilm_sst2
    report = hsvfast.score(model, batches, pooling=pooling)
    labels = all_labels(batches)
    assert report.layers == list(range(6))
    assert report.num_examples == 872 and report.class_counts == {0: 428, 1: 444}
    for k in report.layers:
        # Layer k is block k's output = hidden_states[k + 1] (the embedding output is not scored).
        features = reference_features([h[k + 1] for h in hidden], batches, pooling)
        assert ref.relative_error(report.metrics["variability"][k], ref.official_variability(features, labels)) <= 1e-5
        assert ref.relative_error(report.metrics["trace_ratio"][k], ref.trace_ratio(features, labels)) <= 1e-5
    values = report.metrics["variability"]
    assert report.best_layer == report.layers[int(np.argmin(values))]


def test_minilm_tokenizer_finds_special_tokens(minilm_sst2):
    model, tokenizer, batches, _ = minilm_sst2
    with_mask = hsvfast.score(model, batches[:4], layers=[-1])
    without = [{k: v for k, v in b.items() if k != "special_tokens_mask"} for b in batches[:4]]
    with_tokenizer = hsvfast.score(model, without, layers=[-1], tokenizer=tokenizer)
    assert with_tokenizer.metrics == with_mask.metrics


def test_minilm_compiled_and_torch_backends_agree(minilm_sst2, monkeypatch):
    model, _, batches, _ = minilm_sst2
    compiled = hsvfast.score(model, batches[:6])
    from hsvfast import _kernels

    monkeypatch.setattr(_kernels, "_FORCE_TORCH", True)
    fallback = hsvfast.score(model, batches[:6])
    assert compiled.backend == "cpp" and fallback.backend == "torch"
    for name in compiled.metrics:
        np.testing.assert_allclose(compiled.metrics[name], fallback.metrics[name], rtol=1e-9)


def test_report_to_dict_is_json(minilm_sst2):
    model, _, batches, _ = minilm_sst2
    report = hsvfast.score(model, batches[:3], layers=[0, -1])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"] == [0, 5] and data["pooling"] == "mean"
    assert data["hsvfast_version"] == hsvfast.__version__
    assert set(data["metrics"]) == {"variability", "trace_ratio"} and data["best_layer"] in (0, 5)
    assert sum(data["class_counts"].values()) == data["num_examples"] == 192
    assert "model" in data["model_name"]
    rows = report.to_csv().splitlines()
    assert rows[0] == "layer,variability,trace_ratio,best" and len(rows) == 3
    assert sum(row.endswith(",True") for row in rows) == 1
    with pytest.raises(ValueError, match="not a hsvfast report: no 'layers', 'metrics'"):  # was a KeyError
        hsvfast.Report.from_dict({"variability": [1.0]})
    with pytest.raises(ValueError, match="metric 'variability' has 2 values for 1 layers"):
        hsvfast.Report.from_dict({**data, "layers": [0]})


# --------------------------------------------------------------------- tiny models, many architectures


@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
def test_tiny_models_every_layer_matches_reference(kind, kernel_backend):
    model = tiny_model(kind)
    batches = random_batches()
    report = hsvfast.score(model, batches)
    captured = capture_block_outputs(model, batches)
    labels = all_labels(batches)
    assert report.layers == list(range(DEPTH))
    for k in range(DEPTH):
        features = reference_features(captured[k], batches, "mean")
        assert ref.relative_error(report.metrics["variability"][k], ref.rank_aware_variability(features, labels)) <= 1e-6
    if kind in ENCODERS:  # the convention: layer k is hidden_states[k + 1]
        with torch.no_grad():
            states = model(**{k: v for k, v in batches[0].items() if k in ("input_ids", "attention_mask")},
                           output_hidden_states=True).hidden_states
        torch.testing.assert_close(states[DEPTH], captured[DEPTH - 1][0])


@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
@pytest.mark.parametrize("metrics", [None, ["trace_ratio"], "balanced"])
def test_block_outputs_held_until_the_forward_stops_give_the_same_statistics(kind, metrics, monkeypatch):
    """On a GPU the block outputs of a batch are held and folded with one launch (scoring._HOLD_BYTES).
    Forced on the CPU here: every architecture must give the statistics of folding each block at once
    (none writes into a block's output after returning it)."""
    from hsvfast import scoring, statistics

    model = tiny_model(kind)
    batches = random_batches()
    kwargs = {"layers": [0, 2, 3]}
    if metrics == "balanced":
        kwargs["class_counts"] = dict(zip(*np.unique(all_labels(batches), return_counts=True)))
    elif metrics is not None:
        kwargs["metrics"] = metrics
    at_once = hsvfast.score(model, batches, **kwargs).stats
    groups = []
    fold_layers = statistics.Statistics.fold_layers
    monkeypatch.setattr(statistics.Statistics, "fold_layers",
                        lambda self, positions, *a: (groups.append(list(positions)), fold_layers(self, positions, *a)))
    one_layer = batches[0]["input_ids"].numel() * model.config.hidden_size * 4  # float32 outputs of batch 0
    for budget, expected in ((1 << 30, [[0, 1, 2]]), (one_layer + 1, [[0, 1], [2]])):
        groups.clear()
        monkeypatch.setattr(scoring, "_HOLD_BYTES", {"cpu": budget})
        held = hsvfast.score(model, batches, **kwargs).stats
        assert groups[: len(expected)] == expected  # batch 0 was folded in these groups
        assert_same_statistics(held, at_once, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_forward_stops_after_deepest_layer_and_cleans_up(kind):
    model = tiny_model(kind).train()
    blocks = hsvfast.find_blocks(model)
    calls = [0] * len(blocks)
    counters = [b.register_forward_pre_hook(lambda m, a, k=k: calls.__setitem__(k, calls[k] + 1))
                for k, b in enumerate(blocks)]
    batches = random_batches(num_batches=3)
    report = hsvfast.score(model, batches, layers=[0, -3])
    for c in counters:
        c.remove()
    assert report.layers == [0, 1]
    assert calls == [3, 3, 0, 0]  # blocks above the deepest scored one never ran
    assert all(len(b._forward_hooks) == 0 for b in blocks)
    assert model.training  # mode restored


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_compiled_model_is_scored_like_the_eager_one_and_without_dynamo_warnings(kind):
    # torch.compile'd model: the hooks run inside the compiled frame; dynamo must not trace the statistics
    # code (it warned at the compiled kernel, "Dynamo does not know how to trace the builtin …").
    torch._dynamo.reset()
    model = tiny_model(kind)
    batches = random_batches(num_batches=3)
    eager = hsvfast.score(model, batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = hsvfast.score(torch.compile(model, backend="eager"), batches)
    assert not [str(w.message)[:100] for w in caught]
    assert_same_statistics(compiled.stats, eager.stats, rtol=1e-6)
    torch._dynamo.reset()


def test_progress_bar_counts_scored_batches_and_examples(capsys):
    # The loader is read one batch ahead: a bar over the loader closed before the last batch was scored
    # and printed the examples of all batches but the last.
    batches = random_batches(num_batches=4, batch_size=5)
    report = hsvfast.score(tiny_model("bert"), batches, progress=True)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert report.num_examples == 20
    assert "4/4" in final and "examples=20" in final, final


def test_hooks_removed_and_mode_restored_after_an_error():
    model = tiny_model("bert").train()
    batches = random_batches(num_batches=2)
    batches[1] = {k: v for k, v in batches[1].items() if k != "labels"}
    with pytest.raises(ValueError, match="batch 1 has no labels"):
        hsvfast.score(model, batches)
    assert all(len(b._forward_hooks) == 0 for b in hsvfast.find_blocks(model))
    assert model.training


def test_subset_and_class_counts_give_same_scores():
    model = tiny_model("bert")
    batches = random_batches()
    full = hsvfast.score(model, batches)
    labels = all_labels(batches)
    counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    balanced = hsvfast.score(model, batches, layers=[1, 3], class_counts=counts)
    assert balanced.stats.mode == "balanced"
    for name in full.metrics:
        np.testing.assert_allclose(balanced.metrics[name], [full.metrics[name][1], full.metrics[name][3]], rtol=1e-9)


def test_label_key_and_string_labels():
    model = tiny_model("bert")
    batches = random_batches()
    renamed = [{**{k: v for k, v in b.items() if k != "labels"},
                "label": [["a", "b", "c"][i] for i in b["labels"].tolist()]} for b in batches]
    a, b = hsvfast.score(model, batches), hsvfast.score(model, renamed)
    assert b.class_counts.keys() == {"a", "b", "c"}
    np.testing.assert_allclose(a.metrics["variability"], b.metrics["variability"], rtol=1e-12)


# ------------------------------------------------------------------------------------------ bad input


def batches_with(**changes):
    batches = random_batches(num_batches=2)
    for batch in batches:
        batch.update(changes)
    return batches


@pytest.mark.parametrize(
    "batches,kwargs,error,match",
    [
        (batches_with(labels=torch.rand(12)), {}, TypeError, "Regression targets"),
        # Multi-hot targets were flattened: "36 labels for 12 sequences".
        (batches_with(labels=torch.zeros(12, 3, dtype=torch.long)), {}, ValueError, r"shape \(12, 3\).*Multi-label"),
        (batches_with(labels=[[0, 1]] * 12), {}, ValueError, r"shape \(12, 2\): hsvfast needs one class per sequence"),
        (batches_with(labels=torch.zeros(12, dtype=torch.long)), {}, ValueError, "at least two labels"),
        ([], {}, ValueError, "no labelled example"),
        (random_batches(), {"layers": [7]}, ValueError, "layer 7 does not exist.*0..3"),
        (random_batches(), {"layers": []}, ValueError, "layers is empty"),
        (random_batches(), {"layers": "0,1"}, TypeError, "layers must be a list of block indices"),
        (random_batches(), {"layers": [0.0]}, TypeError, "layers: 0.0 is not an integer"),
        (random_batches(), {"class_counts": [5, 5]}, TypeError, "class_counts must be a mapping"),
        # A string has no special ids: every token would have counted, pooling="mean_all" in all but name.
        ([{k: v for k, v in b.items() if k != "special_tokens_mask"} for b in random_batches()],
         {"tokenizer": "bert-base-uncased"}, TypeError, "tokenizer must be a transformers tokenizer"),
        (random_batches(), {"pooling": "max"}, ValueError, "unknown pooling 'max'"),
        ([{k: v for k, v in b.items() if k != "special_tokens_mask"} for b in random_batches()], {},
         ValueError, "no 'special_tokens_mask' and no tokenizer"),
        ([(b["input_ids"], b["labels"]) for b in random_batches()], {}, TypeError, "dict batches"),
        (batches_with(labels=torch.zeros(5, dtype=torch.long)), {}, ValueError, "5 labels for 12 sequences"),
        # A missing label was a class of its own ("None").
        (batches_with(labels=["a", "b", None] * 4), {}, ValueError, r"batch 0: label None at position 2"),
        (random_batches(), {"device": "cuda:99"}, ValueError, "device cuda:99 is not available"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(batches, kwargs, error, match):
    with pytest.raises(error, match=match):
        hsvfast.score(tiny_model("bert"), batches, **kwargs)


def test_nan_activations_name_layer_and_batch():
    model = tiny_model("bert")
    batches = random_batches(num_batches=3)
    with torch.no_grad():
        model.encoder.layer[2].output.dense.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 2: non-finite \(NaN or Inf\) hidden states in batch 0"):
        hsvfast.score(model, batches)
    report = hsvfast.score(model, batches, layers=[0, 1])  # layers below the NaN are fine
    assert all(np.isfinite(report.metrics["variability"]))


def test_padding_without_an_attention_mask_is_warned_about():
    """Batches padded by hand without a mask: the pad tokens are attended, so every state changes."""
    model = tiny_model("bert")  # pad_token_id 0
    padded = [{**b, "input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 0)} for b in random_batches()]
    unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} for b in padded]
    with pytest.warns(UserWarning, match=r"batch 0 has no attention_mask but holds the model's pad token \(id 0\)"):
        hsvfast.score(model, unmasked)
    full = [{**b, "input_ids": b["input_ids"].clamp(min=3)} for b in unmasked]  # no pad token anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hsvfast.score(model, full)
        hsvfast.score(model, padded)  # masked: nothing to say


def test_sequences_with_nothing_to_pool_are_skipped_and_counted():
    batches = random_batches(num_batches=2)
    batches[1]["special_tokens_mask"][4] = 1  # sequence 4 of batch 1: only special tokens
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match="skipping sequences with no token to pool"):
        report = hsvfast.score(model, batches)
    assert report.num_skipped == 1 and report.num_examples == 23
    with pytest.raises(ValueError, match="batch 1: 1 sequence"):
        hsvfast.score(model, batches, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hsvfast.score(model, batches, pooling="mean_all").num_skipped == 0


def test_blocks_that_do_not_run_are_detected():
    model = tiny_model("bert")
    stray = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    with pytest.raises(RuntimeError, match="blocks="):
        hsvfast.score(model, random_batches(), blocks=stray)


def test_no_block_list_asks_for_blocks():
    with pytest.raises(ValueError, match="blocks="):
        hsvfast.score(torch.nn.Linear(3, 3), random_batches())


class BatchesWithLabelColumn(list):
    """Stands in for a 🤗 dataset: exposes its label column, as `datasets.Dataset` does."""

    column_names = ["input_ids", "label"]

    def __getitem__(self, key):
        if key == "label":
            return torch.cat([b["labels"] for b in self]).tolist()
        return list.__getitem__(self, key)


def test_class_counts_read_from_the_dataset_when_per_class_matrices_do_not_fit():
    model = tiny_model("bert")
    batches = random_batches()
    per_class = hsvfast.score(model, batches)
    loader = torch.utils.data.DataLoader(BatchesWithLabelColumn(batches), batch_size=None)
    roomy = hsvfast.score(model, loader)
    assert roomy.stats.mode == "per_class"
    tight = hsvfast.score(model, loader, max_memory=2 * 3 * 8 * 32 * 32)  # < 3 classes × 4 layers × d²
    assert tight.stats.mode == "balanced"
    np.testing.assert_allclose(tight.metrics["variability"], per_class.metrics["variability"], rtol=1e-9)
    with pytest.raises(MemoryError, match=r"would need \d+\.\d\d KiB, over the limit of 48\.00 KiB.*class_counts"):
        hsvfast.score(model, batches, max_memory=2 * 3 * 8 * 32 * 32)


def test_report_notes_classes_smaller_than_the_hidden_size():
    import hsvfast.report

    model = tiny_model("bert")  # d = 32
    small = hsvfast.score(model, random_batches(num_batches=4))  # 48 sequences, 3 classes
    label, smallest = min(small.class_counts.items(), key=lambda kv: kv[1])
    assert small.hidden_size == 32 and smallest < 32
    assert small.sample_note.startswith(f"Class {label!r} has {smallest} examples, fewer than the hidden size d = 32")
    again = hsvfast.report.Report.from_dict(json.loads(json.dumps(small.to_dict())))
    assert again.hidden_size == 32 and again.sample_note is not None
    large = hsvfast.score(model, random_batches(num_batches=12))  # every class > 32 examples
    assert min(large.class_counts.values()) >= 32 and large.sample_note is None
    assert hsvfast.score(model, random_batches(num_batches=4), metrics=["trace_ratio"]).sample_note is None

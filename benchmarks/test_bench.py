"""pytest-benchmark suites: kernels across sizes, metric finalisation, scoring a tiny model.

    pytest benchmarks/test_bench.py --benchmark-columns=median,iqr,ops

Not part of the test suite (timed tests are flaky); compare medians within one run.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import hsvfast
from hsvfast import Statistics, _kernels
from hsvfast.metrics import layer_metrics, metrics_of_layers

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 32, 384), (64, 128, 1024), (16, 512, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("what", ["pool_fold", "copy"])
def test_kernel(benchmark, device, shape, dtype, what):
    batch, tokens, dim = shape
    act = torch.randn(*shape, device=device).to(dtype)
    weights = torch.ones(batch, tokens, device=device)
    labels = torch.arange(batch, device=device) % 2
    f64 = dict(dtype=torch.float64, device=device)
    out, shift, sums, sq = (torch.empty(batch, dim, **f64), torch.zeros(2, dim, **f64),
                            torch.zeros(2, dim, **f64), torch.zeros(2, **f64))
    target = torch.empty_like(act)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        if what == "copy":
            target.copy_(act)
        else:
            _kernels.pool_fold(act, weights, out, labels=labels, shift=shift, sums=sums, sqnorms=sq)
        sync()

    benchmark(run)
    benchmark.extra_info["GB"] = act.numel() * act.element_size() / 1e9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["all_layers", "layer_by_layer"])
@pytest.mark.parametrize("num_layers,dim,classes", [(32, 4096, 2), (12, 768, 77), (24, 1024, 2)])
def test_finalise_all_metrics(benchmark, num_layers, dim, classes, how, device):
    """Target: 32 layers at d = 4096, C = 2 well under a second (no O(d³) work per layer).

    ``all_layers`` is what ``score`` does (metrics_of_layers: one round trip for all layers);
    ``layer_by_layer`` the same maths one layer at a time, for comparison."""
    counts = {c: 64 for c in range(classes)}
    stats = Statistics(list(range(num_layers)), class_counts=counts, device=device)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 64)
    for position in range(num_layers):
        plan = stats.plan_batch(labels.tolist(), np.ones(len(labels), bool))
        stats.fold(position, torch.from_numpy(rng.normal(size=(len(labels), 1, dim))).float().to(device),
                   torch.ones(len(labels), 1, device=device), plan)
    stats.finish_batch(plan)

    if how == "all_layers":
        result = benchmark(lambda: metrics_of_layers(stats.all_class_moments()))
    else:
        result = benchmark(lambda: [layer_metrics(stats.class_moments(p)) for p in range(num_layers)])
    assert len(result) == num_layers


def test_score_tiny_bert(benchmark):
    import transformers as tf

    model = tf.BertModel(tf.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, intermediate_size=128)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 200, (32, 24), generator=g),
                "attention_mask": torch.ones(32, 24, dtype=torch.long),
                "labels": torch.randint(0, 3, (32,), generator=g)} for _ in range(8)]
    report = benchmark(lambda: hsvfast.score(model, batches, pooling="mean_all"))
    assert len(report.layers) == 4


SST2_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "train.tsv"


@pytest.mark.skipif(not SST2_TRAIN.is_file(), reason="needs ../shared/data/sst2/train.tsv")
@pytest.mark.parametrize("how", ["read_labelled_text", "csv_module"])
def test_read_data_file(benchmark, how):
    """Reading SST-2 train (67,349 rows) as the CLI does, against the standard library's csv reader of the same
    file (the floor for a pure-Python read). The datasets import is outside the timing (a one-off)."""
    import csv

    from hsvfast.data import read_labelled_text

    def csv_module():
        with SST2_TRAIN.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]

    read = (lambda: read_labelled_text(SST2_TRAIN).texts) if how == "read_labelled_text" else (lambda: csv_module()[0])
    read()
    assert len(benchmark(read)) == 67349

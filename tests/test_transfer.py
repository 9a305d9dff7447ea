"""Plan, truncate, freeze, adapters, classifier and training on tiny BERT and Llama models."""
import json
import math

import numpy as np
import pytest
import torch

import hsvfast
from hsvfast.surgery import BottleneckAdapter, adapter_sites
from tiny_models import DEPTH, HIDDEN, random_batches, tiny_model

KINDS = ["bert", "llama", "gpt2", "distilbert"]


def inputs_of(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def block_outputs(model, batch):
    captured = []
    handles = [b.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
               for b in hsvfast.find_blocks(model)]
    with torch.no_grad():
        model(**inputs_of(batch))
    for h in handles:
        h.remove()
    return captured


def fake_report(values, num_blocks=None):
    return hsvfast.Report(layers=list(range(len(values))), metrics={"variability": values,
                          "trace_ratio": values}, class_counts={0: 5, 1: 5}, pooling="mean", model_name="m",
                          num_examples=10, num_skipped=0, backend="cpp", version="x", num_blocks=num_blocks)


# ------------------------------------------------------------------------------------------- plan


def test_plan_rules_and_layers():
    report = fake_report([3.0, 1.04, 1.02, 1.0, 1.5, 2.0])
    p = hsvfast.plan(report, num_tuned=2)
    assert (p.head_layer, p.tuned_layers, p.frozen_layers, p.dropped_layers) == (3, [2, 3], [0, 1], [4, 5])
    assert p.flops_fraction == pytest.approx(4 / 6)
    early = hsvfast.plan(report, num_tuned=1, rule="earliest", tolerance=0.05)
    assert (early.head_layer, early.tuned_layers, early.dropped_layers) == (1, [1], [2, 3, 4, 5])
    assert hsvfast.plan(report, rule="earliest", tolerance=0.03).head_layer == 2


def test_plan_counts_trainable_parameters_and_round_trips(tmp_path):
    model = tiny_model("bert")
    report = hsvfast.score(model, random_batches())
    p = hsvfast.plan(report, num_tuned=1, model=model)
    block = hsvfast.find_blocks(model)[p.head_layer]
    assert p.trainable_parameters == sum(x.numel() for x in block.parameters())
    p.save(tmp_path / "plan.json")
    assert hsvfast.Plan.load(tmp_path / "plan.json") == p
    json.loads((tmp_path / "plan.json").read_text())
    report_again = hsvfast.Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert hsvfast.plan(report_again, num_tuned=1).head_layer == p.head_layer


def test_plan_tunes_two_layers_by_default_or_all_there_are_below_the_head():
    assert hsvfast.plan(fake_report([2.0, 1.0, 3.0, 4.0])).tuned_layers == [0, 1]
    head_first = hsvfast.plan(fake_report([0.5, 1.0, 3.0, 4.0]))
    assert (head_first.head_layer, head_first.tuned_layers, head_first.frozen_layers) == (0, [0], [])
    assert hsvfast.plan(fake_report([0.5, 1.0, 3.0, 4.0]), num_tuned=0).tuned_layers == []
    from_numpy = hsvfast.plan(fake_report([2.0, 1.0, 3.0, 4.0]), num_tuned=np.int64(1), tolerance=np.float32(0.1))
    assert from_numpy.tuned_layers == [1] and json.dumps(from_numpy.to_dict())  # plain Python numbers in the plan


@pytest.mark.parametrize("values,kwargs,match", [
    ([2.0, 1.0, 3.0, 4.0], {"num_tuned": 3}, "num_tuned=3 is more than the 2 layers"),
    ([2.0, 1.0, 3.0, 4.0], {"rule": "best"}, "unknown rule 'best'"),
    ([2.0, 1.0, 3.0, 4.0], {"num_tuned": -1}, "non-negative"),
    ([2.0, 1.0, 3.0, 4.0], {"num_tuned": 2.0}, "non-negative integer"),
    ([2.0, 1.0, 3.0, 4.0], {"rule": "earliest", "tolerance": math.nan}, "tolerance must be a finite number"),
    ([2.0, 1.0, 3.0, 4.0], {"tolerance": -0.1}, "tolerance must be a finite number"),
    ([math.inf] * 4, {}, "inf at every scored layer"),
    ([math.nan] * 4, {}, "no layer has a defined variability"),
])
def test_plan_refuses_bad_arguments(values, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hsvfast.plan(fake_report(values), **kwargs)


def test_plan_file_must_be_a_plan(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"head_layer": 1, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown fields"):
        hsvfast.Plan.load(tmp_path / "x.json")


# --------------------------------------------------------------------------------------- truncate


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_keeps_the_hidden_states_of_kept_layers(kind):
    batch = random_batches(num_batches=1)[0]
    full = block_outputs(tiny_model(kind), batch)
    model = hsvfast.truncate(tiny_model(kind), 1)
    assert len(hsvfast.find_blocks(model)) == 2
    kept = block_outputs(model, batch)
    assert len(kept) == 2
    for a, b in zip(kept, full[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if kind in ("bert", "distilbert"):
        with torch.no_grad():
            last = model(**inputs_of(batch)).last_hidden_state
        torch.testing.assert_close(last, full[1], rtol=0, atol=0)


@pytest.mark.parametrize("head,error,match", [(-1, ValueError, "out of range"), (DEPTH, ValueError, "out of range"),
                                              (1.5, TypeError, "head_layer: 1.5 is not an integer"),
                                              ("2", TypeError, "not an integer"), (True, TypeError, "not an integer")])
def test_truncate_refuses_layers_out_of_range(head, error, match):
    with pytest.raises(error, match=match):
        hsvfast.truncate(tiny_model("bert"), head)


def test_layer_indices_may_come_from_numpy_or_torch_but_must_be_a_list_of_integers():
    model = tiny_model("bert")
    assert hsvfast.score(model, random_batches(), layers=np.array([0, -1])).layers == [0, DEPTH - 1]
    assert len(hsvfast.find_blocks(hsvfast.truncate(model, np.int64(1)))) == 2
    hsvfast.freeze(model, torch.tensor([1]))
    assert all(p.requires_grad for p in hsvfast.find_blocks(model)[1].parameters())
    with pytest.raises(TypeError, match=r"freeze: layers must be a list of block indices \(e.g. \[2, 3\]\), got 1"):
        hsvfast.freeze(model, 1)  # tune layer 1, or one layer? Ambiguous: refused
    with pytest.raises(TypeError, match="add_adapters: layers must be a list"):
        hsvfast.add_adapters(model, 1)
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
        hsvfast.add_adapters(model, [1], bottleneck=0)


# ---------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_frozen_parameters_do_not_change_and_tuned_ones_do(kind):
    model = hsvfast.truncate(tiny_model(kind), 2)
    hsvfast.freeze(model, [2])
    classifier = hsvfast.Classifier(model, num_labels=3)
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    optimizer = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=0.5)
    batch = random_batches(num_batches=1)[0]
    classifier.train()
    classifier(**{k: batch[k] for k in ("input_ids", "attention_mask", "special_tokens_mask")},
               labels=batch["labels"]).loss.backward()
    optimizer.step()
    for name, parameter in classifier.named_parameters():
        changed = not torch.equal(before[name], parameter)
        tuned = ".2." in name or name.startswith("head.")
        assert parameter.requires_grad == tuned, name
        if not tuned:
            assert not changed, name
    assert any(not torch.equal(before[n], p) for n, p in classifier.named_parameters() if ".2." in n)


def test_freeze_refuses_unknown_layers():
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        hsvfast.freeze(tiny_model("bert"), [9])


# -------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_adapters_leave_the_output_unchanged(kind):
    batch = random_batches(num_batches=1)[0]
    model = tiny_model(kind)
    with torch.no_grad():
        before = model(**inputs_of(batch)).last_hidden_state
    hsvfast.add_adapters(model, [1, 3], bottleneck=8, init="zero")
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert len(adapters) == 4
    with torch.no_grad():
        after = model(**inputs_of(batch)).last_hidden_state
    assert float((after - before).abs().max()) <= 1e-6


def test_adapter_sites_are_the_papers():
    expected = {"bert": ("attention.output.dense", "output.dense"), "distilbert": ("attention.out_lin", "ffn.lin2"),
                "gpt2": ("attn.c_proj", "mlp.c_proj"), "llama": ("self_attn.o_proj", "mlp.down_proj")}
    for kind, sites in expected.items():
        assert adapter_sites(hsvfast.find_blocks(tiny_model(kind))[0], HIDDEN) == sites


def test_bert_init_is_normal_002_with_zero_bias():
    adapter = BottleneckAdapter(512, 256, init="bert")
    for layer in (adapter.down, adapter.up):
        assert float(layer.weight.detach().std()) == pytest.approx(0.02, rel=0.02)
        assert abs(float(layer.weight.detach().mean())) < 1e-3
        assert torch.all(layer.bias == 0)


def test_adapter_training_touches_only_adapters_norms_and_head():
    model = tiny_model("bert")
    p = hsvfast.plan(fake_report([3.0, 2.0, 1.0, 1.5], num_blocks=DEPTH), num_tuned=2)
    classifier = hsvfast.apply(model, p, num_labels=3, method="adapter", bottleneck=8)
    for name, parameter in classifier.named_parameters():
        expected = "adapter" in name or name.startswith("head.") or (
            "LayerNorm" in name and any(f"layer.{k}." in name for k in p.tuned_layers))
        assert parameter.requires_grad == expected, name
    assert len(hsvfast.find_blocks(classifier.backbone)) == 3


def test_apply_refuses_unknown_method_and_kind():
    p = hsvfast.plan(fake_report([3.0, 1.0, 2.0, 2.5], num_blocks=DEPTH), num_tuned=1)
    with pytest.raises(ValueError, match="unknown method 'prune'"):
        hsvfast.apply(tiny_model("bert"), p, num_labels=2, method="prune")
    deeper = hsvfast.plan(fake_report([3.0, 1.0, 2.0, 2.5, 2.6, 2.7], num_blocks=DEPTH + 2), num_tuned=1)
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=f"made for a model with {DEPTH + 2} blocks.*has {DEPTH}"):
        hsvfast.apply(model, deeper, num_labels=2)  # head layer 1 exists here too, but it is another model's layer
    assert len(hsvfast.find_blocks(model)) == DEPTH  # refused before any change
    with pytest.raises(ValueError, match="unknown adapter kind"):
        hsvfast.add_adapters(tiny_model("bert"), [0], kind="parallel")


def test_lora_through_peft():
    pytest.importorskip("peft", reason="kind='lora' is an optional extra (pip install peft)")
    model = hsvfast.add_adapters(tiny_model("bert"), [2], kind="lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora" in n and ".2." in n for n in names)


@pytest.mark.parametrize("method", ["finetune", "adapter", "lora"])
def test_a_plan_without_tuned_layers_trains_the_head_only(method):
    # PEFT reads an empty layers_to_transform as every layer: apply once put LoRA on all of them.
    if method == "lora":
        pytest.importorskip("peft", reason="kind='lora' is an optional extra (pip install peft)")
    p = hsvfast.plan(fake_report([3.0, 2.0, 1.0, 1.5], num_blocks=DEPTH), num_tuned=0)
    assert p.tuned_layers == []
    classifier = hsvfast.apply(tiny_model("bert"), p, num_labels=3, method=method)
    trainable = [n for n, q in classifier.named_parameters() if q.requires_grad]
    assert trainable and not any("lora" in n or "adapter" in n or ".layer." in n for n in trainable), trainable


# -------------------------------------------------------------------------------------- training


def test_train_keeps_the_best_epoch_and_reports_history(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("bert")
    p = hsvfast.plan(fake_report([3.0, 2.0, 1.0, 1.5], num_blocks=DEPTH), num_tuned=2)
    classifier = hsvfast.apply(model, p, num_labels=3)
    train_batches, eval_batches = random_batches(num_batches=4, seed=1), random_batches(num_batches=2, seed=2)
    history = hsvfast.train(classifier, train_batches, eval_batches, epochs=3, lr=1e-3, checkpoint_dir=tmp_path,
                            progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(h["train_loss"]) and 0 <= h["accuracy"] <= 1 for h in history)
    assert (tmp_path / "best.safetensors").exists()
    final = hsvfast.evaluate(classifier, eval_batches, torch.device("cpu"))
    assert final["accuracy"] == pytest.approx(max(h["accuracy"] for h in history))


def test_train_refuses_what_would_fail_or_mislead_later():
    p = hsvfast.plan(fake_report([3.0, 2.0, 1.0, 1.5], num_blocks=DEPTH), num_tuned=1)
    classifier = hsvfast.apply(tiny_model("bert"), p, num_labels=2)
    batches = random_batches(num_batches=2, seed=1)  # labels 0..2: one too many for num_labels=2
    with pytest.raises(ValueError, match=r"epoch 1, batch \d: label 2 is outside 0\.\.1; .* num_labels=2"):
        hsvfast.train(classifier, batches, epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        hsvfast.train(classifier, batches, epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"warmup is the fraction of the steps .* in \[0, 1\], got 2"):
        hsvfast.train(classifier, batches, epochs=1, warmup=2, progress=False)  # the peak rate was never reached
    with pytest.raises(ValueError, match="metric must be 'accuracy' or 'mcc'"):  # would keep the last epoch
        hsvfast.train(classifier, batches, batches, metric="f1", progress=False)
    with pytest.raises(TypeError, match="train_loader must have a length and be readable once per epoch"):
        hsvfast.train(classifier, iter(batches), epochs=2, progress=False)  # a second epoch would see nothing
    with pytest.raises(ValueError, match="train_loader has no batches"):
        hsvfast.train(classifier, [], progress=False)
    with pytest.raises(ValueError, match="the evaluation loader has no batches"):
        hsvfast.evaluate(classifier, [], torch.device("cpu"))
    floats = [{**b, "labels": b["labels"].float()} for b in batches]
    with pytest.raises(ValueError, match="labels must be integer class ids, got torch.float32"):
        hsvfast.train(classifier, floats, epochs=1, progress=False)
    from hsvfast.training import _checked_labels

    with pytest.raises(ValueError, match="map string labels to ids first"):  # also for a model without num_labels
        _checked_labels({"labels": ["pos", "neg"]}, None, 0, 3)


def test_classifier_output_works_like_a_transformers_model():
    classifier = hsvfast.Classifier(tiny_model("llama"), num_labels=2)
    batch = random_batches(num_batches=1, classes=2)[0]
    out = classifier(**batch)
    assert out.logits.shape == (12, 2) and out.loss.dim() == 0
    with pytest.raises(ValueError, match="num_labels"):
        hsvfast.Classifier(tiny_model("bert"), num_labels=1)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):  # when made, not at the first forward
        hsvfast.Classifier(tiny_model("bert"), num_labels=2, pooling="max")

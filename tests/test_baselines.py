"""The benchmarks' baselines (benchmarks/baselines) compute the paper's ν too: they must agree with hsvfast."""
import sys

import numpy as np
import pytest
import torch

import hsvfast
from conftest import REPO
from tiny_models import random_batches, tiny_model

sys.path.insert(0, str(REPO / "benchmarks"))
from baselines.floor import bare_forward  # noqa: E402
from baselines.hand_written import hand_written  # noqa: E402
from baselines.paper_procedure import paper_procedure  # noqa: E402


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_baselines_agree_with_hsvfast_in_any_order(kind):
    """In float64, the hand-written baseline and the paper's procedure give hsvfast's ν; run one after
    the other in both orders (the paper's procedure truncates the model, which must leave it whole).

    On a decoder with a final norm the paper's procedure reads each truncated model's last hidden
    state, which is after that norm (so is output_hidden_states' top entry): there it scores a
    different quantity and is compared with itself only."""
    model = tiny_model(kind).double()
    batches = random_batches(num_batches=6, classes=3)
    layers = [0, 1, 2]  # below the top block: output_hidden_states holds the block outputs there
    expected = hsvfast.score(model, batches, layers=layers).metrics["variability"]
    paper_first = paper_procedure(model, batches, layers)
    np.testing.assert_allclose(hand_written(model, batches, layers), expected, rtol=1e-6)
    np.testing.assert_allclose(paper_procedure(model, batches, layers), paper_first, rtol=1e-12)
    if kind == "bert":
        np.testing.assert_allclose(paper_first, expected, rtol=1e-6)
    assert len(hsvfast.find_blocks(model)) == 4 and model.config.num_hidden_layers == 4


def test_floor_runs_the_truncated_model_and_restores_it():
    model = tiny_model("bert")
    ran = []
    handles = [block.register_forward_hook(lambda *args, k=k: ran.append(k))
               for k, block in enumerate(hsvfast.find_blocks(model))]
    bare_forward(model, random_batches(num_batches=2), deepest_layer=1)
    assert ran == [0, 1, 0, 1]
    for handle in handles:
        handle.remove()
    batch = random_batches(num_batches=1)[0]
    states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states
    assert len(states) == 5 and model.config.num_hidden_layers == 4
    assert not torch.isnan(states[-1]).any()

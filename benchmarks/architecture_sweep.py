"""Score a tiny random model of every text architecture transformers knows, against its own hidden states.

    python benchmarks/architecture_sweep.py               # all (~15 min on 2 cores)
    python benchmarks/architecture_sweep.py xlm longformer

For each model type of ``transformers.models.auto.MODEL_MAPPING_NAMES``: build it from its config with
tiny sizes (4 layers, d = 32), run a bare forward, then ``hsvfast.score`` (``pooling="mean_all"``), and
compare the trace ratio of every layer but the last with the one computed from
``output_hidden_states`` pooled by hand (``hidden_states[k + 1]``; the last layer of decoders is read
before their final norm, which ``hidden_states[-1]`` includes). Prints one line per type:

* ``ok``: scored; ``maxerr`` is the largest relative difference (``<<<<`` marks > 1e-6 or a layer count
  other than 4 — some configs keep their own default depth);
* ``FAIL at score``: hsvfast refused the model (the message says why) or broke;
* ``n/a``: the tiny config does not build or the bare forward fails (not hsvfast's);
* ``skip multimodal``: configs with a text and a vision part.

Mamba-style models (Mamba, FalconMamba, RWKV) number ``hidden_states`` from the first block's output, so
their rows show a mismatch of the reference's indexing, not of hsvfast's (its layer k is block k's output
there too). Not a test: it needs nothing but transformers, and its verdicts are read by a person.
"""
from __future__ import annotations

import argparse
import inspect
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hsvfast  # noqa: E402
import reference as ref  # noqa: E402
from tiny_models import random_batches  # noqa: E402

SIZES = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, num_key_value_heads=2, head_dim=8, d_model=32, n_embd=32, n_layer=4,
             n_head=4, num_layers=4, num_heads=4, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, d_ff=37, d_kv=8, n_positions=64,
             embedding_size=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)


class TimedOut(Exception):
    pass


def reference_errors(model, config, batches, report):
    runner = model.get_encoder() if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder") \
        else model
    features, labels = [[] for _ in report.layers], []
    with torch.no_grad():
        for batch in batches:
            states = runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].double().unsqueeze(-1)
            for k in report.layers[:-1]:
                hidden = states[k + 1].double()
                if hidden.shape[:2] != mask.shape[:2] and hidden.shape[0] == mask.shape[1]:
                    hidden = hidden.transpose(0, 1)  # tokens-first layouts
                hidden = hidden[:, : mask.shape[1]]  # models that return their internal padding
                features[k].append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
            labels.append(batch["labels"].numpy())
    labels = np.concatenate(labels)
    return [ref.relative_error(report.metrics["trace_ratio"][k], ref.trace_ratio(np.concatenate(features[k]), labels))
            for k in report.layers[:-1]]


def sweep_one(model_type: str) -> str:
    name = MODEL_MAPPING_NAMES[model_type]
    model_class = getattr(tf, name[0] if isinstance(name, (tuple, list)) else name, None)
    if model_class is None or model_type not in CONFIG_MAPPING:
        return ""
    stage = "config"
    try:
        config_class = CONFIG_MAPPING[model_type]
        parameters = inspect.signature(config_class.__init__).parameters
        open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        config = config_class(**{k: v for k, v in SIZES.items() if k in parameters or open_ended})
        if hasattr(config, "text_config") or hasattr(config, "vision_config"):
            return "skip multimodal"
        stage = "build"
        torch.manual_seed(0)
        model = model_class(config).eval()
        batches = random_batches(num_batches=2, batch_size=16, max_len=10, classes=3)
        stage = "bare"
        with torch.no_grad():
            extra = {"decoder_input_ids": batches[0]["input_ids"]} if getattr(config, "is_encoder_decoder", False) else {}
            model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], **extra)
        stage = "score"
        report = hsvfast.score(model, batches, pooling="mean_all")
        stage = "compare"
        worst = max(reference_errors(model, config, batches, report), default=0.0)
        flag = "  <<<<" if worst > 1e-6 or len(report.layers) != 4 else ""
        return f"ok layers={len(report.layers)} maxerr={worst:.1e}{flag}"
    except TimedOut:
        return f"TIMEOUT at {stage}"
    except Exception as error:  # a sweep: every failure is a line of output
        message = str(error).replace("\n", " ")[:140]
        return f"{'FAIL' if stage in ('score', 'compare') else 'n/a'} at {stage}: {type(error).__name__}: {message}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_types", nargs="*", help="model types to sweep (default: every one transformers knows)")
    model_types = parser.parse_args().model_types
    warnings.simplefilter("ignore")
    tf.logging.set_verbosity_error()

    def timed_out(*_):
        raise TimedOut

    signal.signal(signal.SIGALRM, timed_out)
    counts: dict = {}
    for model_type in model_types or sorted(MODEL_MAPPING_NAMES):
        signal.alarm(40)
        try:
            line = sweep_one(model_type)
        finally:
            signal.alarm(0)
        if line:
            print(f"{model_type:28s} {line}", flush=True)
            kind = line.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
    print(counts)


if __name__ == "__main__":
    main()

"""Architectures beyond the common ones: shared-weight layers (ALBERT), encoder-decoders (T5, BART),
tokens-first blocks (XLNet), RoBERTa-style position limits, and a sweep of tiny random models, each
scored against Hugging Face's own ``output_hidden_states`` (not hsvfast's hooks)."""
import copy

import numpy as np
import pytest
import torch
import transformers as tf

import hsvfast
import reference as ref
from tiny_models import VOCAB, random_batches

H, L = 32, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64)


def build(config_name, model_name, **extra):
    if not hasattr(tf, model_name):  # a newer architecture than the installed transformers knows
        pytest.skip(f"transformers {tf.__version__} has no {model_name}")
    torch.manual_seed(0)
    return getattr(tf, model_name)(getattr(tf, config_name)(**{**COMMON, **extra})).eval()


def albert(groups=1):
    return build("AlbertConfig", "AlbertModel", embedding_size=16, num_hidden_groups=groups)


def t5(full=True):
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=VOCAB, d_model=H, d_kv=8, d_ff=37, num_layers=L, num_decoder_layers=L,
                         num_heads=4)
    return (tf.T5Model(config) if full else tf.T5EncoderModel(config)).eval()


def bart():
    torch.manual_seed(0)  # the decoder as deep as the encoder (as in bart-base): no depth tells them apart
    return tf.BartModel(tf.BartConfig(vocab_size=VOCAB, d_model=H, encoder_layers=L, decoder_layers=L,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                      decoder_ffn_dim=37, max_position_embeddings=64)).eval()


def xlnet():
    torch.manual_seed(0)
    return tf.XLNetModel(tf.XLNetConfig(vocab_size=VOCAB, d_model=H, n_layer=L, n_head=4, d_inner=37)).eval()


def fsmt():
    torch.manual_seed(0)
    return tf.FSMTModel(tf.FSMTConfig(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=H, encoder_layers=L,
                                      decoder_layers=L, encoder_attention_heads=4, decoder_attention_heads=4,
                                      encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                                      langs=["en", "de"])).eval()


def seq2seq(config_name, model_name, **extra):
    torch.manual_seed(0)
    config = getattr(tf, config_name)(vocab_size=VOCAB, d_model=H, encoder_layers=L, decoder_layers=L,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                      decoder_ffn_dim=37, **extra)
    return getattr(tf, model_name)(config).eval()


def xlm_like(config_name, model_name):
    torch.manual_seed(0)
    return getattr(tf, model_name)(getattr(tf, config_name)(vocab_size=VOCAB, emb_dim=H, n_layers=L, n_heads=4,
                                                            max_position_embeddings=64)).eval()


# name -> builder; every model's blocks keep (sequences, tokens, hidden) states of every input token
SWEEP = {
    "albert": albert,
    "albert-2-groups": lambda: albert(groups=2),
    "xlnet": xlnet,
    "fsmt": fsmt,  # fairseq's (tokens, sequences, hidden) blocks inside an encoder-decoder
    # XLM and FlauBERT keep each layer's parts in parallel lists: attentions, layer_norm1, ffns, layer_norm2
    "xlm": lambda: xlm_like("XLMConfig", "XLMModel"),
    "flaubert": lambda: xlm_like("FlaubertConfig", "FlaubertModel"),
    # Longformer, LED and PEGASUS-X pad the input on the right to their window / block size inside the model
    "longformer": lambda: build("LongformerConfig", "LongformerModel", pad_token_id=1, attention_window=4),
    "led": lambda: seq2seq("LEDConfig", "LEDModel", attention_window=4, max_encoder_position_embeddings=64,
                           max_decoder_position_embeddings=64),
    "pegasus-x": lambda: seq2seq("PegasusXConfig", "PegasusXModel", block_size=8, max_position_embeddings=64),
    # a hybrid: attention and linear-attention layers of different types in one list
    "olmo-hybrid": lambda: build("OlmoHybridConfig", "OlmoHybridModel", num_key_value_heads=2, pad_token_id=1),
    # linear attention in layers 0-2, full attention in 3, experts in every layer
    "qwen3-next": lambda: build("Qwen3NextConfig", "Qwen3NextModel", num_key_value_heads=2, head_dim=8, pad_token_id=1),
    "t5": t5,
    "t5-encoder": lambda: t5(full=False),
    "bart": bart,
    "xlm-roberta": lambda: build("XLMRobertaConfig", "XLMRobertaModel", pad_token_id=1),
    "camembert": lambda: build("CamembertConfig", "CamembertModel", pad_token_id=1),
    "mpnet": lambda: build("MPNetConfig", "MPNetModel", pad_token_id=1),
    "modernbert": lambda: build("ModernBertConfig", "ModernBertModel", pad_token_id=1, bos_token_id=0,
                                eos_token_id=2, cls_token_id=0, sep_token_id=2, global_attn_every_n_layers=2,
                                local_attention=8),
    "gemma2": lambda: build("Gemma2Config", "Gemma2Model", num_key_value_heads=2, head_dim=8),
    "gemma3": lambda: build("Gemma3TextConfig", "Gemma3TextModel", num_key_value_heads=2, head_dim=8),
    "phi3": lambda: build("Phi3Config", "Phi3Model", num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                          bos_token_id=1),
    "qwen3": lambda: build("Qwen3Config", "Qwen3Model", num_key_value_heads=2, head_dim=8),
    "qwen2-moe": lambda: build("Qwen2MoeConfig", "Qwen2MoeModel", num_key_value_heads=2, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "gpt-neox": lambda: build("GPTNeoXConfig", "GPTNeoXModel"),
    "falcon": lambda: build("FalconConfig", "FalconModel"),
}


def hf_layer_features(model, batches, layer):
    """Mean over attended tokens of ``hidden_states[layer + 1]`` as transformers returns it
    (run by the encoder alone, for an encoder-decoder), in float64."""
    features = []
    runner = model.get_encoder() if model.config.is_encoder_decoder else model
    with torch.no_grad():
        for batch in batches:
            out = runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
            mask = batch["attention_mask"].double().unsqueeze(-1)
            hidden = out.hidden_states[layer + 1].double()[:, : mask.shape[1]]  # PEGASUS-X returns its padding
            features.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(features)


@pytest.mark.parametrize("name", SWEEP)
def test_every_layer_matches_the_hidden_states_transformers_returns(name):
    model = SWEEP[name]()
    # batch 10 of 10 tokens too: XLNet's tokens-first blocks are then square, and only the model type tells
    batches = random_batches(num_batches=2, batch_size=16, max_len=10) + random_batches(1, 10, 10, seed=1)
    report = hsvfast.score(model, batches, pooling="mean_all")
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    assert report.layers == list(range(L)) and report.num_blocks == L
    # The last block of a decoder is scored before the final norm, which hidden_states[-1] includes.
    checked = range(L) if name.startswith(("albert", "xlnet", "fsmt", "xlm", "flaubert", "longformer", "led", "camembert",
                                                 "mpnet", "bart")) else range(L - 1)
    for k in checked:
        features = hf_layer_features(model, batches, k)
        assert ref.relative_error(report.metrics["trace_ratio"][k], ref.trace_ratio(features, labels)) <= 1e-9, k
        assert ref.relative_error(report.metrics["variability"][k],
                                  ref.rank_aware_variability(features, labels)) <= 1e-6, k


@pytest.mark.parametrize("groups", [1, 2])
def test_albert_layers_sharing_weights_are_scored_per_application(groups):
    model = albert(groups)
    assert len(hsvfast.find_blocks(model)) == groups  # fewer modules than layers
    batches = random_batches(num_batches=2, batch_size=16, max_len=10)
    full = hsvfast.score(model, batches, pooling="mean_all")
    part = hsvfast.score(model, batches, pooling="mean_all", layers=[1, -2])
    assert part.layers == [1, 2]
    np.testing.assert_allclose(part.metrics["variability"], full.metrics["variability"][1:3], rtol=1e-12)
    assert len(set(np.round(full.metrics["trace_ratio"], 12))) == L  # four different layers, not one four times


def test_encoder_decoder_models_are_scored_on_the_encoder_without_running_the_decoder():
    full, encoder_only = t5(full=True), t5(full=False)
    missing, _ = encoder_only.load_state_dict({k: v for k, v in full.state_dict().items()
                                               if not k.startswith("decoder.")}, strict=False)
    assert not missing
    batches = random_batches(num_batches=2, batch_size=16, max_len=10)
    calls = []
    full.decoder.register_forward_hook(lambda *a: calls.append(1))
    a = hsvfast.score(full, batches, pooling="mean_all")  # T5Model needs decoder inputs to run the decoder
    b = hsvfast.score(encoder_only, batches, pooling="mean_all")
    assert not calls
    seq2seq = bart()
    assert hsvfast.find_blocks(full) is full.encoder.block and hsvfast.find_blocks(seq2seq) is seq2seq.encoder.layers
    np.testing.assert_allclose(a.metrics["variability"], b.metrics["variability"], rtol=1e-12)


# --------------------------------------------------------------------------------- refused input


class ReusesABlock(torch.nn.Module):
    """A toy model whose forward runs block 0 twice: its blocks are not one per layer."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return self.blocks[1](self.blocks[0](self.blocks[0](h)))


class DropsAToken(ReusesABlock):
    def forward(self, input_ids, attention_mask=None):
        h = self.blocks[0](self.embed(input_ids))
        return self.blocks[1](h[:, 1:])  # the second block sees one token less: pooling it needs another mask


class KeepsTwoStreams(ReusesABlock):
    def forward(self, input_ids, attention_mask=None):
        h = self.blocks[0](self.embed(input_ids))
        return self.blocks[1](torch.stack([h, h], dim=2))  # (sequences, tokens, streams, hidden)


def test_a_block_run_twice_in_one_forward_is_refused():
    with pytest.raises(RuntimeError, match=r"ran 2 times in one forward.*blocks="):
        hsvfast.score(ReusesABlock(), random_batches(), pooling="mean_all")


def test_a_block_that_changes_the_tokens_is_refused_before_any_kernel_reads_it():
    model = DropsAToken()
    with pytest.raises(ValueError, match=r"block 1 returned hidden states of shape \(12, 9, 8\).*\(12, 10\)"):
        hsvfast.score(model, random_batches(), pooling="mean_all")
    assert hsvfast.score(model, random_batches(), pooling="mean_all", layers=[0]).layers == [0]
    with pytest.raises(ValueError, match=r"block 1 returned hidden states of shape \(12, 10, 2, 8\).*several streams"):
        hsvfast.score(KeepsTwoStreams(), random_batches(), pooling="mean_all")


@pytest.mark.parametrize("name,limit", [("camembert", 62), ("mpnet", 62), ("xlm-roberta", 62)])
def test_roberta_style_positions_refuse_inputs_past_the_embedding_table(name, limit):
    # Positions start at padding_idx + 1 = 2: 64 embeddings hold 62 tokens (the old check let 63 and 64
    # through to an IndexError inside the embedding).
    model = SWEEP[name]()
    ok = random_batches(num_batches=1, batch_size=4, max_len=limit)
    too_long = random_batches(num_batches=1, batch_size=4, max_len=limit + 1)
    for batch in ok + too_long:
        batch["attention_mask"][:] = 1
    assert hsvfast.score(model, ok * 2, pooling="mean_all").num_examples == 8
    with pytest.raises(ValueError, match=f"takes at most {limit}; tokenize with truncation=True"):
        hsvfast.score(model, too_long, pooling="mean_all")


def test_xlnet_has_no_length_limit():
    batches = random_batches(num_batches=2, batch_size=4, max_len=80)  # longer than any table of 64
    assert hsvfast.score(xlnet(), batches, pooling="mean_all").num_examples == 8


# ------------------------------------------------------------------------- plans on such models


def scored(model):
    report = hsvfast.score(model, random_batches(num_batches=2, batch_size=16, max_len=10), pooling="mean_all")
    report.metrics["variability"] = [4.0, 3.0, 1.0, 2.0]  # head at layer 2
    return report


def test_albert_plan_counts_a_shared_group_once_and_refuses_tuning_part_of_it():
    model = albert(groups=1)
    report = scored(model)
    group = sum(p.numel() for p in hsvfast.find_blocks(model)[0].parameters())
    assert hsvfast.plan(report, num_tuned=3, model=model).trainable_parameters == group
    part = hsvfast.plan(report, num_tuned=2)
    for method in ("finetune", "adapter", "lora"):
        with pytest.raises(ValueError, match=r"layers \[0, 1, 2\] share their weights.*num_tuned = head_layer \+ 1"):
            hsvfast.apply(copy.deepcopy(model), part, num_labels=3, method=method)


@pytest.mark.parametrize("method", ["finetune", "adapter", "lora"])
def test_albert_plan_tuning_every_kept_layer_trains(method):
    if method == "lora":
        pytest.importorskip("peft")
    model = albert(groups=1)
    classifier = hsvfast.apply(model, hsvfast.plan(scored(model), num_tuned=3), num_labels=3, method=method,
                               pooling="mean_all")
    assert model.config.num_hidden_layers == 3
    batch = random_batches(num_batches=1, batch_size=16, max_len=10)[0]
    out = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    group = hsvfast.find_blocks(model)[0]
    grads = [p.grad for p in group.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    # The truncated model runs 3 applications of the group: the head sees layer 2's output.
    report = hsvfast.score(model, random_batches(num_batches=2, batch_size=16, max_len=10), pooling="mean_all")
    assert report.layers == [0, 1, 2]


def test_albert_truncation_keeps_each_layer_on_its_group_or_refuses():
    model = albert(groups=2)  # layers 0, 1 -> group 0; layers 2, 3 -> group 1
    with pytest.raises(ValueError, match="cannot truncate AlbertModel to 2 layers"):
        hsvfast.truncate(model, 1)  # 2 layers would run groups 0 and 1
    assert model.config.num_hidden_layers == L  # untouched by the refusal
    hsvfast.truncate(model, 2)  # 3 layers: groups 0, 0, 1 as before
    assert model.config.num_hidden_layers == 3


@pytest.mark.parametrize("name", ["bart", "t5", "fsmt"])  # FSMT's encoder has no config of its own
def test_encoder_decoder_plan_puts_the_classifier_on_the_encoder(name):
    model = SWEEP[name]()
    classifier = hsvfast.apply(model, hsvfast.plan(scored(model), num_tuned=1), num_labels=3, pooling="mean_all")
    assert classifier.backbone is model.get_encoder() and len(hsvfast.find_blocks(classifier.backbone)) == 3
    batch = random_batches(num_batches=1, batch_size=16, max_len=10)[0]
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    logits = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (16, 3) and not calls


@pytest.mark.parametrize("name,sites", [
    ("t5-encoder", ("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo")),  # T5 reads wo.weight in its forward
    # A mixture of experts: the adapter follows the whole block (routed experts + the gated shared expert),
    # not the shared expert's down projection, the last nn.Linear to d in it.
    ("qwen2-moe", ("self_attn.o_proj", "mlp")),
    ("falcon", ("self_attention.dense", "mlp.dense_4h_to_h")),
    ("modernbert", ("attn.Wo", "mlp.Wo")),
])
def test_adapters_sit_after_attention_and_the_whole_ffn_and_start_as_the_identity(name, sites):
    from hsvfast.surgery import BottleneckAdapter, adapter_sites

    model = SWEEP[name]()
    assert adapter_sites(hsvfast.find_blocks(model)[0], H) == sites
    batch = random_batches(num_batches=1, batch_size=8, max_len=10)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    before = model(**inputs).last_hidden_state.detach()  # with autograd on, as after: the same kernels
    hsvfast.add_adapters(model, [0, 2], bottleneck=8, init="zero")
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert len(adapters) == 4
    after = model(**inputs).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    after.square().sum().backward()
    assert all(a.up.weight.grad is not None and a.up.weight.grad.abs().sum() > 0 for a in adapters)


@pytest.mark.parametrize("name", ["xlm", "t5", "longformer", "olmo-hybrid"])
def test_truncated_models_run_their_first_layers(name):
    model = SWEEP[name]()
    batches = random_batches(num_batches=2, batch_size=16, max_len=10)
    full = hsvfast.score(model, batches, pooling="mean_all")
    hsvfast.truncate(model, 1)
    assert len(hsvfast.find_blocks(model)) == 2
    if name == "xlm":  # every parallel list is cut, and the forward's own layer count follows
        assert [len(getattr(model, n)) for n in ("attentions", "layer_norm1", "ffns", "layer_norm2")] == [2] * 4
        assert model.n_layers == 2
    runner = model.get_encoder() if model.config.is_encoder_decoder else model
    with torch.no_grad():
        extra = {"use_cache": False} if name == "olmo-hybrid" else {}  # its 2 layers left hold no KV cache
        out = runner(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                     output_hidden_states=True, **extra)
    assert len(out.hidden_states) == 3
    cut = hsvfast.score(model, batches, pooling="mean_all")
    assert cut.layers == [0, 1]
    np.testing.assert_allclose(cut.metrics["variability"], full.metrics["variability"][:2], rtol=1e-12)


def test_a_plan_is_carried_out_on_a_model_of_parallel_layer_lists():
    model = SWEEP["xlm"]()  # its hidden size is the config's emb_dim
    classifier = hsvfast.apply(model, hsvfast.plan(scored(model), num_tuned=1), num_labels=3, pooling="mean_all")
    assert model.n_layers == 3 and len(model.ffns) == 3
    # Tuning layer 2 trains its entry of every list (was only layer_norm2[2]); nothing else.
    trainable = {".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"attentions.2", "layer_norm1.2", "ffns.2", "layer_norm2.2"}, trainable
    batch = random_batches(num_batches=1, batch_size=16, max_len=10)[0]
    out = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.logits.shape == (16, 3)
    fresh = SWEEP["xlm"]()
    layer_2 = sum(p.numel() for name in ("attentions", "layer_norm1", "ffns", "layer_norm2")
                  for p in getattr(fresh, name)[2].parameters())
    assert hsvfast.plan(scored(fresh), num_tuned=1, model=fresh).trainable_parameters == layer_2
    with pytest.raises(ValueError, match="parallel lists, not blocks.*method='finetune'"):
        hsvfast.apply(fresh, hsvfast.plan(scored(fresh), num_tuned=1), num_labels=3, method="adapter")


def test_lora_targets_the_linear_layers_of_every_tuned_layer_type_and_the_classifier_keeps_no_cache():
    pytest.importorskip("peft")
    model = SWEEP["qwen3-next"]()
    report = scored(model)
    report.metrics["variability"] = [4.0, 3.0, 2.0, 1.0]  # head at layer 3, the full-attention layer
    classifier = hsvfast.apply(model, hsvfast.plan(report, num_tuned=2), num_labels=3, method="lora",
                               pooling="mean_all")
    adapted = {name.split(".lora_A.")[0] for name, _ in classifier.named_parameters() if ".lora_A." in name}
    assert any(n.endswith("layers.3.self_attn.q_proj") for n in adapted)  # block 0 has no q_proj (was missed)
    assert any(n.endswith("layers.2.linear_attn.in_proj_qkvz") for n in adapted)
    assert not any(".layers.1." in n or ".layers.0." in n or "expert" in n for n in adapted)
    batch = random_batches(num_batches=1, batch_size=16, max_len=10)[0]
    out = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()  # with a KV cache, a model cut to linear-attention layers fails in transformers


def test_a_hybrid_cut_to_linear_attention_layers_trains_a_classifier():
    model = SWEEP["olmo-hybrid"]()  # layers 0-2 linear attention: no layer left makes a KV cache
    classifier = hsvfast.apply(model, hsvfast.plan(scored(model), num_tuned=1), num_labels=3, pooling="mean_all")
    batch = random_batches(num_batches=1, batch_size=16, max_len=10)[0]
    out = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()

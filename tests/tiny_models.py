"""Tiny randomly initialised transformers models of several architectures (no download)."""
import torch
import transformers as tf

VOCAB = 96
HIDDEN = 32
DEPTH = 4
ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")


def tiny_model(kind: str):
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    if kind == "bert":
        config = tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                               intermediate_size=37, **common)
        model = tf.BertModel(config)
    elif kind == "roberta":
        config = tf.RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                                  intermediate_size=37, pad_token_id=1, **common)
        model = tf.RobertaModel(config)
    elif kind == "electra":
        config = tf.ElectraConfig(hidden_size=HIDDEN, embedding_size=16, num_hidden_layers=DEPTH,
                                  num_attention_heads=4, intermediate_size=37, **common)
        model = tf.ElectraModel(config)
    elif kind == "deberta":
        config = tf.DebertaV2Config(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                                    intermediate_size=37, **common)
        model = tf.DebertaV2Model(config)
    elif kind == "mistral":
        config = tf.MistralConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=37, **common)
        model = tf.MistralModel(config)
    elif kind == "distilbert":
        config = tf.DistilBertConfig(dim=HIDDEN, n_layers=DEPTH, n_heads=4, hidden_dim=37, **common)
        model = tf.DistilBertModel(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=2)
        model = tf.GPT2Model(config)
    elif kind == "llama":
        config = tf.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=37, **common)
        model = tf.LlamaModel(config)
    elif kind == "qwen2":
        config = tf.Qwen2Config(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=37, **common)
        model = tf.Qwen2Model(config)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model.apply(model._init_weights) if hasattr(model, "_init_weights") else None
    return model.eval()


def random_batches(num_batches=4, batch_size=12, max_len=10, classes=3, seed=0, special_ids=(0, 1, 2)):
    """Right-padded batches with special tokens at both ends of each sequence."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        lengths = torch.randint(3, max_len + 1, (batch_size,), generator=g)
        ids = torch.randint(len(special_ids) + 1, VOCAB, (batch_size, max_len), generator=g)
        attention = torch.zeros(batch_size, max_len, dtype=torch.long)
        special = torch.zeros(batch_size, max_len, dtype=torch.long)
        for b, n in enumerate(lengths.tolist()):
            attention[b, :n] = 1
            ids[b, 0], ids[b, n - 1] = special_ids[0], special_ids[2]
            ids[b, n:] = special_ids[1]
            special[b, 0] = special[b, n - 1] = 1
            special[b, n:] = 1
        labels = torch.randint(0, classes, (batch_size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": attention, "special_tokens_mask": special,
                    "labels": labels})
    return out

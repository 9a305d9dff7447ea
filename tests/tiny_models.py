"""Tiny randomly initialised transformers models of several architectures (no download)."""
import torch
import transformers as tf

VOCAB = 96
HIDDEN = 32
DEPTH = 4
ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta")
DECODERS = ("gpt2", "llama", "qwen2", "mistral")


# kind -> (config class, model class, arguments beyond the common ones)
_STANDARD = {
    "bert": (tf.BertConfig, tf.BertModel, {}),
    "roberta": (tf.RobertaConfig, tf.RobertaModel, dict(pad_token_id=1)),
    "electra": (tf.ElectraConfig, tf.ElectraModel, dict(embedding_size=16)),
    "deberta": (tf.DebertaV2Config, tf.DebertaV2Model, {}),
    "llama": (tf.LlamaConfig, tf.LlamaModel, dict(num_key_value_heads=2)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2Model, dict(num_key_value_heads=2)),
    "mistral": (tf.MistralConfig, tf.MistralModel, dict(num_key_value_heads=2)),
}


def tiny_model(kind: str):
    if kind in _STANDARD:
        config_class, model_class, extra = _STANDARD[kind]
        model = model_class(config_class(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=HIDDEN,
                                         num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=37,
                                         **extra))
    elif kind == "distilbert":
        model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=64, dim=HIDDEN,
                                                       n_layers=DEPTH, n_heads=4, hidden_dim=37))
    elif kind == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=2))
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


def tiny_tokenizer(pad_token: bool = True, eos: bool = True):
    """A fast word-level tokenizer built in memory: ``<eos>`` after each text (unless ``eos`` is False, as
    GPT-2's adds nothing: an empty text is then no token at all), ``<pad>`` only if asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6, "<pad>": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos:
        backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>" if pad_token else None,
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_corpus(n: int = 42, seed: int = 0):
    """Texts for :func:`tiny_tokenizer` with labels 0-2, class 3 only at odd positions (the second
    shard of two), and the last two texts empty (nothing to pool under "mean")."""
    import random

    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(n - 2)] + ["", ""]
    labels = [3 if i % 8 == 1 else i % 3 for i in range(n)]
    return texts, labels


def byte_level_bpe_tokenizer(corpus, vocab_size: int = 400):
    """A RoBERTa-style fast tokenizer (byte-level BPE, <s> … </s>, pairs joined by </s></s>)
    trained in memory on ``corpus``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.RobertaProcessing(("</s>", backend.token_to_id("</s>")),
                                                          ("<s>", backend.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])

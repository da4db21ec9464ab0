"""Tiny transformers text encoders with random weights and a word-level tokenizer, saved to a folder
the way released models are (nothing downloaded)."""

from pathlib import Path

import torch

WORDS = ["a", "an", "the", "red", "blue", "green", "cat", "dog", "bird", "on", "mat", "sky", "big", "small"]
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<s>", "</s>"
WIDTH = 16


def word_tokenizer(bos: bool = False, eos: bool = True):
    """A transformers fast tokenizer over ``WORDS``: pads with id 0, ends each prompt with </s>
    when ``eos`` and starts it with <s> when ``bos`` (T5: eos, CLIP: both, Qwen: neither)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS, *WORDS])}
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    single = " ".join([BOS] * bos + ["$A"] + [EOS] * eos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(BOS, vocabulary[BOS]), (EOS, vocabulary[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )


def vocab_size() -> int:
    return 4 + len(WORDS)


def save_t5(folder: Path) -> Path:
    """A T5 encoder-decoder (as released T5 checkpoints are) with its tokenizer in one folder."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size(), d_model=WIDTH, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def save_clip(folder: Path, projection: bool = False) -> Path:
    """A CLIP text tower (with its projection when ``projection``, as SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=8,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(folder)
    word_tokenizer(bos=True).save_pretrained(folder)
    return folder


def save_qwen_pipeline(folder: Path) -> Path:
    """A decoder-only language model laid out as in a diffusers pipeline: ``text_encoder/`` (the
    causal LM, head included) beside ``tokenizer/``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size(), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder / "text_encoder")
    word_tokenizer(eos=False).save_pretrained(folder / "tokenizer")
    return folder

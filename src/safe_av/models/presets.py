"""Named builders: tiny random models for tests and the demo; real checkpoints by hub name or path.

Tiny models are transformers' own classes built from small configs, with a word-level tokenizer
trained on the texts given (the synthetic corpus, for the demo). They save with
``save_pretrained`` and load back through the same ``from_pretrained`` path real checkpoints use.
"""

from __future__ import annotations

import re
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, AUDIO_TOKEN]
TINY_IMAGE_SIZE = 64
_BASIC_WORDS = (
    "what is the how many which are there a an of in on to and or yes no zero one two three four five "
    "six seven eight nine ten left right middle color colour shape sound sounds sounding instrument "
    "playing louder first last does question answer audio image picture describe"
).split()

TINY_BASES = ("tiny-blip2-opt", "tiny-blip2-t5", "tiny-llava")
TINY_AUDIO = ("tiny-clap", "tiny-whisper")


def build_tiny_tokenizer(texts: list[str] | None = None, *, max_vocab: int = 2000) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer whose vocabulary covers ``texts``.

    ``<image>`` and ``<audio>`` are special tokens: they are never split or lower-cased.
    """
    words = list(_BASIC_WORDS) + [w for t in (texts or []) for w in re.findall(r"\w+|[^\w\s]", t.lower())]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, min_frequency=1, special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(words)], trainer=trainer)
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
        model_max_length=512,
    )


def _vocab_size(tokenizer) -> int:
    # A multiple of 8, like real checkpoints; ids above the tokenizer's are never produced.
    return ((len(tokenizer) + 7) // 8) * 8


def build_tiny_base(name: str, texts: list[str] | None = None, *, seed: int = 0):
    """Build a tiny random ``Blip2ForConditionalGeneration`` / ``LlavaForConditionalGeneration`` + processor."""
    if name not in TINY_BASES:
        raise ValueError(f"model.base={name!r}: unknown tiny preset (known: {', '.join(TINY_BASES)})")
    tokenizer = build_tiny_tokenizer(texts)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    vocab = _vocab_size(tokenizer)
    special = dict(pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    torch.manual_seed(seed)
    if name.startswith("tiny-blip2"):
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=TINY_IMAGE_SIZE, patch_size=8)
        qformer = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       cross_attention_frequency=1, encoder_hidden_size=64, vocab_size=vocab)
        if name == "tiny-blip2-opt":
            text = OPTConfig(vocab_size=vocab, hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=4,
                             ffn_dim=256, num_attention_heads=4, max_position_embeddings=640, dropout=0.0,
                             attention_dropout=0.0, **special).to_dict()
        else:
            text = T5Config(vocab_size=vocab, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
                            num_heads=4, dropout_rate=0.0, decoder_start_token_id=ids["<pad>"],
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False, **special).to_dict()
        config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=8,
                             image_token_index=ids[IMAGE_TOKEN])
        model = Blip2ForConditionalGeneration(config)
        with torch.no_grad():  # BLIP-2's own init (LAVIS): normal query tokens; transformers' zeros start symmetric
            model.query_tokens.normal_(0.0, config.initializer_range)
        if name == "tiny-blip2-t5":
            # T5's init draws an untied lm_head with std 1 (logits of std sqrt(d_model)); scale it as a
            # trained head is, so the tiny model's logits have a realistic range.
            with torch.no_grad():
                model.language_model.lm_head.weight.mul_(config.text_config.d_model ** -0.5)
        image_processor = BlipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=8)
    else:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=64)
        text = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=640, **special)
        config = LlavaConfig(vision_config=vision.to_dict() | {"model_type": "clip_vision_model"},
                             text_config=text.to_dict() | {"model_type": "llama"},
                             image_token_index=ids[IMAGE_TOKEN], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                                                crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", image_token=IMAGE_TOKEN)
    return model.eval(), processor


def build_tiny_audio(name: str, *, seed: int = 0):
    """Build a tiny random CLAP audio tower or Whisper encoder + its feature extractor."""
    torch.manual_seed(seed)
    # Whole models (as real checkpoints are) so save_pretrained/from_pretrained round-trip;
    # SAFE uses only their audio tower / encoder.
    if name == "tiny-clap":
        audio = ClapAudioConfig(window_size=4, num_mel_bins=64, spec_size=256, patch_size=16, patch_stride=16,
                                hidden_size=64, depths=[1, 1], num_attention_heads=[2, 2],
                                patch_embeds_hidden_size=32, projection_dim=32, enable_fusion=False)
        text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=40)
        cfg = ClapConfig(text_config=text, audio_config=audio.to_dict(), projection_dim=32)
        fe = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=10,
                                  truncation="rand_trunc", padding="repeatpad")
        return ClapModel(cfg).eval(), fe
    if name == "tiny-whisper":
        cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                            encoder_ffn_dim=64, max_source_positions=500, decoder_layers=1,
                            decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=128, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, chunk_length=10)
        return WhisperModel(cfg).eval(), fe
    raise ValueError(f"model.audio_encoder={name!r}: unknown tiny preset (known: {', '.join(TINY_AUDIO)})")


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base(name_or_path: str, *, dtype: str = "float32", attn_implementation: str = "sdpa",
              load_in: str = "none", texts: list[str] | None = None, seed: int = 0):
    """A tiny preset by name, or a real BLIP-2 / LLaVA checkpoint by hub name or local path."""
    if name_or_path in TINY_BASES:
        return build_tiny_base(name_or_path, texts, seed=seed)
    config = AutoConfig.from_pretrained(name_or_path)
    classes = {"blip-2": Blip2ForConditionalGeneration, "llava": LlavaForConditionalGeneration}
    if config.model_type not in classes:
        raise ValueError(f"model.base={name_or_path!r}: model_type {config.model_type!r} is not supported "
                         f"(supported: {', '.join(classes)})")
    kwargs = dict(dtype=_dtype(dtype), attn_implementation=attn_implementation)
    if load_in != "none":
        from transformers import BitsAndBytesConfig

        # 4-bit: matmuls in the model's dtype (bitsandbytes' default compute dtype is float32, which doubles the
        # activations its layers keep and runs every matmul in fp32)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in == "8bit",
                                                           load_in_4bit=load_in == "4bit",
                                                           bnb_4bit_compute_dtype=_dtype(dtype))
    model = classes[config.model_type].from_pretrained(name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model.eval(), processor


def load_audio_encoder(name_or_path: str, *, dtype: str = "float32", seed: int = 0):
    """A tiny preset, or a CLAP / Whisper checkpoint by hub name or local path (whole model + extractor)."""
    if name_or_path in TINY_AUDIO:
        return build_tiny_audio(name_or_path, seed=seed)
    from transformers import AutoFeatureExtractor

    config = AutoConfig.from_pretrained(name_or_path)
    fe = AutoFeatureExtractor.from_pretrained(name_or_path)
    torch_dtype = _dtype(dtype)
    if config.model_type == "clap":
        return ClapModel.from_pretrained(name_or_path, dtype=torch_dtype).eval(), fe
    if config.model_type == "whisper":
        return WhisperModel.from_pretrained(name_or_path, dtype=torch_dtype).eval(), fe
    raise ValueError(f"model.audio_encoder={name_or_path!r}: model_type {config.model_type!r} is not supported "
                     "(supported: clap, whisper)")

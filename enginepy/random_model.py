"""Random MusicGen checkpoints in the Hugging Face layout, built with transformers' own config classes.

Real weights cannot always be downloaded; these models exercise the whole path (HF directory -> convert ->
load -> generate -> decode -> WAV) for real. With the real musicgen-small/medium/large shapes they serve
speed work; tiny ones serve the tests and the offline demo (they sound like noise).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

# Decoder shapes of the released checkpoints (hidden size, layers, heads); FFN is 4x hidden.
RELEASED_SHAPES = {
    "small": (1024, 24, 16),
    "medium": (1536, 48, 24),
    "large": (2048, 48, 32),
}

# MusicgenMelodyFeatureExtractor's defaults (those of the released musicgen-melody checkpoints).
MELODY_FEATURES = dict(feature_size=12, sampling_rate=32000, hop_length=4096, chunk_length=30, n_fft=16384,
                       num_chroma=12, padding_value=0.0, return_attention_mask=False, stem_indices=[3, 2],
                       padding_side="right")

_WORDS = (
    "a an the and with of in on for lo-fi beat warm piano drums bass guitar synth strings ambient jazz rock pop "
    "electronic calm upbeat happy sad dark bright slow fast techno house hip hop orchestral violin cello flute "
    "choir vocals melody rhythm groove chill epic cinematic retro 80s 90s acoustic electric soft loud deep "
    "rain night summer dance funk soul blues reggae metal folk classical minimal tropical"
).split()


@dataclass
class RandomModelSpec:
    """Sizes of a random MusicGen model. Defaults are tiny (a few hundred kB)."""

    hidden_size: int = 24
    num_layers: int = 2
    num_heads: int = 3
    num_codebooks: int = 4
    codebook_size: int = 32  # EnCodec needs a power of two
    audio_channels: int = 1
    text_hidden_size: int = 16
    text_layers: int = 1
    text_heads: int = 2
    text_ffn: int = 0  # 0: twice text_hidden_size
    text_buckets: int = 8
    sampling_rate: int = 800
    upsampling_ratios: tuple[int, ...] = (4, 4)  # hop 16 -> 50 frames/s at 800 Hz
    codec_hidden_size: int = 8
    codec_filters: int = 4
    codec_lstm_layers: int = 1
    max_position_embeddings: int = 2048
    seed: int = 0
    melody: bool = False  # MusicgenMelodyForConditionalGeneration: chroma + text as a prefix, no cross-attention
    chroma_length: int = 235  # prefix frames of projected chroma (the released checkpoints': 30 s of melody)


def released_spec(size: str, seed: int = 0) -> RandomModelSpec:
    """Random weights with the exact shapes of musicgen-small / medium / large (t5-base, EnCodec 32 kHz)."""
    if size not in RELEASED_SHAPES:
        raise ValueError(f"size must be one of {', '.join(RELEASED_SHAPES)}; got {size!r}")
    hidden, layers, heads = RELEASED_SHAPES[size]
    return RandomModelSpec(
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_codebooks=4, codebook_size=2048,
        text_hidden_size=768, text_layers=12, text_heads=12, text_ffn=3072, text_buckets=32,
        sampling_rate=32000, upsampling_ratios=(8, 5, 4, 4), codec_hidden_size=128, codec_filters=64,
        codec_lstm_layers=2, seed=seed,
    )


def _build_tokenizer(path: str) -> None:
    """A word-level tokenizer made with `tokenizers`, saved so that AutoTokenizer loads it (T5 ids: pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def build_random_hf_model(path: str, spec: RandomModelSpec | None = None, **overrides) -> str:
    """Write a random `MusicgenForConditionalGeneration` (or, with melody=True,
    `MusicgenMelodyForConditionalGeneration` and its feature extractor's preprocessor_config.json) with its
    config.json, model.safetensors and tokenizer to `path`."""
    import torch
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyForConditionalGeneration,
        T5Config,
    )

    from .hf import quiet_transformers

    spec = spec or RandomModelSpec()
    for key, value in overrides.items():
        if not hasattr(spec, key):
            raise TypeError(f"unknown RandomModelSpec field {key!r}")
        setattr(spec, key, value)
    os.makedirs(path, exist_ok=True)
    _build_tokenizer(path)
    vocab_size = len(json.load(open(os.path.join(path, "tokenizer.json")))["model"]["vocab"])

    hop = math.prod(spec.upsampling_ratios)
    frame_rate = math.ceil(spec.sampling_rate / hop)
    per_channel = spec.num_codebooks // spec.audio_channels
    bits = int(math.log2(spec.codebook_size))
    # Bandwidth that gives exactly `per_channel` quantizers (EnCodec: n_q = bandwidth*1000 // (frame_rate*bits)).
    bandwidth = per_channel * frame_rate * bits / 1000.0
    text = T5Config(
        vocab_size=vocab_size,
        d_model=spec.text_hidden_size,
        d_kv=spec.text_hidden_size // spec.text_heads,
        d_ff=spec.text_ffn or 2 * spec.text_hidden_size,
        num_layers=spec.text_layers,
        num_heads=spec.text_heads,
        relative_attention_num_buckets=spec.text_buckets,
        pad_token_id=0,
        eos_token_id=1,
    )
    codec = EncodecConfig(
        sampling_rate=spec.sampling_rate,
        audio_channels=1,
        hidden_size=spec.codec_hidden_size,
        num_filters=spec.codec_filters,
        num_residual_layers=1,
        upsampling_ratios=list(spec.upsampling_ratios),
        codebook_size=spec.codebook_size,
        codebook_dim=spec.codec_hidden_size,
        target_bandwidths=[bandwidth],
        num_lstm_layers=spec.codec_lstm_layers,
        normalize=False,
    )
    decoder = (MusicgenMelodyDecoderConfig if spec.melody else MusicgenDecoderConfig)(
        vocab_size=spec.codebook_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        ffn_dim=4 * spec.hidden_size,
        num_codebooks=spec.num_codebooks,
        audio_channels=spec.audio_channels,
        pad_token_id=spec.codebook_size,
        bos_token_id=spec.codebook_size,
        max_position_embeddings=spec.max_position_embeddings,
    )
    # The special token lies outside the vocabulary by design; transformers' warning about it is noise.
    with quiet_transformers():
        if spec.melody:
            config = MusicgenMelodyConfig(text_encoder=text, audio_encoder=codec, decoder=decoder,
                                          chroma_length=spec.chroma_length)
            model_class = MusicgenMelodyForConditionalGeneration
        else:
            config = MusicgenConfig(text_encoder=text, audio_encoder=codec, decoder=decoder)
            model_class = MusicgenForConditionalGeneration
        torch.manual_seed(spec.seed)
        model = model_class(config).eval()
        with torch.no_grad():
            # The default init (std 0.02) gives near-uniform logits and text that barely matters. Unit-gain weights
            # make greedy choices clear-cut and the prompt change the music, so parity tests compare real content.
            for module in model.decoder.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features))
            for emb in model.decoder.model.decoder.embed_tokens:
                emb.weight.normal_(0.0, 1.0)
            if hasattr(model, "enc_to_dec_proj"):  # absent when T5 is as wide as the decoder
                model.enc_to_dec_proj.weight.normal_(0.0, 1.0 / math.sqrt(spec.text_hidden_size))
            if hasattr(model, "audio_enc_to_dec_proj"):  # one-hot chroma: unit-gain rows make melodies differ
                model.audio_enc_to_dec_proj.weight.normal_(0.0, 1.0)
            # EnCodec codebooks start as zeros (filled by k-means in training): random ones make audio depend on codes.
            for layer in model.audio_encoder.quantizer.layers:
                layer.codebook.embed.normal_(0.0, 1.0)
                layer.codebook.inited.fill_(1)
        model.generation_config.update(decoder_start_token_id=spec.codebook_size, do_sample=False)
        model.save_pretrained(path)
    if spec.melody:
        # The chroma's parameters, whatever the codec's rate: MusicgenMelodyFeatureExtractor's defaults, written as
        # its save_pretrained does (the class itself needs torchaudio, which does not import with this torch).
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(dict(MELODY_FEATURES, feature_extractor_type="MusicgenMelodyFeatureExtractor",
                           processor_class="MusicgenMelodyProcessor"), f, indent=2)
    return path

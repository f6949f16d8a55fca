"""Reading checkpoints and packing the decoder weights into the engine's layout.

Packed decoder layout (decoder.safetensors), L layers, K codebooks, D hidden, F ffn, V vocabulary:
  emb                       [K, V + 1, D]   stacked per-codebook embeddings (row V = special token)
  layers.{i}.ln1.{weight,bias}              pre-self-attention LayerNorm
  layers.{i}.qkv            [3D, D]         fused Q, K, V projections (no bias)
  layers.{i}.out            [D, D]
  layers.{i}.ln_cross.{weight,bias}
  layers.{i}.cross_q        [D, D]
  layers.{i}.cross_kv       [2D, D]         fused cross-attention K, V (applied once per request)
  layers.{i}.cross_out      [D, D]
  layers.{i}.ln2.{weight,bias}
  layers.{i}.fc1            [F, D]
  layers.{i}.fc2            [D, F]
  ln_out.{weight,bias}
  heads                     [K, V, D]       stacked per-codebook output heads
  text_proj.{weight,bias}   [D, Dt], [D]    T5 width -> D (kept in fp32: it sees fp32 T5 states)
MusicGen-Melody (prefix conditioning) has no cross-attention (no ln_cross, cross_q, cross_kv, cross_out) and
  audio_proj.{weight,bias}  [D, 12], [D]    chroma bins -> D (fp32)
"""
from __future__ import annotations

import contextlib
import os

import torch

from .config import read_json_object
from .errors import EnginepyError, ModelFileError

HF_DECODER = "decoder.model.decoder."
# The conditioning projections stay fp32 whatever the decoder's dtype: they see fp32 T5 states and chroma.
FP32_KEYS = ("text_proj", "audio_proj")
# Present in some checkpoints, recomputed by every implementation: safe to drop.
IGNORED_KEYS = ("decoder.model.decoder.embed_positions.weights",)


def _reason(e: BaseException) -> str:
    """'Type: first line of the message', at most 200 characters: enough to tell truncation from garbage."""
    first = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def reading(path: str, problem: str, remedy: str):
    """Any failure inside the block (a library reading `path`) becomes one ModelFileError naming `path`:
    '<path>: <problem> (<exception type>: <first line>); <remedy>'."""
    try:
        yield
    except EnginepyError:
        raise
    except Exception as e:  # safetensors, pickle, json, transformers: each has its own exception types
        raise ModelFileError(f"{path}: {problem} ({_reason(e)}); {remedy}") from e


def load_safetensors(path: str, remedy: str) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; a truncated, empty or foreign file is a ModelFileError naming it."""
    from safetensors.torch import load_file

    with reading(path, "not a readable safetensors file (damaged or truncated?)", remedy):
        return load_file(path)


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory: model.safetensors, sharded safetensors or .bin."""
    remedy = "download the checkpoint again"
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(single):
        return load_safetensors(single, remedy)
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFileError(f"{index}: 'weight_map' must map tensor names to shard file names")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise ModelFileError(f"{directory}: shard {shard} listed in model.safetensors.index.json is missing")
            state.update(load_safetensors(path, remedy))
        return state
    if os.path.isfile(binary):
        with reading(binary, "not a readable PyTorch checkpoint (damaged or truncated?)", remedy):
            state = torch.load(binary, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelFileError(f"{binary}: expected a dict of tensors (a state dict); got {type(state).__name__}")
        return state
    raise ModelFileError(
        f"{directory}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def expected_decoder_shapes(
    num_layers: int, hidden: int, ffn: int, num_codebooks: int, vocab: int, text_hidden: int, num_chroma: int = 0
) -> dict[str, tuple[int, ...]]:
    """Every decoder-side key of a Hugging Face MusicGen checkpoint and its shape (num_chroma > 0: a MusicGen-Melody
    checkpoint, no cross-attention, audio_enc_to_dec_proj)."""
    attentions = ("self_attn",) if num_chroma else ("self_attn", "encoder_attn")
    norms = ("self_attn_layer_norm", "final_layer_norm") if num_chroma else \
        ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(num_codebooks):
        shapes[f"{HF_DECODER}embed_tokens.{k}.weight"] = (vocab + 1, hidden)
        shapes[f"decoder.lm_heads.{k}.weight"] = (vocab, hidden)
    for i in range(num_layers):
        p = f"{HF_DECODER}layers.{i}."
        for attn in attentions:
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{p}{attn}.{proj}.weight"] = (hidden, hidden)
        for norm in norms:
            shapes[f"{p}{norm}.weight"] = (hidden,)
            shapes[f"{p}{norm}.bias"] = (hidden,)
        shapes[f"{p}fc1.weight"] = (ffn, hidden)
        shapes[f"{p}fc2.weight"] = (hidden, ffn)
    shapes[f"{HF_DECODER}layer_norm.weight"] = (hidden,)
    shapes[f"{HF_DECODER}layer_norm.bias"] = (hidden,)
    shapes["enc_to_dec_proj.weight"] = (hidden, text_hidden)
    shapes["enc_to_dec_proj.bias"] = (hidden,)
    if num_chroma:
        shapes["audio_enc_to_dec_proj.weight"] = (hidden, num_chroma)
        shapes["audio_enc_to_dec_proj.bias"] = (hidden,)
    return shapes


def check_keys(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    what: str,
    optional: frozenset[str] = frozenset(),
    extra_ok=None,
) -> None:
    """Raise ModelFileError naming every missing key, shape mismatch and unexpected key of `state`.

    Keys in `optional` may be absent; keys not in `expected` are unexpected unless extra_ok(key) is true.
    """
    missing = [k for k in expected if k not in state and k not in optional]
    wrong = [
        f"{k}: expected {list(shape)}, got {list(state[k].shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    unexpected = [k for k in state if k not in expected and not (extra_ok and extra_ok(k))]
    problems = [
        f"{label}: {sep.join(items)}"
        for label, items, sep in (("missing keys", missing, ", "), ("shape mismatches", wrong, "; "),
                                  ("unexpected keys", unexpected, ", "))
        if items
    ]
    if problems:
        raise ModelFileError(f"{what}: " + " | ".join(problems))


def pack_decoder(state: dict[str, torch.Tensor], num_layers: int, num_codebooks: int,
                 prefix: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face decoder keys -> the packed layout in this module's docstring (all fp32 or source dtype);
    prefix=True for MusicGen-Melody."""
    d = HF_DECODER
    packed = {
        "emb": torch.stack([state[f"{d}embed_tokens.{k}.weight"] for k in range(num_codebooks)]),
        "heads": torch.stack([state[f"decoder.lm_heads.{k}.weight"] for k in range(num_codebooks)]),
        "ln_out.weight": state[f"{d}layer_norm.weight"],
        "ln_out.bias": state[f"{d}layer_norm.bias"],
        "text_proj.weight": state["enc_to_dec_proj.weight"],
        "text_proj.bias": state["enc_to_dec_proj.bias"],
    }
    if prefix:
        packed["audio_proj.weight"] = state["audio_enc_to_dec_proj.weight"]
        packed["audio_proj.bias"] = state["audio_enc_to_dec_proj.bias"]
    for i in range(num_layers):
        p, q = f"{d}layers.{i}.", f"layers.{i}."
        sa, ca = p + "self_attn.", p + "encoder_attn."
        packed[q + "qkv"] = torch.cat([state[sa + f"{x}_proj.weight"] for x in "qkv"])
        packed[q + "out"] = state[sa + "out_proj.weight"]
        norms = [("self_attn_layer_norm", "ln1"), ("final_layer_norm", "ln2")]
        if not prefix:
            packed[q + "cross_q"] = state[ca + "q_proj.weight"]
            packed[q + "cross_kv"] = torch.cat([state[ca + f"{x}_proj.weight"] for x in "kv"])
            packed[q + "cross_out"] = state[ca + "out_proj.weight"]
            norms.append(("encoder_attn_layer_norm", "ln_cross"))
        for src, dst in norms:
            packed[q + dst + ".weight"] = state[p + src + ".weight"]
            packed[q + dst + ".bias"] = state[p + src + ".bias"]
        packed[q + "fc1"] = state[p + "fc1.weight"]
        packed[q + "fc2"] = state[p + "fc2.weight"]
    return {k: v.contiguous() for k, v in packed.items()}


def packed_shapes(num_layers: int, hidden: int, ffn: int, num_codebooks: int, vocab: int, text_hidden: int,
                  num_chroma: int = 0):
    """Every key of decoder.safetensors and its shape (used to validate a converted directory); num_chroma > 0
    for MusicGen-Melody."""
    shapes = {
        "emb": (num_codebooks, vocab + 1, hidden),
        "heads": (num_codebooks, vocab, hidden),
        "ln_out.weight": (hidden,),
        "ln_out.bias": (hidden,),
        "text_proj.weight": (hidden, text_hidden),
        "text_proj.bias": (hidden,),
    }
    if num_chroma:
        shapes["audio_proj.weight"] = (hidden, num_chroma)
        shapes["audio_proj.bias"] = (hidden,)
    for i in range(num_layers):
        q = f"layers.{i}."
        shapes.update({q + "qkv": (3 * hidden, hidden), q + "out": (hidden, hidden),
                       q + "fc1": (ffn, hidden), q + "fc2": (hidden, ffn)})
        if not num_chroma:
            shapes.update({q + "cross_q": (hidden, hidden), q + "cross_kv": (2 * hidden, hidden),
                           q + "cross_out": (hidden, hidden)})
        for n in ("ln1", "ln2") if num_chroma else ("ln1", "ln_cross", "ln2"):
            shapes[q + n + ".weight"] = (hidden,)
            shapes[q + n + ".bias"] = (hidden,)
    return shapes


def load_submodule_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `module`, accepting both weight-norm key styles, and name every missing/unexpected key."""
    own = module.state_dict()
    renamed = {}
    for key, value in state.items():
        if key not in own:
            # Older EnCodec checkpoints store weight norm as weight_g / weight_v; newer torch uses parametrizations.
            alt = key.replace(".weight_g", ".parametrizations.weight.original0").replace(
                ".weight_v", ".parametrizations.weight.original1"
            )
            alt = alt if alt in own else key.replace(".parametrizations.weight.original0", ".weight_g").replace(
                ".parametrizations.weight.original1", ".weight_v"
            )
            key = alt if alt in own else key
        renamed[key] = value
    # T5 ties its encoder embedding to `shared`; checkpoints store only the latter.
    tied = frozenset({"encoder.embed_tokens.weight"}) if "shared.weight" in renamed else frozenset()
    check_keys(renamed, {k: tuple(v.shape) for k, v in own.items()}, what, optional=tied)
    module.load_state_dict(renamed, strict=False)

"""The converter: packed layout, dtype cast, checkpoint variants, and errors that name what is wrong."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from enginepy.config import ModelConfig
from enginepy.convert import convert_hf
from enginepy.errors import InvalidParameter, ModelFileError
from hf_reference import load_hf


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_weights(directory: str, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _edit_config(directory: str, edit) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_packed_weights_equal_the_source(tiny_hf, tmp_path):
    cfg = convert_hf(tiny_hf, str(tmp_path / "out"))
    packed = load_file(str(tmp_path / "out" / "decoder.safetensors"))
    hf, _ = load_hf(tiny_hf)
    layer = hf.decoder.model.decoder.layers[1]
    assert torch.equal(packed["emb"][2], hf.decoder.model.decoder.embed_tokens[2].weight)
    assert torch.equal(packed["heads"][3], hf.decoder.lm_heads[3].weight)
    assert torch.equal(packed["layers.1.qkv"], torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                                          layer.self_attn.v_proj.weight]))
    assert torch.equal(packed["layers.1.cross_kv"], torch.cat([layer.encoder_attn.k_proj.weight,
                                                               layer.encoder_attn.v_proj.weight]))
    assert torch.equal(packed["text_proj.bias"], hf.enc_to_dec_proj.bias)
    assert ModelConfig.load(str(tmp_path / "out")) == cfg
    assert cfg.delays == [0, 1, 2, 3] and cfg.vocab_size == 32 and cfg.hop_length == 16


def test_dtype_casts_the_decoder_only(tiny_hf, tmp_path):
    convert_hf(tiny_hf, str(tmp_path / "bf16"), "bfloat16")
    packed = load_file(str(tmp_path / "bf16" / "decoder.safetensors"))
    assert packed["layers.0.fc1"].dtype == torch.bfloat16 and packed["emb"].dtype == torch.bfloat16
    assert packed["text_proj.weight"].dtype == torch.float32
    assert load_file(str(tmp_path / "bf16" / "text_encoder" / "model.safetensors"))["shared.weight"].dtype == torch.float32


def test_sharded_checkpoint_and_legacy_weight_norm_names(tiny_hf, tmp_path):
    src = _copy(tiny_hf, tmp_path / "sharded")
    state = load_file(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    # Older EnCodec checkpoints name weight norm weight_g / weight_v.
    state = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
             for k, v in state.items()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k].contiguous() for k in part}, os.path.join(src, name))
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: n for n, part in halves.items() for k in part}}, f)
    convert_hf(src, str(tmp_path / "out"))
    ref = convert_hf(tiny_hf, str(tmp_path / "ref"))
    out = ModelConfig.load(str(tmp_path / "out"))
    assert {**out.__dict__, "source": None} == {**ref.__dict__, "source": None}
    for sub in ("decoder.safetensors", "codec/model.safetensors"):
        a, b = load_file(str(tmp_path / "out" / sub)), load_file(str(tmp_path / "ref" / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_misshapen_keys_are_named(tiny_hf, tmp_path):
    src = _copy(tiny_hf, tmp_path / "broken")

    def edit(state):
        del state["decoder.model.decoder.layers.1.fc2.weight"]
        del state["decoder.lm_heads.0.weight"]
        state["decoder.model.decoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 5)

    _edit_weights(src, edit)
    with pytest.raises(ModelFileError) as e:
        convert_hf(src, str(tmp_path / "out"))
    msg = str(e.value)
    assert "decoder.model.decoder.layers.1.fc2.weight" in msg and "decoder.lm_heads.0.weight" in msg
    assert "layers.0.self_attn.q_proj.weight: expected [24, 24], got [5, 5]" in msg
    assert not os.path.exists(tmp_path / "out")


def test_unexpected_keys_are_named(tiny_hf, tmp_path):
    src = _copy(tiny_hf, tmp_path / "extra")
    _edit_weights(src, lambda s: s.update({"decoder.model.decoder.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ModelFileError, match=r"unexpected keys: decoder\.model\.decoder\.layers\.0\.mystery\.weight"):
        convert_hf(src, str(tmp_path / "out"))


def test_codec_key_missing_is_named(tiny_hf, tmp_path):
    src = _copy(tiny_hf, tmp_path / "nocodec")
    _edit_weights(src, lambda s: s.pop("audio_encoder.decoder.layers.0.conv.bias"))
    with pytest.raises(ModelFileError, match=r"codec weights: missing keys: decoder\.layers\.0\.conv\.bias"):
        convert_hf(src, str(tmp_path / "out"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".enginepy")] == []


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["decoder"].update(vocab_size=64, pad_token_id=64), "vocab_size 64 disagrees with the codec's codebook_size 32"),
        (lambda c: c["decoder"].update(num_codebooks=9), "num_codebooks 9 needs 9 quantizers per channel but the codec has 4"),
        (lambda c: c.update(model_type="bark"), "model_type is 'bark'"),
        (lambda c: c["decoder"].update(activation_function="relu"), "activation_function 'relu' is not supported"),
        (lambda c: c.pop("audio_encoder"), "the 'audio_encoder' section is missing"),
    ],
)
def test_inconsistent_configs_are_refused(tiny_hf, tmp_path, edit, match):
    src = _copy(tiny_hf, tmp_path / "cfg")
    _edit_config(src, edit)
    with pytest.raises(ModelFileError, match=match):
        convert_hf(src, str(tmp_path / "out"))


def test_missing_files_are_named(tiny_hf, tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        convert_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    src = _copy(tiny_hf, tmp_path / "noweights")
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(ModelFileError, match="no weights found"):
        convert_hf(src, str(tmp_path / "out"))
    src = _copy(tiny_hf, tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(src, name))
    with pytest.raises(ModelFileError, match="tokenizer files are missing"):
        convert_hf(src, str(tmp_path / "out"))


def test_refuses_to_overwrite_a_foreign_directory(tiny_hf, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidParameter, match="refusing to overwrite"):
        convert_hf(tiny_hf, str(tmp_path / "precious"))
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"

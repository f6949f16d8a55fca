"""Damaged model files end in one ModelFileError naming the file (never a library traceback), the codec refuses
codes it cannot decode, converted directories look like any other new directory, SIGTERM during a conversion
leaves nothing behind, and the cache of converted copies can be listed and pruned."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from enginepy.cli import main
from enginepy.convert import convert_hf
from enginepy.errors import InvalidParameter, ModelFileError
from enginepy.loading import list_cache, load_components, prune_cache, resolve_model_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory) -> str:
    dst = str(tmp_path_factory.mktemp("conv") / "m")
    convert_hf(tiny_hf, dst)
    return dst


def _copy(src: str, dst) -> str:
    return str(shutil.copytree(src, dst))


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(path: str) -> None:
    open(path, "wb").close()


def _garbage(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"\x00\xffnot a model" * 100)


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    data = edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _set(section: str | None, **values):
    def edit(data):
        (data[section] if section else data).update(values)
        return data
    return edit


def _drop(section: str, key: str):
    def edit(data):
        del data[section][key]
        return data
    return edit


# (case id, file inside the Hugging Face directory, damage, expected message fragment)
HF_CASES = [
    ("weights-truncated", "model.safetensors", _truncate, "model.safetensors: not a readable safetensors file"),
    ("weights-empty", "model.safetensors", _empty, "model.safetensors: not a readable safetensors file"),
    ("weights-garbage", "model.safetensors", _garbage, "model.safetensors: not a readable safetensors file"),
    ("config-invalid-json", "config.json", lambda p: _write(p, "{ not json"), "config.json is not valid JSON"),
    ("config-a-list", "config.json", lambda p: _write(p, "[1, 2]"), "config.json must hold a JSON object; got a list"),
    ("decoder-a-string", "config.json", lambda p: _edit_json(p, _set(None, decoder="x")),
     "the 'decoder' section must be a JSON object; got str"),
    ("missing-key", "config.json", lambda p: _edit_json(p, _drop("decoder", "hidden_size")),
     "config.json decoder: the 'hidden_size' entry is missing"),
    ("wrong-type", "config.json", lambda p: _edit_json(p, _set("decoder", ffn_dim="96")),
     "config.json decoder: ffn_dim must be an integer; got '96'"),
    ("zero-heads", "config.json", lambda p: _edit_json(p, _set("decoder", num_attention_heads=0)),
     "config.json decoder: num_attention_heads must be >= 1; got 0"),
    ("inconsistent-heads", "config.json", lambda p: _edit_json(p, _set("decoder", num_attention_heads=5)),
     "hidden_size 24 is not divisible by num_attention_heads"),
    ("zero-sample-rate", "config.json", lambda p: _edit_json(p, _set("audio_encoder", sampling_rate=0)),
     "config.json audio_encoder: sampling_rate must be >= 1; got 0"),
    ("zero-upsampling", "config.json", lambda p: _edit_json(p, _set("audio_encoder", upsampling_ratios=[4, 0])),
     "upsampling_ratios must be a non-empty list of positive numbers; got [4, 0]"),
    ("no-text-width", "config.json", lambda p: _edit_json(p, _drop("text_encoder", "d_model")),
     "config.json text_encoder: the 'd_model' entry is missing"),
    ("t5-bad-section", "config.json", lambda p: _edit_json(p, _set("text_encoder", num_heads="two")),
     "the text_encoder section is not a valid T5 configuration"),
    ("tokenizer-garbage", "tokenizer.json", _garbage, "the tokenizer files are damaged or unreadable"),
]


@pytest.mark.parametrize("case,name,damage,message", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_damaged_hugging_face_directory(tiny_hf, tmp_path, case, name, damage, message):
    src = _copy(tiny_hf, tmp_path / "hf")
    damage(os.path.join(src, name))
    with pytest.raises(ModelFileError) as e:
        resolve_model_dir(src, "float32", str(tmp_path / "cache"))
    assert message in str(e.value) and str(e.value).startswith(src)  # names the file (or the tokenizer's directory)
    assert len(str(e.value).splitlines()) == 1
    leftovers = os.listdir(tmp_path / "cache") if os.path.isdir(tmp_path / "cache") else []
    assert leftovers == []  # nothing half-converted


def test_damaged_shards_and_pytorch_checkpoints(tiny_hf, tmp_path):
    src = _copy(tiny_hf, tmp_path / "sharded")
    os.remove(os.path.join(src, "model.safetensors"))
    _write(os.path.join(src, "model.safetensors.index.json"), "[]")
    with pytest.raises(ModelFileError, match="model.safetensors.index.json must hold a JSON object"):
        convert_hf(src, str(tmp_path / "out"))
    _write(os.path.join(src, "model.safetensors.index.json"), json.dumps({"weight_map": {"a": "shard.safetensors"}}))
    _garbage(os.path.join(src, "shard.safetensors"))
    with pytest.raises(ModelFileError, match="shard.safetensors: not a readable safetensors file"):
        convert_hf(src, str(tmp_path / "out"))
    os.remove(os.path.join(src, "model.safetensors.index.json"))
    _garbage(os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ModelFileError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        convert_hf(src, str(tmp_path / "out"))
    torch.save([torch.zeros(2)], os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(ModelFileError, match="pytorch_model.bin: expected a dict of tensors"):
        convert_hf(src, str(tmp_path / "out"))


def _config_edit(**values):
    return lambda p: _edit_json(os.path.join(p, "enginepy.json"), _set(None, **values))


# (case id, damage of the converted directory, expected message fragment)
CONVERTED_CASES = [
    ("decoder-truncated", lambda p: _truncate(os.path.join(p, "decoder.safetensors")),
     "decoder.safetensors: not a readable safetensors file"),
    ("decoder-empty", lambda p: _empty(os.path.join(p, "decoder.safetensors")),
     "decoder.safetensors: not a readable safetensors file"),
    ("decoder-garbage", lambda p: _garbage(os.path.join(p, "decoder.safetensors")),
     "decoder.safetensors: not a readable safetensors file"),
    ("config-invalid-json", lambda p: _write(os.path.join(p, "enginepy.json"), "{"), "enginepy.json is not valid JSON"),
    ("config-a-list", lambda p: _write(os.path.join(p, "enginepy.json"), "[]"),
     "enginepy.json must hold a JSON object; got a list"),
    ("missing-key", lambda p: _edit_json(os.path.join(p, "enginepy.json"), lambda d: {k: v for k, v in d.items() if k != "ffn_dim"}),
     "enginepy.json: missing entries ffn_dim"),
    ("unknown-key", _config_edit(flavour="vanilla"), "enginepy.json: unknown entries flavour"),
    ("wrong-type", _config_edit(hidden_size="24"), "enginepy.json: hidden_size must be an integer; got '24'"),
    ("bool-type", _config_edit(num_layers=True), "enginepy.json: num_layers must be an integer; got True"),
    ("zero-heads", _config_edit(num_heads=0), "enginepy.json: num_heads must be >= 1; got 0"),
    ("inconsistent-heads", _config_edit(num_heads=5), "enginepy.json: hidden_size 24 is not divisible by num_heads 5"),
    ("zero-sample-rate", _config_edit(sample_rate=0), "enginepy.json: sample_rate must be >= 1; got 0"),
    ("delays-length", _config_edit(delays=[0, 1, 2]), "enginepy.json: delays must be 4 non-negative integers"),
    ("delays-negative", _config_edit(delays=[0, 1, -2, 3]), "enginepy.json: delays must be 4 non-negative integers"),
    ("bad-eps", _config_edit(layer_norm_eps=0), "enginepy.json: layer_norm_eps must be a number in (0, 1)"),
    ("bad-dtype", _config_edit(dtype="float64"), "enginepy.json: dtype must be one of float32, float16, bfloat16"),
    ("rate-mismatch", _config_edit(sample_rate=1600, frame_rate=100),
     "enginepy.json sample_rate 1600 disagrees with codec/config.json sampling_rate 800"),
    ("frame-rate-inconsistent", _config_edit(sample_rate=1600),
     "enginepy.json: frame_rate 50 disagrees with sample_rate 1600 / hop_length 16"),
    ("codec-truncated", lambda p: _truncate(os.path.join(p, "codec", "model.safetensors")),
     "codec: the codec files are damaged or unreadable"),
    ("codec-config-garbage", lambda p: _garbage(os.path.join(p, "codec", "config.json")),
     "codec: the codec files are damaged or unreadable"),
    ("t5-missing-weights", lambda p: os.remove(os.path.join(p, "text_encoder", "model.safetensors")),
     "text_encoder: the text encoder files are damaged or unreadable"),
    ("tokenizer-empty", lambda p: [os.remove(os.path.join(p, "tokenizer", n)) for n in os.listdir(os.path.join(p, "tokenizer"))],
     "tokenizer: tokenizer files are missing (expected one of tokenizer.json, spiece.model)"),
    ("tokenizer-garbage", lambda p: _garbage(os.path.join(p, "tokenizer", "tokenizer.json")),
     "tokenizer: the tokenizer files are damaged or unreadable"),
]


@pytest.mark.parametrize("case,damage,message", CONVERTED_CASES, ids=[c[0] for c in CONVERTED_CASES])
def test_damaged_converted_directory(converted, tmp_path, capsys, case, damage, message):
    model = _copy(converted, tmp_path / "m")
    damage(model)
    with pytest.raises(ModelFileError) as e:
        load_components(model, torch.float32, CPU)
    assert message in str(e.value) and model in str(e.value) and len(str(e.value).splitlines()) == 1
    # The command line says the same in one line, exit code 2.
    code = main(["generate", "jazz", "--model", model, "--device", "cpu", "--duration", "0.1",
                 "--out", str(tmp_path / "o.wav"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("enginepy: error: ") and message in err
    assert not os.path.exists(tmp_path / "o.wav")


def test_codec_weights_with_a_missing_key_are_refused_not_randomly_initialised(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy(converted, tmp_path / "m")
    path = os.path.join(model, "codec", "model.safetensors")
    state = load_file(path)
    key = sorted(state)[0]
    del state[key]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=rf"codec: missing keys: {key.replace('.', '[.]')}"):
        load_components(model, torch.float32, CPU)


def test_damaged_files_exit_2_with_one_line_through_the_real_cli(tiny_hf, converted, tmp_path):
    model = _copy(converted, tmp_path / "m")
    _truncate(os.path.join(model, "decoder.safetensors"))
    src = _copy(tiny_hf, tmp_path / "hf")
    _write(os.path.join(src, "config.json"), "[]")
    for args in (["generate", "jazz", "--model", model, "--device", "cpu"], ["convert", src, str(tmp_path / "out")]):
        r = subprocess.run([sys.executable, "-m", "enginepy", *args], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("enginepy: error: ")


@pytest.fixture(scope="module")
def codec(converted):
    return load_components(converted, torch.float32, CPU)[3]


@pytest.mark.parametrize(
    "codes,message",
    [
        (torch.zeros(1, 3, 5, dtype=torch.int64), r"codes must have shape \[B, 4, T\] with B, T >= 1; got \[1, 3, 5\]"),
        (torch.zeros(4, 5, dtype=torch.int64), r"codes must have shape \[B, 4, T\] with B, T >= 1; got \[4, 5\]"),
        (torch.zeros(1, 4, 0, dtype=torch.int64), r"got \[1, 4, 0\]"),
        (torch.zeros(1, 4, 5), r"codes must hold integers \(int64 \[B, 4, T\]\); got torch.float32"),
        (torch.full((1, 4, 5), 32), r"codes must be in \[0, 31\] \(the codebook size is 32\); got values in \[32, 32\]"),
        (torch.full((1, 4, 5), -1), r"codes must be in \[0, 31\]"),
        ([[[0]]], "codes must be a torch.Tensor of int64 \\[B, 4, T\\]; got list"),
    ],
)
def test_codec_refuses_codes_it_cannot_decode(codec, codes, message):
    with pytest.raises(InvalidParameter, match=message):
        codec.decode(codes)


def test_codec_decodes_valid_codes_like_transformers(codec, converted):
    from transformers import EncodecModel

    codes = torch.randint(0, 32, (2, 4, 7), generator=torch.Generator().manual_seed(0))
    ref = EncodecModel.from_pretrained(os.path.join(converted, "codec")).eval()
    with torch.no_grad():
        expected = ref.decode(codes[None], [None]).audio_values
    torch.testing.assert_close(codec.decode(codes.to(torch.int32)), expected)


def test_converted_directory_has_normal_permissions(tiny_hf, tmp_path):
    convert_hf(tiny_hf, str(tmp_path / "out"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask


def test_replacing_a_converted_directory_keeps_a_complete_one_in_place(tiny_hf, tmp_path):
    dst = str(tmp_path / "out")
    convert_hf(tiny_hf, dst)
    (tmp_path / "out" / "marker").write_text("old")
    convert_hf(tiny_hf, dst, "bfloat16")
    assert sorted(os.listdir(tmp_path)) == ["out"] and not os.path.exists(tmp_path / "out" / "marker")
    assert json.load(open(tmp_path / "out" / "enginepy.json"))["dtype"] == "bfloat16"


SLOW_SAVE = """
import sys, time
import safetensors.torch
def slow(*args, **kwargs):
    print("converting", flush=True)
    time.sleep(120)
safetensors.torch.save_file = slow
{call}
"""


@pytest.mark.parametrize("via", ["cli", "api"])
def test_sigterm_during_convert_removes_the_temporary_directory(tiny_hf, tmp_path, via):
    dst = str(tmp_path / "out")
    call = (f"from enginepy.cli import main; sys.exit(main(['convert', {tiny_hf!r}, {dst!r}]))" if via == "cli" else
            f"from enginepy.convert import convert_hf; convert_hf({tiny_hf!r}, {dst!r})")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_SAVE.format(call=call))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "converting"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".enginepy-convert-")]  # the work in progress
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []
    if via == "cli":
        assert err.strip() == "enginepy: terminated"


def test_cache_list_and_prune(tiny_hf, tmp_path, capsys):
    src = _copy(tiny_hf, tmp_path / "hf")
    cache = str(tmp_path / "cache")
    first = resolve_model_dir(src, "float32", cache)
    bf16 = resolve_model_dir(src, "bfloat16", cache)
    assert json.load(open(os.path.join(first, "enginepy.json")))["source"] == {
        "kind": "huggingface", "path": src, "fingerprint": os.path.basename(first)}
    os.utime(os.path.join(src, "model.safetensors"), (1_700_000_000, 1_700_000_000))  # the source changed
    current = resolve_model_dir(src, "float32", cache)
    assert current not in (first, bf16)
    os.makedirs(os.path.join(cache, ".enginepy-convert-abandoned", "codec"))  # left by a killed conversion
    os.makedirs(os.path.join(cache, "0123456789abcdef0123"))
    _write(os.path.join(cache, "0123456789abcdef0123", "enginepy.json"), "{")  # damaged
    os.makedirs(os.path.join(cache, "bench-random-tiny"))  # a random model `enginepy bench` built
    os.makedirs(os.path.join(cache, "notes"))  # not enginepy's: never listed, never removed

    status = {os.path.basename(e.path): e.status for e in list_cache(cache)}
    assert status == {os.path.basename(first): "stale", os.path.basename(bf16): "stale",
                      os.path.basename(current): "current", ".enginepy-convert-abandoned": "incomplete",
                      "0123456789abcdef0123": "damaged", "bench-random-tiny": "generated"}
    assert main(["cache", "list", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert f"current        float32" in out and f"{src}  ->  {current}" in out and "6 entries" in out

    assert main(["cache", "prune", "--dry-run", "--cache-dir", cache]) == 0
    assert "would remove 4 entries" in capsys.readouterr().out and len(list_cache(cache)) == 6
    removed = prune_cache(cache)
    assert {os.path.basename(e.path) for e in removed} == {os.path.basename(first), os.path.basename(bf16),
                                                           ".enginepy-convert-abandoned", "0123456789abcdef0123"}
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(current), "bench-random-tiny", "notes"])

    shutil.rmtree(src)  # the source is gone: its copy is an orphan
    assert [e.status for e in list_cache(cache) if e.path == current] == ["source missing"]
    assert main(["cache", "prune", "--all", "--cache-dir", cache]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert os.listdir(cache) == ["notes"]


def test_a_file_given_as_model_directory_is_named_as_such(tmp_path):
    path = tmp_path / "model.wav"
    path.write_bytes(b"RIFF")
    with pytest.raises(ModelFileError, match=rf"^model directory {path} is a file, not a directory$"):
        resolve_model_dir(str(path), "float32", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError, match=rf"^model directory {path} is a file, not a directory$"):
        convert_hf(str(path), str(tmp_path / "out"))


def test_an_unusable_cache_is_named(tiny_hf, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    with pytest.raises(InvalidParameter, match=r"^the conversion cache \(\$ENGINEPY_CACHE or cache_dir\) .*cache/"):
        resolve_model_dir(tiny_hf, "float32", str(tmp_path / "cache"))

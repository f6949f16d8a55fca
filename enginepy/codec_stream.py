"""Streaming EnCodec decoding: codes arrive a few frames at a time, audio leaves as soon as it is final.

`Codec.decode` runs transformers' EncodecModel decoder over a whole code sequence. That decoder is non-causal
(musicgen's 32 kHz codec: centred convolutions with reflect padding) but every piece of it is local except
the LSTM, which is causal. So each layer runs incrementally here and keeps only the state it needs:

- quantizer: Σ_k codebook_k[code_k] is frame-local; no state.
- stride-1 Conv1d whose dilated kernel spans `left + right + 1` inputs: output t is final once input t + right
  exists. It keeps the last `left + right` inputs as context. Its padding (reflect, constant or replicate, via
  transformers' own `_pad1d`) is applied to the left end when the first outputs are computed and to the right end
  on close, as on the whole sequence; a sequence too short to have started is run through the module as a whole.
- LSTM: causal; (h, c) is carried across chunks.
- ConvTranspose1d (kernel 2r, stride r): untrimmed output j is the sum of inputs ⌊j/r⌋ - 1 and ⌊j/r⌋, so it keeps
  the last input; the `trim_left` samples after the last full block need the next input and wait for it.
- residual block: its branch lags its input, so the skip path waits in a FIFO until the branch catches up.

Every layer therefore sees each input once plus a fixed context per call: cost is linear in length, and the
concatenated chunks equal the one-shot decode up to float rounding (the convolutions sum the same terms over
differently shaped inputs; tests check ≤ 1e-4 max abs, measured errors are ~1e-7 on audio of amplitude ~0.1).

Lookahead. A conv holding back `right` inputs at a rate r_l times below the audio rate delays the audio by
right·r_l samples; a transposed conv adds its `trim_left` at its output rate. For musicgen's EnCodec 32 kHz
(upsampling 8, 5, 4, 4; kernels 7/3/7, non-causal) the delay is
    first conv 3 frames·640 + (4 + 1)·80 + (3 + 1)·16 + (2 + 1)·4 + (2 + 1)·1 + last conv 3 = 2402 samples,
i.e. 3.75 frames: after N frames have been pushed, exactly max(0, 640·N - 2402) samples have been emitted, and
the audio of frame f is out once frame f + 4 has been pushed (`lookahead_frames` = 4). Causal codecs with reflect
padding (transformers' default config, used by the tiny test models) have no steady-state delay, but their first
conv reads its left reflection from inputs 1..pad, so they emit nothing until the first `pad + 1` inputs exist.
"""
from __future__ import annotations

import math
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import nn

from .codec import Codec
from .errors import InvalidParameter


# facebook/encodec_32khz as published: the audio_encoder of every musicgen checkpoint. Written out because
# EncodecConfig's defaults are the causal 24 kHz model's (use_causal_conv=True, use_conv_shortcut=True).
ENCODEC_32KHZ = dict(
    sampling_rate=32000, audio_channels=1, hidden_size=128, num_filters=64, num_residual_layers=1,
    upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm", kernel_size=7, last_kernel_size=7,
    residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False, pad_mode="reflect", compress=2,
    num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=2048, codebook_dim=128, use_conv_shortcut=False,
    target_bandwidths=[2.2], normalize=False, chunk_length_s=None, overlap=None,
)


def random_codec(channels: int = 1, seed: int = 0, device: str | torch.device = "cpu", **config) -> Codec:
    """A Codec with random weights (tests, benchmarks): EncodecConfig(**config), default ENCODEC_32KHZ;
    channels 2 decodes interleaved L/R codebooks like a stereo musicgen."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    model = EncodecModel(EncodecConfig(**(config or ENCODEC_32KHZ))).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:  # zeros at init; random so that the audio depends on the codes
            layer.codebook.embed.normal_(0.0, 1.0)
    return Codec(model, channels, torch.device(device))


def _cat(parts: list) -> torch.Tensor | None:
    parts = [p for p in parts if p is not None and p.shape[-1] > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class _Conv:
    """EncodecConv1d with stride 1. State: [started, buffer [B, C_in, t]]."""

    def __init__(self, module: nn.Module):
        if module.norm_type != "weight_norm":
            raise InvalidParameter(
                f"streaming decode needs norm_type 'weight_norm'; got {module.norm_type!r} "
                "(time_group_norm normalises over the whole sequence)"
            )
        if int(module.stride) != 1:
            raise InvalidParameter(f"streaming decode supports stride-1 decoder convolutions; got stride {int(module.stride)}")
        self.module = module
        # Weight norm folded once: recomputing it per call costs as much as a one-frame convolution.
        self.weight = module.conv.weight.detach().clone()
        self.bias = module.conv.bias.detach().clone()
        self.dilation = module.conv.dilation[0]
        total = int(module.padding_total)
        self.right = 0 if module.causal else total // 2
        self.left = total - self.right
        self.mode = module.pad_mode
        self.in_channels = module.conv.in_channels

    def init(self, lanes: int, device: torch.device) -> list:
        return [False, torch.zeros(lanes, self.in_channels, 0, device=device)]

    def valid(self, x: torch.Tensor) -> torch.Tensor:
        """Unpadded convolution: [B, C_in, t] -> [B, C_out, t - left - right]."""
        return F.conv1d(x, self.weight, self.bias, dilation=self.dilation)

    def push(self, state: list, x: torch.Tensor) -> torch.Tensor | None:
        started, buf = state
        buf = torch.cat([buf, x], dim=-1)
        n = buf.shape[-1]
        if not started:
            # The left padding reads inputs 1..left (reflect), and fewer than right + 1 inputs give no final output.
            if n <= max(self.left, self.right):
                state[1] = buf
                return None
            padded = self.module._pad1d(buf, (self.left, 0), mode=self.mode) if self.left else buf
            state[0] = True
        else:
            padded = buf
        # Context for the next output (n - right): inputs from n - right - left on, left padding included.
        state[1] = padded[..., padded.shape[-1] - self.left - self.right:].clone()
        return self.valid(padded)

    def flush(self, state: list) -> torch.Tensor | None:
        started, buf = state
        if buf.shape[-1] == 0:
            return None
        if not started:
            # The whole sequence is in the buffer: the module itself handles its short-input padding rule.
            return self.module(buf)
        if not self.right:
            return None
        return self.valid(self.module._pad1d(buf, (0, self.right), mode=self.mode))

    def lag(self, lag_in: int) -> int:
        return lag_in + self.right


class _ConvTranspose:
    """EncodecConvTranspose1d (kernel k, stride r, r <= k <= 2r). State: [started, last input [B, C_in, 1]].

    Output block q (untrimmed samples [q·r, (q + 1)·r)) is bias + W_lo·x[q] + W_hi·x[q - 1], so the layer runs
    as one GEMM over pairs of adjacent inputs: [B·m, 2·C_in] x [2·C_in, C_out·r]. F.conv_transpose1d on CPU
    re-packs its weights on every call: 95 ms for the 1024 -> 512 layer on two inputs vs 3 ms for this GEMM
    (1 thread, AMD EPYC), which would dominate a push of a few frames.
    """

    def __init__(self, module: nn.Module):
        if module.norm_type != "weight_norm":
            raise InvalidParameter(f"streaming decode needs norm_type 'weight_norm'; got {module.norm_type!r}")
        conv = module.conv
        r, k = conv.stride[0], conv.kernel_size[0]
        if not r <= k <= 2 * r or conv.dilation[0] != 1 or conv.padding[0] or conv.output_padding[0]:
            raise InvalidParameter(
                f"streaming decode needs transposed convolutions with stride <= kernel <= 2 * stride; got kernel {k}, "
                f"stride {r}"
            )
        weight = F.pad(conv.weight.detach(), (0, 2 * r - k))  # [C_in, C_out, 2r]; zero taps add exact zeros
        c_in, c_out = weight.shape[:2]
        # Rows: previous input's channels (taps r..2r), then the current input's (taps 0..r).
        self.weight = torch.cat([weight[..., r:], weight[..., :r]], dim=0).reshape(2 * c_in, c_out * r).contiguous()
        self.bias = conv.bias.detach().clone().repeat_interleave(r)  # [C_out·r], matching the (C_out, r) columns
        self.stride, self.out_channels, self.in_channels = r, c_out, c_in
        # The same split as EncodecConvTranspose1d.forward.
        total = k - r
        right = math.ceil(total * module.trim_right_ratio) if module.causal else total // 2
        self.trim_left = total - right

    def init(self, lanes: int, device: torch.device) -> list:
        # A zero "input -1" adds exact zeros, so the first block needs no special case.
        return [False, torch.zeros(lanes, self.in_channels, 1, device=device)]

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs [B, C_in, m + 1] (one before the new ones) -> untrimmed output blocks [B, C_out, m·r]."""
        b, _, m1 = x.shape
        pairs = torch.cat([x[..., :-1], x[..., 1:]], dim=1).transpose(1, 2)  # [B, m, 2·C_in]
        y = torch.addmm(self.bias, pairs.reshape(-1, pairs.shape[-1]), self.weight)  # [B·m, C_out·r]
        return y.view(b, m1 - 1, self.out_channels, self.stride).permute(0, 2, 1, 3).reshape(b, self.out_channels, -1)

    def push(self, state: list, x: torch.Tensor) -> torch.Tensor:
        started, prev = state
        state[0], state[1] = True, x[..., -1:].clone()
        y = self._blocks(torch.cat([prev, x], dim=-1))
        return y if started else y[..., self.trim_left:]

    def flush(self, state: list) -> torch.Tensor | None:
        started, prev = state
        if not started or not self.trim_left:
            return None
        # Samples after the last input's block: the last input and a zero "next input".
        return self._blocks(F.pad(prev, (0, 1)))[..., : self.trim_left]

    def lag(self, lag_in: int) -> int:
        return lag_in * self.stride + self.trim_left


class _LSTM:
    """EncodecLSTM (output = LSTM(x) + x), causal. State: [h [B, layers, C], c [B, layers, C]].

    Runs the cell by hand (PyTorch gate order i, f, g, o): nn.LSTM on CPU re-packs its weights on every call,
    66 ms for one step of musicgen's 2 x 1024 LSTM vs 7 ms by hand (1 thread, AMD EPYC). The input projection of
    all new steps is one GEMM; the recurrence is one [B, C] x [C, 4C] product per step.
    """

    def __init__(self, module: nn.Module):
        lstm = module.lstm
        if lstm.bidirectional or lstm.proj_size or not lstm.bias or lstm.batch_first:
            raise InvalidParameter("streaming decode needs EnCodec's plain unidirectional LSTM")
        self.layers = [
            (getattr(lstm, f"weight_ih_l{i}").detach().t().contiguous(), getattr(lstm, f"weight_hh_l{i}").detach().t().contiguous(),
             (getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")).detach().clone())
            for i in range(lstm.num_layers)
        ]
        self.hidden = lstm.hidden_size

    def init(self, lanes: int, device: torch.device) -> list:
        shape = (lanes, len(self.layers), self.hidden)
        return [torch.zeros(shape, device=device), torch.zeros(shape, device=device)]

    def push(self, state: list, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # [n, B, C]
        n, b, _ = seq.shape
        hs, cs = [], []
        inp = seq
        for i, (w_ih, w_hh, bias) in enumerate(self.layers):
            gates_x = torch.addmm(bias, inp.reshape(n * b, -1), w_ih).view(n, b, -1)
            h, c = state[0][:, i], state[1][:, i]
            out = []
            for t in range(n):
                gi, gf, gg, go = torch.addmm(gates_x[t], h, w_hh).chunk(4, dim=1)
                c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
                h = torch.sigmoid(go) * torch.tanh(c)
                out.append(h)
            hs.append(h)
            cs.append(c)
            inp = torch.stack(out)
        state[0], state[1] = torch.stack(hs, dim=1), torch.stack(cs, dim=1)
        return (inp + seq).permute(1, 2, 0)

    def flush(self, state: list) -> None:
        return None

    def lag(self, lag_in: int) -> int:
        return lag_in


class _Pointwise:
    """A stateless per-sample layer (ELU)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def init(self, lanes: int, device: torch.device) -> list:
        return []

    def push(self, state: list, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def flush(self, state: list) -> None:
        return None

    def lag(self, lag_in: int) -> int:
        return lag_in


class _Chain:
    """Layers run in order; a layer's final outputs feed the next. State: one entry per layer."""

    def __init__(self, layers: list):
        self.layers = layers

    def init(self, lanes: int, device: torch.device) -> list:
        return [layer.init(lanes, device) for layer in self.layers]

    def push(self, state: list, x: torch.Tensor) -> torch.Tensor | None:
        for layer, st in zip(self.layers, state):
            x = layer.push(st, x)
            if x is None or x.shape[-1] == 0:
                return None
        return x

    def flush(self, state: list) -> torch.Tensor | None:
        x = None
        for layer, st in zip(self.layers, state):
            x = _cat([layer.push(st, x) if x is not None else None, layer.flush(st)])
        return x

    def lag(self, lag_in: int) -> int:
        for layer in self.layers:
            lag_in = layer.lag(lag_in)
        return lag_in


class _Residual:
    """EncodecResnetBlock: shortcut(x) + block(x). State: [skip FIFO [B, C, t], block state]."""

    def __init__(self, module: nn.Module):
        self.block = _Chain([_wrap(layer) for layer in module.block])
        shortcut = module.shortcut
        self.shortcut = None if isinstance(shortcut, nn.Identity) else _Conv(shortcut)
        if self.shortcut is not None and self.shortcut.left + self.shortcut.right:
            raise InvalidParameter("streaming decode needs a pointwise (kernel 1) residual shortcut")
        self.channels = module.block[1].conv.in_channels

    def init(self, lanes: int, device: torch.device) -> list:
        return [torch.zeros(lanes, self.channels, 0, device=device), self.block.init(lanes, device)]

    def _join(self, skip: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # transformers' order: shortcut(residual) + branch
        return (skip if self.shortcut is None else self.shortcut.valid(skip)) + y

    def push(self, state: list, x: torch.Tensor) -> torch.Tensor | None:
        fifo = torch.cat([state[0], x], dim=-1)
        y = self.block.push(state[1], x)
        m = 0 if y is None else y.shape[-1]
        state[0] = fifo[..., m:].clone()
        return None if y is None else self._join(fifo[..., :m], y)

    def flush(self, state: list) -> torch.Tensor | None:
        y = self.block.flush(state[1])
        if y is None:
            return None
        return self._join(state[0], y)

    def lag(self, lag_in: int) -> int:
        return self.block.lag(lag_in)


def _wrap(module: nn.Module):
    from transformers.models.encodec import modeling_encodec as me

    if isinstance(module, me.EncodecConv1d):
        return _Conv(module)
    if isinstance(module, me.EncodecConvTranspose1d):
        return _ConvTranspose(module)
    if isinstance(module, me.EncodecLSTM):
        return _LSTM(module)
    if isinstance(module, me.EncodecResnetBlock):
        return _Residual(module)
    if isinstance(module, nn.ELU):
        return _Pointwise(module)
    raise InvalidParameter(f"streaming decode does not know the decoder layer {type(module).__name__}")


# Per-row state is a nested list of flags and tensors with the lanes (rows x channels) on dim 0. Rows whose
# flags and tensor shapes agree are in the same phase and can run as one batch.
def _phase(state: list) -> tuple:
    return tuple(
        _phase(s) if isinstance(s, list) else tuple(s.shape[1:]) if isinstance(s, torch.Tensor) else s
        for s in state
    )


def _stack(states: list[list]) -> list:
    first = states[0]
    if len(states) == 1:
        return first
    out = []
    for i, s in enumerate(first):
        if isinstance(s, list):
            out.append(_stack([st[i] for st in states]))
        elif isinstance(s, torch.Tensor):
            out.append(torch.cat([st[i] for st in states], dim=0))
        else:
            out.append(s)
    return out


def _split(state: list, lanes: int, rows: int) -> list[list]:
    if rows == 1:
        return [state]
    parts: list[list] = [[] for _ in range(rows)]
    for s in state:
        if isinstance(s, list):
            pieces = _split(s, lanes, rows)
        elif isinstance(s, torch.Tensor):
            pieces = list(s.split(lanes, dim=0))
        else:
            pieces = [s] * rows
        for part, piece in zip(parts, pieces):
            part.append(piece)
    return parts


class _Row:
    __slots__ = ("state", "codebooks", "frames")

    def __init__(self, state: list):
        self.state = state
        self.codebooks: int | None = None
        self.frames = 0


class StreamingDecoder:
    """Incremental `Codec.decode` for many rows at once; audio comes out as soon as it is final.

        stream = StreamingDecoder(mg.codec)
        stream.open("r1")
        out = stream.push({"r1": codes_new})       # codes int64 [K, n] -> {"r1": float32 [C, m]}
        tail = stream.close("r1")                  # float32 [C, m'], the rest
        # cat of all pieces == mg.generate_audio(all codes)[0] within float rounding (≤ 1e-4 max abs)

    After N frames of a row have been pushed, N·hop_length - lookahead_samples samples of it have been emitted
    (in steady state; see the module docstring for the start of a causal codec); close() emits the rest, so a
    row of T frames yields T·hop_length samples in all. Rows with new frames in a push run together in one
    forward pass per group of rows with the same number of new frames and the same phase (every row past its
    first few frames is in the same phase). Audio is float32 on the codec's device. The decoder weights are
    read once, at construction.
    """

    def __init__(self, codec: Codec):
        if not isinstance(codec, Codec):
            raise InvalidParameter(f"codec must be an enginepy Codec; got {type(codec).__name__}")
        model = codec.model
        self.codec = codec
        self.device = codec.device
        self.channels = codec.audio_channels
        self.codebook_size = int(model.config.codebook_size)
        self.max_codebooks = len(model.quantizer.layers) * self.channels
        self.hop_length = math.prod(model.config.upsampling_ratios)
        self.quantizer = model.quantizer
        self.decoder = _Chain([_wrap(layer) for layer in model.decoder.layers])
        self.lookahead_samples = self.decoder.lag(0)
        self._rows: dict[Hashable, _Row] = {}

    @property
    def lookahead_frames(self) -> int:
        """Frames that must follow frame f before all of f's audio is emitted (steady state): ⌈lookahead_samples / hop⌉."""
        return -(-self.lookahead_samples // self.hop_length)

    @property
    def rows(self) -> list:
        """Ids of the open rows."""
        return list(self._rows)

    def __contains__(self, row_id) -> bool:
        return row_id in self._rows

    def open(self, row_id: Hashable) -> None:
        """Start a new row (any hashable id not already open)."""
        try:
            hash(row_id)
        except TypeError:
            raise InvalidParameter(f"row_id must be hashable; got {row_id!r}") from None
        if row_id in self._rows:
            raise InvalidParameter(f"row_id {row_id!r} is already open")
        self._rows[row_id] = _Row(self.decoder.init(self.channels, self.device))

    def _row(self, row_id) -> _Row:
        try:
            return self._rows[row_id]
        except (KeyError, TypeError):
            raise InvalidParameter(f"row_id {row_id!r} is not open") from None

    def _check_codes(self, row_id, row: _Row, codes) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise InvalidParameter(f"codes of row {row_id!r} must be an integer tensor [K, n]; got {codes!r:.80}")
        if codes.dim() != 2:
            raise InvalidParameter(f"codes of row {row_id!r} must have shape [K, n]; got {list(codes.shape)}")
        k = codes.shape[0]
        if row.codebooks is not None and k != row.codebooks:
            raise InvalidParameter(f"codes of row {row_id!r} must keep K = {row.codebooks} codebooks; got {k}")
        if not 1 <= k <= self.max_codebooks or k % self.channels:
            raise InvalidParameter(
                f"codes of row {row_id!r} must have K a multiple of {self.channels} in [1, {self.max_codebooks}] "
                f"codebooks; got {k}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise InvalidParameter(
                f"codes of row {row_id!r} must lie in [0, {self.codebook_size - 1}]; got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.to(device=self.device, dtype=torch.int64)

    def _empty(self) -> torch.Tensor:
        return torch.zeros(self.channels * self.codec.model.config.audio_channels, 0, device=self.device)

    @torch.no_grad()
    def push(self, chunks: dict) -> dict:
        """{row_id: codes int [K, n] (new frames, natural layout)} -> {row_id: float32 [C, m] newly final audio}.

        Every row given gets an entry, m = 0 when nothing became final. K must stay the same for a row.
        """
        if not isinstance(chunks, dict):
            raise InvalidParameter(f"chunks must be a dict {{row_id: codes [K, n]}}; got {type(chunks).__name__}")
        checked = {rid: self._check_codes(rid, self._row(rid), codes) for rid, codes in chunks.items()}
        out = {rid: self._empty() for rid in checked}
        groups: dict[tuple, list] = {}
        for rid, codes in checked.items():
            row = self._rows[rid]
            row.codebooks = codes.shape[0]
            if codes.shape[1]:
                groups.setdefault((codes.shape, _phase(row.state)), []).append(rid)
        for ids in groups.values():
            codes = torch.stack([checked[rid] for rid in ids])  # [R, K, n]
            rows = [self._rows[rid] for rid in ids]
            state = _stack([row.state for row in rows])
            audio = self.decoder.push(state, self._embed(codes))
            for row, st in zip(rows, _split(state, self.channels, len(rows))):
                row.state = st
                row.frames += codes.shape[-1]
            if audio is not None:
                for rid, wav in zip(ids, audio.reshape(len(ids), -1, audio.shape[-1])):
                    out[rid] = wav
        return out

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [R, K, n] with interleaved channels -> quantized embeddings [R·C, D, n], one lane per channel."""
        r, k, n = codes.shape
        lanes = codes.reshape(r, k // self.channels, self.channels, n).transpose(1, 2).reshape(r * self.channels, -1, n)
        return self.quantizer.decode(lanes.transpose(0, 1))

    @torch.no_grad()
    def close(self, row_id: Hashable) -> torch.Tensor:
        """Flush a row and forget it: float32 [C, m], the audio not yet emitted (its right end)."""
        row = self._row(row_id)
        del self._rows[row_id]
        if row.frames == 0:
            return self._empty()
        audio = self.decoder.flush(row.state)
        return self._empty() if audio is None else audio.reshape(-1, audio.shape[-1])

    def discard(self, row_id: Hashable) -> None:
        """Forget a row without flushing it (an aborted request)."""
        self._row(row_id)
        del self._rows[row_id]

"""Temporal modules over the window's bottleneck features: ``(B, T, C, h, w) -> (B, T, C, h, w)``.

Position ``t`` of the output is slice ``t``'s bottleneck map refined with context from the
other slices. A unidirectional module only sees slices ``<= t``: at the centre position it
ignores the slices after the centre; the bidirectional option sees both sides.

Decisions:

- ``lstm`` (the plan's model) runs one LSTM, shared over spatial positions, along the
  ``T`` bottleneck feature vectors at every position ``(i, j)``, so the decoder's input at
  ``(i, j)`` carries what the neighbouring slices show at ``(i, j)``. The earlier variant,
  kept as ``lstm_pooled`` for the quality benchmark, pools each slice to one vector and only
  scales and shifts each map per channel (FiLM): no spatial detail from a neighbour reaches
  the decoder.
- Every module is residual (``out_t = map_t + ...``, FiLM around the map for
  ``lstm_pooled``), so the initial model keeps each slice's own features.
- Hidden width: ``hidden <= 0`` means ``min(C, HIDDEN_CAP)``. At depth 5, base 32
  (``C = 1024``), ``convlstm`` at width ``C`` was 153.1M of a 185.6M-parameter model, the
  pooled LSTM 21.0M of 53.5M; capped at 64: 5.1M of 37.6M, ``lstm`` 0.7M of 33.2M.
"""

from __future__ import annotations

import torch
from torch import nn

TEMPORALS: tuple[str, ...] = ("lstm", "lstm_pooled", "convlstm", "none")
HIDDEN_CAP = 64  # default hidden width: at the bottleneck's (up to 1024) it dominated the model


class NoTemporal(nn.Module):
    """Identity (the ablation): every slice keeps its own bottleneck map."""

    def forward(self, bottlenecks: torch.Tensor) -> torch.Tensor:
        return bottlenecks


class PositionLSTM(nn.Module):
    """LSTM over the ``T`` feature vectors at every spatial position, weights shared over them.

    Position ``(i, j)`` of every slice is one step of a sequence of ``T`` vectors of ``C``
    channels; the ``B*h*w`` sequences run through one LSTM, and a linear layer projects its
    output (forward and backward concatenated when bidirectional) back to ``C`` channels::

        out_t[:, i, j] = map_t[:, i, j] + proj(lstm(map_1..T[:, i, j])_t)

    Neighbouring slices reach the output at the same position only; spatial context comes
    from the encoder's receptive field.
    """

    def __init__(self, channels: int, hidden: int, bidirectional: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(hidden * (2 if bidirectional else 1), channels)

    def forward(self, bottlenecks: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = bottlenecks.shape
        seqs = bottlenecks.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)  # (B*h*w, T, C)
        out, _ = self.lstm(seqs)  # (B*h*w, T, hidden * dirs)
        proj: torch.Tensor = self.proj(out)
        delta = proj.view(b, h, w, t, c).permute(0, 3, 4, 1, 2)  # (B, T, C, h, w)
        return bottlenecks + delta


class PooledLSTM(nn.Module):
    """LSTM over per-slice pooled feature vectors, applied to the maps as FiLM (``lstm_pooled``).

    Each slice's map is average-pooled to a vector ``(B, T, C)``; an LSTM runs over the
    ``T`` vectors; a linear layer turns its output at each position into a per-channel
    scale and shift (FiLM) applied to that slice's map::

        out_t = map_t * (1 + gamma_t) + beta_t,   [gamma_t, beta_t] = proj(lstm(v)_t)

    The neighbours change the map only through a per-channel scale and shift, the same at
    every spatial position; kept to compare against `PositionLSTM`.
    """

    def __init__(self, channels: int, hidden: int, bidirectional: bool) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(hidden * (2 if bidirectional else 1), 2 * channels)

    def forward(self, bottlenecks: torch.Tensor) -> torch.Tensor:
        vectors = bottlenecks.mean(dim=(3, 4))  # (B, T, C)
        seq, _ = self.lstm(vectors)  # (B, T, hidden * dirs)
        proj: torch.Tensor = self.proj(seq)
        gamma, beta = proj.chunk(2, dim=-1)  # (B, T, C) each
        return bottlenecks * (1 + gamma[..., None, None]) + beta[..., None, None]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step (Shi et al. 2015): gates from a 3x3 conv over ``[x, h]``."""

    def __init__(self, in_ch: int, hidden: int, kernel: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(in_ch + hidden, 4 * hidden, kernel, padding=kernel // 2)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, o, g = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTM(nn.Module):
    """ConvLSTM over the bottleneck maps, keeping their spatial layout.

    ``out_t = map_t + proj(h_t)`` with ``h_t`` the hidden map at position ``t``
    (forward and backward concatenated when bidirectional) and ``proj`` a 1x1 conv.
    """

    def __init__(self, channels: int, hidden: int, bidirectional: bool) -> None:
        super().__init__()
        self.fwd = ConvLSTMCell(channels, hidden)
        self.bwd = ConvLSTMCell(channels, hidden) if bidirectional else None
        self.proj = nn.Conv2d(hidden * (2 if bidirectional else 1), channels, 1)

    @staticmethod
    def _run(cell: ConvLSTMCell, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        n, _, h, w = xs[0].shape
        state = (xs[0].new_zeros(n, cell.hidden, h, w), xs[0].new_zeros(n, cell.hidden, h, w))
        out = []
        for x in xs:
            state = cell(x, state)
            out.append(state[0])
        return out

    def forward(self, bottlenecks: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = bottlenecks.shape
        xs = list(bottlenecks.unbind(dim=1))  # T x (B, C, h, w)
        hs = self._run(self.fwd, xs)
        if self.bwd is not None:
            back = self._run(self.bwd, xs[::-1])[::-1]
            hs = [torch.cat(pair, dim=1) for pair in zip(hs, back, strict=True)]
        hidden = torch.stack(hs, dim=1).flatten(0, 1)  # (B*T, hidden*dirs, h, w)
        proj: torch.Tensor = self.proj(hidden)
        return bottlenecks + proj.view(b, t, c, h, w)


def make_temporal(kind: str, channels: int, hidden: int, bidirectional: bool) -> nn.Module:
    """Temporal module ``kind`` (one of `TEMPORALS`) over ``channels`` bottleneck channels.

    ``hidden`` <= 0 means ``min(channels, HIDDEN_CAP)``; a positive ``hidden`` is used as is.
    """
    hidden = hidden if hidden > 0 else min(channels, HIDDEN_CAP)
    if kind == "lstm":
        return PositionLSTM(channels, hidden, bidirectional)
    if kind == "lstm_pooled":
        return PooledLSTM(channels, hidden, bidirectional)
    if kind == "convlstm":
        return ConvLSTM(channels, hidden, bidirectional)
    if kind == "none":
        return NoTemporal()
    raise ValueError(f"unknown temporal module {kind!r}; expected one of {TEMPORALS}")

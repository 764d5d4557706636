"""DDPM++ / NCSN++ U-Net (Song et al. 2021) with EDM's ``SongUNet`` hyperparameters and layout.

Keyword names, defaults and the ``state_dict`` (names, shapes, order) equal EDM's SongUNet, so EDM's
checkpoints load by name. The EDM CIFAR-10 settings are

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
            decoder_type='standard', resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2]
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
            decoder_type='standard', resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]

One extension: ``fourier_scale`` (default 16, iCT uses 0.02) sets the standard deviation of the
initial random Fourier frequencies; checkpoints store the frequencies themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knn_cm.models.blocks import UNetBlock
from knn_cm.models.dropout import uniform_noise
from knn_cm.models.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")

# EDM's initialisations: Glorot-uniform everywhere; the last convolution of every residual branch and of
# the output starts near zero (so each block starts close to the identity); q/k/v get a smaller gain.
_INIT = {"init_mode": "xavier_uniform"}
_INIT_ZERO = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
_INIT_ATTN = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"SongUNet: {name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


class SongUNet(nn.Module):
    """The SongUNet family (DDPM++ and NCSN++) as configured by EDM.

    ``F = net(x, noise_labels, class_labels=None, augment_labels=None)``:
        x              [N, in_channels, img_resolution, img_resolution]
        noise_labels   [N] (EDM feeds c_noise = ln(sigma) / 4)
        class_labels   [N, label_dim] one-hot or soft labels; required iff label_dim > 0
        augment_labels [N, augment_dim] or None (the augmentation term is skipped when None)
        (as in EDM, a single row [1, label_dim] / [1, augment_dim] applies to every sample)
        F              [N, out_channels, img_resolution, img_resolution]

    Structure: noise embedding (+ label and augmentation terms) -> two-layer SiLU mapping network
    -> encoder (first conv, then per level an optional down block and ``num_blocks`` >= 0 blocks) ->
    decoder (``in0`` with attention and ``in1`` at the lowest level, else an ``up`` block, then
    ``num_blocks + 1`` blocks that concatenate encoder skips) -> GroupNorm, SiLU, 3x3 conv.
    ``encoder_type`` 'skip' adds a down-sampled copy of the input at every level, 'residual' (NCSN++)
    a progressively down-sampled residual path; ``decoder_type`` 'skip' sums outputs of all levels.

    ``init_kwargs`` keeps the constructor arguments (a plain dict) for checkpoints.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        channel_mult = [int(mult) for mult in channel_mult]
        attn_resolutions = [int(res) for res in attn_resolutions]
        resample_filter = [float(tap) for tap in resample_filter]
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        _check_choice("decoder_type", decoder_type, DECODER_TYPES)
        if not channel_mult:
            raise ValueError("SongUNet: channel_mult must list at least one level")
        if img_resolution < 1 or img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(
                f"SongUNet: img_resolution={img_resolution} must be divisible by 2**(len(channel_mult) - 1) = "
                f"{2 ** (len(channel_mult) - 1)} (channel_mult={channel_mult})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SongUNet: dropout={dropout} must lie in [0, 1)")
        if not 0.0 <= label_dropout <= 1.0:
            raise ValueError(f"SongUNet: label_dropout={label_dropout} must lie in [0, 1]")
        if num_blocks < 0:
            raise ValueError(f"SongUNet: num_blocks={num_blocks} must be >= 0")

        self.init_kwargs = dict(
            img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
            label_dim=label_dim, augment_dim=augment_dim, model_channels=model_channels,
            channel_mult=list(channel_mult), channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
            attn_resolutions=list(attn_resolutions), dropout=dropout, label_dropout=label_dropout,
            embedding_type=embedding_type, channel_mult_noise=channel_mult_noise, encoder_type=encoder_type,
            decoder_type=decoder_type, resample_filter=list(resample_filter), fourier_scale=fourier_scale,
        )  # fmt: skip
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, init=_INIT, init_zero=_INIT_ZERO, init_attn=_INIT_ATTN,
        )  # fmt: skip

        # Mapping network; registration order fixes the state_dict order (map_noise holds NCSN++'s freqs).
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, scale=fourier_scale)
        self.map_label = Linear(label_dim, noise_channels, **_INIT) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **_INIT) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **_INIT)
        self.map_layer1 = Linear(emb_channels, emb_channels, **_INIT)

        # Encoder. ``skip_channels`` records every output the decoder will concatenate (aux paths excluded).
        self.enc = nn.ModuleDict()
        self._enc_roles: dict[str, str] = {}
        channels = in_channels
        aux_channels = in_channels
        skip_channels: list[int] = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self._add_encoder(f"{res}x{res}_conv", "conv", Conv2d(channels, model_channels, kernel=3, **_INIT))
                channels = model_channels
                skip_channels.append(channels)
            else:
                down_block = UNetBlock(channels, channels, down=True, **block_kwargs)
                self._add_encoder(f"{res}x{res}_down", "block", down_block)
                skip_channels.append(channels)
                if encoder_type == "skip":
                    down = Conv2d(aux_channels, aux_channels, kernel=0, down=True, resample_filter=resample_filter)
                    self._add_encoder(f"{res}x{res}_aux_down", "aux_down", down)
                    aux_skip = Conv2d(aux_channels, channels, kernel=1, **_INIT)
                    self._add_encoder(f"{res}x{res}_aux_skip", "aux_skip", aux_skip)
                elif encoder_type == "residual":
                    residual = Conv2d(
                        aux_channels, channels, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **_INIT,
                    )  # fmt: skip
                    self._add_encoder(f"{res}x{res}_aux_residual", "aux_residual", residual)
                    aux_channels = channels
            for index in range(num_blocks):
                block = UNetBlock(channels, model_channels * mult, attention=res in attn_resolutions, **block_kwargs)
                self._add_encoder(f"{res}x{res}_block{index}", "block", block)
                channels = model_channels * mult
                skip_channels.append(channels)

        # Decoder. Blocks named ``block{i}`` consume one encoder skip each (concatenated after x).
        self.dec = nn.ModuleDict()
        self._dec_roles: dict[str, str] = {}
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                in0 = UNetBlock(channels, channels, attention=True, **block_kwargs)
                self._add_decoder(f"{res}x{res}_in0", "block", in0)
                self._add_decoder(f"{res}x{res}_in1", "block", UNetBlock(channels, channels, **block_kwargs))
            else:
                self._add_decoder(f"{res}x{res}_up", "block", UNetBlock(channels, channels, up=True, **block_kwargs))
            for index in range(num_blocks + 1):
                block_in = channels + skip_channels.pop()
                channels = model_channels * mult
                attention = index == num_blocks and res in attn_resolutions
                block = UNetBlock(block_in, channels, attention=attention, **block_kwargs)
                self._add_decoder(f"{res}x{res}_block{index}", "block_with_skip", block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    up = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                    self._add_decoder(f"{res}x{res}_aux_up", "aux_up", up)
                self._add_decoder(f"{res}x{res}_aux_norm", "aux_norm", GroupNorm(channels, eps=1e-6))
                aux_conv = Conv2d(channels, out_channels, kernel=3, **_INIT_ZERO)
                self._add_decoder(f"{res}x{res}_aux_conv", "aux_conv", aux_conv)

    def _add_encoder(self, name: str, role: str, module: nn.Module) -> None:
        self.enc[name] = module
        self._enc_roles[name] = role

    def _add_decoder(self, name: str, role: str, module: nn.Module) -> None:
        self.dec[name] = module
        self._dec_roles[name] = role

    def embed(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Conditioning vector emb [N, emb_channels] from noise labels [N] and optional labels."""
        emb = self.map_noise(noise_labels)
        # The embeddings return [cos, sin]; DDPM++/NCSN++ (and EDM) feed [sin, cos] to the mapping network.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                # Classifier-free-guidance style: drop the whole label vector of a sample. One draw per
                # sample of the batch (also when a single label row is broadcast), as in EDM.
                keep = uniform_noise([noise_labels.shape[0], 1], labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.embed(noise_labels, class_labels, augment_labels)

        skips: list[torch.Tensor] = []
        aux = x
        for name, module in self.enc.items():
            role = self._enc_roles[name]
            if role == "aux_down":
                aux = module(aux)
            elif role == "aux_skip":
                x = x + module(aux)
                skips[-1] = x
            elif role == "aux_residual":
                x = (x + module(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = module(x, emb) if role == "block" else module(x)
                skips.append(x)

        output = None
        normed = None
        for name, module in self.dec.items():
            role = self._dec_roles[name]
            if role == "aux_up":
                output = module(output)
            elif role == "aux_norm":
                normed = module(x)
            elif role == "aux_conv":
                level_output = module(F.silu(normed))
                output = level_output if output is None else level_output + output
            else:
                if role == "block_with_skip":
                    x = torch.cat([x, skips.pop().to(x.dtype)], dim=1)
                x = module(x, emb)
        return output

    def _check_inputs(self, x, noise_labels, class_labels, augment_labels) -> None:
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SongUNet: x has shape {list(x.shape)}; expected [N, {', '.join(map(str, expected))}]")
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f"SongUNet: noise_labels has shape {list(noise_labels.shape)}; expected [{x.shape[0]}]")
        batch_sizes = {1, x.shape[0]}  # a single label row is broadcast over the batch (as in EDM)
        if self.label_dim:
            if class_labels is None or class_labels.ndim != 2 or tuple(class_labels.shape) not in {
                (rows, self.label_dim) for rows in batch_sizes
            }:
                got = None if class_labels is None else list(class_labels.shape)
                raise ValueError(
                    f"SongUNet: class_labels is {got}; expected shape [{x.shape[0]}, {self.label_dim}] "
                    f"or [1, {self.label_dim}]"
                )
        elif class_labels is not None:
            raise ValueError("SongUNet: class_labels given but the network is unconditional (label_dim=0)")
        if augment_labels is not None:
            if not self.augment_dim:
                raise ValueError("SongUNet: augment_labels given but the network has augment_dim=0")
            if augment_labels.ndim != 2 or tuple(augment_labels.shape) not in {
                (rows, self.augment_dim) for rows in batch_sizes
            }:
                raise ValueError(
                    f"SongUNet: augment_labels has shape {list(augment_labels.shape)}; "
                    f"expected [{x.shape[0]}, {self.augment_dim}] or [1, {self.augment_dim}]"
                )

"""Networks: EDM-compatible DDPM++ / NCSN++ (SongUNet), preconditioning, EDM checkpoint import.

    from knn_cm.models import SongUNet, EDMPrecond, CMPrecond, build_denoiser, shared_dropout

    net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=[2, 2, 2])
    denoiser = EDMPrecond(net)                  # D(x, sigma), EDM's c_skip / c_out / c_in / c_noise
    consistency = CMPrecond(net, sigma_min=0.002)   # f(z, sigma) with f(z, sigma_min) = z

Modules: ``layers`` (Conv2d, Linear, GroupNorm, embeddings), ``blocks`` (UNetBlock), ``song_unet``,
``precond``, ``precision`` (autocast), ``dropout`` (shared dropout masks), ``factory``
(``build_denoiser``, the Hydra target), ``network_file`` (the project's ``.pt`` network files, read with
``weights_only=True``), ``edm_pickle`` (importing EDM's network pickles without running their code).
"""

from knn_cm.models.blocks import UNetBlock
from knn_cm.models.dropout import draw_dropout_seed, shared_dropout, shared_dropout_active
from knn_cm.models.edm_pickle import EDMNetwork, UntrustedPickleError, load_edm_pickle
from knn_cm.models.factory import PRECONDITIONERS, build_denoiser
from knn_cm.models.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding
from knn_cm.models.network_file import (
    NotANetworkFileError,
    check_network_shape,
    load_network,
    load_network_file,
    network_from_payload,
    save_network,
    save_state_dict,
)
from knn_cm.models.precision import autocast_context, resolve_amp_dtype
from knn_cm.models.precond import CMPrecond, EDMPrecond, FMPrecond
from knn_cm.models.song_unet import SongUNet

__all__ = [
    "CMPrecond",
    "Conv2d",
    "EDMNetwork",
    "EDMPrecond",
    "FMPrecond",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "NotANetworkFileError",
    "PRECONDITIONERS",
    "PositionalEmbedding",
    "SongUNet",
    "UNetBlock",
    "UntrustedPickleError",
    "autocast_context",
    "build_denoiser",
    "check_network_shape",
    "draw_dropout_seed",
    "load_edm_pickle",
    "load_network",
    "load_network_file",
    "network_from_payload",
    "resolve_amp_dtype",
    "save_network",
    "save_state_dict",
    "shared_dropout",
    "shared_dropout_active",
]

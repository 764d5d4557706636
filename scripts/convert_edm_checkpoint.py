#!/usr/bin/env python
"""Convert an EDM network pickle (.pkl) into a knn_cm network file (.pt).

    python scripts/convert_edm_checkpoint.py edm-cifar10-32x32-uncond-vp.pkl edm_ddpmpp.pt --trust-pickle

The output holds the EMA network's state dict (EDM's parameter names), the SongUNet keyword arguments
and the EDMPrecond arguments recovered from the pickle; ``knn_cm.models.load_network`` rebuilds the
denoiser from it with ``torch.load(weights_only=True)``. The logic lives in ``knn_cm.models.edm_pickle`` and
``knn_cm.models.network_file``.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

try:
    import knn_cm.models  # noqa: F401
except ModuleNotFoundError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knn_cm.models.edm_pickle import load_edm_pickle
from knn_cm.models.network_file import save_state_dict

TRUST_HELP = (
    "required: confirm that INPUT comes from a source you trust. Python pickles can execute arbitrary "
    "code while loading, and EDM's pickles embed the network's source code. This converter never imports "
    "EDM or runs that embedded code (EDM's classes are replaced by inert stand-ins and only torch/numpy "
    "container types are allowed), but unpickling still runs torch's tensor-rebuilding code, so it only "
    "proceeds with this flag."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert an EDM network pickle (network-snapshot-*.pkl) into a knn_cm .pt network file "
        "(state dict + SongUNet and precond arguments, loadable with torch.load(weights_only=True)).",
    )
    parser.add_argument("input", type=Path, help="EDM network pickle (.pkl)")
    parser.add_argument("output", type=Path, help="network file to write (.pt); written atomically")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    parser.add_argument("--key", default="ema", help="entry of the pickle holding the network (default: ema)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.trust_pickle:
        print(
            f"error: refusing to unpickle {args.input} without --trust-pickle.\n"
            "Pickles can execute code when loaded; pass --trust-pickle only for files from a trusted source "
            "(see --help).",
            file=sys.stderr,
        )
        return 2
    try:
        network = load_edm_pickle(args.input, trust=True, key=args.key)
        save_state_dict(
            args.output,
            network.state_dict,
            songunet_kwargs=network.songunet_kwargs,
            precond_class=network.precond_class,
            precond_kwargs=network.precond_kwargs,
            metadata=network.metadata,
        )
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    num_elements = sum(tensor.numel() for tensor in network.state_dict.values())
    print(
        f"wrote {args.output}: {network.precond_class}(SongUNet), {len(network.state_dict)} tensors, "
        f"{num_elements:,} elements (parameters and buffers)"
    )
    print(f"songunet_kwargs: {network.songunet_kwargs}")
    print(f"precond_kwargs: {network.precond_kwargs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

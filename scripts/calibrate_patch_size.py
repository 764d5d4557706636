"""Calibrate a local denoiser's patch size per sigma against a trained network (Kamb & Ganguli's procedure).

    python scripts/calibrate_patch_size.py --network runs/digits_edm/snapshots/network-final.pt --dataset digits \
        --estimator els --sizes 3 5 7 --seeds 0 1 2 3 4 5 6 7 8 9 --out configs/train/estimator/els_digits.yaml

Along the network's own deterministic sampling trajectory from each seed (EDM's Heun sampler, ``--steps`` steps,
sigma ``--sigma-max`` -> ``--sigma-min``, rho 7), at each step's state z_i and noise level sigma_i every candidate
size p gives a score (D_p(z_i) - z_i) / sigma_i^2; the size whose score has the highest cosine similarity to the
network's, (D_net(z_i) - z_i) / sigma_i^2, is that seed's choice at sigma_i. The schedule is the median of the
seeds' choices at each sigma (the lower median for an even number of seeds, so it is one of the sizes), written as
an estimator config with a ``[[sigma, size], ...]`` table (the format of configs/train/estimator/els.yaml), and one
JSON line per sigma (the cosine of every size, median over seeds) is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml

from knn_cm.data import DataStore, load_digits, load_image_folder
from knn_cm.diffusion import karras_sigmas
from knn_cm.estimators import make_estimator
from knn_cm.models import load_network
from knn_cm.sampling.ode import heun_sample
from knn_cm.sampling.seeds import noise_for_seeds

CALIBRATED = ("els", "ls", "pspc_square")


def load_store(dataset: str, path: str | None):
    """The training set: ``digits`` (embedded) or ``cifar10_jpeg`` (the archive or folder at ``path``)."""
    if dataset == "digits":
        return load_digits()
    if dataset == "cifar10_jpeg":
        if path is None:
            raise ValueError("--path is needed with --dataset cifar10_jpeg (e.g. ../shared/data/cifar10-jpeg.tar.gz)")
        return load_image_folder(path, subfolder="train", name="cifar10_jpeg")
    raise ValueError(f"--dataset must be digits or cifar10_jpeg, got {dataset!r}")


def add_network_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--network, --dataset, --path and --subset (this script's and scripts/bench_denoisers.py's)."""
    parser.add_argument("--network", required=True, help="a network file (training snapshot or converted checkpoint)")
    parser.add_argument("--dataset", default="digits", help="digits | cifar10_jpeg")
    parser.add_argument("--path", default=None, help="the dataset's archive or folder (cifar10_jpeg)")
    parser.add_argument("--subset", type=int, default=None, help="use the first N training images only")


def network_and_store(args, parser: argparse.ArgumentParser):
    """(the network, the training store cut to --subset) that :func:`add_network_and_data_arguments` names."""
    store = load_store(args.dataset, args.path)
    if args.subset is not None:
        if not 1 <= args.subset <= len(store):
            parser.error(f"--subset must be in [1, {len(store)}], got {args.subset}")
        store = DataStore.from_array(store.images[: args.subset].copy(), name=f"{store.name}_{args.subset}")
    return load_network(args.network), store


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row pair of a, b [B, ...] (float64): [B]."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-300)


@torch.no_grad()
def calibrate(network, store, estimator: str, sizes: list[int], seeds: list[int], steps: int, sigma_min: float,
              sigma_max: float, estimator_kwargs: dict) -> list[dict]:
    """Per step of the network's trajectory: sigma, the chosen size (median over seeds) and each size's cosine.

    Returns one record per step with sigma > 0: ``{"sigma", "size", "choices" [seeds], "cosine" {size: median}}``.
    """
    noise = noise_for_seeds(seeds, store.shape)
    _, trajectory = heun_sample(network, noise, num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
                                return_trajectory=True)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, 7.0).tolist()[:-1]  # the states' levels (the last is 0)
    estimators = {size: make_estimator(estimator, store, patch_size=size, **estimator_kwargs) for size in sizes}
    records = []
    for step, sigma in enumerate(sigmas):
        z = trajectory[step]
        level = torch.full((z.shape[0],), sigma, dtype=torch.float32)
        network_direction = network(z, level).float() - z
        similarity = {size: cosine(est(z, level, generator=torch.Generator().manual_seed(step)) - z,
                                   network_direction) for size, est in estimators.items()}
        table = torch.stack([similarity[size] for size in sizes])  # [sizes, seeds]
        choices = [sizes[i] for i in table.argmax(0).tolist()]
        records.append({"sigma": sigma, "size": statistics.median_low(choices), "choices": choices,
                        "cosine": {size: float(similarity[size].median()) for size in sizes}})
    return records


def schedule_config(records: list[dict], estimator: str, estimator_kwargs: dict, command: str) -> str:
    """The estimator config (YAML text) whose ``patch_size`` is the calibrated [[sigma, size], ...] table."""
    spec = {"name": estimator, "patch_size": [[round(r["sigma"], 6), r["size"]] for r in records]}
    spec |= {key: value for key, value in estimator_kwargs.items() if key in ("padding", "window", "window_std")}
    spec |= {"k": estimator_kwargs.get("k"), "n": estimator_kwargs.get("n")}
    header = (f"# {estimator}'s patch size per sigma, calibrated against a network by scripts/calibrate_patch_size.py\n"
              f"# (Kamb & Ganguli: the size whose score is closest in cosine to the network's along its own\n"
              f"# trajectory, median over seeds). Made by:\n#   {command}\n")
    body = yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=110)
    return header + body


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_network_and_data_arguments(parser)
    parser.add_argument("--estimator", default="els", choices=CALIBRATED)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 7])
    parser.add_argument("--padding", default=None, help="els: circular | zero")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--sigma-min", type=float, default=0.002)
    parser.add_argument("--sigma-max", type=float, default=80.0)
    parser.add_argument("--k", type=int, default=None, help="with --n: calibrate the KNN form")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--out", required=True, help="the config file to write")
    args = parser.parse_args(argv)
    if args.padding is not None and args.estimator != "els":
        parser.error(f"--padding applies to els, not to {args.estimator}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    network, store = network_and_store(args, parser)
    estimator_kwargs = {"k": args.k, "n": args.n}
    if args.padding is not None:
        estimator_kwargs["padding"] = args.padding
    records = calibrate(network, store, args.estimator, sorted(set(args.sizes)), args.seeds, args.steps,
                        args.sigma_min, args.sigma_max, estimator_kwargs)
    for record in records:
        print(json.dumps(record), flush=True)
    command = "python scripts/calibrate_patch_size.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(schedule_config(records, args.estimator, estimator_kwargs, command))
    return records


if __name__ == "__main__":
    main()

"""The denoiser bench: every estimator against a trained network's denoiser on the same forward-process inputs.

    python scripts/bench_denoisers.py --network runs/digits_edm/snapshots/network-final.pt --dataset digits \
        --out docs/results/denoiser_bench_digits

For each sigma (default EDM's 18-step schedule without its final 0) a fixed batch of training images x is noised,
z = x + sigma eps (the same z for every estimator), and each estimator's x_hat(z, sigma) is compared with the
network's D(z, sigma): the per-sigma mean squared error to the network (PSPC's forward-process protocol), and to x.
Every estimator is also given x (``single`` answers with it: z's own source, the memorising extreme).
The estimators are the memorising ones (single, exact, knn) and the local ones (gaussian, ls, els, pspc_square,
cfdm), each built from its config in configs/train/estimator/ unless ``--spec LABEL=...`` gives another spec (a
JSON mapping, or @PATH of a YAML config such as one scripts/calibrate_patch_size.py wrote).

Writes ``<out>/results.json`` (every record and the command), ``<out>/table.md`` (MSE to the network per estimator
and sigma) and ``<out>/mse_to_network.png``, and prints one JSON line per (estimator, sigma).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from knn_cm.data import DataStore
from knn_cm.diffusion import karras_sigmas
from knn_cm.estimators import build_estimator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_patch_size import add_network_and_data_arguments, network_and_store

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train" / "estimator"
ESTIMATORS = ("single", "exact", "knn", "gaussian", "ls", "els", "pspc_square", "cfdm")


def estimator_specs(labels: list[str], overrides: list[str]) -> dict[str, dict]:
    """label -> spec: configs/train/estimator/<label>.yaml, replaced by ``LABEL=JSON`` or ``LABEL=@PATH`` overrides."""
    given = {}
    for override in overrides:
        label, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--spec must be LABEL=JSON or LABEL=@PATH, got {override!r}")
        given[label] = (yaml.safe_load(Path(value[1:]).read_text()) if value.startswith("@") else json.loads(value))
    specs = {}
    for label in labels:
        if label in given:
            specs[label] = dict(given.pop(label))
        elif (CONFIGS / f"{label}.yaml").exists():
            specs[label] = yaml.safe_load((CONFIGS / f"{label}.yaml").read_text())
        else:
            raise ValueError(f"--estimators: no config configs/train/estimator/{label}.yaml for {label!r}; "
                             f"give --spec {label}=JSON")
    for label, spec in given.items():  # overrides of labels not listed are added
        specs[label] = dict(spec)
    return specs


@torch.no_grad()
def bench(network, store: DataStore, specs: dict[str, dict], sigmas: list[float], images: int,
          seed: int) -> list[dict]:
    """One record per (estimator, sigma): MSE to the network's denoiser and to x, and seconds per call."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(store), generator=generator)[:images]
    x = store.float(picks)
    estimators = {label: build_estimator(spec, store, setting=f"--spec {label}") for label, spec in specs.items()}
    records = []
    for step, sigma in enumerate(sigmas):
        z = x + sigma * torch.randn(x.shape, generator=generator)
        level = torch.full((x.shape[0],), sigma)
        reference = network(z, level).float()
        network_error = float((reference - x).square().mean())
        for label, estimator in estimators.items():
            start = time.perf_counter()
            estimate = estimator(z, level, x=x, generator=torch.Generator().manual_seed(seed + step))
            seconds = time.perf_counter() - start
            records.append({"estimator": label, "sigma": sigma, "mse_to_network": float((estimate - reference)
                                                                                        .square().mean()),
                            "mse_to_x": float((estimate - x).square().mean()), "network_mse_to_x": network_error,
                            "seconds": round(seconds, 4)})
            print(json.dumps(records[-1]), flush=True)
    return records


def write_results(out: Path, records: list[dict], command: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, **meta, "records": records}, indent=1))
    labels = list(dict.fromkeys(r["estimator"] for r in records))
    sigmas = list(dict.fromkeys(r["sigma"] for r in records))
    value = {(r["estimator"], r["sigma"]): r["mse_to_network"] for r in records}
    lines = [f"MSE to the network's denoiser on forward-process z (made by `{command}`)", "",
             "| sigma | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for sigma in sigmas:
        row = [f"{value[(label, sigma)]:.3g}" for label in labels]
        best = min(labels, key=lambda label: value[(label, sigma)])
        row[labels.index(best)] = f"**{row[labels.index(best)]}**"
        lines.append(f"| {sigma:g} | " + " | ".join(row) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label in labels:
        axes.plot(sigmas, [value[(label, sigma)] for sigma in sigmas], marker="o", markersize=3, label=label)
    axes.set(xscale="log", yscale="log", xlabel="sigma", ylabel="MSE to the network's denoiser")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "mse_to_network.png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_network_and_data_arguments(parser)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument("--spec", action="append", default=[], help="LABEL=JSON or LABEL=@PATH (repeatable)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=None, help="default: EDM's 18 steps")
    parser.add_argument("--images", type=int, default=64, help="images x per sigma")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for results.json, table.md and the plot")
    args = parser.parse_args(argv)
    network, store = network_and_store(args, parser)
    sigmas = args.sigmas or karras_sigmas(18).tolist()[:-1]
    specs = estimator_specs(args.estimators, args.spec)
    records = bench(network, store, specs, sigmas, args.images, args.seed)
    command = "python scripts/bench_denoisers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(Path(args.out), records, command, {"dataset": store.name, "N": len(store), "specs": specs,
                                                     "images": args.images, "seed": args.seed})
    return records


if __name__ == "__main__":
    main()

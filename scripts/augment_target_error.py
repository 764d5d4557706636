"""How far each EDM target under augmentation is from the exact posterior mean of the augmented data.

    python scripts/augment_target_error.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--sources 128]
        [--resampled 24] [--out docs/results/augment_target_error.md]

Sources x are drawn from CIFAR-10, augmented by EDM's CIFAR-10 pipe (p 0.12, knn_cm.training.augment), and
noised: z = T x + t eps. The exact reference is the posterior mean over the augmented data given the
transform, E[T x | z, T] = sum_i softmax_i(-||z - T x_i||^2 / (2 t^2)) T x_i, by brute force over all 50,000
images transformed by T (for images the pipe resampled, all 50,000 images are warped by that image's T,
so only ``--resampled`` of them per level are scored). Per-pixel MSE against it, for:

- rule: the training target (KNN.augmented_target, the dataset estimators' rule): KNN (k 2048, n 256) on
  T^-1 z, then T, for flips; the augmented source T x where T resamples;
- unaugmented: the KNN estimate on z itself, the posterior mean of the unaugmented data (what a silent
  fall-back would use);
- knn_ignoring_resampling (resampled images only): KNN with only the flips undone, as if T were a flip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from knn_cm.data import load_image_folder
from knn_cm.estimators import make_estimator
from knn_cm.search import build_index
from knn_cm.training.augment import EDM_CIFAR10, Augmentation, AugmentPipe

TIMES = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0)


def posterior_mean(z: torch.Tensor, t: float, rows: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    """Exact E[y | z] over rows [N, d] (uniform prior) for z [B, d], float64, two passes over chunks."""
    z = z.double()
    log_weights = torch.cat([-torch.cdist(z, rows[i : i + chunk].double()).square() / (2 * t * t)
                             for i in range(0, rows.shape[0], chunk)], dim=1)
    weights = torch.softmax(log_weights, dim=1)
    return sum(weights[:, i : i + chunk] @ rows[i : i + chunk].double() for i in range(0, rows.shape[0], chunk))


def one(augmentation: Augmentation, i: int, count: int) -> Augmentation:
    """Image i's augmentation repeated ``count`` times (to transform the whole dataset by it)."""
    fields = {name: getattr(augmentation, name)[i : i + 1] for name in augmentation.__dataclass_fields__}
    return Augmentation(**{name: value.expand(count, *value.shape[1:]) for name, value in fields.items()})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--sources", type=int, default=128, help="augmented sources per noise level")
    parser.add_argument("--resampled", type=int, default=24, help="resampled sources scored per level (cost)")
    parser.add_argument("--times", type=float, nargs="+", default=list(TIMES), help="noise levels t")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/augment_target_error.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    store = load_image_folder(args.data, subfolder="train", channels=3, name="cifar10_jpeg")
    data = store.float(torch.arange(len(store)))                       # [N, 3, 32, 32]
    knn = make_estimator("knn", store, index=build_index(store, "flat"), k=2048, n=256)
    log(f"data and index ready ({time.perf_counter() - started:.0f} s)")
    pipe = AugmentPipe(**EDM_CIFAR10)
    results = []
    for level, t in enumerate(args.times):
        generator = torch.Generator().manual_seed(args.seed * 1000 + level)
        ids = torch.randint(0, len(store), (args.sources,), generator=generator)
        augmented, augmentation = pipe.augment(data[ids], generator)
        z = augmented + t * torch.randn(augmented.shape, generator=generator)
        sigma = torch.full((args.sources,), t)
        draws = torch.Generator().manual_seed(args.seed * 1000 + level + 500)
        rule, _ = knn.augmented_target(pipe, augmentation, z, sigma, augmented, draws)
        unaugmented = knn(z, sigma, generator=draws)
        ignoring = augmentation.apply_orthogonal(knn(augmentation.invert_orthogonal(z), sigma, generator=draws))
        orthogonal = augmentation.orthogonal_only
        log(f"t = {t:g}: targets computed ({time.perf_counter() - started:.0f} s)")
        errors = {"orthogonal": {"rule": [], "unaugmented": []},
                  "resampled": {"rule": [], "unaugmented": [], "knn_ignoring_resampling": []}}
        # Flipped (or untouched) images: the data transformed by each of the flip combinations present.
        flip_pairs = zip(augmentation.xflip[orthogonal], augmentation.yflip[orthogonal])
        for flips in {(bool(a), bool(b)) for a, b in flip_pairs}:
            chosen = orthogonal & (augmentation.xflip == flips[0]) & (augmentation.yflip == flips[1])
            transformed = data.flip(3) if flips[0] else data
            transformed = transformed.flip(2) if flips[1] else transformed
            reference = posterior_mean(z[chosen].reshape(int(chosen.sum()), -1), t,
                                       transformed.reshape(len(store), -1))
            for name, estimate in (("rule", rule), ("unaugmented", unaugmented)):
                error = (estimate[chosen].reshape(reference.shape).double() - reference).square().mean(dim=1)
                errors["orthogonal"][name].extend(error.tolist())
        # Resampled images: all 50,000 images warped by that image's transform.
        for i in (~orthogonal).nonzero().flatten()[: args.resampled].tolist():
            transformed = pipe._translate(one(augmentation, i, len(store)).apply_orthogonal(data),
                                          augmentation.shift[i : i + 1].expand(len(store), 2))
            transformed = pipe._resample(transformed, augmentation.inverse_map[i : i + 1].expand(len(store), 3, 3),
                                         augmentation.resampled[i : i + 1].expand(len(store)))
            reference = posterior_mean(z[i : i + 1].reshape(1, -1), t, transformed.reshape(len(store), -1))
            for name, estimate in (("rule", rule), ("unaugmented", unaugmented),
                                   ("knn_ignoring_resampling", ignoring)):
                error = (estimate[i].reshape(1, -1).double() - reference).square().mean()
                errors["resampled"][name].append(float(error))
        row = {"t": t, "orthogonal_count": len(errors["orthogonal"]["rule"]),
               "resampled_count": len(errors["resampled"]["rule"]),
               "resampled_share": float((~orthogonal).float().mean())}
        for group, by_name in errors.items():
            for name, values in by_name.items():
                row[f"{group}_{name}"] = sum(values) / len(values) if values else float("nan")
        results.append(row)
        print(json.dumps(row), flush=True)

    seconds = time.perf_counter() - started
    lines = [f"# EDM targets under augmentation against the exact augmented posterior mean (CIFAR-10, N {len(store)})",
             "", f"`python scripts/augment_target_error.py --sources {args.sources} --resampled {args.resampled} "
             f"--times {' '.join(f'{t:g}' for t in args.times)} --seed {args.seed}` ({seconds:.0f} s on 2 shared "
             "CPU cores). Per-pixel MSE of each target against the exact posterior mean "
             "over the augmented data given the transform; KNN k 2048, n 256.", "",
             "| t | flips only: rule (KNN on T^-1 z) | flips only: unaugmented KNN | resampled: rule (T x) | "
             "resampled: unaugmented KNN | resampled: KNN ignoring the resampling | resampled share | "
             "scored (flips / resampled) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append(f"| {row['t']:g} | {row['orthogonal_rule']:.3g} | {row['orthogonal_unaugmented']:.3g} | "
                     f"{row['resampled_rule']:.3g} | {row['resampled_unaugmented']:.3g} | "
                     f"{row['resampled_knn_ignoring_resampling']:.3g} | {row['resampled_share']:.2f} | "
                     f"{row['orthogonal_count']} / {row['resampled_count']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()

"""Generate many samples by seed with a named sampler: the engine of ``sample.py`` and ``evaluate.py``.

Sample i starts from ``noise_for_seeds([i])`` whatever the batch, so checkpoints and methods are compared
on the same noise. The stochastic parts of some samplers (multistep consistency noise, KNN / STF draws)
come from a generator seeded with the batch's first seed: they repeat exactly for the same seeds and
batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from knn_cm.sampling.consistency import consistency_sample
from knn_cm.sampling.flow import estimator_velocity, flow_hybrid_sample, flow_sample
from knn_cm.sampling.hybrid import forward_process_sample, hybrid_sample
from knn_cm.sampling.ode import estimator_denoiser, euler_sample, heun_sample
from knn_cm.sampling.seeds import noise_for_seeds
from knn_cm.settings import positive_int

SAMPLER_KINDS = ("auto", "consistency", "heun", "euler", "pf_ode", "hybrid", "forward", "flow_euler", "flow_heun",
                 "flow_pf_ode", "flow_hybrid")
_SCHEDULE = ("num_steps", "sigma_min", "sigma_max", "rho")
# The make_sampler arguments each kind reads (everything else leaves its samples unchanged).
SAMPLER_SETTINGS = {"consistency": ("sigmas", "sigma_min"), "heun": _SCHEDULE + ("s_churn",),
                    "euler": _SCHEDULE + ("s_churn",), "pf_ode": _SCHEDULE, "hybrid": _SCHEDULE + ("t_switch",),
                    "forward": _SCHEDULE + ("t_switch",), "flow_euler": ("num_steps",), "flow_heun": ("num_steps",),
                    "flow_pf_ode": ("num_steps",), "flow_hybrid": ("num_steps", "t_switch")}
USES_ESTIMATOR = ("pf_ode", "hybrid", "flow_pf_ode", "flow_hybrid")
_DEFAULTS = {"sigmas": (80.0,), "num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "t_switch": 1.0,
             "s_churn": 0.0}


def resolve_kind(kind: str, network) -> str:
    """``auto``: one-step consistency sampling for a consistency model (CMPrecond), Heun on the flow-matching ODE
    for a velocity network (FMPrecond), EDM's Heun otherwise.

    ``network``: the denoiser, or its preconditioning class name (a network file's ``precond_class``).
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler {kind!r}; allowed: {', '.join(SAMPLER_KINDS)}")
    if kind != "auto":
        return kind
    precond_class = network if isinstance(network, str) else type(network).__name__
    return {"CMPrecond": "consistency", "FMPrecond": "flow_heun"}.get(precond_class, "heun")


def sampler_settings(kind: str, settings: Mapping) -> dict:
    """The settings that determine a sampler's output: those ``kind`` reads (make_sampler's defaults for
    absent ones), as plain numbers (floats, ``num_steps`` an int, ``sigmas`` a list of floats).

    ``kind`` must be resolved (not "auto"); settings the kind does not read are left out, so e.g. a
    consistency evaluation does not depend on ``num_steps``.
    """
    if kind not in SAMPLER_SETTINGS:
        raise ValueError(f"unknown sampler {kind!r}; allowed: {', '.join(SAMPLER_SETTINGS)}")
    out = {}
    for name in SAMPLER_SETTINGS[kind]:
        value = settings.get(name, _DEFAULTS[name])
        if name == "sigmas":
            out[name] = [float(sigma) for sigma in value]
        elif name == "num_steps":
            out[name] = int(value)
        else:
            out[name] = float(value)
    return out


def make_sampler(kind: str, network=None, estimator=None, store=None, sigmas: Sequence[float] = (80.0,),
                 num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 t_switch: float = 1.0, s_churn: float = 0.0, clip_denoised: bool = True) -> Callable:
    """A function (noise [B, C, H, W], generator) -> float32 samples [B, C, H, W].

    Kinds: ``consistency`` (``sigmas``: one step (80,) or multistep, e.g. (80, 0.821); ``clip_denoised``
    clamps each denoised estimate to [-1, 1] before noise is re-injected); ``heun`` / ``euler``
    (EDM's sampler on the network); ``pf_ode`` (Heun with the estimator alone, Section 6); ``hybrid``
    (estimator above ``t_switch``, network below); ``forward`` (training images noised to ``t_switch``,
    then the network; the noise argument only sets the batch size). On the flow-matching ODE
    (``knn_cm.sampling.flow``, t = 1 is noise, uniform steps): ``flow_euler`` / ``flow_heun`` (a velocity network,
    ``num_steps`` steps), ``flow_pf_ode`` (Heun with the estimator's velocity alone) and ``flow_hybrid`` (the
    estimator above the flow-matching time ``t_switch``, the network below; Heun).
    """
    kind = resolve_kind(kind, network)
    needs = {"consistency": ("network",), "heun": ("network",), "euler": ("network",), "pf_ode": ("estimator",),
             "hybrid": ("network", "estimator"), "forward": ("network", "store"), "flow_euler": ("network",),
             "flow_heun": ("network",), "flow_pf_ode": ("estimator",), "flow_hybrid": ("network", "estimator")}[kind]
    given = {"network": network, "estimator": estimator, "store": store}
    missing = [name for name in needs if given[name] is None]
    if missing:
        raise ValueError(f"the {kind!r} sampler needs {' and '.join(missing)}")
    schedule = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    if kind == "consistency":
        return lambda noise, generator: consistency_sample(network, noise, sigmas=tuple(sigmas), sigma_min=sigma_min,
                                                           generator=generator, clip_denoised=clip_denoised)
    if kind in ("heun", "euler"):
        solver = heun_sample if kind == "heun" else euler_sample
        return lambda noise, generator: solver(network, noise, s_churn=s_churn, generator=generator, **schedule)
    if kind in ("flow_euler", "flow_heun"):
        solver = kind.removeprefix("flow_")
        return lambda noise, generator: flow_sample(network, noise, num_steps, solver=solver)
    if kind == "flow_pf_ode":
        return lambda noise, generator: flow_sample(estimator_velocity(estimator, generator), noise, num_steps,
                                                    solver="heun")
    if kind == "flow_hybrid":
        return lambda noise, generator: flow_hybrid_sample(estimator, network, noise, t_switch, num_steps,
                                                           generator=generator)
    if kind == "pf_ode":
        return lambda noise, generator: heun_sample(estimator_denoiser(estimator, generator), noise, **schedule)
    if kind == "hybrid":
        return lambda noise, generator: hybrid_sample(estimator, network, noise, t_switch, generator=generator,
                                                      **schedule)
    return lambda noise, generator: forward_process_sample(store, network, t_switch, noise.shape[0],
                                                           generator=generator, device=noise.device, **schedule)


def generate(sampler: Callable, seeds: Sequence[int], shape: Sequence[int], batch_size: int = 256,
             device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """Samples [len(seeds), C, H, W] (float32 in [-1, 1], on CPU); sample i uses seed ``seeds[i]``."""
    batch_size = positive_int(batch_size, "batch_size")
    seeds = list(seeds)
    batches = [seeds[start : start + batch_size] for start in range(0, len(seeds), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sampling", unit="batch")
    out = []
    for batch in batches:
        noise = noise_for_seeds(batch, shape, device)
        generator = torch.Generator(device=device).manual_seed(int(batch[0]))
        out.append(sampler(noise, generator).clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)

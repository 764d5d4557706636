"""Samplers for diffusion and consistency models; every denoiser is a plain callable D(z, sigma).

    from knn_cm.sampling import (heun_sample, hybrid_sample, consistency_sample, estimator_denoiser,
                                 forward_process_sample, noise_for_seeds)

    noise = noise_for_seeds(range(64), (3, 32, 32))              # sample i always uses seed i
    images = heun_sample(edm_precond, noise)                       # EDM: 18 Heun steps, 35 evaluations
    knn = make_estimator("knn", store, index=build_index(store), k=2048, n=256)
    memorised = heun_sample(estimator_denoiser(knn, torch.Generator().manual_seed(0)), noise)
    mixed = hybrid_sample(knn, edm_precond, noise, t_switch=2.0)   # Section 6: KNN above 2, EDM below
    baseline = forward_process_sample(store, edm_precond, 2.0, 64, generator=torch.Generator().manual_seed(0))
    one_step = consistency_sample(cm_precond, noise)               # f(80 z, 80)
    two_step = consistency_sample(cm_precond, noise, sigmas=(80.0, 0.821), generator=torch.Generator())

D(z [B, C, H, W] float32, sigma [B] float32) -> x_hat [B, C, H, W] is E[x | z, sigma] (paper Eq. 5), so
networks (``EDMPrecond``), estimators (``knn_cm.estimators``) and mixtures are interchangeable; a
class-conditional network is passed as ``lambda z, sigma: net(z, sigma, class_labels)``. All samplers
run without gradients on noise's device and take explicit noise and generators, so results are
reproducible. Schedules are ``knn_cm.diffusion.karras_sigmas`` (EDM's time steps, ending in 0).

Modules: ``ode`` (Heun / Euler, EDM Algorithm 2), ``hybrid`` (Section 6's hybrid and forward-process
samplers; how t_switch enters the schedule), ``consistency`` (one- and multistep), ``seeds``,
``generate`` (named samplers and generation by seed, for ``sample.py`` and ``evaluate.py``), ``flow``
(Euler / Heun on the flow-matching ODE with a velocity network, an estimator, or both: x_t = (1 - t) x + t eps).
"""

from knn_cm.diffusion import karras_sigmas
from knn_cm.sampling.consistency import consistency_sample
from knn_cm.sampling.flow import estimator_velocity, flow_hybrid_sample, flow_sample
from knn_cm.sampling.generate import SAMPLER_KINDS, generate, make_sampler, resolve_kind
from knn_cm.sampling.hybrid import (
    forward_process_sample,
    hybrid_sample,
    switch_schedule,
    tail_schedule,
)
from knn_cm.sampling.ode import (
    Denoiser,
    estimator_denoiser,
    euler_sample,
    heun_sample,
    solve_pf_ode,
)
from knn_cm.sampling.seeds import noise_for_seeds

__all__ = [
    "SAMPLER_KINDS",
    "Denoiser",
    "consistency_sample",
    "estimator_denoiser",
    "estimator_velocity",
    "euler_sample",
    "flow_hybrid_sample",
    "flow_sample",
    "forward_process_sample",
    "generate",
    "heun_sample",
    "hybrid_sample",
    "karras_sigmas",
    "make_sampler",
    "noise_for_seeds",
    "resolve_kind",
    "solve_pf_ode",
    "switch_schedule",
    "tail_schedule",
]

"""Samplers on the flow-matching ODE dx_t / dt = v(x_t, t) from t = t_max (default 1, pure noise) down to t = 0.

Convention (``knn_cm.diffusion.FlowMatchingProcess``): x_t = (1 - t) x + t eps, t = 1 is noise, and the marginal
velocity is v(x_t, t) = E[eps - x | x_t] = (x_t - E[x | x_t]) / t. A velocity is any callable

    v(x_t [B, C, H, W] float32, t [B] float32) -> [B, C, H, W]

a trained network (``FMPrecond``), an estimator through Algorithm 2 (:func:`estimator_velocity`), or the two
chained (:func:`flow_hybrid_sample`). As in EDM's sampler the ODE state is float64 and the velocity sees float32.

Time grid: uniform, t_i = t_max (1 - i / S), i = 0..S (rectified flow's and Lipman et al.'s Euler grid); the
start is x = t_max * eps (exactly eps at t_max = 1; below 1 the (1 - t_max) x part is left out, as EDM's
sampler starts at sigma_max eps). Heun's correction evaluates v at the step's end; a velocity that is not
defined at t = 0 (an estimator: the posterior mean's noise level t / (1 - t) vanishes there) takes an Euler
step onto t = 0, which lands exactly on its posterior mean (x_t - t v = x_hat). Networks are defined at t = 0:
Heun with S steps costs 2 S evaluations for a network, 2 S - 1 for an estimator.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from itertools import pairwise

import torch

from knn_cm.data import uint8_to_float
from knn_cm.diffusion import ODE_SOLVERS, FlowMatchingProcess
from knn_cm.sampling.hybrid import switch_schedule
from knn_cm.sampling.ode import check_noise
from knn_cm.settings import positive_int

# v(x_t [B, C, H, W] float32, t [B] float32) -> velocity [B, C, H, W]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_solver(solver: str) -> str:
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; allowed: {', '.join(ODE_SOLVERS)}")
    return solver


def _check_t_max(t_max) -> float:
    if isinstance(t_max, bool) or not isinstance(t_max, numbers.Real) or not 0 < t_max <= 1:
        raise ValueError(f"t_max must be a number in (0, 1] (flow-matching time, 1 = noise), got {t_max!r}")
    return float(t_max)


def flow_times(num_steps: int, t_max: float = 1.0, device: str | torch.device | None = None) -> torch.Tensor:
    """The uniform grid t_i = t_max (1 - i / S), i = 0..S [S + 1], float64, from t_max down to exactly 0."""
    num_steps = positive_int(num_steps, "num_steps")
    t_max = _check_t_max(t_max)
    steps = torch.arange(num_steps + 1, dtype=torch.float64, device=device)
    return t_max * (num_steps - steps) / num_steps


def _velocity(velocity: Velocity, x: torch.Tensor, t: float) -> torch.Tensor:
    """v(x, t) in float64 for a float64 state x [B, C, H, W] and one time (a host float)."""
    t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    out = velocity(x.to(torch.float32), t_batch)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the velocity must return a tensor of x's shape {tuple(x.shape)}, got {shape}")
    return out.to(torch.float64)


def solve_flow_ode(velocity_for_step: Callable[[int], Velocity], start: torch.Tensor, times: torch.Tensor,
                   solver: str = "euler", return_trajectory: bool = False):
    """Integrate dx/dt = v(x, t) from ``start`` (float64 [B, C, H, W] at times[0]) through ``times`` [S + 1].

    Step i goes from times[i] to times[i + 1] with ``velocity_for_step(i)`` for both of its evaluations:
    Euler x' = x + h v(x, t); Heun adds the trapezoidal correction x' = x + h (v(x, t) + v(x_euler, t')) / 2,
    except onto t' = 0 for a velocity whose ``defined_at_zero`` attribute is False (module docstring).

    Returns:
        float32 x [B, C, H, W] at times[-1], or (x, trajectory [S + 1, B, C, H, W] float32) when asked.
    """
    _check_solver(solver)
    levels = times.tolist()  # host copies for the branches (no device read per step)
    x = start
    trajectory = [x.to(torch.float32)] if return_trajectory else None
    for i, (t_cur, t_next) in enumerate(pairwise(levels)):
        velocity = velocity_for_step(i)
        slope = _velocity(velocity, x, t_cur)
        x_euler = x + (t_next - t_cur) * slope
        heun = solver == "heun" and (t_next > 0 or getattr(velocity, "defined_at_zero", True))
        x = x + (t_next - t_cur) * 0.5 * (slope + _velocity(velocity, x_euler, t_next)) if heun else x_euler
        if return_trajectory:
            trajectory.append(x.to(torch.float32))
    x_final = x.to(torch.float32)
    return (x_final, torch.stack(trajectory)) if return_trajectory else x_final


@torch.no_grad()
def flow_sample(velocity: Velocity, noise: torch.Tensor, num_steps: int = 16, solver: str = "euler",
                t_max: float = 1.0, return_trajectory: bool = False):
    """Integrate the flow-matching ODE with ``velocity`` (a network, or :func:`estimator_velocity`) from t_max to 0.

    Args:
        velocity: v(x_t [B, C, H, W] float32, t [B] float32) -> [B, C, H, W].
        noise: standard normal [B, C, H, W] (e.g. ``noise_for_seeds``: sample i uses seed i); the start is
            t_max * noise.
        num_steps: S uniform steps (Euler: S evaluations; Heun: 2 S for a network).
        solver: "euler" or "heun".
        t_max: the first time, in (0, 1].
        return_trajectory: also return the states after every step [S + 1, B, C, H, W].
    """
    check_noise(noise)
    if not callable(velocity):
        raise ValueError(f"velocity must be callable as v(x_t, t), got {type(velocity).__name__}")
    _check_solver(solver)
    times = flow_times(num_steps, t_max, device=noise.device)
    start = noise.to(torch.float64) * times[0]
    return solve_flow_ode(lambda step: velocity, start, times, solver, return_trajectory)


@functools.lru_cache(maxsize=4)
def _cached_data_mean(store) -> torch.Tensor:
    return data_mean(store)


def data_mean(store) -> torch.Tensor:
    """E[x] over a DataStore's images [C, H, W] float64 (in [-1, 1]), read in chunks of raw pixels."""
    total = torch.zeros(store.shape, dtype=torch.float64)
    for _, chunk in store.iter_uint8():
        total += uint8_to_float(chunk, torch.float64).sum(dim=0)
    return total / len(store)


def estimator_velocity(estimator, generator: torch.Generator | None = None,
                       process: FlowMatchingProcess | None = None) -> Velocity:
    """v(x_t, t) = (x_t - E[x | x_t]) / t with E[x | x_t] from ``estimator`` through Algorithm 2.

    At t = 1 the noisy point carries nothing of x (s(1) = 0 and the query x_t / s(t) is undefined), so there the
    posterior mean is the prior's, E[x]: the mean of the estimator's store, computed once. ``generator`` (on the
    estimator's device) is forwarded to every call, so KNN / STF draws repeat from its seed. Not defined at
    t = 0 (``defined_at_zero`` is False: samplers step onto t = 0 with Euler).
    """
    if not callable(estimator):
        raise ValueError(f"estimator must be callable as est(z, sigma, generator=...), got {type(estimator).__name__}")
    process = process or FlowMatchingProcess()
    prior_mean: list[torch.Tensor] = []

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1)
        at_prior = t >= 1
        if bool(at_prior.any()):
            if not bool(at_prior.all()):
                raise ValueError("estimator_velocity: t = 1 and t < 1 in one batch; sample one time per call")
            if not prior_mean:
                store = getattr(estimator, "store", None)
                if store is None:
                    raise ValueError("the estimator has no store, so its velocity at t = 1 (x_t - E[x]) is unknown; "
                                     "start the sampler below 1 (t_max < 1)")
                prior_mean.append(_cached_data_mean(store))  # one pass per store, not per batch
            return x_t - prior_mean[0].to(device=x_t.device, dtype=x_t.dtype)
        return process.velocity(estimator, x_t, t, generator=generator)

    velocity.defined_at_zero = False
    return velocity


def _check_t_switch(t_switch) -> float:
    if isinstance(t_switch, bool) or not isinstance(t_switch, numbers.Real) or not 0 <= t_switch:
        raise ValueError(f"t_switch must be a flow-matching time >= 0 (>= 1: the network only), got {t_switch!r}")
    return float(t_switch)


@torch.no_grad()
def flow_hybrid_sample(estimator, network: Velocity, noise: torch.Tensor, t_switch: float, num_steps: int = 16,
                       solver: str = "heun", t_max: float = 1.0, generator: torch.Generator | None = None,
                       return_trajectory: bool = False):
    """The estimator's velocity from t_max down to t_switch, then the network's (Section 6's hybrid, on the flow).

    t_switch is inserted into the uniform grid when it lies strictly inside it (no step straddles it; it then
    adds one step); a step starting above t_switch uses the estimator for both of its evaluations, every other
    step the network. So t_switch >= t_max is ``flow_sample(network, ...)`` and t_switch = 0 is
    ``flow_sample(estimator_velocity(estimator, generator), ...)``, bit for bit.

    Args:
        estimator: a posterior-mean estimator (``knn_cm.estimators``), used through :func:`estimator_velocity`.
        network: a velocity v(x_t, t), e.g. ``FMPrecond``.
        noise: standard normal [B, C, H, W]; the start is t_max * noise.
        t_switch: flow-matching time >= 0 where the network takes over.
        num_steps, solver, t_max: as in :func:`flow_sample`, before t_switch is inserted.
        generator: forwarded to every estimator call (reproducible KNN / STF draws).
    """
    check_noise(noise)
    t_switch = _check_t_switch(t_switch)
    _check_solver(solver)
    for name, function in (("estimator", estimator), ("network", network)):
        if not callable(function):
            raise ValueError(f"{name} must be callable, got {type(function).__name__}")
    times = switch_schedule(flow_times(num_steps, t_max, device=noise.device), t_switch)
    from_estimator = estimator_velocity(estimator, generator)
    uses_estimator = (times[:-1] > t_switch).tolist()
    start = noise.to(torch.float64) * times[0]
    return solve_flow_ode(lambda step: from_estimator if uses_estimator[step] else network, start, times, solver,
                          return_trajectory)


def flow_nfe(num_steps: int, solver: str, defined_at_zero: bool = True) -> int:
    """Velocity evaluations of :func:`flow_sample` with S steps: S (Euler), 2 S (Heun), 2 S - 1 (Heun, estimator)."""
    num_steps = positive_int(num_steps, "num_steps")
    if _check_solver(solver) == "euler":
        return num_steps
    return 2 * num_steps - (0 if defined_at_zero else 1)


__all__ = ["Velocity", "data_mean", "estimator_velocity", "flow_hybrid_sample", "flow_nfe", "flow_sample",
           "flow_times", "solve_flow_ode"]

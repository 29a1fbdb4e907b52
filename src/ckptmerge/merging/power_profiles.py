"""Power-function EMA profiles (EDM2, Karras et al. 2024) and the post-hoc least-squares solve, in float64.

A power-function EMA of exponent gamma at step t weighs the weights of step tau in (0, t] by the profile

    p_(t, gamma)(tau) = (gamma + 1) / t^(gamma + 1) * tau^gamma           (zero after t; integrates to 1)

Its relative width is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), so sigma_rel 0.05 is
gamma = 16.97 and 0.10 is gamma = 6.94 (EDM2's pair). Online, the rule beta_t = (1 - 1/t)^(gamma + 1)
(``online/power_ema.py``) gives the weights of step s exactly the mass of p on (s - 1, s].

Two profiles ending at t_a <= t_b have the inner product

    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) * (t_a / t_b)^gamma_b

and the post-hoc EMA of any other profile is the least-squares combination of the stored ones:
A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>. The fit's relative residual is
||p_target - sum_i x_i p_i|| / ||p_target|| in the L2 norm of profiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ckptmerge.errors import ScheduleError

MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)  # gamma = 0: the uniform average of every step so far


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the power profile of relative width ``sigma_rel`` (the cubic's largest root)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ScheduleError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}) (gamma > 0), got {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power profile of exponent ``gamma``."""
    if not gamma > 0.0:
        raise ScheduleError(f"gamma must be positive, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def profile_gamma(sigma_rel: float | None, gamma: float | None, *, owner: str) -> float:
    """gamma from exactly one of ``sigma_rel`` or ``gamma`` (ScheduleError naming ``owner`` otherwise)."""
    if (sigma_rel is None) == (gamma is None):
        raise ScheduleError(f"{owner} needs exactly one of sigma_rel or gamma, e.g. {owner}:sigma_rel=0.07")
    if gamma is not None:
        gamma_to_sigma_rel(gamma)  # validates
        return float(gamma)
    return sigma_rel_to_gamma(sigma_rel)


def profile_inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_(t_a, gamma_a), p_(t_b, gamma_b)> for arrays that broadcast against each other (float64)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_ends_first = t_a <= t_b
    t_late = np.where(a_ends_first, t_b, t_a)
    gamma_late = np.where(a_ends_first, gamma_b, gamma_a)
    ratio = np.minimum(t_a, t_b) / t_late
    return (gamma_a + 1.0) * (gamma_b + 1.0) / ((gamma_a + gamma_b + 1.0) * t_late) * ratio ** gamma_late


@dataclass(frozen=True)
class PosthocFit:
    """Coefficients of the stored profiles that best match the target profile, and how well they do."""

    coeffs: list[float]
    relative_residual: float
    target_gamma: float
    target_step: int

    def record(self) -> dict:
        """What ``merge.json`` keeps of the fit."""
        return {"target_sigma_rel": round(gamma_to_sigma_rel(self.target_gamma), 12), "target_gamma": self.target_gamma,
                "target_step": self.target_step, "coefficients": self.coeffs,
                "coefficient_sum": float(sum(self.coeffs)),
                "relative_residual": self.relative_residual}


def solve_posthoc(steps: Sequence[int], gammas: Sequence[float], target_gamma: float,
                  target_step: int | None = None) -> PosthocFit:
    """Least-squares coefficients of the snapshots (``steps``, ``gammas``) for the profile (``target_step``,
    ``target_gamma``); the target step defaults to the newest snapshot's."""
    steps_f = np.asarray(steps, dtype=np.float64)
    gammas_f = np.asarray(gammas, dtype=np.float64)
    if steps_f.size == 0 or np.any(steps_f <= 0):
        raise ScheduleError(f"phema needs snapshots at positive steps, got {list(steps)}")
    target_step = int(steps_f.max()) if target_step is None else int(target_step)
    gram = profile_inner_products(steps_f[:, None], gammas_f[:, None], steps_f[None, :], gammas_f[None, :])
    rhs = profile_inner_products(steps_f, gammas_f, target_step, target_gamma)
    coeffs, *_ = np.linalg.lstsq(gram, rhs, rcond=None)
    target_norm = float(profile_inner_products(target_step, target_gamma, target_step, target_gamma))
    error = target_norm - 2.0 * float(coeffs @ rhs) + float(coeffs @ gram @ coeffs)
    residual = math.sqrt(max(error, 0.0) / target_norm)
    return PosthocFit([float(c) for c in coeffs], residual, float(target_gamma), target_step)

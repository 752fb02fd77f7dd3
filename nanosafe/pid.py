"""
A PID multiplier (--multiplier pid), a drop-in for lagrange.Lagrange: the same first argument,
the same update(J_c) -> λ, the same bounds. Stooke, Achiam & Abbeel 2020, "Responsive Safety in
RL by PID Lagrangian Methods".
"""

import math

from nanosafe.lagrange import Lagrange, _error, _log_init, _upper


class PIDLagrange(Lagrange):
    """A PID multiplier (Stooke, Achiam & Abbeel 2020).

    Stooke et al. set, with e = J_c − d,

        λ = max(0, Kp·e + Ki·I + Kd·max(0, J_c − J_c,prev)),    I ← max(0, I + e)

    The integral alone is plain dual ascent: it lags the cost, so λ overshoots and oscillates.
    The proportional term reacts within one step; the derivative term, positive part only,
    raises λ while cost is climbing and never pulls it down, which damps the overshoot.

    Here the same three terms act on log λ:

        I     ← clamp(I + ki·exp(I)·e)                       the official step, on λ_I = exp(I)
        log λ ← clamp(I + kp·e + kd·max(0, e − e_prev))       (e − e_prev = J_c − J_c,prev)

    Why log space: λ > 0 needs no max(0, ·), and with kp = kd = 0, ki = lr this is exactly
    `Lagrange`, step for step. The P and D terms scale λ by exp(kp·e + kd·Δe⁺), a relative
    push whatever λ's size, and stay out of the integral's step size: fed back there, one
    P/D spike makes a huge integral step (it sent λ to the bound on a lagged toy system).
    Clamping I to log λ's bounds is the anti-windup (the paper's max(0, I) plays that
    role): I can't run far past lambda_max and take ages to come back.
    """

    def __init__(self, threshold, lambda_init=1.0, kp=0.0, ki=0.1, kd=0.0, lambda_max=None,
                 update_delay_steps=0):
        self.threshold = float(threshold)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.update_delay_steps = int(update_delay_steps)
        self.hi = _upper(lambda_max)
        self.integral = self.log_lambda = self._clamp(_log_init(lambda_init))
        self.prev_error = None  # no derivative on the first step
        self.step = 0

    # _clamp and value come from Lagrange: the same bounds, the same λ = exp(log λ)

    def update(self, mean_episode_cost):
        """One PID step on J_c = mean_episode_cost; returns the new λ."""
        err = _error(mean_episode_cost, self.threshold)
        if self.step >= self.update_delay_steps:
            step = self.ki * math.exp(self.integral) * err if err else 0.0
            self.integral = self._clamp(self.integral + step)
            rise = 0.0 if self.prev_error is None else max(0.0, err - self.prev_error)
            self.log_lambda = self._clamp(self.integral + self.kp * err + self.kd * rise)
            self.prev_error = err
        self.step += 1
        return self.value

    def state_dict(self):
        return {"integral": self.integral, "log_lambda": self.log_lambda,
                "prev_error": self.prev_error, "step": self.step}

    def load_state_dict(self, state):
        self.integral, self.log_lambda = float(state["integral"]), float(state["log_lambda"])
        self.prev_error = None if state["prev_error"] is None else float(state["prev_error"])
        self.step = int(state["step"])

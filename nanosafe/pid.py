"""
A PID multiplier (--multiplier pid), a drop-in for lagrange.Lagrange: the same first argument,
the same update(J_c) -> λ, the same cap. Stooke, Achiam & Abbeel 2020, "Responsive Safety in
RL by PID Lagrangian Methods", in the form of its reference code (rlpyt,
rlpyt/projects/safe/cppo_pid.py, CppoPID.optimize_agent).
"""

from collections import deque

from nanosafe.lagrange import _error


class PIDLagrange:
    """λ itself is the controlled output. With e = J_c − d, one update:

        I   ← max(0, I + ki·e)                          the integral: plain dual ascent on λ
        P   ← α_p·P + (1 − α_p)·e                       the error, smoothed (EMA)
        S   ← α_d·S + (1 − α_d)·J_c                     the cost, smoothed (EMA)
        D   = max(0, S − S[d_delay updates ago])        its rise over a delay, positive part
        λ   = min(λ_max, max(0, kp·P + I + kd·D))

    The integral alone lags the cost, so λ overshoots and oscillates; P reacts within a few
    steps and D, which only ever raises λ while the cost is climbing, damps the overshoot.
    I starts at lambda_init (rlpyt: pid_i = penalty_init), so λ starts there too.

    One departure from rlpyt: there the smoothed cost S and its delay line start at 0, so the
    first ~d_delay / (1 − α_d) updates read a rise that is only the filter filling up. Here S
    and the delay line start at the first J_c: no derivative until the cost really moves.
    """

    def __init__(self, threshold, lambda_init=1.0, kp=0.0, ki=0.1, kd=0.0, d_delay=10,
                 p_ema=0.95, d_ema=0.95, lambda_max=None, update_delay_steps=0):
        if lambda_init < 0:
            raise ValueError(f"lambda_init must be >= 0, got {lambda_init}")
        if d_delay < 1 or not (0 <= p_ema < 1 and 0 <= d_ema < 1):
            raise ValueError(f"need d_delay >= 1 and EMA factors in [0, 1), got {d_delay}, "
                             f"{p_ema}, {d_ema}")
        self.threshold = float(threshold)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.p_ema, self.d_ema = float(p_ema), float(d_ema)
        self.lambda_max = float("inf") if lambda_max is None else float(lambda_max)
        self.update_delay_steps = int(update_delay_steps)
        self.integral = self.lam = min(float(lambda_init), self.lambda_max)
        self.p = 0.0                          # rlpyt: _delta_p = 0
        self.s = None                         # the smoothed cost; None until the first J_c
        self.delayed = deque(maxlen=int(d_delay))
        self.step = 0

    @property
    def value(self):
        return self.lam

    def update(self, mean_episode_cost):
        """One PID step on J_c = mean_episode_cost; returns the new λ."""
        err = _error(mean_episode_cost, self.threshold)
        j = err + self.threshold
        if self.step >= self.update_delay_steps:
            self.integral = max(0.0, self.integral + self.ki * err)
            self.p = self.p_ema * self.p + (1 - self.p_ema) * err
            if self.s is None:
                self.s = j
                self.delayed.append(j)
            self.s = self.d_ema * self.s + (1 - self.d_ema) * j
            rise = max(0.0, self.s - self.delayed[0])
            self.lam = min(self.lambda_max,
                           max(0.0, self.kp * self.p + self.integral + self.kd * rise))
            self.delayed.append(self.s)
        self.step += 1
        return self.lam

    def state_dict(self):
        return {"integral": self.integral, "lambda": self.lam, "p": self.p, "s": self.s,
                "delayed": list(self.delayed), "step": self.step}

    def load_state_dict(self, state):
        self.integral, self.lam, self.p = (float(state[k]) for k in ("integral", "lambda", "p"))
        self.s = None if state["s"] is None else float(state["s"])
        self.delayed = deque((float(x) for x in state["delayed"]), maxlen=self.delayed.maxlen)
        self.step = int(state["step"])

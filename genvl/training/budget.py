"""The stage's wall-clock budget (``max_seconds``) and time-based checkpoints (``save_minutes``)."""

from __future__ import annotations

import time

import torch

from genvl.training.config import TrainConfig


class BudgetClock:
    """The stage's wall-clock budget (``cfg.max_seconds``) and time-based checkpoints (``cfg.save_minutes``).

    After ``FIT_AFTER`` steps of this process it measures the time per step (the first two steps,
    slower, left out) and sets ``cfg.max_steps`` to the steps that fit the rest of the budget (never
    above the recipe's), so that the learning-rate schedule decays to its end. It measures again every
    ``REFIT_SHARE`` of the budget and refits when the speed moved (another process on the machine, a
    slower epoch), until ``REFIT_UNTIL`` of the steps are done. The fitted numbers go into the loop
    state (and so into checkpoints: a resumed run keeps them). Past the budget, :meth:`tick` says
    stop, on every process alike.
    """

    FIT_AFTER = 8  # steps timed before the first fit (the first two are not counted)
    REFIT_SHARE = 0.05  # share of the budget between two measurements,
    REFIT_MIN_SECONDS = 20.0  # and at least this long
    REFIT_UNTIL = 0.9  # no refit in the last 10% of the steps: the schedule ends as planned
    RESERVE = 0.03  # share of the budget kept for the release and the sample grid

    def __init__(self, cfg: TrainConfig, state: dict, t_start: float):
        self.cfg, self.state, self.t_start = cfg, state, t_start
        self.first_step = state["step"]
        self.mark: tuple[float, int] | None = None  # (time, step) where the current speed window began
        self.t_saved = time.perf_counter()
        self.out_of_time = self.save_due = False
        state.setdefault("recipe_max_steps", cfg.max_steps)

    def _fit(self, accelerator, bar, now: float) -> None:
        cfg, state = self.cfg, self.state
        t0, s0 = self.mark
        per_step = (now - t0) / max(1, state["step"] - s0)
        left = cfg.max_seconds * (1 - self.RESERVE) - (now - self.t_start)
        fit = min(int(state["recipe_max_steps"]), state["step"] + max(1, int(left / per_step)))
        if accelerator.num_processes > 1:  # every process keeps the same schedule
            fit = int(accelerator.reduce(torch.tensor([fit], device=accelerator.device), "max").item())
        if abs(fit - cfg.max_steps) > 0.02 * cfg.max_steps or not state.get("max_steps"):
            cfg.max_steps = fit
            bar.total = fit
            bar.refresh()
        state["max_steps"] = cfg.max_steps
        self.mark = (now, state["step"])

    def tick(self, accelerator, bar) -> bool:
        """Call after each optimizer step; True when the budget is spent. Also decides
        :attr:`save_due` (time for a checkpoint), the same on every process."""
        cfg, state = self.cfg, self.state
        self.save_due = False
        if cfg.max_seconds <= 0 and cfg.save_minutes <= 0:
            return False
        now = time.perf_counter()
        done = state["step"] - self.first_step
        if done == 2:
            self.mark = (now, state["step"])
        if cfg.max_seconds > 0 and self.mark is not None:
            first = done == self.FIT_AFTER and not state.get("max_steps")
            window = max(self.REFIT_MIN_SECONDS, self.REFIT_SHARE * cfg.max_seconds)
            refit = (state.get("max_steps") and now - self.mark[0] >= window
                     and state["step"] < self.REFIT_UNTIL * cfg.max_steps)
            if accelerator.num_processes > 1:  # the same decision everywhere
                refit = bool(accelerator.reduce(torch.tensor([float(bool(refit))], device=accelerator.device), "max") > 0)
            if first or refit:
                self._fit(accelerator, bar, now)
        flags = torch.tensor([float(cfg.max_seconds > 0 and now - self.t_start >= cfg.max_seconds),
                              float(cfg.save_minutes > 0 and now - self.t_saved >= 60 * cfg.save_minutes)],
                             device=accelerator.device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "max")
        self.out_of_time, self.save_due = bool(flags[0] > 0), bool(flags[1] > 0)
        return self.out_of_time

    def saved(self) -> None:
        self.t_saved = time.perf_counter()

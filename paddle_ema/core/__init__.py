"""The math of an average, written once for every front-end: decay schedules (`schedules`), which
call averages, copies or skips (`step_policy`), the update rule and bias correction (`averaging`),
which parameters (`selection`). Imports nothing of paddle_ema above errors and _compat."""

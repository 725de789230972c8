"""Post-hoc EMA: choose the EMA length after training (Karras et al. 2023, "Analyzing and Improving
the Training Dynamics of Diffusion Models", section 3).

A power-function EMA with exponent gamma averages the weights x_1..x_t seen so far with a weight
proportional to tau ** gamma (the `power_function` schedule). Its width relative to the run is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))

During training, `PostHocEMA` tracks two or more such EMAs and saves their averages every K
updates. Afterwards `synthesize` builds the average of any other profile as a linear combination
of the snapshots: the combination whose weight profile over the steps is closest, in least
squares, to the profile wanted. With normalised profiles p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)
on [0, t], every inner product is in closed form:

    <p_a, p_b> = (g_a + 1)(g_b + 1) min(t_a, t_b) ** (g_a + g_b + 1) / ((g_a + g_b + 1) t_a**(g_a + 1) t_b**(g_b + 1))

so the coefficients solve a small linear system A x = b, A between snapshots, b against the target.
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from .checkpoint import atomic_save, atomic_write_text, safe_load
from .dygraph import ExponentialMovingAverage
from .averaging import SavedState
from .errors import ConfigError, IncompatibleStateError
from .schedules import PowerFunction
from .step_policy import check_int

__all__ = ["sigma_rel_to_gamma", "gamma_to_sigma_rel", "profile_coefficients", "PostHocEMA", "synthesize"]

INDEX = "posthoc_index.json"
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)  # gamma = 0, equal weights


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent `gamma`.

    Args:
        gamma: the exponent, >= 0.

    Returns:
        sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))).
    """
    if not gamma >= 0:
        raise ConfigError(f"gamma must be >= 0, got {gamma!r}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma >= 0 whose profile has this relative width.

    Args:
        sigma_rel: the relative width, in (0, sqrt(1/12)].

    Returns:
        The largest real root of gamma**3 + 7 gamma**2 + (16 - 1/s**2) gamma + (12 - 1/s**2) = 0.
    """
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ConfigError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0), got {sigma_rel!r}")
    inv = 1.0 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return max(0.0, float(max(r.real for r in roots if abs(r.imag) < 1e-9)))


def _log_inner(t_a, g_a, t_b, g_b):
    power = g_a + g_b + 1.0
    return (
        math.log(g_a + 1.0) + math.log(g_b + 1.0) + power * math.log(min(t_a, t_b))
        - math.log(power) - (g_a + 1.0) * math.log(t_a) - (g_b + 1.0) * math.log(t_b)
    )


def profile_coefficients(snapshots: Sequence[Tuple[float, float]], t: float, gamma: float) -> np.ndarray:
    """The combination of snapshots closest (least squares) to the gamma-profile average at step t.

    Args:
        snapshots: [(t_i, gamma_i)] of the stored averages (t_i = updates averaged, >= 1).
        t: the step to synthesise at.
        gamma: the wanted profile's exponent.

    Returns:
        The coefficients x_i, one per snapshot: the average is sum_i x_i * snapshot_i.
    """
    if not snapshots:
        raise ConfigError("post-hoc EMA needs at least one snapshot")
    n = len(snapshots)
    gram = np.empty((n, n))
    for i, (t_i, g_i) in enumerate(snapshots):
        for j, (t_j, g_j) in enumerate(snapshots):
            gram[i, j] = math.exp(_log_inner(t_i, g_i, t_j, g_j))
    target = np.array([math.exp(_log_inner(t_i, g_i, t, gamma)) for t_i, g_i in snapshots])
    coefficients, *_ = np.linalg.lstsq(gram, target, rcond=None)
    return coefficients


class PostHocEMA:
    """Tracks power-function EMAs of a model and saves their averages every `snapshot_every` updates.

    Args:
        model: the model (bare or DataParallel).
        snapshot_dir: folder for the snapshots and their index.
        sigma_rels: relative widths of the tracked profiles (the paper uses 0.05 and 0.10).
        snapshot_every: save every K averaging updates.
        snapshot_dtype: 'float32' or 'float16' (half the disk, at float16's rounding).
        write: write the snapshot files; under data parallelism only rank 0 should.
        **options: passed to each ExponentialMovingAverage (update_every, start_step, exclude, ...);
            their step policy decides which calls average.
    """

    def __init__(self, model: Any, snapshot_dir: Union[str, Path], sigma_rels: Iterable[float] = (0.05, 0.10),
                 snapshot_every: int = 1000, snapshot_dtype: str = "float32", write: bool = True, **options: Any):
        if snapshot_dtype not in ("float32", "float16"):
            raise ConfigError(f"snapshot_dtype must be 'float32' or 'float16', got {snapshot_dtype!r}")
        snapshot_every = check_int("snapshot_every", snapshot_every, 1)
        if not sigma_rels:
            raise ConfigError("sigma_rels needs at least one relative width")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = [ExponentialMovingAverage(model, schedule=PowerFunction(gamma=g), **options) for g in self.gammas]
        self.snapshot_dir = Path(snapshot_dir)
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.write = write
        if write:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)

    def update(self, step: Optional[int] = None) -> None:
        """Update every tracked EMA; save a snapshot after every `snapshot_every`-th averaging update.

        Args:
            step: an external call counter (0-based), as for ExponentialMovingAverage.update().
        """
        decays = [ema.update(step=step) for ema in self.emas]
        t = self.emas[0].num_updates
        if decays[0] is not None and t % self.snapshot_every == 0:  # only on calls that averaged
            self.snapshot()

    def snapshot(self) -> None:
        """Save the current average of every profile (collective when the EMAs are sharded)."""
        t = self.emas[0].num_updates
        entries = []
        for index, (ema, gamma, sigma_rel) in enumerate(zip(self.emas, self.gammas, self.sigma_rels)):
            weights = {name: value.astype(self.snapshot_dtype) for name, value in ema.state_dict()["shadow"].items()}
            name = f"posthoc_{index}_{t:010d}.pdparams"
            entries.append({"file": name, "t": t, "gamma": gamma, "sigma_rel": sigma_rel})
            if self.write:
                atomic_save(weights, self.snapshot_dir / name)
        if self.write:
            index_path = self.snapshot_dir / INDEX
            known = json.loads(index_path.read_text())["snapshots"] if index_path.exists() else []
            # A resumed run writes the same steps again: the newer files replace the older entries.
            known = [e for e in known if e["file"] not in {n["file"] for n in entries}] + entries
            atomic_write_text(json.dumps({"snapshots": known}, indent=1), index_path)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume.

        Returns:
            {'emas': each EMA's state_dict(), 'sigma_rels': the tracked widths}.
        """
        return {"emas": [ema.state_dict() for ema in self.emas], "sigma_rels": self.sigma_rels}

    def set_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from state_dict(); other widths raise IncompatibleStateError.

        Args:
            state: a state_dict() of a PostHocEMA with the same sigma_rels.
        """
        saved = SavedState(state, "the post-hoc EMA state does not fit this PostHocEMA")
        widths = saved.state.get("sigma_rels")
        if not isinstance(widths, list) or widths != self.sigma_rels:
            raise IncompatibleStateError(f"post-hoc EMA state has sigma_rels {saved.shown(widths)}, this one {self.sigma_rels}")
        states = saved.state.get("emas")
        if not isinstance(states, list):
            saved.refuse("emas", f"must be a list of the profiles' states, got a {type(states).__name__}")
        if len(states) != len(self.emas):
            saved.refuse("emas", f"holds {len(states)} profiles' states; this PostHocEMA tracks {len(self.emas)} "
                                 f"profiles, the state has {len(states)}")
        checked = []
        for index, (ema, ema_state) in enumerate(zip(self.emas, states)):
            try:  # every profile is checked before any is loaded
                checked.append(ema._checked_state(ema_state))
            except IncompatibleStateError as exc:
                raise IncompatibleStateError(f"post-hoc EMA profile {index} (sigma_rel {self.sigma_rels[index]}): "
                                             f"{exc}") from None
        for ema, (shadows, counters) in zip(self.emas, checked):
            ema._load_checked(shadows, counters)


def synthesize(snapshot_dir: Union[str, Path], sigma_rel: Optional[float] = None, gamma: Optional[float] = None,
               at: Optional[int] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """The average of a power-function profile, from the snapshots in `snapshot_dir`.

    Args:
        snapshot_dir: the folder PostHocEMA wrote.
        sigma_rel: the wanted relative width; give it or `gamma`.
        gamma: the wanted exponent; give it or `sigma_rel`.
        at: the step (updates averaged) to synthesise at; by default the last snapshot's.

    Returns:
        ({name: float32 numpy array}, info), info listing the snapshots used and their coefficients.
    """
    if (sigma_rel is None) == (gamma is None):
        raise ConfigError("give exactly one of sigma_rel and gamma")
    gamma = sigma_rel_to_gamma(sigma_rel) if gamma is None else float(gamma)
    index_path = Path(snapshot_dir) / INDEX
    if not index_path.exists():
        raise ConfigError(f"no post-hoc EMA snapshots in {snapshot_dir}: {INDEX} is missing")
    entries = json.loads(index_path.read_text())["snapshots"]
    at = max(e["t"] for e in entries) if at is None else at
    used = [e for e in entries if e["t"] <= at]
    if not used:
        raise ConfigError(f"no snapshot at or before step {at} in {snapshot_dir}")
    coefficients = profile_coefficients([(e["t"], e["gamma"]) for e in used], at, gamma)
    total = None
    for entry, coefficient in zip(used, coefficients):
        weights = {name: value.numpy() for name, value in safe_load(Path(snapshot_dir) / entry["file"], "post-hoc snapshot").items()}
        if total is None:
            total = {name: np.zeros(value.shape, np.float64) for name, value in weights.items()}
        for name, value in weights.items():
            total[name] += coefficient * value.astype(np.float64)
    info = {"gamma": gamma, "sigma_rel": gamma_to_sigma_rel(gamma), "at": at,
            "snapshots": [{**e, "coefficient": float(c)} for e, c in zip(used, coefficients)]}
    return {name: value.astype(np.float32) for name, value in total.items()}, info

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
import os
import stat
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .core.schedules import PowerFunction
from .core.validation import check_choice, check_int, is_integer
from .dygraph import ExponentialMovingAverage
from .errors import CheckpointError, ConfigError, IncompatibleStateError, NonFiniteError
from .infra.checkpoint import atomic_save, atomic_write_text, safe_load
from .infra.saved_state import SavedState, tensor_problem
from .kernels import first_nonfinite_name

__all__ = ["sigma_rel_to_gamma", "gamma_to_sigma_rel", "profile_coefficients", "profile_fit", "PostHocEMA",
           "synthesize", "read_index", "synthesis_range", "synthesis_step", "check_synthesis", "MAX_PROFILE_ERROR"]

INDEX = "posthoc_index.json"
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)  # gamma = 0, equal weights
# A profile is synthesised only when the snapshots' best combination is this close to it (relative
# L2 norm of the profile difference, in closed form); farther, the result is another average.
MAX_PROFILE_ERROR = 0.25
# Steps are counted in integers up to this (as the config's step settings).
MAX_STEP = 2**62


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent `gamma`.

    Args:
        gamma: the exponent, a finite number >= 0.

    Returns:
        sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))).
    """
    if not _is_real(gamma) or not 0.0 <= gamma < math.inf:
        raise ConfigError(f"gamma must be a finite number >= 0, got {gamma!r}")
    gamma = float(gamma)
    # Written so that no intermediate overflows for a huge gamma (about 1 / gamma then).
    return math.sqrt((gamma + 1.0) / (gamma + 3.0)) / (gamma + 2.0)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The gamma >= 0 whose profile has this relative width.

    Args:
        sigma_rel: the relative width, in (0, sqrt(1/12)].

    Returns:
        The largest real root of gamma**3 + 7 gamma**2 + (16 - 1/s**2) gamma + (12 - 1/s**2) = 0.
    """
    if not _is_real(sigma_rel) or not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ConfigError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (gamma >= 0), got {sigma_rel!r}")
    s = float(sigma_rel)
    # The cubic in u = gamma * s (multiplied by s**3): its coefficients stay bounded however small
    # s is, where 1/s**2 would overflow.
    roots = np.roots([1.0, 7.0 * s, 16.0 * s * s - 1.0, 12.0 * s**3 - s])
    gamma = max(0.0, float(max(r.real for r in roots if abs(r.imag) < 1e-9)) / s)
    if not math.isfinite(gamma):
        raise ConfigError(f"sigma_rel {sigma_rel!r} is too small: its gamma is beyond the floating-point range")
    return gamma


def _is_real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _log_inner(t_a, g_a, t_b, g_b):
    """log <p_a, p_b> (numpy arrays or floats). With (t_lo, t_hi) the earlier and later step and
    g_hi the later one's exponent, the closed form's powers of the steps reduce to
    g_hi * (log t_lo - log t_hi) - log t_hi: no huge terms cancel, whatever the gammas."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
    a_first = t_a <= t_b
    t_lo, t_hi = np.where(a_first, t_a, t_b), np.where(a_first, t_b, t_a)
    g_hi = np.where(a_first, g_b, g_a)
    return (np.log1p(g_a) + np.log1p(g_b) - np.log1p(g_a + g_b) + g_hi * (np.log(t_lo) - np.log(t_hi))
            - np.log(t_hi))


def _gram(snapshots):
    t, g = (np.array([s[i] for s in snapshots], np.float64) for i in (0, 1))
    return np.exp(_log_inner(t[:, None], g[:, None], t[None, :], g[None, :]))


def profile_fit(snapshots: Sequence[Tuple[float, float]], t: float, gamma: float,
                gram: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float]:
    """The combination of snapshots closest (least squares) to the gamma-profile average at step t,
    and how close it is.

    Args:
        snapshots: [(t_i, gamma_i)] of the stored averages (t_i = updates averaged, >= 1).
        t: the step to synthesise at.
        gamma: the wanted profile's exponent.
        gram: the snapshots' inner products, when already computed (the same for every target).

    Returns:
        (x, error): the coefficients x_i (the average is sum_i x_i * snapshot_i) and the relative
        L2 distance ||sum_i x_i p_i - p|| / ||p|| between the combined and the wanted profile,
        in closed form: 0 for a stored profile, about 1 where the snapshots cannot express it.
    """
    if not snapshots:
        raise ConfigError("post-hoc EMA needs at least one snapshot")
    gram = _gram(snapshots) if gram is None else gram
    t_i, g_i = (np.array([s[i] for s in snapshots], np.float64) for i in (0, 1))
    target = np.exp(_log_inner(t_i, g_i, t, gamma))
    coefficients, *_ = np.linalg.lstsq(gram, target, rcond=None)
    norm = float(np.exp(_log_inner(t, gamma, t, gamma)))
    residual = norm - 2.0 * float(coefficients @ target) + float(coefficients @ gram @ coefficients)
    return coefficients, math.sqrt(max(residual, 0.0) / norm)


def profile_coefficients(snapshots: Sequence[Tuple[float, float]], t: float, gamma: float) -> np.ndarray:
    """The combination of snapshots closest (least squares) to the gamma-profile average at step t.

    Args:
        snapshots: [(t_i, gamma_i)] of the stored averages (t_i = updates averaged, >= 1).
        t: the step to synthesise at.
        gamma: the wanted profile's exponent.

    Returns:
        The coefficients x_i, one per snapshot: the average is sum_i x_i * snapshot_i.
    """
    return profile_fit(snapshots, t, gamma)[0]


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
        check_choice("snapshot_dtype", snapshot_dtype, ("float32", "float16"), "'float32' or 'float16'")
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
        """Save the current average of every profile (collective when the EMAs are sharded).
        Every profile is checked first: one that holds NaN or Inf (or leaves float16's range) is a
        NonFiniteError naming the parameter and step, and nothing is written."""
        t = self.emas[0].num_updates
        entries, files = [], []
        for index, (ema, gamma, sigma_rel) in enumerate(zip(self.emas, self.gammas, self.sigma_rels)):
            weights = {name: value.astype(self.snapshot_dtype) for name, value in ema.state_dict()["shadow"].items()}
            bad = first_nonfinite_name(weights)
            if bad is not None:
                raise NonFiniteError(f"post-hoc EMA snapshot at update {t}: the sigma_rel {sigma_rel} average of "
                                     f"{bad!r} holds NaN or Inf as {self.snapshot_dtype}; nothing is written")
            name = f"posthoc_{index}_{t:010d}.pdparams"
            entries.append({"file": name, "t": t, "gamma": gamma, "sigma_rel": sigma_rel})
            files.append((weights, name))
        if self.write:
            index_path = self.snapshot_dir / INDEX
            known = read_index(self.snapshot_dir) if os.path.lexists(index_path) else []
            for weights, name in files:
                atomic_save(weights, self.snapshot_dir / name)
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
            raise IncompatibleStateError(f"post-hoc EMA state has sigma_rels {saved.shown(widths)}, this one "
                                         f"{self.sigma_rels}")
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


def _index_problem(entry, folder):
    """Why one index entry cannot be used, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object with 'file', 't' and 'gamma'"
    missing = [key for key in ("file", "t", "gamma") if key not in entry]
    if missing:
        return f"lacks {missing}"
    name, t, gamma = entry["file"], entry["t"], entry["gamma"]
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\0" in name \
            or (os.altsep and os.altsep in name):
        return f"has 'file' {SavedState.shown(name)}; it must name a file in the snapshot folder (no folder part)"
    if not is_integer(t, 1) or t > MAX_STEP:
        return f"has 't' {SavedState.shown(t)}; it must be an integer from 1 to 2**62 (updates averaged)"
    if not _is_real(gamma) or not 0.0 <= gamma < math.inf:
        return f"has 'gamma' {SavedState.shown(gamma)}; it must be a finite number >= 0"
    if "sigma_rel" in entry and (not _is_real(entry["sigma_rel"]) or not 0.0 < entry["sigma_rel"] <= MAX_SIGMA_REL):
        return f"has 'sigma_rel' {SavedState.shown(entry['sigma_rel'])}; it must be in (0, {MAX_SIGMA_REL:.4f}]"
    try:
        info = os.lstat(os.path.join(folder, name))
    except FileNotFoundError:
        return f"names {name!r}, which is not in {folder}"
    if stat.S_ISLNK(info.st_mode):
        return f"names {name!r}, which is a link; snapshots are regular files in {folder}"
    if not stat.S_ISREG(info.st_mode):
        return f"names {name!r}, which is not a regular file"
    return None


def read_index(snapshot_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """The entries of a snapshot folder's posthoc_index.json, every one checked: an object with
    'file' (a file of that folder: no folder part, no link, a regular file), 't' (an integer
    >= 1), 'gamma' (a finite number >= 0) and optionally 'sigma_rel'; no file twice.

    Args:
        snapshot_dir: the folder PostHocEMA wrote.

    Returns:
        [{'file', 't', 'gamma', ...}] in the index's order. An index that is missing, not a
        regular file, not JSON or holds a bad entry is one CheckpointError (ConfigError when
        missing) naming the file and the entry.
    """
    folder = os.fspath(snapshot_dir)
    path = os.path.join(folder, INDEX)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError(f"no post-hoc EMA snapshots in {folder}: {INDEX} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a link, folder or device); a snapshot index is one")
    try:
        with open(path, "rb") as file:
            document = json.loads(file.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise CheckpointError(f"{path} is not a snapshot index: it is not valid JSON ({reason})") from None
    if not isinstance(document, dict) or not isinstance(document.get("snapshots"), list):
        raise CheckpointError(f"{path} is not a snapshot index: it must be an object {{\"snapshots\": [...]}}, got "
                              f"{SavedState.shown(document)}")
    entries = document["snapshots"]
    if not entries:
        raise CheckpointError(f"{path} lists no snapshots")
    seen = set()
    for number, entry in enumerate(entries):
        problem = _index_problem(entry, folder)
        if problem is None and entry["file"] in seen:
            problem = f"names {entry['file']!r} a second time"
        if problem:
            raise CheckpointError(f"{path}: snapshot {number} {problem}")
        seen.add(entry["file"])
    return entries


def _sigma_grid():
    return np.geomspace(1e-4, MAX_SIGMA_REL, 96)


def synthesis_range(entries: Sequence[Dict[str, Any]], at: int) -> Optional[Tuple[float, float]]:
    """The widths the snapshots synthesise at step `at` within MAX_PROFILE_ERROR, sampled on a
    grid of 96 sigma_rel from 1e-4 to sqrt(1/12) spaced by a factor of 1.09.

    Args:
        entries: read_index's entries.
        at: the step to synthesise at.

    Returns:
        (smallest, largest) sigma_rel of the grid that passes, or None when none does.
    """
    used = [(e["t"], e["gamma"]) for e in entries if e["t"] <= at]
    if not used:
        return None
    gram = _gram(used)
    passing = [s for s in _sigma_grid() if profile_fit(used, at, sigma_rel_to_gamma(s), gram)[1] <= MAX_PROFILE_ERROR]
    return (float(passing[0]), float(passing[-1])) if passing else None


def _load_snapshot(folder, entry, first):
    """One snapshot's {name: float64 array}, checked against the first one loaded (`first`)."""
    path = os.path.join(folder, entry["file"])
    what = f"post-hoc snapshot {path} (t {entry['t']})"
    weights = safe_load(path, "post-hoc snapshot")
    if not isinstance(weights, dict) or not weights or not all(isinstance(k, str) for k in weights):
        raise CheckpointError(f"{what} is not a state dict of averaged weights")
    if first is not None and set(weights) != set(first):
        missing, extra = sorted(set(first) - set(weights)), sorted(set(weights) - set(first))
        raise CheckpointError(f"{what} holds other entries than the first snapshot used: missing {missing[:5]}, "
                              f"extra {extra[:5]}")
    for name, value in weights.items():
        shape = value.shape if first is None else first[name].shape
        problem = tensor_problem(value, shape)
        if problem:
            raise CheckpointError(f"{what}: {name!r} {problem}")
    bad = first_nonfinite_name(weights)
    if bad is not None:
        raise CheckpointError(f"{what}: {bad!r} holds NaN or Inf")
    return {name: np.asarray(value.numpy() if hasattr(value, "numpy") else value, np.float64)
            for name, value in weights.items()}


def synthesis_step(entries: Sequence[Dict[str, Any]], at: Optional[int] = None) -> int:
    """The step to synthesise at: `at`, an integer within the snapshots' steps (a ConfigError
    naming them otherwise), or by default the last snapshot's.

    Args:
        entries: read_index's entries.
        at: the step asked for, or None.

    Returns:
        The step.
    """
    steps = sorted({e["t"] for e in entries})
    if at is None:
        return steps[-1]
    if not is_integer(at, 1) or not steps[0] <= at <= steps[-1]:
        raise ConfigError(f"at {at!r} is outside the stored snapshots' steps {steps[0]} to {steps[-1]}: synthesise at "
                          "an update in that range")
    return int(at)


def check_synthesis(snapshot_dir: Union[str, Path], gamma: float, at: Optional[int] = None,
                    entries: Optional[List[Dict[str, Any]]] = None) -> Tuple[int, List[Dict[str, Any]], np.ndarray, float]:
    """Whether the snapshots can synthesise the gamma-profile average at step `at`: a ConfigError
    naming the allowed range when `at` is outside the snapshots' steps or the profile is farther
    than MAX_PROFILE_ERROR from every combination of theirs.

    Args:
        snapshot_dir: the folder PostHocEMA wrote.
        gamma: the wanted exponent, a finite number >= 0.
        at: the step to synthesise at; by default the last snapshot's.
        entries: read_index(snapshot_dir), when already read.

    Returns:
        (at, the index entries used, their coefficients, the profile error).
    """
    sigma_rel = gamma_to_sigma_rel(gamma)  # validates gamma
    folder = os.fspath(snapshot_dir)
    entries = read_index(folder) if entries is None else entries
    at = synthesis_step(entries, at)
    used = [e for e in entries if e["t"] <= at]
    coefficients, error = profile_fit([(e["t"], e["gamma"]) for e in used], at, float(gamma))
    if not error <= MAX_PROFILE_ERROR:
        allowed = synthesis_range(entries, at)
        can = (f"they synthesise sigma_rel {allowed[0]:.3g} to {allowed[1]:.3g} there" if allowed
               else "they synthesise no width there")
        raise ConfigError(f"sigma_rel {sigma_rel:.3g} (gamma {gamma:.4g}) at update {at} is beyond what the snapshots "
                          f"in {folder} express (the closest combination misses the profile by {error:.0%}, more than "
                          f"{MAX_PROFILE_ERROR:.0%}); {can}")
    return at, used, coefficients, error


def synthesize(snapshot_dir: Union[str, Path], sigma_rel: Optional[float] = None, gamma: Optional[float] = None,
               at: Optional[int] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """The average of a power-function profile, from the snapshots in `snapshot_dir`.

    Refused with one ConfigError naming the allowed range: a step `at` outside the snapshots'
    steps, and a profile the snapshots cannot express (their best combination farther than
    MAX_PROFILE_ERROR from it). A snapshot that lacks an entry, holds another shape or NaN/Inf is a
    CheckpointError; a result outside float32's range a NonFiniteError.

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
    if gamma is None:
        gamma = sigma_rel_to_gamma(sigma_rel)
    else:
        sigma_rel = gamma_to_sigma_rel(gamma)  # validates gamma
        gamma = float(gamma)
    folder = os.fspath(snapshot_dir)
    at, used, coefficients, error = check_synthesis(folder, gamma, at)
    total = first = None
    for entry, coefficient in zip(used, coefficients):
        weights = _load_snapshot(folder, entry, first)
        if total is None:
            first, total = weights, {name: np.zeros(value.shape, np.float64) for name, value in weights.items()}
        for name, value in weights.items():
            total[name] += coefficient * value
    with np.errstate(over="ignore"):  # beyond float32's range is inf, refused just below
        averaged = {name: value.astype(np.float32) for name, value in total.items()}
    bad = first_nonfinite_name(averaged)
    if bad is not None:
        raise NonFiniteError(f"the synthesised sigma_rel {sigma_rel:.3g} average of {bad!r} is beyond float32's range")
    info = {"gamma": gamma, "sigma_rel": gamma_to_sigma_rel(gamma), "at": at, "error": error,
            "snapshots": [{**e, "coefficient": float(c)} for e, c in zip(used, coefficients)]}
    return averaged, info

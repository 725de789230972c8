"""tools/posthoc_ema.py: EMA weights of any length after training, from the post-hoc snapshots.

A run with `ema_posthoc: true` stored power-function EMA snapshots in <output>/<name>/posthoc/.
For each requested profile (relative width sigma_rel, or exponent gamma) this synthesises the
averaged weights (paddle_ema.posthoc.synthesize), completes them with the run's final raw
weights for entries that are not averaged, optionally recomputes BatchNorm statistics, writes
<output>/<name>/posthoc_sigma<S>.pdparams and, with --eval, reports the accuracy of each.

Every profile is checked against what the snapshots can express before anything is written: a
requested one outside it is refused with the range; the default sweep leaves such widths out.
"""

import os

from ..errors import ConfigError
from ..infra.checkpoint import atomic_save, safe_load
from ..posthoc import check_synthesis, gamma_to_sigma_rel, read_index, sigma_rel_to_gamma, synthesis_step, synthesize
from .average_protocol import check_finite

__all__ = ["DEFAULT_SWEEP", "posthoc_weights", "parse_profiles", "output_name"]

DEFAULT_SWEEP = (0.02, 0.04, 0.06, 0.08, 0.10, 0.15, 0.20, 0.25)


def output_name(sigma_rel):
    """posthoc_sigma<S>.pdparams: S with three decimals when they are the exact value (0.050), else
    the shortest text that is (0.1004): two different widths never share a file."""
    short = f"{sigma_rel:.3f}"
    return f"posthoc_sigma{short if float(short) == sigma_rel else repr(float(sigma_rel))}.pdparams"


def parse_profiles(sigma_rels, gammas):
    """([(sigma_rel, gamma)] requested, True), or the default sweep and False; each validated, and
    no two writing one file."""
    profiles = [(float(s), sigma_rel_to_gamma(s)) for s in sigma_rels or []]
    profiles += [(gamma_to_sigma_rel(g), float(g)) for g in gammas or []]
    seen = {}
    for sigma_rel, gamma in profiles:
        name = output_name(sigma_rel)
        if name in seen:
            raise ConfigError(f"--sigma-rel/--gamma ask for sigma_rel {sigma_rel!r} (gamma {gamma:.6g}) twice "
                              f"(after gamma {seen[name]:.6g}): each profile is written once, to {name}")
        seen[name] = gamma
    if profiles:
        return profiles, True
    return [(s, sigma_rel_to_gamma(s)) for s in DEFAULT_SWEEP], False


def _expressible(snapshots, entries, profiles, at, explicit):
    """The profiles the snapshots express at `at` and the default sweep's widths left out; a
    requested profile they do not express is check_synthesis's ConfigError, raised before anything
    is written."""
    at = synthesis_step(entries, at)  # a step outside the snapshots' is refused, sweep or not
    kept, left_out = [], []
    for sigma_rel, gamma in profiles:
        try:
            check_synthesis(snapshots, gamma, at, entries)
        except ConfigError:
            if explicit:
                raise
            left_out.append(sigma_rel)
            continue
        kept.append((sigma_rel, gamma))
    if not kept:
        raise ConfigError(f"none of the default sweep's widths {list(DEFAULT_SWEEP)} can be synthesised from the "
                          f"snapshots in {snapshots}; give --sigma-rel within what they express")
    return kept, left_out


def posthoc_weights(cfg, run_dir, snapshots, profiles, at=None, update_bn=False, do_eval=False, explicit=True):
    """([(sigma_rel, gamma, path, accuracy or None, at)] for each profile, [sigma_rel of the default sweep
    left out]); writes one .pdparams each."""
    import paddle

    from .builders import build_datasets, build_model, set_device
    from .checkpoint_averaging import recompute_bn_statistics
    from .checkpoint_files import check_fits, copy_state
    from .evaluation import evaluate

    entries = read_index(snapshots)  # checked before the model and data are built
    profiles, left_out = _expressible(snapshots, entries, profiles, at, explicit)
    raw_file = next((os.path.join(run_dir, f"model_final{s}") for s in (".pdema", ".pdparams")
                     if os.path.exists(os.path.join(run_dir, f"model_final{s}"))), None)
    if raw_file is None:
        raise ConfigError(f"{run_dir} has no model_final checkpoint to take the non-averaged entries from")
    set_device(cfg)
    data = build_datasets(cfg, ("train", "eval") if do_eval else ("train",))
    model = build_model(cfg, data["train"])
    base = safe_load(raw_file, "final raw weights")
    check_fits(model, base, f"weights {raw_file}")
    results = []
    for sigma_rel, gamma in profiles:
        averaged, info = synthesize(snapshots, gamma=gamma, at=at)
        unknown = sorted(set(averaged) - set(base))
        if unknown:
            raise ConfigError(f"the snapshots in {snapshots} hold entries this model lacks: {unknown[:5]}")
        wrong = [f"{k} {list(v.shape)} vs {list(base[k].shape)}" for k, v in averaged.items()
                 if list(v.shape) != list(base[k].shape)]
        if wrong:
            raise ConfigError(f"the snapshots in {snapshots} hold entries of other shapes than this model's: {wrong[:3]}")
        state = {name: paddle.to_tensor(averaged[name]).astype(value.dtype) if name in averaged else value
                 for name, value in base.items()}
        model.set_state_dict(state)
        if update_bn:
            recompute_bn_statistics(model, data["train"], cfg["EvalReader"]["batch_size"], cfg["update_bn_batches"])
        weights = copy_state(model.state_dict())
        name = output_name(sigma_rel)
        check_finite(weights, f"the post-hoc weights of sigma_rel {sigma_rel:g} at update {info['at']}")
        path = os.path.join(run_dir, name)
        atomic_save(weights, path)
        accuracy = evaluate(model, data["eval"], cfg["EvalReader"]["batch_size"]) if do_eval else None
        results.append((sigma_rel, info["gamma"], path, accuracy, info["at"]))
    return results, left_out

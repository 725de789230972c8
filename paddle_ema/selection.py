"""Which parameters an average covers.

By default: trainable parameters only (stop_gradient=False). Paddle keeps BatchNorm's running
statistics `_mean`/`_variance` as parameters with stop_gradient=True; they are skipped, so the live
statistics stay in the model when averaged weights are swapped in. `include_stop_gradient=True`
averages them (and other frozen parameters) like weights.

Exclusion patterns: a plain string excludes names that contain it (PaddleDetection's
`ema_black_list`); a string starting with "re:" or a compiled `re.Pattern` excludes names that the
regular expression matches (re.search). A pattern that matches no candidate is an error: a typo
must not silently average everything.
"""

import re

from . import _compat
from .errors import SelectionError

__all__ = ["unwrap", "select_parameters", "compile_patterns", "is_floating", "batchnorm_statistic_names",
           "black_listed_keys"]

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def unwrap(model):
    """The bare Layer inside `paddle.DataParallel` (and other wrappers that keep it as `_layers`)."""
    import paddle

    while isinstance(model, paddle.DataParallel) or (
        type(model).__name__ in ("DataParallel", "DistributedModel", "GroupShardedStage2", "GroupShardedStage3")
        and hasattr(model, "_layers")
    ):
        model = _compat.unwrap_layers(model)
    return model


def batchnorm_statistic_names(model, classes=None):
    """Names (as in `model.named_parameters()` / `state_dict()`, wrapper prefixes removed) of the
    running statistics `_mean`/`_variance` of the model's BatchNorm layers.

    `classes` narrows which layers count (PaddleDetection's `ema_filter_no_grad` knows only
    BatchNorm2D and SyncBatchNorm); by default every BatchNorm kind does.
    """
    classes = _compat.batchnorm_classes() if classes is None else tuple(classes)
    layer = unwrap(model)
    names = set()
    for prefix, sub in layer.named_sublayers(include_self=True):
        if isinstance(sub, classes):
            mean, variance = _compat.batchnorm_statistics(sub)
            for param in (mean, variance):
                if param is not None:
                    names.add(_qualified(prefix, param, sub))
    return names


def _qualified(prefix, param, layer):
    local = next(name for name, p in layer.named_parameters(include_sublayers=False) if p is param)
    return f"{prefix}.{local}" if prefix else local


def black_listed_keys(model, black_list=(), filter_no_grad=False, batchnorm_classes=None):
    """State-dict keys that PaddleDetection-style averages leave live: keys containing any of the
    `black_list` substrings and, with `filter_no_grad`, stop_gradient parameters other than
    BatchNorm statistics (of `batchnorm_classes`, every BatchNorm kind by default)."""
    keys = unwrap(model).state_dict().keys()
    listed = {key for key in keys for sub in (black_list or ()) if sub in key}
    if filter_no_grad:
        statistics = batchnorm_statistic_names(model, batchnorm_classes)
        listed.update(name for name, param in unwrap(model).named_parameters()
                      if param.stop_gradient and name not in statistics)
    return listed


def is_floating(tensor):
    return any(str(tensor.dtype).endswith(name) for name in _FLOAT_DTYPES)


def compile_patterns(patterns):
    """[(original, predicate)] for exclusion patterns; validates their types and regexes."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append((pattern.pattern, pattern.search))
        elif isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                regex = re.compile(pattern[3:])
            except re.error as exc:
                raise SelectionError(f"exclude pattern {pattern!r} is not a valid regular expression: {exc}") from None
            compiled.append((pattern, regex.search))
        elif isinstance(pattern, str) and pattern:
            compiled.append((pattern, lambda name, sub=pattern: sub in name))
        else:
            raise SelectionError(
                f"exclude entries are non-empty substrings, 're:<regex>' strings or re.Pattern objects, got {pattern!r}"
            )
    return compiled


def select_parameters(model, include_stop_gradient=False, exclude=None):
    """[(name, parameter)] of the averaged parameters, in the model's order, names without wrapper prefixes."""
    layer = unwrap(model)
    candidates = [
        (name, param)
        for name, param in layer.named_parameters()
        if is_floating(param) and (include_stop_gradient or not param.stop_gradient)
    ]
    patterns = compile_patterns(exclude)
    unmatched = [text for text, matches in patterns if not any(matches(name) for name, _ in candidates)]
    if unmatched:
        sample = ", ".join(name for name, _ in candidates[:6]) + (", ..." if len(candidates) > 6 else "")
        raise SelectionError(
            f"exclude pattern(s) {unmatched} match no averaged parameter; parameter names look like: {sample}"
        )
    return [(name, param) for name, param in candidates if not any(matches(name) for _, matches in patterns)]

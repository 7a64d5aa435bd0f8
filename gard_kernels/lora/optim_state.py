"""Optimizer state that follows a LoRA factor through a rank change.

A rank change slices a factor along its rank dimension (shrink by norm), pads it (grow), or
replaces it by a rotated factor (shrink by SVD). Elementwise optimizers (SGD, Adam, AdamW,
RMSprop, Adagrad, ...) keep per-parameter state that is either shaped like the parameter
(moments, momentum buffers) or scalar (step counters), and both have an obvious image under a
slice or pad: tensors are sliced along the rank dimension and zero-padded for new directions,
scalars are kept. Any other state (Adafactor-style row/column factors, L-BFGS histories) has no
such image, so it is refused with an error before anything is changed.

Grown directions and bias correction. Adam-style optimizers keep one `step` t per tensor, so a
direction appended late in training meets zero moments but bias corrections 1 - beta^t of ~1:
its first update would be (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr per element, and ~6.6 lr ten
steps later. Instead every grown element runs as a fresh Adam of its own. Its age n (steps since
it was grown) is kept in the state (`NEW_KEY`, parameter-shaped, sliced, padded and
checkpointed with the moments), and the stored moments are the element's own fresh moments
scaled by c = (1 - beta^t) / (1 - beta^n), so that the optimizer's tensor-wide bias correction
divides by exactly the element's own 1 - beta^n. A step pre-hook re-scales them as t and n
advance: with m_s = c_old m_f stored, setting m = (c_new / c_old) m_s + (1 - beta1) (c_new - 1)
/ beta1 * g before the optimizer's m <- beta1 m + (1 - beta1) g leaves m = c_new m_f' (the same
for exp_avg_sq with g^2 and beta2, and for amsgrad's running max). The first update of a grown
element is therefore lr * g / (|g| + eps), and every later one is a fresh Adam's, at any step
count; an element leaves the tracking once both c are within 1e-3 of 1 (about 7,000 steps for
beta2 = 0.999), when the tensor-wide correction is its own. Optimizers without bias correction
(SGD with momentum, RMSprop, Adagrad) need nothing: a zero-padded buffer gives exactly, or at
most, a fresh optimizer's first update.
"""
from __future__ import annotations

import inspect
import numbers
import weakref
from typing import Iterable

import torch

__all__ = [
    "NEW_KEY",
    "check_remappable",
    "check_optimizer_supported",
    "mark_new_directions",
    "remap_along",
    "remap_optimizer_state",
    "rescale_optimizer_state",
    "reset_optimizer_state",
    "track_new_directions",
]

# State key of the per-element age of grown directions: 0 for an ordinary element, 1 + the
# steps taken since the grow for a tracked one. Float: Optimizer.load_state_dict casts floating
# state to the parameter's dtype, and float32 counts steps exactly far beyond the tracking span.
NEW_KEY = "gard_new_directions"
# A tracked element is released once both bias-correction ratios are this close to 1.
_RELEASE_TOLERANCE = 1e-3

# What to use instead of an optimizer whose state cannot follow a resize.
_WHAT_WORKS = (
    "Use torch.optim.AdamW (the Hugging Face Trainer's optim=\"adamw_torch\"): the LoRA factors are small, so "
    "8 bytes of state per LoRA parameter cost little next to the base model. In static mode "
    "(mode=\"static\") with gard.profile(...) any optimizer works, attached before the profile (the one "
    "allocation comes before its first step, so it holds no state yet) or after it (no resize follows)."
)


# optimizer -> the parameters whose state holds NEW_KEY. The optimizer's step pre-hook, installed
# once, only looks at these, so it costs a dictionary look-up when nothing waits.
_waiting: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[torch.Tensor]]" = weakref.WeakKeyDictionary()


def _is_scalar(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return value is None or isinstance(value, (numbers.Number, bool))


def check_remappable(optimizer: torch.optim.Optimizer | None, params: Iterable[torch.Tensor]) -> None:
    """Raise if some state of `optimizer` for `params` cannot follow a slice / pad.

    Call it before changing anything, so a refused rank change leaves the model untouched.

    Raises:
        TypeError: naming the optimizer class, the state key and shape, and what to do instead.
    """
    if optimizer is None:
        return
    for param in params:
        for key, value in optimizer.state.get(param, {}).items():
            if _is_scalar(value):
                continue
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                continue
            what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(
                f"{type(optimizer).__name__} keeps state[{key!r}] ({what}) for a LoRA factor of shape "
                f"{tuple(param.shape)}: it is neither shaped like the parameter nor a scalar (e.g. "
                "factored second moments), so it cannot follow a rank change. Use an optimizer with "
                "elementwise state (torch.optim.AdamW, Adam, SGD, RMSprop, ...), whose state GARD carries "
                "through every rank change."
            )


def remap_along(t: torch.Tensor, index: torch.Tensor, new_size: int, dim: int) -> torch.Tensor:
    """New tensor whose slots [0, len(index)) along `dim` are t's slots `index`, zeros after.

    Args:
        t: tensor of any shape.
        index: [k] int64 positions along `dim` of t, k <= new_size.
        new_size: size of the result along `dim`.
        dim: the rank dimension (0 for lora_A [r, d_in], 1 for lora_B [d_out, r]).
    """
    shape = list(t.shape)
    shape[dim] = new_size
    out = t.new_zeros(shape)
    out.narrow(dim, 0, index.numel()).copy_(t.index_select(dim, index.to(t.device)))
    return out


def remap_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, index: torch.Tensor, new_size: int, dim: int
) -> None:
    """Make `optimizer`'s state for `param` follow a slice / pad along the rank dimension.

    Every state tensor shaped like `param` (exp_avg, exp_avg_sq, max_exp_avg_sq,
    momentum_buffer, ...) becomes remap_along(state, index, new_size, dim): kept directions keep
    their state exactly, new ones start from zero. Scalar state (step counters) is kept. Call it
    BEFORE `param.data` takes its new shape (state is matched against the current shape).

    Args:
        optimizer: the optimizer holding `param`, or None (nothing to do).
        param: the LoRA factor.
        index: [k] int64 old positions kept, in their new order.
        new_size: new size of the rank dimension (>= k; slots k.. are new directions).
        dim: the rank dimension of `param`.
    Raises:
        TypeError: state that is neither parameter-shaped nor scalar (see check_remappable).
    """
    if optimizer is None or param not in optimizer.state:
        return
    check_remappable(optimizer, [param])
    state = optimizer.state[param]
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            state[key] = remap_along(value, index, new_size, dim)


# State keys of torch's elementwise optimizers -> the power of the gradient each one scales with
# (moments and momentum buffers 1, second moments and accumulated squares 2; ages 0).
_GRADIENT_POWER = {
    "exp_avg": 1, "momentum_buffer": 1, "grad_avg": 1,
    "exp_avg_sq": 2, "max_exp_avg_sq": 2, "square_avg": 2, "sum": 2, "acc_delta": 2,
    NEW_KEY: 0,
}


def rescale_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, factor: float) -> None:
    """Make `optimizer`'s state for `param` follow param <- factor * param with the loss unchanged.

    The gradient of the rescaled parameter is the old one / factor, so a state tensor that sums
    the gradient's k-th powers (SGD momentum and Adam's first moment k = 1, Adam's second moment
    and Adagrad's sums k = 2) is divided by factor^k: the next step then continues the same
    averages of gradients of the new parameter. Scalar state (step counters) is kept. Call it
    BEFORE changing the parameter; everything is checked before anything changes.

    Raises:
        TypeError: a parameter-shaped state tensor whose relation to the gradient is unknown.
    """
    if optimizer is None or param not in optimizer.state:
        return
    state = optimizer.state[param]
    _check_rescalable(optimizer, state)
    for key, value in state.items():
        power = _GRADIENT_POWER.get(key, 0)
        if power and isinstance(value, torch.Tensor) and value.dim() > 0:
            value.div_(factor**power)


def _check_rescalable(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Refuse parameter-shaped state whose relation to the gradient is unknown (rescale_optimizer_state)."""
    unknown = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and k not in _GRADIENT_POWER]
    if unknown:
        raise TypeError(
            f"{_qualified_name(optimizer)} keeps state {unknown} for a LoRA factor whose scale changes with its "
            f"rank (scaling_rule); GARD knows how {sorted(_GRADIENT_POWER)} follow a rescaled parameter. Use "
            "scaling_rule='constant' or an optimizer such as torch.optim.AdamW"
        )


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> None:
    """Forget `optimizer`'s state for `param`, so the next step treats it as a new parameter.

    Used after an SVD re-factorisation: the factors are rotated, so elementwise moments of the
    old coordinates describe nothing in the new ones. Dropping the state, counters included,
    restarts Adam's bias correction with the moments; zeroing the moments but keeping a large
    step count would make the first update about (1 - beta1) / sqrt(1 - beta2) ~ 3 times lr
    per element.
    """
    if optimizer is not None:
        optimizer.state.pop(param, None)


def check_optimizer_supported(
    optimizer: torch.optim.Optimizer, probe_shape: tuple[int, int] = (3, 2), rescaled: bool = False
) -> None:
    """Raise now if `optimizer`'s state could not follow a rank change later.

    Optimizers create state lazily, so factored or quantised state (Adafactor's row/column
    factors, 8-bit Adam's blockwise scales) would otherwise only surface at the first resize,
    mid-run. The check runs one step of the same class with the same options on a throwaway
    parameter of `probe_shape` and checks the state it creates, plus the state the optimizer
    already has. bitsandbytes' 8-bit optimizers keep 32-bit state below `min_8bit_size` elements
    (4096 by default): pass the shape of the largest LoRA factor, so the trial meets the state
    the real factors will get.

    Args:
        optimizer: the optimizer to check.
        probe_shape: shape of the trial parameter (default (3, 2)).
        rescaled: a rank change also rescales B (a rank-dependent scaling_rule): its state must
            be one whose relation to the gradient GARD knows (rescale_optimizer_state).
    Raises:
        TypeError: naming the optimizer and what works instead.
    """
    name = type(optimizer).__name__
    if getattr(optimizer, "is_paged", False):
        # bitsandbytes' pager keeps its own list of the state buffers it allocated: a resized
        # (new) buffer would not be paged, and the old one would stay allocated for the run.
        raise TypeError(
            f"{_qualified_name(optimizer)} is a paged optimizer: its state buffers are held by bitsandbytes' "
            f"pager, which does not follow a rank change. {_WHAT_WORKS}"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        _check_not_quantised(optimizer, optimizer.state.get(param, {}))
    check_remappable(optimizer, params)
    if rescaled:
        for param in params:
            _check_rescalable(optimizer, optimizer.state.get(param, {}))
    # On the parameters' device: some optimizers only step there (bitsandbytes without a CPU backend).
    device = params[0].device if params else None
    probe = torch.nn.Parameter(torch.zeros(probe_shape, device=device))
    accepted = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    # defaults may hold derived entries the constructor does not take (AdamW's decoupled_weight_decay).
    options = {k: v for k, v in optimizer.defaults.items() if takes_any or k in accepted}
    # bitsandbytes keeps the options that decide 8-bit state (optim_bits, min_8bit_size) outside
    # `defaults`, in an `args` namespace its constructors take back as is.
    if "args" in accepted and hasattr(optimizer, "args"):
        options["args"] = optimizer.args
    try:
        trial = type(optimizer)([probe], **options)
        probe.grad = torch.ones_like(probe)
        trial.step()
    except Exception as error:  # any failure means the probe says nothing; refuse clearly
        raise TypeError(
            f"GARD cannot verify that {name}'s state can follow rank changes (a trial "
            f"step on a small parameter failed: {error}). Use an optimizer with elementwise state "
            "(torch.optim.AdamW, Adam, SGD, RMSprop, ...)"
        ) from error
    _check_not_quantised(optimizer, trial.state[probe])
    if rescaled:
        _check_rescalable(optimizer, trial.state[probe])
    try:
        check_remappable(trial, [probe])
    except TypeError as error:
        raise TypeError(f"attach_optimizer: {error}") from None


def _qualified_name(optimizer: torch.optim.Optimizer) -> str:
    """The class name for torch's optimizers, with its module for others: the Trainer's 8-bit and
    paged optimizers are bitsandbytes classes named like torch's (bitsandbytes.optim.adamw.AdamW)."""
    cls = type(optimizer)
    return cls.__name__ if cls.__module__.startswith("torch.") else f"{cls.__module__}.{cls.__name__}"


def _check_not_quantised(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Refuse integer (quantised) elementwise state, e.g. bitsandbytes' 8-bit Adam moments."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and not value.is_floating_point():
            raise TypeError(
                f"{_qualified_name(optimizer)} keeps state[{key!r}] as {value.dtype} (quantised state, e.g. an "
                "8-bit optimizer's blockwise-quantised moments): it cannot follow a rank change. " + _WHAT_WORKS
            )


def mark_new_directions(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor, start: int, dim: int
) -> None:
    """Start slots [start, end) of `param` along `dim` as fresh Adam elements (age 0).

    Call it after remap_optimizer_state has padded the state to the new size. Does nothing
    when the optimizer keeps no Adam-style moments for `param` (no state yet: its first step
    is a fresh start anyway).
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state or "exp_avg" not in state or "exp_avg_sq" not in state or "step" not in state:
        return
    if not any("betas" in group and any(p is param for p in group["params"]) for group in optimizer.param_groups):
        return  # moments without Adam's (beta1, beta2): no bias correction to restore
    age = state.get(NEW_KEY)
    if age is None or age.shape != param.shape:
        age = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    age.narrow(dim, start, param.shape[dim] - start).fill_(1.0)
    state[NEW_KEY] = age
    track_new_directions(optimizer)


def track_new_directions(optimizer: torch.optim.Optimizer) -> None:
    """Find the parameters whose state holds NEW_KEY (e.g. after load_state_dict) and make sure
    the optimizer keeps their grown elements fresh at its next steps."""
    if optimizer not in _waiting:
        optimizer.register_step_pre_hook(_keep_new_directions_fresh)
    _waiting[optimizer] = [p for p, state in optimizer.state.items() if NEW_KEY in state]


@torch.no_grad()
def _keep_new_directions_fresh(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step pre-hook: re-scale the moments of tracked elements (see the module docstring)."""
    params = _waiting.get(optimizer)
    if not params:
        return
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    still = []
    for param in params:
        state = optimizer.state.get(param)
        group = group_of.get(id(param))
        if not state or NEW_KEY not in state or group is None:
            continue
        still.append(param)
        if param.grad is None or param.grad.is_sparse or state[NEW_KEY].shape != param.shape:
            # Adam skips a parameter without a gradient: neither t nor the ages advance.
            continue
        _rescale_tracked(optimizer, group, param, state)
        if NEW_KEY not in state:
            still.pop()
    _waiting[optimizer] = still


def _rescale_tracked(optimizer, group, param, state) -> None:
    beta1, beta2 = group["betas"]
    stored = state[NEW_KEY]
    tracked = stored > 0
    exp_avg = state["exp_avg"]
    g = param.grad.to(exp_avg.dtype)
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    if group.get("weight_decay", 0) and not decoupled:
        # Adam's L2 form adds weight_decay * p to the gradient before the moments.
        g = g + group["weight_decay"] * param.to(g.dtype)
    if group.get("maximize", False):
        g = -g
    t = float(state["step"]) + 1.0  # the step about to be taken
    n = stored[tracked].to(torch.float64)  # the element's own step count after this step
    g = g[tracked].to(torch.float64)

    def ratios(beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        # c = (1 - beta^t) / (1 - beta^n) after this step, and c_new / c_old (0 before the first).
        c_new = (1.0 - beta**t) / (1.0 - torch.pow(beta, n))
        c_old = (1.0 - beta ** (t - 1.0)) / (1.0 - torch.pow(beta, n - 1.0)).clamp_min(1e-300)
        return c_new, torch.where(n > 1, c_new / c_old, torch.zeros_like(n))

    c1, r1 = ratios(beta1)
    c2, r2 = ratios(beta2)
    exp_avg[tracked] = (r1 * exp_avg[tracked] + (1.0 - beta1) * (c1 - 1.0) / beta1 * g).to(exp_avg.dtype)
    exp_avg_sq = state["exp_avg_sq"]
    exp_avg_sq[tracked] = (r2 * exp_avg_sq[tracked] + (1.0 - beta2) * (c2 - 1.0) / beta2 * g.square()).to(
        exp_avg_sq.dtype
    )
    if "max_exp_avg_sq" in state:
        peak = state["max_exp_avg_sq"]
        peak[tracked] = (r2 * peak[tracked]).to(peak.dtype)
    released = (c1 - 1.0 <= _RELEASE_TOLERANCE) & (c2 - 1.0 <= _RELEASE_TOLERANCE)
    stored[tracked] = torch.where(released, torch.zeros_like(n), n + 1.0).to(stored.dtype)
    if not bool((stored > 0).any()):
        del state[NEW_KEY]

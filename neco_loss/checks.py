"""Argument checks shared by the public functions: each error names the argument and the value."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

MISMATCHES_SHOWN = 3  # error_cause: the first of torch's "size mismatch for ..." lines


def check_choice(value: str, name: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Raises:
        ValueError: Naming ``name``, the value seen and the valid choices.

    """
    valid = list(choices)
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid} but is {value!r}.")
    return value


def check_positive_finite(value: float, name: str) -> float:
    """Return ``value`` as a float if it is a finite number > 0.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite or not positive.

    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number but is {type(value).__name__}: {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0 but is {value!r}.")
    return float(value)


def check_float_tensor(x: object, name: str, dims: int, *, finite: bool = True) -> Tensor:
    """Return ``x`` if it is a floating tensor with ``dims`` dimensions (and finite values).

    Args:
        x: The argument.
        name: Its name in the error.
        dims: Number of dimensions it must have.
        finite: Also check that it holds no NaN or Inf (one host sync; callers checking many
            tensors pass ``False`` and call ``check_finite`` once for all of them).

    Raises:
        TypeError: If ``x`` is not a tensor or not floating point.
        ValueError: If it has another number of dimensions or holds NaN or Inf.

    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor but is {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype but has dtype {x.dtype}.")
    if x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D but has shape {tuple(x.shape)}.")
    if finite:
        check_finite({name: x})
    return x


def check_finite(tensors: Mapping[str, Tensor]) -> None:
    """Raise unless every tensor holds only finite values; one host sync for all of them.

    Args:
        tensors: ``{name: tensor}`` on one device.

    Raises:
        ValueError: Naming the first tensor with NaN or Inf and how many it holds.

    """
    if all_finite(tensors.values()):
        return
    name, x = next((name, x) for name, x in tensors.items() if not all_finite([x]))
    bad = int((~torch.isfinite(x)).sum())
    raise ValueError(f"{name} must be finite but holds {bad} NaN or Inf values.")


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor holds only finite values; one host sync for all of them."""
    flags = [torch.isfinite(x).all() for x in tensors]
    return not flags or bool(torch.stack(flags).all())


def nonfinite_tensors(state: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating tensors of ``state`` (e.g. a ``state_dict``) holding NaN or Inf."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest choice, or ``""``."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def nonfinite_weights(state: Mapping[str, Tensor], source: str | None) -> str | None:
    """Why starting weights make NaN/Inf features (a clause for an error line), or ``None``.

    Args:
        state: The model's ``state_dict`` before its first step.
        source: Where the weights came from (a file or a shipped name), if known.

    """
    broken = nonfinite_tensors(state)
    if not broken:
        return None
    where = f" ({source})" if source else ""
    return (
        f": the starting weights{where} hold NaN/Inf values, in {len(broken)} tensors, "
        f"e.g. {broken[:3]}; start from finite weights"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype to compute in: float32 for half types (too coarse for Q), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def error_cause(error: BaseException) -> str:
    """An exception's message as one line that keeps its cause, for ``error:`` lines.

    torch's ``weights_only`` load errors put their cause on a later line, after advice that
    does not apply to a tool that loads tensors only: the advice is dropped, the cause kept.
    Other messages keep every line, joined; of a long list of size mismatches, the first few.
    """
    text = str(error).replace("\x1b[1m", "").replace("\x1b[0m", "")  # torch's bold
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        advice = ("(1)", "(2)", "Check the documentation")
        cause = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines[1:]]
        cause = [line for line in cause if not line.startswith(advice)]
        objects = "it holds objects other than tensors, which no weights file needs"
        return f"Weights only load failed: {objects}: {' '.join(cause)}"
    mismatches = [line for line in lines if line.startswith("size mismatch for")]
    if len(mismatches) > MISMATCHES_SHOWN:  # torch lists every tensor of a wrong-sized model
        more = len(mismatches) - MISMATCHES_SHOWN
        lines = [line for line in lines if line not in mismatches[MISMATCHES_SHOWN:]]
        lines.append(f"(and {more} more size mismatches)")
    return " ".join(lines) or type(error).__name__

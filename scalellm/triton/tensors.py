"""Small array helpers shared by the Python-backend models in ``model_repository/``.

Kept free of ``triton_python_backend_utils`` so they can be imported (and tested) outside Triton.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from scalellm.triton.contract import Field, Tensor


Get = Callable[[str], "np.ndarray | None"]  # a request's input by name; None when the request does not carry it


class InvalidInput(ValueError):
    """A request field is out of bounds; the message names the field and the bound."""


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def resolve_engine_dir(args: dict, value: str) -> Path:
    """``engine_dir`` may be relative to the model repository root (the parent of this model's dir)."""
    path = Path(value)
    if not path.is_absolute():
        path = Path(args["model_repository"]).resolve().parent / path
    return path.resolve()


def scalar(array: np.ndarray | None, name: str, default: Any = None) -> Any:
    """The one value of a per-request [1, 1] (or [1]) input; ``default`` when the input is absent."""
    if array is None:
        return default
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidInput(f"{name} must hold exactly one value per request (got {flat.size})")
    value = flat[0]
    if isinstance(value, bytes | np.bytes_):
        return value
    return value.item() if isinstance(value, np.generic) else value


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise InvalidInput unless low (<= or <) value <= high."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number (got {value})")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidInput(f"{name} must be {bound} (got {value})")
    if high is not None and value > high:
        raise InvalidInput(f"{name} must be <= {high} (got {value})")


def decode_words(array: np.ndarray | None, name: str) -> list[str]:
    """A BYTES list input (stop_words / bad_words) as strings; invalid UTF-8 is an error."""
    if array is None:
        return []
    words = []
    for item in np.asarray(array).reshape(-1):
        if isinstance(item, str):
            words.append(item)
            continue
        if not isinstance(item, bytes | np.bytes_):
            raise InvalidInput(f"{name} entries must be strings (got {type(item).__name__})")
        try:
            words.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{name} is not valid UTF-8: {exc}") from None
    return [w for w in words if w]


def is_set(array: np.ndarray | None) -> bool:
    """Whether an optional input asks for something: present, non-empty, and not all false/empty strings."""
    if array is None:
        return False
    flat = np.asarray(array).reshape(-1)
    return any(bool(v) for v in flat)


def check_refused(get: Callable[[str], np.ndarray | None], fields: Iterable[Field]) -> None:
    """Refuse, naming it, any field of the contract that is declared but not implemented."""
    for f in fields:
        if f.refused and is_set(get(f.model_input)):
            raise InvalidInput(f"{f.name} is not supported: {f.refused}")


def check_required(get: Callable[[str], np.ndarray | None], inputs: Iterable[Tensor]) -> None:
    """Refuse a request without one of the model's required inputs, naming it (Triton only counts inputs)."""
    for tensor in inputs:
        if tensor.required and get(tensor.name) is None:
            raise InvalidInput(f"{tensor.label} is required")

"""Engine directories: written once by build_engines.py, read back fast by the model runner.

An engine directory is an HF-format directory (transformers can load it as the reference) plus
scalellm_engine.json, which records where it came from and its weight format (dtype, quantize; see
scalellm/models/formats.py). Reading it back (`load_engine_state`) is a plain safetensors load: GGUF
dequantisation happens once, at build time; quantisation to int8/int4 happens at load time (it takes well
under a second and keeps the directory loadable by transformers).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scalellm.models.checkpoint import CONFIG_FILE
from scalellm.models.engine_meta import ENGINE_META_FILE, EngineMetaError, read_record, write_record
from scalellm.models.formats import AUTO, DTYPES, QUANTIZE, dtype_name
from scalellm.models.linear import QUANTIZED_FILE, packed_state, quantize_model

WEIGHTS_FILE = "model.safetensors"
LM_HEAD = "lm_head.weight"
# Input-embedding names a tied lm_head may share (Llama, Mistral, Mixtral all use the first).
EMBEDDING_NAMES = ("model.embed_tokens.weight",)


def _config_object(config: dict[str, Any], dtype: str) -> Any:
    """Rebuild the transformers config object, so config.json is written the way transformers writes it."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype", "dtype")}
    return AutoConfig.for_model(config["model_type"], dtype=dtype, **fields)


def _embedding_name(state_dict: dict[str, torch.Tensor]) -> str | None:
    return next((name for name in EMBEDDING_NAMES if name in state_dict), None)


def untie_lm_head(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop lm_head.weight when it is tied to (and equal to) the embedding; it is re-created on load."""
    embedding = _embedding_name(state_dict)
    if not config.get("tie_word_embeddings") or LM_HEAD not in state_dict or embedding is None:
        return state_dict
    if not torch.equal(state_dict[LM_HEAD], state_dict[embedding]):
        raise ValueError(f"tie_word_embeddings is true but {LM_HEAD} differs from {embedding}")
    return {name: tensor for name, tensor in state_dict.items() if name != LM_HEAD}


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast to dtype, contiguous, never two names on one storage (safetensors refuses shared tensors)."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is a nicety
        tqdm = None
    items = state_dict.items()
    if tqdm is not None:
        items = tqdm(items, total=len(state_dict), desc=f"Casting weights to {dtype_name(dtype)}", unit="t")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in items:
        cast = tensor.detach().to("cpu", dtype).contiguous()
        if cast.data_ptr() in seen:
            cast = cast.clone()
        seen.add(cast.data_ptr())
        out[name] = cast
    return out


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json with the chat template inline, + special_tokens_map.json."""
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    if not (out_dir / "tokenizer.json").is_file():
        raise RuntimeError(f"{type(tokenizer).__name__} wrote no tokenizer.json (a fast tokenizer is needed)")
    if not getattr(tokenizer, "chat_template", None):
        print(f"warning: tokenizer has no chat_template; {out_dir} will not apply one", flush=True)
    special_tokens_map = out_dir / "special_tokens_map.json"
    if not special_tokens_map.exists():  # transformers 5 stopped writing it; older readers still look for it
        special_tokens_map.write_text(json.dumps(tokenizer.special_tokens_map, indent=2) + "\n")


def _make_readable(path: Path) -> None:
    """safetensors writes 0600; an engine mounted into a container may be read by another user."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_siblings(final_dir: Path) -> None:
    """Remove temp/old siblings left by a killed build (their writer process is gone), and our own."""
    for sibling in final_dir.parent.glob(f".{final_dir.name}.*-*"):
        kind, _, pid = sibling.name.removeprefix(f".{final_dir.name}.").partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(sibling, ignore_errors=True)


@contextmanager
def atomic_directory(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces final_dir, on error it is removed.

    An interrupted build therefore never leaves a half-written directory under the final name.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
    if final_dir.exists():
        final_dir.rename(old)
    tmp.rename(final_dir)
    shutil.rmtree(old, ignore_errors=True)


def storage_dtype(dtype: str) -> str:
    """The dtype the weights file holds: auto and the quantised formats keep float32, the exact reference
    that every format is derived from at load time (and what an AVX2 machine computes in)."""
    return "float32" if dtype == AUTO else dtype_name(dtype)


def save_engine(
    out_dir: str | Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    dtype: str | torch.dtype,
    meta: dict[str, Any],
    generation_config: Any | None = None,
    quantize: str = "none",
) -> Path:
    """Write an engine directory atomically; scalellm_engine.json = {backend, architecture} | meta | format.

    ``dtype`` is float32, bfloat16, float16 or auto; ``quantize`` is none, int8 or int4 (see formats.py).
    """
    out_dir = Path(out_dir)
    name = dtype if dtype == AUTO else dtype_name(dtype)
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} (got {quantize!r})")
    stored = storage_dtype(name)
    weights = _cast(untie_lm_head(config, state_dict), DTYPES[stored])
    engine_meta = {"backend": "torch", "architecture": config.get("model_type"), **meta, "dtype": name,
                   "quantize": quantize}
    with atomic_directory(out_dir) as tmp:
        _config_object(config, stored).to_json_file(str(tmp / CONFIG_FILE), use_diff=False)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _make_readable(tmp / WEIGHTS_FILE)
        _save_tokenizer(tokenizer, tmp)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        if quantize != "none":
            packed_file = tmp / QUANTIZED_FILE.format(quantize=quantize)
            save_file(_packed_weights(config, state_dict, quantize), str(packed_file))
            _make_readable(packed_file)
            engine_meta |= packed_layout()
        write_record(tmp, engine_meta)
    return out_dir


def _packed_weights(config: dict[str, Any], state_dict: dict[str, torch.Tensor], quantize: str
                    ) -> dict[str, torch.Tensor]:
    """Quantise once at build time, so that loading is a file read (re-quantising takes ~10 s on 2 cores)."""
    from scalellm.config import ModelConfig
    from scalellm.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_hf(config))
    model.load_hf_state_dict({name: t.float() for name, t in state_dict.items()}, assign=True)
    quantize_model(model, quantize, torch.float32)
    return packed_state(model)


def packed_layout() -> dict[str, str]:
    """What torch's packed weight layouts depend on: its version, and the CPU capability its kernels dispatch on
    (the int4 packing is laid out one way for AVX-512 and another for AVX2), as recorded in scalellm_engine.json."""
    return {"packed_with_torch": torch.__version__, "packed_for_cpu": torch.backends.cpu.get_cpu_capability()}


def load_packed_weights(engine_dir: str | Path, quantize: str) -> dict[str, torch.Tensor] | None:
    """The packed weights built for ``quantize``, or None if there are none usable by this torch on this CPU (an
    engine directory built on another kind of machine: the caller re-quantises from the float32 weights)."""
    engine_dir = Path(engine_dir)
    meta = read_engine_meta(engine_dir) or {}
    path = engine_dir / QUANTIZED_FILE.format(quantize=quantize)
    if any(meta.get(key) != value for key, value in packed_layout().items()) or not path.is_file():
        return None
    return load_file(str(path))


def read_engine_meta(engine_dir: str | Path) -> dict[str, Any] | None:
    """scalellm_engine.json of a complete engine directory, or None if there is none (or it is incomplete)."""
    engine_dir = Path(engine_dir)
    if not all((engine_dir / f).is_file() for f in (ENGINE_META_FILE, CONFIG_FILE, WEIGHTS_FILE)):
        return None
    try:
        return read_record(engine_dir)
    except (OSError, EngineMetaError):
        return None


def load_engine_config(engine_dir: str | Path) -> dict[str, Any]:
    """The engine's full HF config dict (written with every default filled in)."""
    return json.loads((Path(engine_dir) / CONFIG_FILE).read_text())


def load_engine_state(
    engine_dir: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config dict, state dict) of an engine directory; a tied lm_head.weight is the embedding tensor."""
    engine_dir = Path(engine_dir)
    config = load_engine_config(engine_dir)
    state_dict = load_file(str(engine_dir / WEIGHTS_FILE), device=str(device))
    if dtype is not None:
        target = DTYPES[dtype_name(dtype)]
        state_dict = {name: tensor.to(target) for name, tensor in state_dict.items()}
    embedding = _embedding_name(state_dict)
    if config.get("tie_word_embeddings") and LM_HEAD not in state_dict and embedding is not None:
        state_dict[LM_HEAD] = state_dict[embedding]
    return config, state_dict

"""``postprocessing``: each response's token ids as text; the other ``llm`` outputs pass through.

Reads tensorrtllm_backend's shapes (``TOKENS_BATCH`` [batch, beam, tokens], ``SEQUENCE_LENGTH``
[batch, beam]) and returns one string per batch row and beam (``OUTPUT`` [batch * beams], 1-D), so NVIDIA's
``tensorrt_llm`` model can stand in front of it.  With our ``llm``, ``CONTEXT_IDS`` (tokens already shown)
makes streamed text byte-exact; without it each response is decoded on its own (see docs/ensemble.md).
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from scalellm.tokenization import decode_delta
from scalellm.triton.contract import PASS_THROUGH, POST_INPUTS
from scalellm.triton.tensors import Get, InvalidInput, check_required


def _per_beam(array: np.ndarray, batch: int, beams: int) -> np.ndarray:
    return np.asarray(array).reshape(batch, beams, -1)


def postprocess(tokenizer: Tokenizer, get: Get) -> dict[str, np.ndarray]:
    check_required(get, POST_INPUTS)
    tokens = np.asarray(get("TOKENS_BATCH"))
    if tokens.ndim == 2:  # [batch, tokens]: one beam
        tokens = tokens[:, None, :]
    if tokens.ndim != 3 or 0 in tokens.shape[:2]:
        raise InvalidInput(f"TOKENS_BATCH must be [batch, beam, tokens] with a sequence (got shape {tokens.shape})")
    batch, beams = tokens.shape[0], tokens.shape[1]
    lengths = np.asarray(get("SEQUENCE_LENGTH"))
    if lengths.size != batch * beams:
        raise InvalidInput(f"SEQUENCE_LENGTH must hold one length per sequence ({batch * beams}, as TOKENS_BATCH; "
                           f"got {lengths.size})")
    lengths = lengths.reshape(batch, beams)
    context = get("CONTEXT_IDS")
    context = None if context is None else _per_beam(context, batch, beams)
    # Our llm sends finish_reason in a sequence's last response only, and CONTEXT_IDS in every one; a model that
    # sends neither (NVIDIA's) has each response treated as complete: nothing is held back.
    finish = get("FINISH_REASON")
    final = bool(np.asarray(finish).reshape(-1)[0]) if finish is not None else context is None
    texts = []
    for b in range(batch):
        for beam in range(beams):
            ids = tokens[b, beam, : max(int(lengths[b, beam]), 0)].tolist()
            shown = [] if context is None else context[b, beam].tolist()
            texts.append(decode_delta(tokenizer, shown + ids, len(shown), final).encode("utf-8"))
    outputs = {"OUTPUT": np.asarray(texts, dtype=object)}
    for name in PASS_THROUGH:
        value = get(name.upper())
        if value is not None:
            outputs["OUT_" + name.upper()] = value
    return outputs

"""ChatML on the client: a documented fallback for servers without the ``apply_chat_template`` input.

Prefer ``chat=True`` (``--chat`` on the command line): the server's preprocessing then applies the
model's own chat template. ``chatml`` is what the client sends instead when the model does not declare
that input (builds before it), and what ``--system`` uses to set a system message.
"""

from __future__ import annotations

# SmolLM2-Instruct's chat template inserts this system turn when the conversation has none.
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(prompt: str, system: str | None = None) -> str:
    """One user turn in ChatML, ready for the assistant's reply.

    Byte for byte what SmolLM2-Instruct's chat template renders for
    ``[{"role": "user", "content": prompt}]`` with ``add_generation_prompt=True`` (and for a
    leading system message when ``system`` is given).
    """
    system = SMOLLM2_SYSTEM if system is None else system
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")

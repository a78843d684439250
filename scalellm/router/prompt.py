"""The model's tokenizer in the router: the chat template for ``/v1/chat/completions`` and prompt token counts
for ``usage`` (the same ``tokenizer.json`` and ``encode`` call the ensemble's preprocessing uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scalellm.models.engine_meta import EngineMeta
from scalellm.tokenization import ChatTemplate, load_tokenizer


def engine_dir_of(model_dir: Path) -> Path:
    """``build_engines.py`` output (``<dir>/engine``) or an engine / Hugging Face directory itself."""
    return model_dir / "engine" if (model_dir / "engine" / "tokenizer.json").is_file() else model_dir


class PromptBuilder:
    def __init__(self, model_dir: Path) -> None:
        engine_dir = engine_dir_of(model_dir)
        if not (engine_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {engine_dir} (give --model-dir a build_engines.py output)")
        self.chat_template = ChatTemplate(engine_dir)  # the same renderer as the ensemble's preprocessing
        self.tokenizer = load_tokenizer(engine_dir)
        self.max_model_len = EngineMeta.read(engine_dir).max_model_len

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for ``messages`` with the model's chat template (raises ValueError if it fails)."""
        if not self.chat_template.available:
            raise ValueError("this model has no chat template: use /v1/completions")
        try:
            return self.chat_template.render(messages)
        except Exception as exc:  # jinja raises its own errors for messages the template refuses
            raise ValueError(f"messages: the chat template refused them: {exc}") from None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

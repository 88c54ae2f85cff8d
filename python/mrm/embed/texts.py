"""The embedder's input: (prompt, response) texts, a prompt being a string or a chat history."""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Tuple, Union

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]


def normalise_text(item: Any, index: int) -> Tuple[Prompt, str]:
    """Check one (prompt, response) item; ``prompt`` is a string or a list of messages."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"texts[{index}] must be a (prompt, response) pair, got {type(item).__name__}")
    prompt, response = item
    if not isinstance(response, str):
        raise TypeError(f"texts[{index}]: response must be a string, got {type(response).__name__}")
    if isinstance(prompt, str):
        return prompt, response
    if isinstance(prompt, (list, tuple)) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt], response
    raise TypeError(
        f"texts[{index}]: prompt must be a string or a list of {{'role', 'content'}} messages"
    )


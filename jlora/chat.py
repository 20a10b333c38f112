"""Chat rows -> token ids and the mask of the assistant's tokens, with the model's own template.

Two row forms, as TRL takes them: ``{"messages": [{"role": …, "content": …}, …]}`` (system,
user, assistant and tool turns), with the loss on every assistant turn (TRL's
``assistant_only_loss``); and the conversational prompt-completion form ``{"prompt":
[messages], "completion": [messages]}``, with the loss on the completion's assistant turns.

The mask is what the template says the assistant generated. A template with
``{% generation %}`` blocks gives it directly (`return_assistant_tokens_mask`, as TRL uses
it). Any other template is rendered once per assistant turn: the characters between the
conversation up to that turn with the generation prompt and the conversation through it
are the turn's (its content and end-of-turn marker, trailing whitespace left out), and the
tokens of the whole rendering that fall in them are trained. A template that re-renders
earlier turns differently once later ones follow (so no such prefix exists) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
ROLES = ("system", "user", "assistant", "tool")
Messages = Sequence[Mapping[str, Any]]


def is_chat(row: Mapping[str, Any]) -> bool:
    """Whether a data row is a conversation (either form)."""
    if "messages" in row:
        return _looks_like_messages(row["messages"])
    return (
        "prompt" in row and "completion" in row and all(_looks_like_messages(row[k]) for k in ("prompt", "completion"))
    )


def _looks_like_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) and "role" in m for m in value)


def conversation(row: Mapping[str, Any], where: str) -> tuple[list[dict], int]:
    """(messages, index of the first trainable message) of a row, checked."""
    if "messages" in row:
        messages, first = list(row["messages"]), 0
    else:
        messages, first = [*row["prompt"], *row["completion"]], len(row["prompt"])
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise ValueError(f"{where}: message {index} has role {message.get('role')!r}; roles are {ROLES}")
        if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
            raise ValueError(f"{where}: message {index} ({message['role']}) has no text content")
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise ValueError(f"{where}: no assistant turn to train on")
    return [{k: v for k, v in m.items() if v is not None} for m in messages], first


def encode(tokenizer, messages: list[dict], first: int = 0) -> tuple[list[int], list[int]]:
    """(token ids, 1 for the assistant's tokens of messages[first:]) of one conversation."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("chat data needs a chat template, and the model's tokenizer has none")
    if GENERATION_BLOCK.search(template) and not any(m["role"] == "assistant" for m in messages[:first]):
        return template_mask(tokenizer, messages)
    return rendered_mask(tokenizer, messages, first)


def template_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The template's own ``{% generation %}`` mask, as TRL's assistant-only loss takes it."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def rendered_mask(tokenizer, messages: list[dict], first: int = 0) -> tuple[list[int], list[int]]:
    """The mask from renderings of growing prefixes of the conversation (any template)."""
    render = lambda turns, prompt: tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
    text = render(messages, False)
    spans = []
    for index in range(first, len(messages)):
        if messages[index]["role"] != "assistant":
            continue
        start, through = render(messages[:index], True), render(messages[: index + 1], False)
        if not (text.startswith(through) and through.startswith(start)):
            raise ValueError(
                "the chat template renders earlier turns differently once later ones follow, so the assistant's "
                "tokens cannot be told apart; use a template with {% generation %} blocks"
            )
        spans.append((len(start), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < end and e > start for start, end in spans)) for s, e in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask

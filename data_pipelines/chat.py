"""Conversations: messages with roles and images, rendered to document pieces by a chat template.

A `Chat` is a list of `Message(role, pieces)`, role one of system / user / assistant, pieces text
(str) and images in the order they appear in the turn. `render_chat(chat, template)` turns it into
document pieces (data_pipelines/document.py): the template's text as context, each assistant turn
as an `Answer` (the LM loss target with `data.loss_on: answers`), and the images where the turn had
them. One renderer serves training, evaluation and generation, so prompts match what was trained.

The template is the tokenizer's own (`chat_template` in its tokenizer_config.json) when it has one,
else DEFAULT_CHAT_TEMPLATE, which an export writes into its tokenizer files, so transformers'
`apply_chat_template` gives the same text:

    [system text\\n]User: <question>\\nAssistant: <answer>\\n User: ...\\nAssistant:   (generation prompt)

Images are passed to the template inside the message text as the marker `<image>` (LLaVA's
convention, which the export's processor also reads); the template's output is split at the
markers. A turn's span is found by rendering the conversation up to it with the generation prompt
(its context) and up to its end: the difference is the assistant's text, end-of-turn included. A
template must render a conversation's prefixes as prefixes of the whole (all common templates do);
one that does not is an error naming the turn. Special tokens the template writes through
`bos_token` render empty: the sequence builder adds bos itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipelines.document import Answer

ROLES = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"
DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'User: ' + m['content'] + '\\n' }}"
    "{%- else -%}{{ 'Assistant: ' + m['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


@dataclass
class Message:
    role: str
    pieces: list[Any] = field(default_factory=list)  # str | image, in order

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role {self.role!r} is not one of {', '.join(ROLES)}")


class Chat(list):
    """A conversation: a list of `Message`s (a piece type of its own, so loaders can tell it apart)."""

    def images(self) -> list[Any]:
        return [p for m in self for p in m.pieces if not isinstance(p, str)]

    def map_images(self, fn) -> Chat:
        return Chat(Message(m.role, [p if isinstance(p, str) else fn(p) for p in m.pieces]) for m in self)


def _template_messages(chat: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": "".join(p if isinstance(p, str) else IMAGE_MARKER for p in m.pieces)}
            for m in chat]


def render_text(chat: list[Message], template: str, add_generation_prompt: bool = False) -> str:
    """The template's text of a conversation (images as `<image>` markers)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[_template_messages(chat)], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, bos_token="", eos_token="")
    return rendered[0]


def _with_images(text: str, images: list[Any], answer: bool) -> list[Any]:
    """Split text at `<image>` markers, taking images in order from `images` (consumed)."""
    parts = text.split(IMAGE_MARKER)
    out: list[Any] = []
    for i, part in enumerate(parts):
        if i:
            if not images:
                raise ValueError(f"the rendered text has more {IMAGE_MARKER} markers than the conversation has images")
            out.append(images.pop(0))
        if part:
            out.append(Answer(part) if answer else part)
    return out


def render_chat(chat: list[Message], template: str | None = None, add_generation_prompt: bool = False) -> list[Any]:
    """Document pieces of a conversation: context text, images, and each assistant turn as an Answer.
    With add_generation_prompt (a prompt for generation) the pieces end with the assistant's cue."""
    template = template or DEFAULT_CHAT_TEMPLATE
    images = list(Chat(chat).images())
    pieces: list[Any] = []
    done = ""  # rendered text already turned into pieces
    for i, m in enumerate(chat):
        if m.role != "assistant":
            continue
        context = render_text(chat[:i], template, add_generation_prompt=True)
        whole = render_text(chat[:i + 1], template)
        if not (context.startswith(done) and whole.startswith(context)):
            raise ValueError(f"chat template: rendering the conversation up to turn {i} ({m.role}) is not a prefix of "
                             f"rendering it through turn {i}; cannot tell the assistant's text apart")
        pieces += _with_images(context[len(done):], images, answer=False)
        pieces += _with_images(whole[len(context):], images, answer=True)
        done = whole
    rest = render_text(chat, template, add_generation_prompt=add_generation_prompt)
    if not rest.startswith(done):
        raise ValueError("chat template: the conversation's rendering does not extend its turns' renderings")
    pieces += _with_images(rest[len(done):], images, answer=False)
    if images:
        raise ValueError(f"the rendered text has {len(images)} fewer {IMAGE_MARKER} markers than the conversation "
                         f"has images: the chat template drops message text")
    return pieces

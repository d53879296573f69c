"""A request's prompt as token ids: the chat template, token-id prompts, the context limit.

The engine's worker calls ``encode_prompt`` when it admits a request (only that thread touches
the tokenizer: a fast tokenizer shared between threads raises "Already borrowed"). A request
that cannot be served (a template that fails on its messages, an out-of-vocabulary id, a prompt
plus ``max_tokens`` over the context) raises ``EngineError("invalid", ...)`` naming the field.

Usage::

    from lmref.serving.prompts import encode_prompt

    ids = encode_prompt(request, tokenizer, chat_template=None, context_length=2048,
                        vocab_size=49152)     # sets request.max_tokens (and a base model's stop)
"""

from __future__ import annotations

import dataclasses

from lmref.serving.request import EngineError, Request
from lmref.serving.tool_calls import render

# Used when the tokenizer brings no chat template (a base model): plain role markers, and the
# next "<|user|>" marker is treated as a stop so a base model does not write the user's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CHAT_STOP = ("<|user|>",)


def _chat_ids(request: Request, tokenizer, chat_template: str | None) -> list[int]:
    template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    if chat_template is None and tokenizer.chat_template is None:  # a base model
        request.params = dataclasses.replace(
            request.params, stop=request.params.stop + DEFAULT_CHAT_STOP
        )
    # Tools, past calls and their results as this template takes them (lmref.serving.tool_calls)
    messages, tools = render(request.prompt, request.params.tools, template)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as exc:  # a template's raise_exception(), or one that breaks on these
        # messages: this request's fault, not the batch's (jinja2's errors vary)
        raise EngineError(
            "invalid",
            f"the chat template failed on these messages: {exc}",
            param="messages",
            code="chat_template_error",
        ) from None
    # A model's own template writes its special tokens itself; the default one does not.
    return tokenizer(text, add_special_tokens=tokenizer.chat_template is None)["input_ids"]


def encode_prompt(
    request: Request,
    tokenizer,
    chat_template: str | None,
    context_length: int,
    vocab_size: int,
) -> list[int]:
    """The prompt's token ids; also sets ``request.max_tokens`` (what the context leaves when
    ``params.max_tokens`` is None; 0: echo, score only)."""
    if request.is_chat:
        ids = _chat_ids(request, tokenizer, chat_template)
    elif isinstance(request.prompt, list):  # token ids, as lm-evaluation-harness sends them
        ids = list(request.prompt)
        if any(i >= vocab_size for i in ids):
            raise EngineError(
                "invalid",
                f"prompt token ids must be below {vocab_size}, the model's vocabulary size",
                param="prompt",
                code="invalid_token",
            )
    else:
        ids = tokenizer(request.prompt)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise EngineError("invalid", "prompt is empty", param="prompt", code="empty_prompt")
        ids = [tokenizer.bos_token_id]
    if request.params.logit_bias and request.params.logit_bias[-1][0] >= vocab_size:
        raise EngineError(
            "invalid",
            f"logit_bias token ids must be below {vocab_size}, the model's vocabulary size",
            param="logit_bias",
            code="invalid_token",
        )
    wanted = request.params.max_tokens
    if len(ids) + (1 if wanted is None else wanted) > context_length:
        raise EngineError(
            "invalid",
            f"This model's maximum context length is {context_length} tokens; "
            f"the prompt has {len(ids)} and max_tokens is {wanted or 'unset'}.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    request.max_tokens = context_length - len(ids) if wanted is None else wanted
    return ids

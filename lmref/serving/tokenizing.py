"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` in vLLM's shapes, without HTTP: a
served model's own tokenizer, for clients that count tokens or build token-id prompts
(lm-evaluation-harness's ``tokenizer_backend=remote`` uses all three).

The engine's worker thread owns its tokenizer (a fast tokenizer used by two threads at once
raises "Already borrowed"), so these use a second copy of it per model version, loaded from the
same folder on first use and called under a lock. A chat prompt is encoded as the engine
encodes it: the same template (the ``ModelSpec``'s, the tokenizer's, else the default one),
so ``count`` equals the ``usage.prompt_tokens`` that a chat request with these messages reports.

Usage::

    from lmref.serving.tokenizing import detokenize, tokenize, tokenizer_info

    tokenize(engine, {"prompt": "def f(", "return_token_strs": True})
    # {"count": 3, "max_model_len": 2048, "tokens": [...], "token_strs": [...]}
    detokenize(engine, {"tokens": [1, 2, 3]})                  # {"prompt": "..."}
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from lmref.models.loading import load_tokenizer
from lmref.serving.engine import Engine
from lmref.serving.prompts import DEFAULT_CHAT_TEMPLATE
from lmref.serving.schema import bad, chat_messages, flag, text
from lmref.serving.tool_calls import render

_LOCK = threading.Lock()
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Engine -> its tokenizer copy


def _tokenizer(engine: Engine):
    """The routes' own copy of the engine's tokenizer (loaded once); call it under ``_LOCK``."""
    if engine not in _COPIES:
        _COPIES[engine] = load_tokenizer(engine.spec.path)
    return _COPIES[engine]


def _optional_flag(body: dict, name: str, default: bool) -> bool:
    return default if body.get(name) is None else flag(body, name)


def tokenize(engine: Engine, body: dict) -> dict[str, Any]:
    """``{"prompt": str}`` or ``{"messages": [...]}`` (chat template applied, with
    ``add_generation_prompt``, default true) into ``{"count", "max_model_len", "tokens"}`` and,
    with ``return_token_strs``, ``token_strs``. ``add_special_tokens``: default true for a prompt,
    and for messages what the engine does (a model's own template writes its special tokens)."""
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise bad("give exactly one of 'prompt' (a string) and 'messages'", "prompt")
    generation = _optional_flag(body, "add_generation_prompt", True)
    strs = flag(body, "return_token_strs")
    with _LOCK:
        tok = _tokenizer(engine)
        if has_prompt:
            prompt = text(body["prompt"], "prompt")
            special = _optional_flag(body, "add_special_tokens", True)
        else:
            messages = chat_messages(body)
            template = engine.spec.chat_template or tok.chat_template or DEFAULT_CHAT_TEMPLATE
            special = _optional_flag(body, "add_special_tokens", tok.chat_template is None)
            try:
                prompt = tok.apply_chat_template(
                    render(messages, None, template)[0],  # past tool calls as the engine does
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=generation,
                )
            except Exception as exc:  # jinja2's errors vary; the messages' fault, as in the engine
                raise bad(
                    f"the chat template failed on these messages: {exc}", "messages"
                ) from None
        ids = tok(prompt, add_special_tokens=special)["input_ids"]
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": engine.context_length,
            "tokens": ids,
        }
        if strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out


def detokenize(engine: Engine, body: dict) -> dict[str, str]:
    """``{"tokens": [ids]}`` into ``{"prompt": text}`` (special tokens kept, as vLLM does)."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise bad("'tokens' must be a list of token ids (integers)", "tokens")
    with _LOCK:
        tok = _tokenizer(engine)
        size = len(tok)
        wrong = [t for t in tokens if not 0 <= t < size]
        if wrong:
            raise bad(
                f"'tokens' holds ids outside the vocabulary [0, {size}): {wrong[:5]}", "tokens"
            )
        return {"prompt": tok.decode(tokens, clean_up_tokenization_spaces=False)}


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    """What a client needs to tokenize like the server: special tokens, the chat template, the
    context length (vLLM's ``/tokenizer_info``; lm-eval reads ``eos_token`` and the template)."""
    with _LOCK:
        tok = _tokenizer(engine)
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": engine.spec.chat_template or tok.chat_template,
            "model_max_length": engine.context_length,
            "vocab_size": len(tok),
        }

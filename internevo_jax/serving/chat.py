"""Chat messages -> prompt ids: the tokenizer's own chat template when it has one, else InternLM2's format.

InternLM2's format (what InternEvo's chat models are trained on), one block per message, then the open assistant
turn the model completes; the tokenizer adds its BOS in front:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

The reply ends at ``<|im_end|>``: its token id when the tokenizer has it as one token, else the text as a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render_internlm2(messages: Sequence[tuple[str, str]]) -> str:
    """``(role, text)`` pairs in InternLM2's chat format, ending with the open assistant turn."""
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in messages) + f"{IM_START}assistant\n"


def chat_prompt(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[int], list[str]]:
    """(prompt ids, stop ids, stop strings) for ``messages`` with ``tokenizer`` (``hf``: a transformers tokenizer or
    None). A template of the tokenizer's own wins; its EOS ends the reply."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and getattr(hf, "chat_template", None):
        dicts = [dict(role=role, content=text) for role, text in messages]
        ids = hf.apply_chat_template(dicts, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids), [hf.eos_token_id] if hf.eos_token_id is not None else [], []
    ids = tokenizer.encode(render_internlm2(messages))
    stop_ids: list[int] = []
    if hf is not None:
        end = hf.convert_tokens_to_ids(IM_END)
        if isinstance(end, int) and end != hf.unk_token_id:
            stop_ids.append(end)
    return ids, stop_ids, [IM_END]

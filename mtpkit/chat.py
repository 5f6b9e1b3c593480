"""How a prompt is put to a chat model: its chat template when it has one, plain turns otherwise (torch-free)."""

from __future__ import annotations

PLAIN_TURN = "{content}\n\n"  # plain-text rendering for tokenizers without a chat template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text up to where the assistant's response begins."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(PLAIN_TURN.format(content=m["content"]) for m in messages)


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt as the base sees it before generating: ``render_prompt``'s text, plus the
    BOS a plain (template-less) tokenizer adds; a chat template writes its own special tokens."""
    ids = list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not has_chat_template(tokenizer) and bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [bos] + ids
    return ids

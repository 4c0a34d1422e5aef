"""The chat format for fine-tuning and inference.

    chat = render(messages, tok)                      # ids + loss mask (assistant tokens learned)
    prompt = render_prompt(messages, tok)             # ... + <|assistant|>, for generation
    reply = parse_assistant(generated_ids, tok)       # text up to <|end|>
    examples, stats = load_chat_examples("sft.jsonl", tok, max_tokens=block_size + 1)
    batches = ChatBatches(examples, block_size, batch_size, seed, pad_id=tok.pad_id)
    loss_sum, count = chat_loss(model, next(batches))    # summed over learned tokens, and their count

The format is described in ``template.py``, the data sources in ``data.py`` and the
batch layout (packing, doc_ids, resume) in ``batching.py``.
"""

from chatforge.chat.batching import ChatBatches, chat_loss, collate, eval_batches, first_fit
from chatforge.chat.data import (
    ChatDataStats,
    iter_conversations,
    load_chat_examples,
    messages_from_record,
    tokenize_conversations,
    truncate,
)
from chatforge.chat.template import (
    LEARNED_ROLES,
    ROLES,
    RenderedChat,
    messages_from_ids,
    parse_assistant,
    prompt_messages,
    render,
    render_prompt,
    role_token,
    stop_token_ids,
    validate_messages,
)

__all__ = [
    "LEARNED_ROLES",
    "ROLES",
    "ChatBatches",
    "ChatDataStats",
    "RenderedChat",
    "chat_loss",
    "collate",
    "eval_batches",
    "first_fit",
    "iter_conversations",
    "load_chat_examples",
    "messages_from_ids",
    "messages_from_record",
    "parse_assistant",
    "prompt_messages",
    "render",
    "render_prompt",
    "role_token",
    "stop_token_ids",
    "tokenize_conversations",
    "truncate",
    "validate_messages",
]

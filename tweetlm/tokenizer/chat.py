"""The chat template: how a conversation becomes token ids (serving, `tweetlm chat`, fine-tuning).

    <|endoftext|><|system|>You are...<|end|><|user|>hi<|end|><|assistant|>hello!<|end|>

Role tokens are inserted by id, so a message that contains the text "<|end|>" stays text
and cannot close its turn early. CHAT_TEMPLATE is the same layout as a Jinja template for
transformers' `apply_chat_template` (saved with the tokenizer); transformers matches
special-token strings in text, so the two agree on every message that does not spell one.

Fine-tuning takes the ids with a loss mask from the same rendering (`render_chat_with_mask`): the
model learns each assistant message's content and its closing <|end|> (so that it learns to stop),
and nothing of the system and user messages or of the role tokens, which the prompt always supplies.
"""

from tweetlm.errors import UserError

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` ([{"role": ..., "content": str}, ...]), ending with the assistant's
    role token when `add_generation_prompt` (the model then writes the reply and <|end|>)."""
    return _render(tokenizer, messages, add_generation_prompt)[0]


def render_chat_with_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a whole conversation for training: render_chat's ids (no generation prompt) and, for each id,
    True where the model should learn to write it: an assistant message's content tokens and its <|end|>."""
    return _render(tokenizer, messages, False)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
    end = tokenizer.token_id("<|end|>")
    ids, mask = [tokenizer.boundary_id], [False]
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"messages[{i}].role is {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        body = [*tokenizer.encode(content), end]
        ids += [tokenizer.token_id(f"<|{role}|>"), *body]
        mask += [False] + [role == "assistant"] * len(body)
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant|>"))
        mask.append(False)
    return ids, mask

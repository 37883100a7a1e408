"""The chat template: how a conversation becomes token ids (serving, `tweetlm chat`, fine-tuning).

    <|endoftext|><|system|>You are...<|end|><|user|>hi<|end|><|assistant|>hello!<|end|>

Role tokens are inserted by id, so a message that contains the text "<|end|>" stays text
and cannot close its turn early. CHAT_TEMPLATE is the same layout as a Jinja template for
transformers' `apply_chat_template` (saved with the tokenizer); transformers matches
special-token strings in text, so the two agree on every message that does not spell one.
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
    end = tokenizer.token_id("<|end|>")
    ids = [tokenizer.boundary_id]
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"messages[{i}].role is {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        ids += [tokenizer.token_id(f"<|{role}|>"), *tokenizer.encode(content), end]
    if add_generation_prompt:
        ids.append(tokenizer.token_id("<|assistant|>"))
    return ids

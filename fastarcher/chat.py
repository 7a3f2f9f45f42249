"""How environment text becomes the policy's dialogue: plain text, or the tokenizer's chat template.

An env speaks in observations and the policy answers in utterances. The trainer keeps each dialogue as
token ids built by concatenation, prompt ⊕ (action ⊕ observation)*, so that s′ = s ⊕ a ⊕ o holds exactly.
A `DialogueFormat` says what text surrounds each observation and which single token ends a reply:

- raw (base models, the built-in policy): the observation text alone, replies end with a newline;
- chat (instruct models): the first prompt is the template's rendering of [system?, user: obs] with the
  generation prompt; a reply ends with the template's end-of-turn token (`<|im_end|>` in ChatML) and every
  later observation is the template's text for "end of the assistant turn, a user turn, the generation
  prompt". The pieces are read off the template by rendering probe dialogues, so the concatenated
  dialogue is the template's own rendering of the whole conversation (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastarcher.model import STOP_TEXT, ChatTemplateMode, encode

_PROBE = ("\x00fastarcher-probe-{}\x00")
"""Placeholder contents: text no env or template produces, found again in the rendering."""


@dataclass(frozen=True)
class DialogueFormat:
    """Text around each observation, and the text of the one token that ends a reply."""

    prompt_head: str = ""
    """Before the first observation (chat: a system turn, the user turn's header)."""
    turn_head: str = ""
    """After a reply's stop token, before the next observation (chat: the rest of the assistant turn's end,
    the user turn's header)."""
    turn_tail: str = ""
    """After every observation (chat: the end of the user turn and the generation prompt)."""
    stop_text: str = STOP_TEXT
    """The text of the single token that ends a reply (raw: newline; chat: the end-of-turn token)."""
    chat: bool = False

    def first(self, obs: str) -> str:
        return self.prompt_head + self._content(obs) + self.turn_tail

    def next(self, obs: str) -> str:
        return self.turn_head + self._content(obs) + self.turn_tail

    def _content(self, obs: str) -> str:
        # envs end their text with a newline (the raw format's separator); a chat turn has its own end
        return obs.rstrip("\n") if self.chat else obs

    def wrap_encoder(self, tokenizer):
        """text → ids of the observation as the dialogue holds it (the longer of first and later turns)."""
        return lambda obs: max(encode(tokenizer, self.first(obs)), encode(tokenizer, self.next(obs)), key=len)

    def facts(self) -> dict:
        """What an exported policy's user needs to rebuild the dialogue outside fastarcher."""
        return {"chat_template": self.chat, "prompt_head": self.prompt_head, "turn_head": self.turn_head,
                "turn_tail": self.turn_tail, "stop_text": self.stop_text}


RAW = DialogueFormat()


def _split(text: str, probe: str, what: str) -> tuple[str, str]:
    if text.count(probe) != 1:
        raise ValueError(f"the chat template does not render the {what} content verbatim once; "
                         f"pass --model.chat-template off")
    head, tail = text.split(probe)
    return head, tail


def chat_format(tokenizer, system_prompt: str | None = None) -> DialogueFormat:
    """Read the dialogue pieces off `tokenizer`'s chat template (ValueError when it cannot be used
    incrementally: the rendering of a longer conversation must extend the shorter one's)."""
    user, reply, user2 = (_PROBE.format(k) for k in range(3))
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=generation_prompt)

    first = render([{"role": "user", "content": user}], True)
    prompt_head, turn_tail = _split(first, user, "user")
    answered = render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], False)
    longer = render([{"role": "user", "content": user}, {"role": "assistant", "content": reply},
                     {"role": "user", "content": user2}], True)
    if not (answered.startswith(first) and longer.startswith(answered)):
        raise ValueError("the chat template renders earlier turns differently once the dialogue grows, so "
                         "s' = s + a + o cannot hold; pass --model.chat-template off")
    _, reply_end = _split(answered[len(first):], reply, "assistant")
    end_ids = encode(tokenizer, reply_end)
    if not end_ids:
        raise ValueError("the chat template ends an assistant turn with nothing; pass --model.chat-template off")
    stop_text = tokenizer.decode(end_ids[:1])
    if (end_ids[0] not in tokenizer.all_special_ids or not reply_end.startswith(stop_text)
            or encode(tokenizer, stop_text) != end_ids[:1]):
        raise ValueError(f"the chat template's end of an assistant turn ({reply_end!r}) does not start with one "
                         f"special token; pass --model.chat-template off")
    user2_head, user2_tail = _split(longer[len(answered):], user2, "second user")
    if user2_tail != turn_tail:
        raise ValueError("the chat template closes the first and later user turns differently; "
                         "pass --model.chat-template off")
    return DialogueFormat(prompt_head=prompt_head, turn_head=reply_end[len(stop_text):] + user2_head,
                          turn_tail=turn_tail, stop_text=stop_text, chat=True)


def dialogue_format(tokenizer, mode: ChatTemplateMode = "auto", system_prompt: str | None = None) -> DialogueFormat:
    """The run's format: the chat template when the tokenizer has one (auto) or when asked (on), else raw."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise ValueError("model.chat_template is 'on' but the tokenizer has no chat template")
    if mode == "off" or not has_template:
        if system_prompt:
            raise ValueError("model.system_prompt needs a chat template (model.chat_template auto or on, and a "
                             "tokenizer with one)")
        return RAW
    return chat_format(tokenizer, system_prompt)


def stop_id_of(tokenizer, fmt: DialogueFormat) -> int:
    """The single token that ends a reply under `fmt` (ValueError if the tokenizer splits it)."""
    ids = encode(tokenizer, fmt.stop_text)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes the stop text {fmt.stop_text!r} as {len(ids)} tokens; "
                         f"fastarcher needs exactly one")
    return ids[0]

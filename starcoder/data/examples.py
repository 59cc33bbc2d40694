"""Fine-tuning formats for `starcoder preprocess`: records to examples whose tokens carry a loss mask.

An `Example` is a tuple of segments `(target, document)`: `document` is a formats.Document (text
parts and special-token ids), `target` says whether its tokens carry the loss. Every example ends
with one EOD, a target (appended unless the example's text already ends with it): the loss is on
response tokens and the closing EOS only, as OctoPack's `--targets_only`. A record gives one
example, or two for `preference` (chosen, then rejected: one document of two sequences on disk).

- `instruct`: `instruction`, `response` through a template holding `{instruction}` and ending in
  `{response}`; the default is StarCoder2-Instruct's.
- `commit`: CommitPackFT's `old_file`, `old_contents`, `subject` (else `message`), `new_contents`
  as in OctoPack's commits_to_jsonl.py: input `[<filename>NAME]<commit_before>OLD<commit_msg>` (the
  filename part with probability 0.5, drawn per record from the seed), target
  `SUBJECT<commit_after>NEW<|endoftext|>`.
- `chat`: `messages` (`{role, content}` dicts) through a Jinja chat template, rendered as
  transformers renders it; each assistant turn is a target, everything else (the generation prompt
  before each turn included) is not.
- `preference`: `prompt`, `chosen`, `rejected`, the prompt through the instruct template.

A record that does not fit raises corpus.BadRecord: it is counted by reason, never fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from starcoder.config import UserError
from starcoder.data.corpus import BadRecord, text_field
from starcoder.data.formats import _merge, doc_rng
from starcoder.data.tokenizer import EOD, Tokenizer

FINETUNE_FORMATS = ("instruct", "commit", "chat", "preference")
SYSTEM = ("You are an exceptionally intelligent coding assistant that consistently delivers "
          "accurate and reliable responses to user instructions.")
# StarCoder2-Instruct's prompt (its model card); `{response}` must end the template.
INSTRUCT_TEMPLATE = SYSTEM + "\n\n### Instruction\n{instruction}\n\n### Response\n{response}"
COMMIT_MARKERS = ("<filename>", "<commit_before>", "<commit_msg>", "<commit_after>")
# The chat template used when the tokenizer folder has none: the instruct format, turn by turn (a
# one-turn conversation gives exactly the `instruct` example), each response closed by EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '" + SYSTEM + "' %}{%- endif %}"
    "{{- system }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '\\n\\n### Instruction\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '\\n\\n### Response\\n' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('roles are system (first only), user and assistant, got ' + "
    "message['role']) }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n\\n### Response\\n' }}{%- endif %}")

Example = tuple  # of (target: bool, formats.Document)


def split_template(template: str) -> tuple[str, str]:
    """The text before and after `{instruction}`; `{response}` must end the template."""
    if template.count("{instruction}") != 1 or not template.endswith("{response}") or \
            template.count("{response}") != 1:
        raise UserError(f"--template {template!r}: needs {{instruction}} once and must end with "
                        "{response} (the response and EOS carry the loss)")
    before, after = template[:-len("{response}")].split("{instruction}")
    return before, after


def find_chat_template(tokenizer: Tokenizer) -> Optional[tuple[str, Path]]:
    """The chat template saved beside the tokenizer (`chat_template.jinja`, as transformers now
    saves it, else `tokenizer_config.json`'s `chat_template`), with the file it came from."""
    folder = Path(tokenizer.path).parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, OSError) as err:
            raise UserError(f"{config}: unreadable ({err})") from None
        if isinstance(template, list):  # several named templates: transformers uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template, config
    return None


def _token_string(tokenizer: Tokenizer, key: str, default: str) -> str:
    """`bos_token` / `eos_token` from tokenizer_config.json (a string or an AddedToken dict)."""
    config = Path(tokenizer.path).parent / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get(key) if config.is_file() else None
    except (ValueError, OSError):
        value = None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


class ChatRenderer:
    """A chat template rendered the way transformers' `apply_chat_template` renders it: a sandboxed
    Jinja environment with `trim_blocks` and `lstrip_blocks`, `raise_exception`, `bos_token`,
    `eos_token` and `add_generation_prompt`."""

    def __init__(self, template: str, bos_token: str, eos_token: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(template)
        except TemplateError as err:
            raise UserError(f"chat template: not valid Jinja ({err})") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def __call__(self, messages: list, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as err:  # user code: whatever it raises on a record is that record's fault
            raise BadRecord("chat template error", f"{type(err).__name__}: {err}") from None


class ExampleFormatter:
    """Turns parsed records into examples (one per record; two for `preference`)."""

    def __init__(self, fmt: str, tokenizer: Tokenizer, seed: int = 1234, template: Optional[str] = None,
                 chat_template: Optional[str] = None, commit_markers: str = "tokens",
                 filename_prob: float = 0.5):
        if fmt not in FINETUNE_FORMATS:
            raise UserError(f"format {fmt!r}: expected one of {', '.join(FINETUNE_FORMATS)}")
        if commit_markers not in ("tokens", "text"):
            raise UserError(f"--commit-markers {commit_markers!r}: expected tokens or text")
        if template is not None and fmt not in ("instruct", "preference"):
            raise UserError(f"--template: only for --format instruct and preference, not {fmt}")
        if chat_template is not None and fmt != "chat":
            raise UserError(f"--chat-template: only for --format chat, not {fmt}")
        self.fmt, self.seed, self.filename_prob = fmt, seed, filename_prob
        self.before, self.after = split_template(template or INSTRUCT_TEMPLATE)
        self.markers: dict = {m: m for m in COMMIT_MARKERS}  # spelled as text
        if fmt == "commit" and commit_markers == "tokens":
            missing = [m for m in COMMIT_MARKERS if tokenizer.token_to_id(m) is None]
            if missing:
                raise UserError(f"--format commit: tokenizer {tokenizer.name} has no "
                                f"{', '.join(missing)} token(s); pass --commit-markers text to "
                                "spell them as plain text")
            self.markers = {m: tokenizer.token_to_id(m) for m in COMMIT_MARKERS}
        self.chat = None
        if fmt == "chat":
            found = find_chat_template(tokenizer)
            source = chat_template if chat_template is not None else (found[0] if found else
                                                                      DEFAULT_CHAT_TEMPLATE)
            self.chat = ChatRenderer(source, _token_string(tokenizer, "bos_token", EOD),
                                     _token_string(tokenizer, "eos_token", EOD))
            self.chat_template_source = ("--chat-template" if chat_template is not None else
                                         str(found[1]) if found else "default")

    def columns(self) -> list[str]:
        """The fields a record needs (what Parquet reads)."""
        return {"instruct": ["instruction", "response"],
                "commit": ["old_file", "old_contents", "subject", "message", "new_contents"],
                "chat": ["messages"], "preference": ["prompt", "chosen", "rejected"]}[self.fmt]

    def __call__(self, obj: dict, index: int) -> list[Example]:
        """The examples of one record (`index`: its position in the input, which seeds its
        draws); raises BadRecord."""
        if self.fmt == "instruct":
            return [self._prompted(_field(obj, "instruction"), _field(obj, "response"))]
        if self.fmt == "preference":
            prompt = _field(obj, "prompt")
            return [self._prompted(prompt, _field(obj, "chosen")),
                    self._prompted(prompt, _field(obj, "rejected"))]
        if self.fmt == "commit":
            return [self._commit(obj, index)]
        return [self._chat(obj)]

    def _prompted(self, instruction: str, response: str) -> Example:
        return ((False, (self.before + instruction + self.after,)), (True, (response,)))

    def _commit(self, obj: dict, index: int) -> Example:
        old_file = _field(obj, "old_file", empty_ok=True)
        old, new = _field(obj, "old_contents", empty_ok=True), _field(obj, "new_contents", empty_ok=True)
        subject = _field(obj, "subject" if obj.get("subject") is not None else "message")
        m = self.markers
        rng = doc_rng(self.seed, index)
        prompt: list = []
        if rng.random() < self.filename_prob:
            prompt += [m["<filename>"], old_file.split("/")[-1]]
        prompt += [m["<commit_before>"], old, m["<commit_msg>"]]
        return ((False, _merge(prompt)), (True, _merge([subject, m["<commit_after>"], new])))

    def _chat(self, obj: dict) -> Example:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRecord("missing key", "messages (a non-empty list of {role, content})")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRecord("bad message", "each message needs a role and a string content")
            _field(m, "content", empty_ok=True)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise BadRecord("no assistant message")
        # Messages after the last response carry no loss: they are left out.
        segments, done = [], ""
        for i, m in enumerate(messages[:last + 1]):
            if m["role"] != "assistant":
                continue
            prompt = self.chat(messages[:i], add_generation_prompt=True)
            full = self.chat(messages[:i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise BadRecord("chat template error", f"the rendering of message {i} does not "
                                "extend the rendering of the messages before it")
            segments += [(False, _merge([prompt[len(done):]])), (True, _merge([full[len(prompt):]]))]
            done = full
        return tuple(segments)


def _field(obj: dict, key: str, empty_ok: bool = False) -> str:
    value = text_field(obj, key)
    if not value and not empty_ok:
        raise BadRecord("empty field", key)
    return value


def example_chars(example: Example) -> int:
    return sum(len(p) for _, doc in example for p in doc if isinstance(p, str))

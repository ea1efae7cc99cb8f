"""The dataset options that change the examples: DatasetOptions.system_prompt and prompt_template."""

from __future__ import annotations

import string
from typing import Any

from services.datasets.domain import CHAT_FORMATS, DatasetFormat

TEMPLATE_FIELDS = frozenset({"prompt", "system_prompt"})


def _short(text: str, limit: int = 40) -> str:
    """A piece of the user's template quoted in a sentence, short enough for an error status."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def template_problems(template: str) -> list[str]:
    """Why `template` cannot be a prompt template (empty when it can).

    A template may hold the plain placeholders {prompt} (required) and {system_prompt}, each at most once,
    and literal braces written {{ and }}: nothing else str.format would act on. A format spec pads
    ("{prompt:>50000000}" made a 5-row upload hundreds of MB), a conversion or an attribute reaches
    into the value, and a repeated placeholder multiplies every example; all of them are refused when
    the upload is checked, before a byte is read.
    """
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return [f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}"]
    problems = []
    decorated = [_short(f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}")
                 for name, spec, conversion in parsed if spec or conversion]
    if decorated:
        problems.append(f"uses {', '.join(decorated)}: placeholders take no format spec or conversion; "
                        "write {prompt} and {system_prompt} as they are")
    names = [name for name, _, _ in parsed]
    unknown = sorted(set(names) - TEMPLATE_FIELDS)
    if unknown:
        problems.append(f"uses unknown placeholders {', '.join(_short('{' + n + '}') for n in unknown[:5])}; "
                        "use {prompt} and {system_prompt}")
    if "prompt" not in names:
        problems.append("must contain {prompt}, where each prompt goes")
    repeated = sorted(n for n in TEMPLATE_FIELDS if names.count(n) > 1)
    if repeated:
        problems.append(f"uses {', '.join('{' + n + '}' for n in repeated)} more than once; each "
                        "placeholder may appear once")
    return problems


def _wrap_user_turns(messages: list[dict[str, Any]], template: str, system_prompt: str) -> None:
    for m in messages:
        if m["role"] == "user" and isinstance(m["content"], str):
            m["content"] = template.format(prompt=m["content"], system_prompt=system_prompt)


def _with_system(messages: list[dict[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _wrap_prompt(prompt: Any, template: str, system_prompt: str, template_has_system: bool) -> Any:
    if isinstance(prompt, list):
        if template:
            _wrap_user_turns(prompt, template, system_prompt)
        return prompt if template_has_system else _with_system(prompt, system_prompt)
    if template:
        prompt = template.format(prompt=prompt, system_prompt=system_prompt)
    if system_prompt and not template_has_system:
        prompt = f"{system_prompt}\n\n{prompt}"
    return prompt


def apply_options(
    record: dict[str, Any], fmt: DatasetFormat, system_prompt: str, template: str
) -> dict[str, Any]:
    """The normalized record with the global system prompt and the prompt template applied (in place).

    The template wraps string prompts and user turns; a template that places {system_prompt} itself
    takes the system prompt, otherwise it becomes a system message (conversations) or a prefix (strings).
    TEXT has no prompt: only the system prompt applies, as a prefix.
    """
    if not system_prompt and not template:
        return record
    has_system = "{system_prompt}" in template
    if fmt in CHAT_FORMATS:
        if template:
            _wrap_user_turns(record["messages"], template, system_prompt)
        if not has_system:
            record["messages"] = _with_system(record["messages"], system_prompt)
    elif fmt is DatasetFormat.TEXT:
        if system_prompt:
            record["text"] = f"{system_prompt}\n\n{record['text']}"
    else:
        record["prompt"] = _wrap_prompt(record["prompt"], template, system_prompt, has_system)
    return record

"""Templates: plain text with `{column}` placeholders, e.g. "Sentence : {text} Label : {label_text}".

Its last placeholder starts the *completion* (the label words of a classifier): what
`--loss-on completion` trains on and what label scoring scores.
"""

from __future__ import annotations

import string


# A last field with at most this many distinct values is taken to hold label words.
MAX_LABEL_WORDS = 20


def template_fields(template: str) -> list[str]:
    """The column names a template uses, in order; only plain `{name}` placeholders are allowed."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template {template!r} is malformed ({error}); write fields as {{column}}") from None
    for _, name, format_spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or format_spec or conversion:
            raise ValueError(
                f"template field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + format_spec if format_spec else ''}}} is not a plain column name: write {{column}}"
            )
        fields.append(name)
    if not fields:
        raise ValueError(f"template {template!r} has no {{column}} field")
    return fields


def fill_template(template: str, row: dict) -> str:
    """The template (or a piece of it, which may hold no field) with each `{column}` filled."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    return template.format(**{name: row[name] for name in names})


def split_template(template: str, row: dict) -> tuple[str, str]:
    """(prompt, completion): the filled text split where the last field starts.

    Whitespace before the split goes to the completion ("... Label :", " hate speech"), so the
    prompt tokenises the same alone as inside the full text (BPE merges a space with the word after).
    """
    last = "{" + template_fields(template)[-1] + "}"
    head, _, tail = template.rpartition(last)
    prompt = fill_template(head, row)
    completion = fill_template(last + tail, row)
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + completion


def label_words_of(template: str, rows: list[dict]) -> list[str] | None:
    """The distinct values of the template's last field, sorted, when few enough to be labels."""
    last = template_fields(template)[-1]
    values = sorted({str(row[last]) for row in rows})
    return values if 0 < len(values) <= MAX_LABEL_WORDS else None


def check_label_words(words: list[str], source: str) -> None:
    """At least two distinct, non-empty label words (classifying with one always answers it); the
    usual slip is one argument with commas, `--labels "a,b"`. `source` starts the ValueError."""
    if len(words) < 2:
        hint = ""
        if source.startswith("--") and words and "," in words[0]:
            hint = f"; one word per argument: {source} " + " ".join(f'"{word.strip()}"' for word in words[0].split(","))
        raise ValueError(f"{source}: {len(words)} label word {words}, classifying needs at least 2{hint}")
    if not all(isinstance(word, str) and word.strip() for word in words):
        raise ValueError(f"{source}: label words must be non-empty text, got {words}")
    if len(set(words)) < len(words):
        raise ValueError(f"{source} repeats a label word: {words}")

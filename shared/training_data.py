"""Training files: JSONL rows of chat `messages` or `prompt`/`completion`, checked line by line.

The gateway checks every row on upload; the worker parses the same way before training, so
a file that was accepted always trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 10


@dataclass(frozen=True)
class Example:
    """One training row: chat turns, or a raw prompt and the completion to learn."""

    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""

    @property
    def is_chat(self) -> bool:
        """Return whether the row is chat turns (else prompt/completion)."""
        return bool(self.messages)


@dataclass(frozen=True)
class Problem:
    """What is wrong with one line of a file."""

    line: int
    message: str


class TrainingDataError(ValueError):
    """A file that cannot be used for training; `problems` name the lines."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = problems or []


# A row longer than this is refused: past the longest max_seq_length (32768 tokens, ~130 KB of
# text) training cuts it anyway, and a 50 MB row of tiny turns parsed into ~1.6M objects (~500 MB
# in the gateway, per upload).
MAX_ROW_CHARS = 2 * 1024 * 1024


def parse_training_file(data: bytes, *, max_rows: int) -> list[Example]:
    """Parse and check a whole JSONL file; raise TrainingDataError naming the bad lines."""
    examples: list[Example] = []
    _check_rows(data, max_rows, examples.append, max_row_chars=None)
    return examples


def count_training_rows(data: bytes, *, max_rows: int) -> int:
    """Check a whole JSONL file as `parse_training_file` does and return its row count, keeping
    no row (the gateway's check of an upload: the parsed rows took many times the file's size)."""
    return _check_rows(data, max_rows, lambda _example: None, max_row_chars=MAX_ROW_CHARS)


def _check_rows(data: bytes, max_rows: int, keep, *, max_row_chars: int | None) -> int:
    """Parse every row, handing each to `keep`; return the row count, or raise TrainingDataError.

    `max_row_chars` is the upload's check only: a file stored before it had one must still train.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark is harmless; drop it
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TrainingDataError(
            f"the file is not UTF-8 text (line {line}, byte {exc.start}); save it as UTF-8 JSONL",
            [Problem(line, "not UTF-8")],
        ) from None
    rows = 0
    problems: list[Problem] = []
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) carry no row
        try:
            if max_row_chars is not None and len(line) > max_row_chars:
                raise ValueError(f"the row is {len(line)} characters; at most {max_row_chars} (training cuts a "
                                 "row at max_seq_length tokens anyway)")
            keep(parse_row(line))
            rows += 1
        except ValueError as exc:
            problems.append(Problem(number, str(exc)))
            if len(problems) >= MAX_REPORTED_PROBLEMS:
                break
        if rows > max_rows:
            raise TrainingDataError(f"the file has more than {max_rows} rows, the limit on this server")
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise TrainingDataError(f"line {first.line}: {first.message}{more}", problems)
    if not rows:
        raise TrainingDataError("the file has no rows; give one JSON object per line")
    return rows


def _lines(text: str):
    """Yield the lines of a text, one at a time (a list of them all was another copy of the file).

    Lines end at "\n" (and "\r\n") only: JSON strings may hold U+2028, U+2029 or U+0085 raw,
    which `str.splitlines` would also break at.
    """
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def parse_row(line: str) -> Example:
    """Parse one JSONL line into an Example; ValueError says what is wrong with it."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in row:
        _no_other_keys(row, {"messages"})
        return Example(messages=_parse_messages(row["messages"]))
    if "prompt" in row or "completion" in row:
        _no_other_keys(row, {"prompt", "completion"})
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError('"prompt" must be a non-empty string')
        if not isinstance(completion, str) or not completion:
            raise ValueError('"completion" must be a non-empty string')
        _check_unicode(prompt, '"prompt"')
        _check_unicode(completion, '"completion"')
        return Example(prompt=prompt, completion=completion)
    raise ValueError('a row needs "messages" (chat turns) or "prompt" and "completion"')


def _check_unicode(text: str, name: str) -> None:
    """Refuse half of a UTF-16 pair (a lone "\\ud800" escape): valid JSON, but no text to train on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff); send valid Unicode") from None


def _no_other_keys(row: dict, allowed: set[str]) -> None:
    extra = sorted(set(row) - allowed)
    if extra:
        raise ValueError(f"unknown field {extra[0]!r}; a row has only {' and '.join(sorted(allowed))}")


def _parse_messages(messages: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'messages[{index}] must be an object with exactly "role" and "content"')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str) or not content:
            raise ValueError(f"messages[{index}].content must be a non-empty string")
        _check_unicode(content, f"messages[{index}].content")
        if role == "system" and index != 0:
            raise ValueError(f"messages[{index}]: a system message may only come first")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise ValueError("the last message must be the assistant's (the turn the model learns)")
    if not any(role == "user" for role, _ in turns):
        raise ValueError("the messages need at least one user turn")
    return tuple(turns)

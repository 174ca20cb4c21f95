"""Chat templates (a GGUF's `tokenizer.chat_template`), rendered as HF transformers does (jinja2, sandboxed,
trim_blocks/lstrip_blocks, its helpers) but within limits, since the template is code from the model file:

    template = compile_template(source)                 # ValueError("chat template: ...") for a broken one
    prompt = render(template, dict(messages=[...], add_generation_prompt=True, bos_token="<s>"))

Limits: TEMPLATE_SECONDS of wall time (checked on every line of template code, through sys.settrace, since jinja
yields only on output and a loop that prints nothing can only be stopped from inside), TEMPLATE_MAX_CHARS for the
output, for any one value built on the way and for the source, TEMPLATE_MAX_DEPTH nested macro calls; operators,
calls and filters that could multiply their inputs (`"x" * 10**9`, join, center, format widths) are checked before
they run. Any failure inside the template (a division by zero, "a" + 1, raise_exception, a sandbox violation, a
limit) is a ValueError starting "chat template:".
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

TEMPLATE_KEY = "tokenizer.chat_template"
# Chat template rendering limits. Real templates are a few KiB and render in milliseconds; these stop a hostile one.
TEMPLATE_SECONDS = 2.0  # wall time of one rendering (or compilation), checked on every template line
TEMPLATE_MAX_CHARS = 1 << 20  # 1 Mi characters: the rendered prompt, any one value built while rendering, the source
TEMPLATE_MAX_DEPTH = 64  # nested template frames (macro calls): real templates nest a few deep
# one step may build up to this much before its result is checked against TEMPLATE_MAX_CHARS (a join of a long text)
_TEMPLATE_STEP_CHARS = 16 * TEMPLATE_MAX_CHARS


class _TemplateLimit(Exception):
    """A chat template ran past one of the rendering limits."""


_MAX_VISITS = 1 << 16  # containers one size check looks into; past it a value counts as too large (no real chat
#                        template holds that many, and a list holding itself twice, 22 deep, would take seconds)


def _size(value: Any, budget: int = _TEMPLATE_STEP_CHARS + 1) -> int:
    """Characters (for str) or items, counted through nested lists, tuples and dicts, without recursion; more than
    `budget` (or too many containers to look into) gives budget + 1."""
    if isinstance(value, (str, range)):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    total, stack = 0, [value]
    for _ in range(_MAX_VISITS):
        if not stack:
            return total
        container = stack.pop()
        total += len(container)
        if total > budget:
            return budget + 1
        for item in itertools.chain.from_iterable(container.items()) if isinstance(container, dict) else container:
            if isinstance(item, (str, range)):
                total += len(item)
            elif isinstance(item, (list, tuple, dict)):
                stack.append(item)
    return total if not stack else budget + 1


def _arg_size(value: Any) -> int:
    """What an argument can make a result grow by: an integer's magnitude (a width, a count), else its size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value)
    return _size(value)


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and _size(value) > TEMPLATE_MAX_CHARS:
        raise _TemplateLimit(f"{what} is larger than the limit of {TEMPLATE_MAX_CHARS} characters or items")
    return value


def _check_growth(args: Iterable[Any], what: str) -> None:
    """Before a call that can multiply its inputs (join, replace, center, indent, x * n...): the largest argument
    times (1 + the next largest) bounds what it builds."""
    sizes = sorted((_arg_size(a) for a in args), reverse=True)
    if sizes and sizes[0] * (1 + (sizes[1] if len(sizes) > 1 else 0)) > _TEMPLATE_STEP_CHARS:
        raise _TemplateLimit(f"{what} could build more than {_TEMPLATE_STEP_CHARS} characters or items")


_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string
# A width or precision given as an argument, which the format string does not show: '%*s' % (10**9, x), and
# '{:{}}'.format(x, 10**9). Real chat templates use neither.
_COMPUTED_WIDTH = re.compile(r"%[#0 +\-]*\.?\*|%[#0 +\-]*\d*\.\*|\{[^{}]*:[^{}]*\{")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise _TemplateLimit("a format string with a width or precision of a million or more")
    if isinstance(fmt, str) and _COMPUTED_WIDTH.search(fmt):
        raise _TemplateLimit("a format string whose width or precision is an argument ('%*s', '{:{}}')")


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """A chat template compiled as HF transformers does: sandboxed, trim_blocks/lstrip_blocks, its helpers; with
    realm's size limits on operators, calls and filters (see `render` for time and depth)."""
    from jinja2 import Undefined
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if len(source) > TEMPLATE_MAX_CHARS:
        raise ValueError(f"chat template: the template has {len(source)} characters, more than the limit of "
                         f"{TEMPLATE_MAX_CHARS} ({TEMPLATE_KEY})")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # intercepted operators are also never constant-folded at compile time ({{ 10 ** 10 ** 9 }})
        intercepted_binops = frozenset(("*", "+", "**", "%"))

        def call_binop(self, context, operator, left, right):
            if operator == "**" and not isinstance(left, float) and not isinstance(right, float):
                if isinstance(right, int) and abs(right) * max(1, int(abs(left)).bit_length()) > 1 << 16:
                    raise _TemplateLimit(f"{left} ** {right} is too large a number")
            elif operator == "*":
                if isinstance(left, int) and isinstance(right, int):
                    if left.bit_length() + right.bit_length() > 1 << 16:
                        raise _TemplateLimit("a product of too large numbers")
                else:
                    _check_growth((left, right), f"{operator!r} on a {type(left).__name__}")
            elif operator == "%":
                _check_format(left)
            result = super().call_binop(context, operator, left, right)
            return _check_size(result, f"the result of {operator!r}")

        def call(__self, __context, __obj, *args, **kwargs):
            bound = getattr(__obj, "__self__", None)  # the separator of sep.join(items), the text of s.replace(...)
            inputs = (*args, *kwargs.values(), *((bound,) if isinstance(bound, (str, list, tuple, dict)) else ()))
            _check_growth(inputs, f"a call of {getattr(__obj, '__name__', 'a function')}")
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def getattr(self, obj, attribute):
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_format(obj)
            return super().getattr(obj, attribute)

    def bounded_filter(name: str, f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
        def wrapper(*args, **kwargs):
            # not the context, nor an undefined name (`x | default(1)`): hasattr on jinja's Undefined raises
            values = [a for a in (*args, *kwargs.values())
                      if not isinstance(a, Undefined) and not hasattr(a, "environment")]
            if name == "format" and values:
                _check_format(values[0])
            _check_growth(values, f"the filter {name!r}")
            return _check_size(f(*args, **kwargs), f"the result of the filter {name!r}")

        return wrapper

    def bounded_join(parts) -> str:
        # the compiled template's "~" (str_join) and its block output (concat): the size is known before joining
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        if sum(map(len, parts)) > TEMPLATE_MAX_CHARS:
            raise _TemplateLimit(f"a text built by the template is longer than the limit of {TEMPLATE_MAX_CHARS} "
                                 "characters")
        return "".join(parts)

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        _check_format(fmt)
        return datetime.datetime.now().strftime(fmt)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.concat = bounded_join
    env.filters["tojson"] = tojson
    env.filters = {name: bounded_filter(name, f) for name, f in env.filters.items()}
    del env.globals["lipsum"]  # jinja's lorem ipsum runs outside the time limit's reach; chat templates never use it
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        template = env.from_string(source)
    except (TemplateError, RecursionError, MemoryError) as e:
        raise ValueError(f"chat template: {_describe(e)}") from e
    except Exception as e:  # the parser's own failures on odd input; never a traceback for a model file's text
        raise ValueError(f"chat template: compiling it failed: {_describe(e)}") from e
    template.root_render_func.__globals__["str_join"] = bounded_join  # the compiled module's namespace
    return template


def _describe(e: BaseException) -> str:
    from jinja2.exceptions import TemplateError

    if isinstance(e, (_TemplateLimit, TemplateError)):
        return str(e)
    if isinstance(e, RecursionError):
        return "too deeply nested (RecursionError)"
    return f"{type(e).__name__}: {e}"


class _Budget:
    """Time and depth limits on template code in the current thread, with sys.settrace: every line of compiled
    template code (filename "<template>") checks the deadline, every call of one counts its depth. Jinja yields only
    on output, so loops that print nothing can only be stopped from inside. The previous tracer is restored."""

    def __init__(self, seconds: float = TEMPLATE_SECONDS, max_depth: int = TEMPLATE_MAX_DEPTH):
        self.seconds, self.max_depth = seconds, max_depth

    def __enter__(self) -> _Budget:
        self.deadline = time.monotonic() + self.seconds
        self.depth = 0
        self.previous = sys.gettrace()
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self.previous)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"rendering took longer than the limit of {self.seconds} s")

    def _call(self, frame, event, arg):
        if event != "call" or frame.f_code.co_filename != "<template>":
            return None
        self.depth += 1
        if self.depth > self.max_depth:
            raise _TemplateLimit(f"macro calls nested deeper than the limit of {self.max_depth}")
        self._check_time()
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self._check_time()
        elif event == "return":
            self.depth -= 1
        return self._line


def render(template, context: dict[str, Any]) -> str:
    """Render within the limits (TEMPLATE_SECONDS, TEMPLATE_MAX_CHARS, TEMPLATE_MAX_DEPTH); any failure inside the
    template is a ValueError("chat template: ...")."""
    parts: list[str] = []
    size = 0
    try:
        with _Budget():
            stream = template.generate(**context)
            try:
                for part in stream:
                    size += len(part)
                    if size > TEMPLATE_MAX_CHARS:
                        raise _TemplateLimit(f"the rendered prompt is longer than the limit of {TEMPLATE_MAX_CHARS} "
                                             "characters")
                    parts.append(part)
            finally:
                stream.close()
    except Exception as e:  # anything the template's code raised: a ZeroDivisionError is the file's fault, too
        raise ValueError(f"chat template: {_describe(e)}") from e
    return "".join(parts)

"""Reward functions: plugins with verl's signature, and the call that never crashes a rollout.

A reward function is `compute_score(data_source, solution_str, ground_truth, extra_info=None)`
returning a number or a dict with a `score` key (other keys are logged), as in verl's
`verl/utils/reward_score`, so a verl reward file plugs in as `module:function`. Built-ins:
`arithmetic` (the tiny task), `gsm8k`, `math`, and `by_data_source` (verl's default: the
scorer of each row's data_source).

`score()` turns whatever the function does into a `RewardResult`: an exception, a NaN, or a
return value of the wrong shape becomes an error on that one sample with score 0.0, because
one bad sample (or one bug in a user's reward) should not kill a server holding a lease.

Stdlib only: rollout workers and the CLI import this before torch/vLLM.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38  # the learner trains in float32 (services.common.trajectories)

RewardFn = Callable[..., Any]
"""`(data_source, solution_str, ground_truth, extra_info=None) -> float | dict` (verl's)."""

Detail = float | str | int | bool


@dataclass(frozen=True)
class RewardResult:
    """One sample's reward. `score` is finite (0.0 when `error` is set); `details` are the
    extra keys a dict-returning reward gave, reduced to JSON scalars for logging."""

    score: float
    details: dict[str, Detail] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.score):
            raise ValueError(f"RewardResult.score must be finite, got {self.score!r}")


def score(fn: RewardFn, data_source: str, solution_str: str, ground_truth: str,
          extra_info: dict[str, Any] | None = None) -> RewardResult:
    """Call `fn` and interpret its result. Never raises for anything `fn` does, short of
    BaseException-only exits (KeyboardInterrupt, SystemExit)."""
    try:
        out = fn(data_source, solution_str, ground_truth, extra_info)
    except Exception as e:
        return RewardResult(0.0, error=f"reward function raised {type(e).__name__}: {e}")
    try:
        return _interpret(out)
    except Exception as e:  # e.g. a details value whose __str__ raises
        return RewardResult(0.0, error=f"reward result unreadable: {type(e).__name__}: {e}")


def _interpret(out: Any) -> RewardResult:
    details: dict[str, Detail] = {}
    if isinstance(out, dict):
        details = {str(k): _json_scalar(v) for k, v in out.items() if k != "score"}
        if "score" not in out:
            return RewardResult(0.0, details, error=f"reward dict has no 'score' key (keys: {sorted(details)})")
        out = out["score"]
    # numbers.Real covers bool, int, float and numpy scalars without importing numpy.
    if not isinstance(out, numbers.Real):
        return RewardResult(0.0, details, error=f"reward score is {type(out).__name__}, expected a number")
    value = float(out)
    if not math.isfinite(value):
        return RewardResult(0.0, details, error=f"reward score is not finite: {value!r}")
    if abs(value) > FLOAT32_MAX:  # the learner refuses the group (trajectories.finite32): leased again forever
        return RewardResult(0.0, details, error=f"reward score {value!r} is outside float32's range")
    return RewardResult(value, details)


def _json_scalar(v: Any) -> Detail:
    if isinstance(v, bool | int | str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else repr(f)  # strict JSON has no NaN/inf
    return str(v)


# ---------------------------------------------------------------------------------------------
# Built-ins

_SPECIAL_TOKENS = ("<pad>", "<bos>")


def arithmetic_exact(data_source: str, solution_str: str, ground_truth: str,
                     extra_info: dict[str, Any] | None = None) -> float:
    """Tiny task (`3+8=` -> `11`, answers zero-padded to two digits): 1.0 iff the generation,
    cut at the first `<eos>` and stripped of `<pad>`/`<bos>`/whitespace at its ends, equals the
    ground truth exactly. `5` for `05` scores 0: partial credit teaches little here."""
    text = solution_str.split("<eos>", 1)[0]
    previous = None
    while text != previous:  # peel specials and whitespace off both ends, in any order
        previous = text
        text = text.strip()
        for tok in _SPECIAL_TOKENS:
            text = text.removeprefix(tok).removesuffix(tok)
    return 1.0 if text == ground_truth.strip() else 0.0


def arithmetic_prefix(data_source: str, solution_str: str, ground_truth: str,
                      extra_info: dict[str, Any] | None = None) -> float:
    """The tiny task for long responses (`bench peers --workload heavy`: every response is
    generated to full length, ignoring end-of-sequence): 1.0 iff the generation, stripped of
    `<pad>`/`<bos>`/whitespace at its start, begins with the ground truth; what follows is
    not scored."""
    text = solution_str
    previous = None
    while text != previous:
        previous = text
        text = text.lstrip()
        for tok in _SPECIAL_TOKENS:
            text = text.removeprefix(tok)
    return 1.0 if text.startswith(ground_truth.strip()) else 0.0


# verl's strict GSM8K format (verl/utils/reward_score/gsm8k.py), plus an optional `$`.
_GSM8K_ANSWER = re.compile(r"#### \$?(-?[0-9.,]*[0-9])")


def gsm8k(data_source: str, solution_str: str, ground_truth: str,
          extra_info: dict[str, Any] | None = None) -> float:
    """1.0 iff the number in the last well-formed `#### <number>` equals the ground truth
    numerically (`1,234` == `1234.0`). The ground truth may be the bare answer or a full
    GSM8K solution ending in `#### 42`; one that is not a number raises (a data bug)."""
    truth = _decimal(ground_truth.rsplit("####", 1)[-1])
    if truth is None:
        raise ValueError(f"GSM8K ground truth is not a number: {ground_truth!r}")
    found = _GSM8K_ANSWER.findall(solution_str)
    if not found:
        return 0.0
    answer = _decimal(found[-1])
    return 1.0 if answer is not None and answer == truth else 0.0


def _decimal(text: str) -> Decimal | None:
    try:
        d = Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def math_answer(data_source: str, solution_str: str, ground_truth: str,
                extra_info: dict[str, Any] | None = None) -> float:
    """MATH-style checker: the last `\\boxed{...}` (or, without one, the text after the last
    "answer is"), normalised, equals the normalised ground truth as a string or as a number
    (`0.5`, `1/2`, `\\frac{1}{2}`) within 1e-6 relative."""
    extracted = _extract_math_answer(solution_str)
    if extracted is None:
        return 0.0
    answer, truth = _normalise_math(extracted), _normalise_math(ground_truth)
    if not answer:
        return 0.0
    if answer == truth:
        return 1.0
    a, b = _math_number(answer), _math_number(truth)
    if a is None or b is None:
        return 0.0
    return 1.0 if abs(a - b) <= Fraction(1, 10**6) * max(abs(a), abs(b)) else 0.0


def _extract_math_answer(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start >= 0:
        # Brace matching, not a regex: answers like \boxed{\frac{1}{2}} nest.
        depth, begin = 0, start + len("\\boxed{")
        for i in range(begin, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                if depth == 0:
                    return text[begin:i]
                depth -= 1
        return None  # unclosed: the generation was cut off inside the answer
    matches = list(re.finditer(r"answer is:?", text, re.IGNORECASE))
    if not matches:
        return None
    rest = text[matches[-1].end():].split("\n", 1)[0]
    return re.split(r"\.\s", rest, maxsplit=1)[0]  # end of sentence; `0.5` stays whole


def _normalise_math(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s).replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)  # keeps \rightarrow intact
    s = s.replace("\\!", "").replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.rstrip(".")
    return re.sub(r"(?<![0-9])\.(?=[0-9])", "0.", s)  # .5 -> 0.5, -.5 -> -0.5


_NUM = r"-?\d+(?:\.\d+)?"
_PLAIN = re.compile(rf"({_NUM})")
_SLASH = re.compile(rf"({_NUM})/({_NUM})")
_FRAC = re.compile(rf"(-?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")


def _math_number(s: str) -> Fraction | None:
    if m := _PLAIN.fullmatch(s):
        return Fraction(m[1])
    sign, num, den = 1, None, None
    if m := _SLASH.fullmatch(s):
        num, den = m[1], m[2]
    elif m := _FRAC.fullmatch(s):
        sign, num, den = (-1 if m[1] else 1), m[2], m[3]
    if num is None or den is None or Fraction(den) == 0:
        return None
    return sign * Fraction(num) / Fraction(den)


# verl's default_compute_score picks the scorer by the row's data_source; these are the
# sources whose scorers exist here.
VERL_SOURCES: dict[str, RewardFn] = {
    "openai/gsm8k": gsm8k,
    "lighteval/MATH": math_answer, "DigitalLearningGmbH/MATH-lighteval": math_answer,
    "HuggingFaceH4/MATH-500": math_answer,
}


def by_data_source(data_source: str, solution_str: str, ground_truth: str,
                   extra_info: dict[str, Any] | None = None) -> float:
    """verl's default reward (no custom_reward_function): the scorer of the row's data_source."""
    fn = VERL_SOURCES.get(data_source)
    if fn is None:
        raise ValueError(f"no built-in reward for data_source {data_source!r} (built in: "
                         f"{', '.join(VERL_SOURCES)}); give custom_reward_function")
    return fn(data_source, solution_str, ground_truth, extra_info)


BUILTINS: dict[str, RewardFn] = {"arithmetic": arithmetic_exact, "arithmetic_prefix": arithmetic_prefix,
                                 "gsm8k": gsm8k, "math": math_answer, "by_data_source": by_data_source}


def load_reward_fn(spec: str) -> RewardFn:
    """A built-in name (`arithmetic`, `arithmetic_prefix`, `gsm8k`, `math`) or `package.module:function`.

    Only dotted module names are accepted, not file paths. Raises ValueError naming what is
    wrong: unknown built-in (with the valid names), module not importable, attribute missing,
    not callable, or not callable with verl's four arguments."""
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILTINS:
            return BUILTINS[spec]
        raise ValueError(f"unknown reward {spec!r}: built-ins are {', '.join(sorted(BUILTINS))}, "
                         "or give 'package.module:function'")
    module_name, _, attr = spec.partition(":")
    if not all(p.isidentifier() for p in module_name.split(".")) or not attr.isidentifier():
        raise ValueError(f"bad reward spec {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # not found, or the module itself fails to import
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: "
                         f"{type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    try:
        inspect.signature(fn).bind("data_source", "solution_str", "ground_truth", None)
    except TypeError as e:
        raise ValueError(f"reward {spec!r} cannot be called as (data_source, solution_str, "
                         f"ground_truth, extra_info): {e}") from e
    except ValueError:
        pass  # no introspectable signature (some C callables); find out at call time
    return fn

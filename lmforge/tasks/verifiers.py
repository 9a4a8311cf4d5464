"""Built-in verifiers: rewards in [0, 1] computed from a completion and the example's reference, no model.

Each verifier is `fn(completion, reference) -> float`:
- `exact_reward`: the completion's extracted answer equals the reference answer.
- `numeric_reward`: both parse as numbers ("1,000", "3/4", "50%", "$2.50") that agree to a relative 1e-6.
- `math_reward`: both parse as math expressions that are equal: `sympy` when installed (symbolic difference
  simplifies to 0), else the numeric evaluator below at three probe points for the variables. LaTeX-ish forms
  (\\frac{a}{b}, \\sqrt{x}, ^, \\cdot, \\boxed{...}) are normalised first.
- `think_reward`: the answer line after `</think>` equals the reference (the reasoning family's format).
- `regex_reward`: the pattern matches somewhere in the completion.
- `json_schema_reward`: the completion (or its ```json fence) parses as JSON valid under the schema
  (needs the `jsonschema` package; a remote `$ref` is never fetched).

The answer of a completion is the content of its last \\boxed{...}, else the text after its last "answer:"
(`tasks.suite.extract_answer`); a reference written GSM8K-style ("... #### 42") counts from "####".
Nothing is ever `eval`ed: expressions are parsed with `ast` and only numbers, names, + - * / ^, and a few
functions are accepted; exponents are capped so a completion cannot make the evaluator hang.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re
from collections.abc import Callable
from typing import Any

from lmforge.tasks.reasoning import extract_answer as think_answer
from lmforge.tasks.suite import extract_answer

MAX_EXPRESSION = 200  # characters; longer "answers" are not parsed
MAX_EXPONENT = 64

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    found = list(_BOXED.finditer(text))
    if not found:
        return None
    start, depth = found[-1].end(), 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def answer_of(completion: str) -> str:
    """The answer a completion gives: its last \\boxed{...}, else `extract_answer` (after "answer:")."""
    inner = boxed(completion)
    return inner.strip() if inner is not None else extract_answer(completion)


def reference_of(reference: str) -> str:
    """A reference answer: the text after a GSM8K "####", else after "answer:" / a \\boxed{}, stripped."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return answer_of(reference)


def exact_reward(completion: str, reference: str) -> float:
    return 1.0 if answer_of(completion) == reference_of(reference) else 0.0


def parse_number(text: str) -> float | None:
    """A number written as 12, -3.5, 1,000, 3/4, 50% or $2.50; None when `text` is not one number."""
    t = text.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    percent = t.endswith("%")
    t = t.rstrip("%")
    try:
        if re.fullmatch(r"-?\d+/\d+", t):
            num, den = t.split("/")
            value = int(num) / int(den)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(value):
        return None
    return value / 100 if percent else value


def numeric_reward(completion: str, reference: str, rel_tol: float = 1e-6) -> float:
    """1.0 when the completion's answer (or, failing that, its last number) equals the reference number."""
    want = parse_number(reference_of(reference))
    if want is None:
        return 0.0
    answer = answer_of(completion)
    got = parse_number(answer)
    if got is None:
        numbers = _NUMBER.findall(answer) or _NUMBER.findall(completion)
        got = parse_number(numbers[-1]) if numbers else None
    return 1.0 if got is not None and math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-12) else 0.0


# ----------------------------------------------------------------------------------------------
# math expressions: a whitelisted `ast` walk, evaluated with floats or built into sympy

FUNCTIONS: dict[str, Callable[[float], float]] = {
    "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log, "ln": math.log,
    "exp": math.exp, "abs": abs,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                  ast.Mult: operator.mul, ast.Div: operator.truediv,
                                                  ast.Pow: operator.pow}
_LATEX = [(r"\\left|\\right|\\!|\\,|\$", ""), (r"\\(?:cdot|times)", "*"), (r"\\pi", "pi"),
          (r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"), (r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)"),
          (r"\\(sin|cos|tan|log|ln|exp)", r"\1"), (r"\^", "**"), (r"[{\[]", "("), (r"[}\]]", ")"),
          (r"(\d)\s*([a-zA-Z(])", r"\1*\2"), (r"\)\s*([a-zA-Z0-9(])", r")*\1")]


class NotMath(ValueError):
    """Text that is not an expression the verifier accepts."""


def parse_math(text: str) -> ast.expr:
    """`text` normalised (LaTeX-ish forms, implicit products, ^) and parsed to a whitelisted `ast` tree."""
    text = text.strip().rstrip(".")
    if not text or len(text) > MAX_EXPRESSION:
        raise NotMath("empty or too long")
    for pattern, repl in _LATEX:
        text = re.sub(pattern, repl, text)
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise NotMath(str(e)) from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Name, ast.Load)) or (
            isinstance(node, ast.Constant) and type(node.value) in (int, float)) or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and len(node.args) == 1 and not node.keywords)
        if not ok or isinstance(node, ast.BinOp) and type(node.op) not in _BINARY or (
                isinstance(node, ast.UnaryOp) and not isinstance(node.op, (ast.UAdd, ast.USub))):
            raise NotMath(f"{type(node).__name__} is not allowed")
    return tree


def variables(tree: ast.expr) -> set[str]:
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in calls and n.id not in CONSTANTS}


def evaluate(tree: ast.expr, values: dict[str, float]) -> float:
    """Float value of a `parse_math` tree with `values` for its variables; `NotMath` on overflow, a complex or
    undefined result, or an exponent beyond MAX_EXPONENT."""

    def ev(node: ast.expr) -> float:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return CONSTANTS.get(node.id, values.get(node.id, math.nan))
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](ev(node.args[0]))  # type: ignore[union-attr]
        assert isinstance(node, ast.BinOp)
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise NotMath("exponent too large")
        return _BINARY[type(node.op)](left, right)

    try:
        value = ev(tree)
    except (ArithmeticError, ValueError, TypeError) as e:
        raise NotMath(str(e)) from None
    if not isinstance(value, float) or not math.isfinite(value):
        raise NotMath(f"value {value!r}")
    return value


def _probe_points(names: set[str], n: int = 3) -> list[dict[str, float]]:
    rng = random.Random(0)
    return [{name: rng.uniform(0.5, 2.5) for name in sorted(names)} for _ in range(n)]


def _numeric_equal(a: ast.expr, b: ast.expr) -> bool:
    for point in _probe_points(variables(a) | variables(b)):
        if not math.isclose(evaluate(a, point), evaluate(b, point), rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def _to_sympy(node: ast.expr, sympy: Any) -> Any:
    if isinstance(node, ast.Constant):
        return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Rational(repr(node.value))
    if isinstance(node, ast.Name):
        return {"pi": sympy.pi, "e": sympy.E}.get(node.id) or sympy.Symbol(node.id)
    if isinstance(node, ast.UnaryOp):
        inner = _to_sympy(node.operand, sympy)
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Call):
        name = {"ln": "log", "abs": "Abs"}.get(node.func.id, node.func.id)  # type: ignore[union-attr]
        return getattr(sympy, name)(_to_sympy(node.args[0], sympy))
    assert isinstance(node, ast.BinOp)
    return _BINARY[type(node.op)](_to_sympy(node.left, sympy), _to_sympy(node.right, sympy))


def _sympy() -> Any:
    try:
        import sympy
    except ImportError:
        return None
    return sympy


def math_equal(a: str, b: str, use_sympy: bool = True) -> bool:
    """Whether two expressions are equal: equal values at three probe points of their variables, confirmed by
    sympy's simplify(a - b) == 0 when sympy is installed (and `use_sympy`). Either side failing to parse (or
    blowing up) is "not equal"."""
    try:
        ta, tb = parse_math(a), parse_math(b)
        # the float pass first: it rejects huge exponents and undefined values before sympy sees them
        close = _numeric_equal(ta, tb)
    except NotMath:
        return False
    sympy = _sympy() if use_sympy else None
    if sympy is None or not close:  # unequal values at a probe point: unequal, no need to simplify
        return close
    try:
        return bool(sympy.simplify(_to_sympy(ta, sympy) - _to_sympy(tb, sympy)) == 0)
    except (ArithmeticError, ValueError, TypeError, AttributeError):
        return close


def math_reward(completion: str, reference: str) -> float:
    return 1.0 if math_equal(answer_of(completion), reference_of(reference)) else 0.0


def regex_reward(completion: str, pattern: str) -> float:
    return 1.0 if re.search(pattern, completion) else 0.0


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def schema_validator(schema: dict[str, Any]) -> Any:
    """A JSON Schema (2020-12) validator that never fetches a remote `$ref`; `ValueError` for a schema that is not
    one (needs the optional `jsonschema` package)."""
    import jsonschema
    from referencing import Registry
    from referencing.exceptions import NoSuchResource

    def offline(uri: str) -> Any:
        raise NoSuchResource(ref=uri)

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a valid JSON Schema ({e.message})") from None
    return jsonschema.Draft202012Validator(schema, registry=Registry(retrieve=offline))


def json_schema_reward(completion: str, schema: dict[str, Any]) -> float:
    """1.0 when the completion (or the first ```json fenced block in it) is JSON valid under `schema`; a `$ref` the
    schema cannot resolve locally counts as invalid."""
    fenced = _FENCE.search(completion)
    try:
        value = json.loads(fenced.group(1) if fenced else completion)
    except ValueError:
        return 0.0
    from referencing.exceptions import Unresolvable

    try:
        return 1.0 if schema_validator(schema).is_valid(value) else 0.0
    except (ValueError, Unresolvable):
        return 0.0


def think_reward(completion: str, reference: str) -> float:
    """1.0 when the answer line after the completion's `</think>` equals the reference (the reasoning task
    family's format, `tasks.reasoning`); a completion that never closes its thinking gets 0."""
    return 1.0 if think_answer(completion) == " ".join(reference.split()) else 0.0


ANSWER_VERIFIERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_reward, "numeric": numeric_reward, "math": math_reward, "think": think_reward}
"""The verifiers that judge a completion against a reference answer, by name."""

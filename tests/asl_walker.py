"""Runs a state machine definition (the file itself) by calling Python functions for its
tasks: the paths moto's Step Functions cannot run here (Lambda tasks need Docker there,
ECS tasks a container) are run with the real handlers, in the order the definition gives.

It implements the parts of the Amazon States Language the definition uses, and refuses
anything else (so a new construct in the definition fails the tests until it is handled
here): Task, Pass, Choice, Wait, Succeed, Fail; Parameters, ResultSelector, ResultPath,
Retry (attempts counted, no sleeping), Catch; JSONPath `$`, `$.a.b`, `$.a[0].b`,
`$$.Execution.Id`; the intrinsics States.Format, States.MathAdd, States.JsonToString,
States.StringSplit and States.Array. A task function's exception is its error: the name is
the exception's type (as Lambda's errorType), the cause Lambda's JSON.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Task = Callable[[Any], Any]
_TOKEN = re.compile(r"\.([A-Za-z_][\w-]*)|\[(\d+)\]")


class TaskError(Exception):
    def __init__(self, error: str, cause: str):
        super().__init__(f"{error}: {cause}")
        self.error, self.cause = error, cause


@dataclass
class Run:
    status: str = "RUNNING"  # SUCCEEDED | FAILED
    visited: list[str] = field(default_factory=list)
    inputs: dict[str, list[Any]] = field(default_factory=dict)  # state -> inputs, in order
    results: list[tuple[str, Any]] = field(default_factory=list)  # (task state, its result)
    output: Any = None
    error: str = ""
    cause: str = ""


def substitute(definition: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The definition with ${Name} replaced as CloudFormation's DefinitionSubstitutions do."""
    text = json.dumps(definition)
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    left = re.findall(r"\$\{(\w+)\}", text)
    if left:
        raise ValueError(f"substitutions missing: {sorted(set(left))}")
    return json.loads(text)


def path_get(data: Any, path: str, context: dict[str, Any]) -> Any:
    if path.startswith("$$"):
        data, path = context, path[1:]
    if not path.startswith("$"):
        raise ValueError(f"not a path: {path!r}")
    rest = path[1:]
    for match in _TOKEN.finditer(rest):
        name, index = match.groups()
        try:
            data = data[name] if name is not None else data[int(index)]
        except (KeyError, IndexError, TypeError):
            raise TaskError("States.Runtime", f"path {path} not found in the input") from None
    if "".join(m.group(0) for m in _TOKEN.finditer(rest)) != rest:
        raise ValueError(f"unsupported path {path!r}")
    return data


def path_set(data: Any, path: str | None, value: Any) -> Any:
    if path is None:
        return data
    if path == "$":
        return value
    out = copy.deepcopy(data) if isinstance(data, dict) else {}
    names = [m.group(1) for m in _TOKEN.finditer(path[1:])]
    if None in names:
        raise ValueError(f"unsupported ResultPath {path!r}")
    node = out
    for name in names[:-1]:
        node = node.setdefault(name, {})
    node[names[-1]] = value
    return out


def _split_args(text: str) -> list[str]:
    args, depth, quoted, current = [], 0, False, ""
    for ch in text:
        if ch == "'" and not current.endswith("\\"):
            quoted = not quoted
        if not quoted and ch == "(":
            depth += 1
        if not quoted and ch == ")":
            depth -= 1
        if ch == "," and not quoted and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        args.append(current.strip())
    return args


def evaluate(expr: str, data: Any, context: dict[str, Any]) -> Any:
    if expr.startswith("$"):
        return path_get(data, expr, context)
    match = re.fullmatch(r"(States\.\w+)\((.*)\)", expr, re.S)
    if not match:
        raise ValueError(f"unsupported expression {expr!r}")
    name, args = match.group(1), [_arg(a, data, context) for a in _split_args(match.group(2))]
    if name == "States.Format":
        text = args[0]
        for value in args[1:]:
            text = text.replace("{}", value if isinstance(value, str) else json.dumps(value), 1)
        return text
    if name == "States.MathAdd":
        return int(args[0]) + int(args[1])
    if name == "States.JsonToString":
        return json.dumps(args[0], separators=(",", ":"))
    if name == "States.StringSplit":
        return [part for part in args[0].split(args[1]) if part]
    if name == "States.Array":
        return list(args)
    raise ValueError(f"unsupported intrinsic {name}")


def _arg(text: str, data: Any, context: dict[str, Any]) -> Any:
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("\\'", "'")
    if text.startswith("$") or text.startswith("States."):
        return evaluate(text, data, context)
    return json.loads(text)


def resolve(template: Any, data: Any, context: dict[str, Any]) -> Any:
    """Parameters / ResultSelector: keys ending in `.$` take the value of their path."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            if key.endswith(".$"):
                out[key[:-2]] = evaluate(value, data, context)
            else:
                out[key] = resolve(value, data, context)
        return out
    if isinstance(template, list):
        return [resolve(v, data, context) for v in template]
    return template


_CHOICE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "BooleanEquals": lambda a, b: a is b or a == b,
    "StringEquals": lambda a, b: a == b,
    "NumericEquals": lambda a, b: a == b,
    "NumericGreaterThanEquals": lambda a, b: a >= b,
}


def _matches(rule: dict[str, Any], data: Any, context: dict[str, Any]) -> bool:
    try:
        value = path_get(data, rule["Variable"], context)
    except TaskError:
        return False  # as Step Functions: a missing variable matches no comparison
    for op, compare in _CHOICE_OPS.items():
        if op in rule:
            return compare(value, rule[op])
        if op + "Path" in rule:
            return compare(value, path_get(data, rule[op + "Path"], context))
    raise ValueError(f"unsupported choice rule {rule}")


def _error_of(exc: BaseException) -> TaskError:
    if isinstance(exc, TaskError):
        return exc
    return TaskError(type(exc).__name__, json.dumps(
        {"errorMessage": str(exc), "errorType": type(exc).__name__}))


def _error_matches(names: list[str], error: str) -> bool:
    return "States.ALL" in names or error in names or (
        "States.TaskFailed" in names and not error.startswith("States."))


def run(definition: dict[str, Any], tasks: dict[str, Task], data: Any,
        execution_id: str = "arn:aws:states:us-east-1:123456789012:execution:sm:test",
        start: str | None = None, max_wait_s: float = 0.2,
        timeout_s: float | None = None) -> Run:
    """Runs from `start` (default StartAt) to a terminal state."""
    states = definition["States"]
    context = {"Execution": {"Id": execution_id}}
    limit = timeout_s if timeout_s is not None else definition.get("TimeoutSeconds", 60)
    deadline = time.monotonic() + limit
    name = start or definition["StartAt"]
    result = Run()
    while True:
        if time.monotonic() > deadline:
            result.status, result.error = "TIMED_OUT", "States.Timeout"
            return result
        state = states[name]
        result.visited.append(name)
        result.inputs.setdefault(name, []).append(copy.deepcopy(data))
        kind = state["Type"]
        if kind == "Succeed":
            result.status, result.output = "SUCCEEDED", data
            return result
        if kind == "Fail":
            result.status, result.error = "FAILED", state.get("Error", "")
            result.cause, result.output = state.get("Cause", ""), data
            return result
        if kind == "Choice":
            chosen = next((rule["Next"] for rule in state["Choices"]
                           if _matches(rule, data, context)), state.get("Default"))
            if chosen is None:
                raise TaskError("States.NoChoiceMatched", name)
            name = chosen
            continue
        if kind == "Wait":
            seconds = state.get("Seconds")
            if seconds is None:
                seconds = path_get(data, state["SecondsPath"], context)
            time.sleep(min(float(seconds), max_wait_s))
            name = state["Next"]
            continue
        if kind == "Pass":
            value = (resolve(state["Parameters"], data, context) if "Parameters" in state
                     else state.get("Result", data))
            data = path_set(data, state.get("ResultPath", "$"), value)
            name = state["Next"]
            continue
        if kind != "Task":
            raise ValueError(f"{name}: unsupported state type {kind}")
        params = resolve(state["Parameters"], data, context) if "Parameters" in state else data
        resource = state["Resource"]
        if resource not in tasks:
            raise ValueError(f"{name}: no task function for resource {resource}")
        attempts: dict[int, int] = {}
        while True:
            try:
                value = tasks[resource](copy.deepcopy(params))
                result.results.append((name, copy.deepcopy(value)))
                break
            except Exception as exc:  # the task's error, as Step Functions sees it
                error = _error_of(exc)
                retry = next((i for i, r in enumerate(state.get("Retry", []))
                              if _error_matches(r["ErrorEquals"], error.error)), None)
                if retry is not None:
                    attempts[retry] = attempts.get(retry, 0) + 1
                    if attempts[retry] <= state["Retry"][retry].get("MaxAttempts", 3):
                        continue
                catcher = next((c for c in state.get("Catch", [])
                                if _error_matches(c["ErrorEquals"], error.error)), None)
                if catcher is None:
                    result.status, result.error, result.cause = "FAILED", error.error, \
                        error.cause
                    return result
                data = path_set(data, catcher.get("ResultPath", "$"),
                                {"Error": error.error, "Cause": error.cause})
                name = catcher["Next"]
                break
        else:  # pragma: no cover
            continue
        if result.visited[-1] != name:  # caught: continue at the catcher's state
            continue
        if "ResultSelector" in state:
            value = resolve(state["ResultSelector"], value, context)
        data = path_set(data, state.get("ResultPath", "$"), value)
        if state.get("End"):
            result.status, result.output = "SUCCEEDED", data
            return result
        name = state["Next"]


def reachable(definition: dict[str, Any], start: str) -> set[str]:
    states, seen, todo = definition["States"], set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        state = states[name]
        todo += [t for t in [state.get("Next"), state.get("Default")] if t]
        todo += [c["Next"] for c in state.get("Choices", []) + state.get("Catch", [])]
    return seen

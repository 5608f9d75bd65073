"""Config fields that describe and check themselves: the one schema behind every config value.

A field is declared once, with its help text and its range, litgpt-style:

    @dataclass
    class TrainConfig:
        lr: float = setting(3e-3, "Peak learning rate.", gt=0)

and the same metadata serves config files (`validate(TrainConfig, read_mapping(path), where=...)`),
command-line flags (cli/options.py generates the options from it), the configs read back from
runs and checkpoints (strict: no type coercion), and every construction (`check_fields` in
`__post_init__`). Values are coerced as they are meant: YAML reads `lr: 3e-3` as the string
"3e-3", which is the number 0.003; "abc" is refused with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from functools import cache
from typing import Any

from smolctl.errors import SmolctlError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
            gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
            choices: tuple | None = None, nonempty: bool = False, flag: tuple[str, ...] | None = None,
            cli: bool = True, resumable: bool = False, says: str | None = None) -> Any:
    """A dataclass field with its schema. `gt/ge/lt/le`: the range of a number (floats must also be
    finite); `says`: that range as errors word it, where not in the words `_bounds` makes (">= 0
    (0 = greedy)"); `choices`: the values allowed; `flag`: the option names when not `--field-name`;
    `cli`: whether train gets a flag for it; `resumable`: changing it does not change the
    trajectory of a run, so `resume` takes it as a flag and accepts it edited in config.yaml."""
    meta = dict(help=help, gt=gt, ge=ge, lt=lt, le=le, choices=choices, nonempty=nonempty, flag=flag, cli=cli,
                resumable=resumable, says=says)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def setting_like(cls: type, name: str, **changes: Any) -> Any:
    """A field declared as `cls`'s field `name` is -- default, help, range -- with `changes` to its
    schema (another `flag`): one declaration for a value two commands take."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default, default_factory=f.default_factory,
                             metadata={**f.metadata, **changes})


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    type: type  # int, float, str, bool, dict, or list or tuple (of `item`)
    optional: bool  # None allowed
    meta: dict
    item: type | None = None
    default: Any = None

    def flag(self) -> str:
        return (self.meta.get("flag") or ("--" + self.name.replace("_", "-"),))[0]


@cache
def specs(cls: type) -> dict[str, Spec]:
    """name -> Spec for every field of the dataclass `cls`, from its annotations and metadata."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t, optional = hints[f.name], False
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            args = [a for a in typing.get_args(t) if a is not type(None)]
            t, optional = args[0], len(args) < len(typing.get_args(t))
        base = typing.get_origin(t) or t
        item = typing.get_args(t)[0] if base in (list, tuple) else None
        default = None if f.default is dataclasses.MISSING else f.default
        out[f.name] = Spec(f.name, base, optional, dict(f.metadata), item, default)
    return out


def validate(cls: type, values: dict[str, Any], what: str, where: str = "", flags: bool = False,
             strict: bool = False, also: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` (a subset of `cls`'s fields) checked and coerced; raises SmolctlError naming the key
    (as `--flag` with `flags`), the nearest valid key for an unknown one, and `where` it came from.
    `strict`: no coercion (metadata smolctl wrote itself: a string where a number belongs is damage).
    `also`: keys the caller handles itself, passed through as they are."""
    known = [*specs(cls), *also]
    unknown = sorted(str(k) for k in values if k not in known)  # YAML keys may be numbers
    if unknown:
        names = ", ".join(f"{k}{_did_you_mean(k, known)}" for k in unknown)
        raise SmolctlError(f"{where}unknown {what} keys: {names}", hint=f"Valid keys: {', '.join(sorted(known))}")
    return {k: v if k in also else check(specs(cls)[k], v, where, flags, strict) for k, v in values.items()}


def check_fields(obj: Any, what: str, flags: bool = False) -> None:
    """Check and coerce every field of a dataclass instance in place (its __post_init__ calls this;
    frozen ones too). `flags`: name the fields as their `--flag`s (settings that are a command's flags)."""
    for name, spec in specs(type(obj)).items():
        object.__setattr__(obj, name, check(spec, getattr(obj, name), f"invalid {what}: " if what else "", flags))


def from_flags(cls: type, values: dict[str, Any]) -> Any:
    """`cls` made from a command's generated options (cli/options.py): a flag left out that has
    no default of its own (None, as a repeatable option gives) takes the field's."""
    fields = specs(cls)
    return cls(**{k: v for k, v in values.items() if v is not None or fields[k].optional})


def check(spec: Spec, value: Any, where: str = "", flags: bool = False, strict: bool = False,
          label: str | None = None) -> Any:
    label = label or f"{where}{spec.flag() if flags else spec.name}"
    if value is None:
        if spec.optional:
            return None
        raise SmolctlError(f"{label} must be {_kind(spec)}, got nothing (null)", hint="Give it a value")
    value = _coerce(spec, value, label, strict)
    meta = spec.meta
    if spec.type in (int, float):
        finite = spec.type is int or math.isfinite(value)
        if not finite or not _within(value, meta):
            rule = meta.get("says") or _bounds(meta, spec.type)
            if not finite:
                rule = {"not negative": "finite and not negative", "": "finite"}.get(rule, f"{rule} and finite")
            verb = "must not be negative" if rule == "not negative" else f"must be {rule}"
            raise SmolctlError(f"{label} {verb}, got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise SmolctlError(f"{label} must be {_either(meta['choices'])}, got {value!r}")
    if meta.get("nonempty") and not value:
        raise SmolctlError(f"{label} must not be empty")
    return value


def _coerce(spec: Spec, value: Any, label: str, strict: bool) -> Any:
    """`value` as `spec.type`, the way a person writing it meant it; SmolctlError if it is not one."""
    t = spec.type
    if t in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SmolctlError(f"{label} must be a list, got {value!r}")
        item = Spec(spec.name, spec.item, False, {})
        return t(check(item, v, strict=strict, label=label) for v in value)
    if t is dict:
        if not isinstance(value, dict):
            raise SmolctlError(f"{label} must be a mapping of keys to values, got {value!r}")
        return value
    if t is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
    elif t is str:
        if isinstance(value, str):
            return value
        # YAML reads `mixed_precision: no` as False: for a choice that is a word, it means the word
        word = {False: "no", True: "yes"}.get(value) if isinstance(value, bool) else None
        if not strict and word in (spec.meta.get("choices") or ()):
            return word
    elif not isinstance(value, bool):  # a bool is not a number, though Python says it is
        number = value
        if isinstance(value, str) and not strict:
            try:
                number = float(value) if t is float else _int(value)
            except ValueError:
                number = None
        if t is float and isinstance(number, (int, float)):
            return float(number)
        if t is int and isinstance(number, int):
            return number
        if t is int and isinstance(number, float) and not strict and number.is_integer():
            return int(number)  # 5e3 steps, 1.0e+4 tokens
    hint = "Quote it in the config file" if t is str else None
    raise SmolctlError(f"{label} must be {_kind(spec)}, got {value!r}", hint=hint)


def _int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)  # "5e3": an integer written as a float; _coerce checks it is whole


def _kind(spec: Spec) -> str:
    kind = {int: "an integer", float: "a number", str: "text", bool: "true or false", dict: "a mapping",
            list: "a list", tuple: "a list"}[spec.type]
    if spec.optional:
        return "true, false or null" if spec.type is bool else f"{kind} or null"
    return kind


def _bounds(meta: dict, t: type) -> str:
    """The range in words: 'positive', 'not negative', 'between 1 and 1024', 'at least 0 and below 1'."""
    gt, ge, lt, le = (meta.get(k) for k in ("gt", "ge", "lt", "le"))
    if lt is None and le is None and (gt, ge) in ((0, None), (None, 0)):
        return "positive" if gt == 0 else "not negative"
    if t is int:  # integers: every bound inclusive
        ge, le = (gt + 1 if gt is not None else ge), (lt - 1 if lt is not None else le)
        gt = lt = None
    if ge is not None and le is not None:
        return f"between {_num(ge)} and {_num(le)}"
    parts = [f"above {_num(gt)}" if gt is not None else "", f"at least {_num(ge)}" if ge is not None else "",
             f"below {_num(lt)}" if lt is not None else "", f"at most {_num(le)}" if le is not None else ""]
    return " and ".join(p for p in parts if p)


def _within(value: float, meta: dict) -> bool:
    gt, ge, lt, le = (meta.get(k) for k in ("gt", "ge", "lt", "le"))
    return ((gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
            and (le is None or value <= le))


def _num(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) and x >= 10_000 else f"{x:g}"


def _either(choices: tuple) -> str:
    words = [str(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def describe_default(spec: Spec) -> str:
    """The default as help text shows it: 0.003, 1e-08, on/off, 'Once upon a time'."""
    v = spec.default
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if isinstance(v, str) and " " in v else str(v)

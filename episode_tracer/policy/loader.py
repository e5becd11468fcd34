"""Loading policy files: parse, validate, apply overrides, compile.

Order of work (docs/policies.md, "Loading"):
1. read every file (sorted by path): lists, macros, rules and overrides;
2. apply list and macro overrides, in file order;
3. compile the rules (lists and macros expanded, conditions compiled);
4. apply rule overrides, in file order;
5. check what the kernel must enforce (deny rules), warn about unused
   lists and macros.
Every problem is a :class:`Diagnostic`; the policy is built only when there
are no errors.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .conditions import ALL_FIELDS, FIELDS, Cond, compile_field, kinds_with, list_ref, tname
from .kernel import MAX_DENY_RULES, deny_problems, is_unix_deny
from .model import Action, Diagnostic, Kind, Level, Rule, Scope, Severity, enum_values
from .policy import LoadResult, Policy
from .version import policy_version

RULE_KEYS = (
    "name", "description", "severity", "on", "match", "except", "action", "scope", "enabled", "tags", "for_s",
)
REQUIRED_RULE_KEYS = ("name", "on", "severity", "action")
TOP_KEYS = ("lists", "macros", "override", "rule", "egress")
LIST_TABLE_KEYS = ("file", "items")
OVERRIDE_KEYS = {
    "list": ("list", "append", "remove"),
    "macro": ("macro", "replace"),
    "rule": ("rule", "enabled", "action", "severity", "scope", "append_except", "for_s"),
}
MAX_FOR_S = 86400  # a day
# words that say what kind of list it is, not what it is about
_GENERIC_WORDS = frozenset({"list", "lists", "regex", "regexes", "glob", "globs", "names", "name", "cidrs", "cidr",
                            "ports", "port", "hosts", "host", "exes", "paths", "items", "entries"})


def _type_class(ftype: Any) -> str:
    v = getattr(ftype, "value", str(ftype))
    return {"strings": "string", "cidrs": "cidr"}.get(v, v)


def _norm_entry(v: Any) -> str:
    """An entry as a concept: `*.pool.com*`, `pool.com` and `POOL.com` alike."""
    return str(v).lower().strip("*. ")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


# --------------------------------------------------------------------------
# what the files hold, before compilation


@dataclass(frozen=True)
class Loc:
    file: str
    where: str


@dataclass
class ListDef:
    name: str
    loc: Loc
    entries: list[Any]
    removals: set[Any] = field(default_factory=set)


@dataclass
class MacroDef:
    name: str
    loc: Loc  # where the body was written (an override that replaced it)
    body: dict[str, Any]
    prefix: str = ""  # key path of the body at loc ("replace" for an override)
    defined: Loc | None = None  # where the macro was first written, when replaced


@dataclass
class RawItem:
    loc: Loc
    index: int  # 1-based position among the file's [[rule]] / [[override]]
    data: dict[str, Any]
    target: str | None = None  # overrides: "rule", "list" or "macro" once checked


@dataclass
class ExceptEntry:
    loc: Loc
    path: str  # except[0] or append_except[0]
    conds: tuple[Cond, ...]


@dataclass
class RuleBuild:
    loc: Loc
    name: str
    description: str
    severity: Severity
    on: Kind
    action: Action
    scope: Scope
    enabled: bool
    tags: tuple[str, ...]
    match: tuple[Cond, ...]
    excepts: list[ExceptEntry]
    action_origin: str | None = None  # "override #N in FILE" when an override set it
    for_s: float | None = None

    def freeze(self) -> Rule:
        def by_cost(conds: Iterable[Cond]) -> tuple[Cond, ...]:
            return tuple(sorted(conds, key=lambda c: c.cost))

        return Rule(
            name=self.name,
            description=self.description,
            severity=self.severity,
            on=self.on,
            action=self.action,
            scope=self.scope,
            enabled=self.enabled,
            tags=self.tags,
            match=by_cost(self.match),
            excepts=tuple(by_cost(e.conds) for e in self.excepts),
            file=self.loc.file,
            for_s=self.for_s,
        )


# --------------------------------------------------------------------------


class _Env:
    """The compiler's view of one place in the files (conditions.Env)."""

    def __init__(self, loader: "Loader", loc: Loc) -> None:
        self.loader = loader
        self.loc = loc

    def error(self, key: str, message: str) -> None:
        self.loader.error(self.loc, key, message)

    def expand(self, name: str, key: str) -> list[tuple[Any, str]] | None:
        if name in self.loader.broken_lists:
            return None  # its own errors are reported where it is defined
        if name not in self.loader.lists:
            self.error(key, f"unknown list '{name}'")
            return None
        self.loader.note_ref("list", name)
        return self.loader.expand_list(name, ())


class Loader:
    def __init__(self) -> None:
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self._seen: set[str] = set()
        self.files: list[Path] = []  # TOML files and the list files they read
        self.toml_files: list[str] = []
        self.lists: dict[str, ListDef] = {}
        self.macros: dict[str, MacroDef] = {}
        self.broken_lists: set[str] = set()  # defined with errors: references stay quiet
        self.broken_macros: set[str] = set()
        self.raw_rules: list[RawItem] = []
        self.overrides: list[RawItem] = []
        self.raw_egress: list[RawItem] = []  # [[egress]] (episode_tracer/policy/egress.py)
        self.egress: tuple = ()
        self.rule_names: dict[str, Loc] = {}
        self.builds: dict[str, RuleBuild] = {}
        self.used_lists: set[str] = set()
        self.used_macros: set[str] = set()
        self._expanded: dict[str, list[tuple[Any, str]] | None] = {}
        self._macro_cache: dict[tuple[str, Kind], tuple[Cond, ...] | None] = {}
        # who reads what (docs/policies.md, "Lists"): owner ("rule:x" or
        # "macro:y") -> {("list" | "macro", name)}, and the field types
        # each list is used as
        self._owner: str | None = None
        self._ftype: Any = None
        self.refs: dict[str, set[tuple[str, str]]] = {}
        self.list_types: dict[str, set[str]] = {}

    def note_ref(self, what: str, name: str) -> None:
        if self._owner is not None:
            self.refs.setdefault(self._owner, set()).add((what, name))
        if what == "list" and self._ftype is not None:
            self.list_types.setdefault(name, set()).add(_type_class(self._ftype))

    def _owned(self, owner: str):
        loader = self

        class _Ctx:
            def __enter__(self) -> None:
                self.prev = loader._owner
                loader._owner = owner

            def __exit__(self, *exc: Any) -> None:
                loader._owner = self.prev

        return _Ctx()

    # ---- diagnostics

    def error(self, loc: Loc, key: str, message: str) -> None:
        self._add(Diagnostic(loc.file, loc.where, key, message, Level.ERROR))

    def warn(self, loc: Loc, key: str, message: str) -> None:
        self._add(Diagnostic(loc.file, loc.where, key, message, Level.WARNING))

    def _add(self, d: Diagnostic) -> None:
        text = f"{d.level.value}:{d}"
        if text in self._seen:
            return
        self._seen.add(text)
        (self.errors if d.level is Level.ERROR else self.warnings).append(d)

    def env(self, loc: Loc) -> _Env:
        return _Env(self, loc)

    # ---- 1. reading

    def read(self, path: Path) -> None:
        display = str(path)
        floc = Loc(display, "")
        self.toml_files.append(display)
        self.files.append(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            self.error(floc, "", f"cannot read: {e.strerror or e}")
            return
        except UnicodeDecodeError as e:
            self.error(floc, "", f"not UTF-8: {e}")
            return
        except tomllib.TOMLDecodeError as e:
            self.error(floc, "", f"invalid TOML: {e}")
            return
        for key in data:
            if key not in TOP_KEYS:
                self.error(floc, key, f"unknown top-level key (expected one of: {', '.join(TOP_KEYS)})")
        self._read_lists(path, display, data.get("lists"))
        self._read_macros(display, data.get("macros"))
        self.raw_rules.extend(self._array_of_tables(display, data, "rule", "[[rule]]"))
        self.overrides.extend(self._array_of_tables(display, data, "override", "[[override]]"))
        self.raw_egress.extend(self._array_of_tables(display, data, "egress", "[[egress]]"))

    def _array_of_tables(self, display: str, data: dict[str, Any], key: str, syntax: str) -> list[RawItem]:
        raw = data.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.error(Loc(display, ""), key, f"expected an array of tables ({syntax}), got {tname(raw)}")
            return []
        out = []
        for i, item in enumerate(raw, 1):
            if not isinstance(item, dict):
                self.error(Loc(display, f"{key} #{i}"), "", f"expected a table, got {tname(item)}")
                continue
            out.append(RawItem(Loc(display, f"{key} #{i}"), i, item))
        return out

    def _name_ok(self, loc: Loc, name: str) -> bool:
        if _NAME_RE.fullmatch(name):
            return True
        self.error(loc, "", "bad name (letters, digits, _ and -, not starting with a digit or -)")
        return False

    def _read_lists(self, path: Path, display: str, raw: Any) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.error(Loc(display, ""), "lists", f"expected a table, got {tname(raw)}")
            return
        for name, value in raw.items():
            loc = Loc(display, f"list '{name}'")
            if not self._name_ok(loc, name):
                continue
            entries = self._list_entries(path, loc, value)
            if entries is None:
                if name not in self.lists:
                    self.broken_lists.add(name)
                continue
            first = self.lists.get(name)
            if first is not None:
                self.error(loc, "", f"duplicate list name (first defined in {first.loc.file})")
                continue
            self.lists[name] = ListDef(name, loc, entries)

    def _list_entries(self, path: Path, loc: Loc, value: Any) -> list[Any] | None:
        if isinstance(value, list):
            return self._scalars(loc, "", value)
        if not isinstance(value, dict):
            self.error(loc, "", f"expected an array or a table (file, items), got {tname(value)}")
            return None
        ok = True
        for key in value:
            if key not in LIST_TABLE_KEYS:
                self.error(loc, key, f"unknown key (expected one of: {', '.join(LIST_TABLE_KEYS)})")
                ok = False
        entries: list[Any] = []
        if "items" in value:
            if not isinstance(value["items"], list):
                self.error(loc, "items", f"expected an array, got {tname(value['items'])}")
                ok = False
            else:
                got = self._scalars(loc, "items", value["items"])
                ok = ok and got is not None
                entries.extend(got or ())
        if "file" in value:
            got = self._list_file(path, loc, value["file"])
            ok = ok and got is not None
            entries.extend(got or ())
        if "items" not in value and "file" not in value:
            self.error(loc, "", "a list table needs file or items")
            ok = False
        return entries if ok else None

    def _scalars(self, loc: Loc, key: str, values: list[Any]) -> list[Any] | None:
        ok = True
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                self.error(loc, f"{key}[{i}]", f"expected a string or an integer, got {tname(v)}")
                ok = False
        return list(values) if ok else None

    def _list_file(self, path: Path, loc: Loc, name: Any) -> list[str] | None:
        if not isinstance(name, str):
            self.error(loc, "file", f"expected a string, got {tname(name)}")
            return None
        target = path.parent / name
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.error(loc, "file", f"cannot read {name!r}: {why}")
            return None
        self.files.append(target)
        return [ln for ln in (line.split("#", 1)[0].strip() for line in text.splitlines()) if ln]

    def _read_macros(self, display: str, raw: Any) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            self.error(Loc(display, ""), "macros", f"expected a table, got {tname(raw)}")
            return
        for name, body in raw.items():
            loc = Loc(display, f"macro '{name}'")
            if not self._name_ok(loc, name):
                continue
            if not isinstance(body, dict):
                self.error(loc, "", f"expected a table of conditions, got {tname(body)}")
                if name not in self.macros:
                    self.broken_macros.add(name)
                continue
            first = self.macros.get(name)
            if first is not None:
                self.error(loc, "", f"duplicate macro name (first defined in {first.loc.file})")
                continue
            self.macros[name] = MacroDef(name, loc, body)

    # ---- lists

    def expand_list(self, name: str, stack: tuple[str, ...]) -> list[tuple[Any, str]] | None:
        """Entries of list `name` (nested `$lists` expanded, removals applied),
        each with the name of the list it was written in."""
        self.used_lists.add(name)
        if name in self._expanded:
            return self._expanded[name]
        ld = self.lists[name]
        if name in stack:
            cycle = " -> ".join(stack[stack.index(name) :] + (name,))
            self.error(ld.loc, "", f"list cycle: {cycle}")
            return None
        out: list[tuple[Any, str]] = []
        ok = True
        for i, entry in enumerate(ld.entries):
            ref = list_ref(entry)
            if ref is None:
                out.append((entry, name))
                continue
            if ref in self.broken_lists:
                ok = False
                continue
            if ref not in self.lists:
                self.error(ld.loc, f"[{i}]", f"unknown list '{ref}'")
                ok = False
                continue
            sub = self.expand_list(ref, stack + (name,))
            if sub is None:
                ok = False
                continue
            out.extend(sub)
        result = [(v, origin) for v, origin in out if v not in ld.removals] if ok else None
        self._expanded[name] = result
        return result

    # ---- macros and condition tables

    def macro_fields(self, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        """Field keys a macro uses, through nested macros."""
        md = self.macros.get(name)
        if md is None or name in seen:
            return set()
        out: set[str] = set()
        for key, value in md.body.items():
            if key == "macro":
                for sub in value if isinstance(value, list) else [value]:
                    if isinstance(sub, str):
                        out |= self.macro_fields(sub, seen | {name})
            elif key in ALL_FIELDS:
                out.add(key)
        return out

    def compile_table(
        self, table: dict[str, Any], kind: Kind, loc: Loc, prefix: str, stack: tuple[str, ...] = ()
    ) -> tuple[Cond, ...] | None:
        """The conditions of a match/except table (or macro body) for `kind`.

        `stack` is the chain of macros being expanded (empty for a rule's own
        table): field availability is checked at the rule's macro reference.
        """
        env = self.env(loc)
        fields = FIELDS[kind]
        conds: list[Cond] = []
        ok = True
        for key, raw in table.items():
            path = f"{prefix}.{key}" if prefix else key
            if key == "macro":
                got = self._macro_refs(raw, kind, loc, path, stack)
                ok = ok and got is not None
                conds.extend(got or ())
                continue
            fd = fields.get(key)
            if fd is None:
                if key in ALL_FIELDS:
                    where = ", ".join(k.value for k in kinds_with(key))
                    env.error(path, f"field not available for '{kind.value}' events (it is a field of: {where})")
                else:
                    known = ", ".join(sorted(fields) + ["macro"])
                    env.error(path, f"unknown field for '{kind.value}' events (expected one of: {known})")
                ok = False
                continue
            prev, self._ftype = self._ftype, fd.ftype
            try:
                cond = compile_field(fd, raw, path, env)
            finally:
                self._ftype = prev
            if cond is None:
                ok = False
            else:
                conds.append(cond)
        return tuple(conds) if ok else None

    def _macro_refs(
        self, raw: Any, kind: Kind, loc: Loc, path: str, stack: tuple[str, ...]
    ) -> list[Cond] | None:
        names = raw if isinstance(raw, list) else [raw]
        if not names or not all(isinstance(n, str) for n in names):
            self.error(loc, path, f"expected a macro name or an array of names, got {tname(raw)}")
            return None
        out: list[Cond] = []
        ok = True
        for i, name in enumerate(names):
            key = f"{path}[{i}]" if isinstance(raw, list) else path
            md = self.macros.get(name)
            if md is None:
                if name not in self.broken_macros:
                    self.error(loc, key, f"unknown macro '{name}'")
                ok = False
                continue
            self.used_macros.add(name)
            self.note_ref("macro", name)
            if name in stack:
                cycle = " -> ".join(stack[stack.index(name) :] + (name,))
                self.error(md.loc, "", f"macro cycle: {cycle}")
                ok = False
                continue
            if not stack:  # a rule's reference: check the fields here
                missing = sorted(self.macro_fields(name) - set(FIELDS[kind]))
                for f in missing:
                    self.error(loc, key, f"macro '{name}' uses '{f}', which '{kind.value}' events do not have")
                if missing:
                    ok = False
                    continue
            conds = self.expand_macro(name, kind, stack)
            if conds is None:
                ok = False
                continue
            if not stack:  # report problems at the rule's reference
                conds = tuple(dataclasses.replace(c, path=key, via=name) for c in conds)
            out.extend(conds)
        return out if ok else None

    def expand_macro(self, name: str, kind: Kind, stack: tuple[str, ...]) -> tuple[Cond, ...] | None:
        cache_key = (name, kind)
        if cache_key in self._macro_cache:
            return self._macro_cache[cache_key]
        md = self.macros[name]
        with self._owned(f"macro:{name}"):
            conds = self.compile_table(md.body, kind, md.loc, md.prefix, stack + (name,))
        self._macro_cache[cache_key] = conds
        return conds

    # ---- 2. list and macro overrides

    def _override_target(self, item: RawItem) -> str | None:
        targets = [k for k in OVERRIDE_KEYS if k in item.data]
        if len(targets) != 1:
            self.error(item.loc, "", "an override needs exactly one of: rule, list, macro")
            return None
        target = targets[0]
        ok = True
        allowed = OVERRIDE_KEYS[target]
        for key in item.data:
            if key not in allowed:
                self.error(
                    item.loc, key, f"unknown key for a {target} override (expected one of: {', '.join(allowed)})"
                )
                ok = False
        if not isinstance(item.data[target], str):
            self.error(item.loc, target, f"expected a string, got {tname(item.data[target])}")
            ok = False
        if ok and len(item.data) == 1:
            self.error(item.loc, "", "nothing to change")
            ok = False
        return target if ok else None

    def apply_list_macro_overrides(self) -> None:
        for item in self.overrides:
            target = item.target = self._override_target(item)
            if target == "list":
                self._override_list(item)
            elif target == "macro":
                self._override_macro(item)

    def _override_list(self, item: RawItem) -> None:
        name = item.data["list"]
        ld = self.lists.get(name)
        if ld is None:
            self.error(item.loc, "list", f"unknown list '{name}'")
            return
        for key in ("append", "remove"):
            if key not in item.data:
                continue
            value = item.data[key]
            if not isinstance(value, list):
                self.error(item.loc, key, f"expected an array, got {tname(value)}")
                continue
            values = self._scalars(item.loc, key, value)
            if values is None:
                continue
            if key == "append":
                ld.entries.extend(values)
            else:
                ld.removals.update(values)

    def _override_macro(self, item: RawItem) -> None:
        name = item.data["macro"]
        if name not in self.macros:
            self.error(item.loc, "macro", f"unknown macro '{name}'")
            return
        body = item.data["replace"]
        if not isinstance(body, dict):
            self.error(item.loc, "replace", f"expected a table of conditions, got {tname(body)}")
            return
        first = self.macros[name]
        self.macros[name] = MacroDef(name, item.loc, body, prefix="replace", defined=first.defined or first.loc)

    # ---- 3. rules

    def compile_rules(self) -> None:
        for item in self.raw_rules:
            build = self._compile_rule(item)
            if build is not None:
                self.builds[build.name] = build

    def _enum(self, loc: Loc, key: str, raw: Any, enum: type[Any]) -> Any:
        if not isinstance(raw, str):
            self.error(loc, key, f"expected a string, got {tname(raw)}")
            return None
        try:
            return enum(raw)
        except ValueError:
            self.error(loc, key, f"{raw!r} is not one of: {enum_values(enum)}")
            return None

    def _typed(self, loc: Loc, key: str, raw: Any, typ: type, what: str) -> bool:
        if isinstance(raw, typ) and (typ is bool or not isinstance(raw, bool)):
            return True
        self.error(loc, key, f"expected {what}, got {tname(raw)}")
        return False

    def _compile_rule(self, item: RawItem) -> RuleBuild | None:
        d = item.data
        name = d.get("name")
        named = isinstance(name, str) and name.strip() != ""
        loc = Loc(item.loc.file, f"rule '{name}'" if named else f"rule #{item.index}")
        ok = True
        for key in d:
            if key not in RULE_KEYS:
                self.error(loc, key, f"unknown key (expected one of: {', '.join(sorted(RULE_KEYS))})")
                ok = False
        for key in REQUIRED_RULE_KEYS:
            if key not in d:
                self.error(loc, key, "missing required key")
                ok = False
        if "name" in d and not isinstance(name, str):
            self.error(loc, "name", f"expected a string, got {tname(name)}")
            ok = False
        elif "name" in d and not named:
            self.error(loc, "name", "empty name")
            ok = False
        if named:
            first = self.rule_names.get(name)
            if first is not None:
                self.error(loc, "name", f"duplicate rule name (first defined in {first.file})")
                ok = False
            else:
                self.rule_names[name] = loc
        kind = self._enum(loc, "on", d["on"], Kind) if "on" in d else None
        severity = self._enum(loc, "severity", d["severity"], Severity) if "severity" in d else None
        action = self._enum(loc, "action", d["action"], Action) if "action" in d else None
        scope = self._enum(loc, "scope", d["scope"], Scope) if "scope" in d else Scope.EPISODES
        ok = ok and None not in (kind, severity, action, scope)
        description = d.get("description", "")
        ok = self._typed(loc, "description", description, str, "a string") and ok
        enabled = d.get("enabled", True)
        ok = self._typed(loc, "enabled", enabled, bool, "a boolean") and ok
        tags = d.get("tags", [])
        if self._typed(loc, "tags", tags, list, "an array of strings"):
            for i, t in enumerate(tags):
                ok = self._typed(loc, f"tags[{i}]", t, str, "a string") and ok
        else:
            ok = False
        match = d.get("match", {})
        if not isinstance(match, dict):
            self.error(loc, "match", f"expected a table of conditions, got {tname(match)}")
            ok = False
            match = None
        excepts_raw = d.get("except", [])
        if not isinstance(excepts_raw, list):
            self.error(loc, "except", f"expected an array of tables, got {tname(excepts_raw)}")
            ok = False
            excepts_raw = []
        if kind is None:
            return None
        for_s = None
        if "for_s" in d:
            for_s = self._for_s(loc, d["for_s"], kind)
            ok = ok and for_s is not None
        with self._owned(f"rule:{name}" if named else f"rule:#{item.index}"):
            conds = self.compile_table(match, kind, loc, "match") if match is not None else None
            excepts = self._compile_excepts(excepts_raw, kind, loc, "except")
        if not ok or conds is None or excepts is None:
            return None
        return RuleBuild(
            loc=loc,
            name=name,
            description=description,
            severity=severity,
            on=kind,
            action=action,
            scope=scope,
            enabled=enabled,
            tags=tuple(tags),
            match=conds,
            excepts=excepts,
            for_s=for_s,
        )

    def _for_s(self, loc: Loc, raw: Any, kind: Kind) -> float | None:
        """A rule's duration: seconds its conditions must hold, gpu rules only."""
        if kind is not Kind.GPU:
            self.error(
                loc, "for_s",
                f"only 'gpu' rules take a duration (it counts over the GPU watcher's samples); "
                f"'{kind.value}' events happen once",
            )
            return None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            self.error(loc, "for_s", f"expected a number of seconds, got {tname(raw)}")
            return None
        if not 0 < raw <= MAX_FOR_S:
            self.error(loc, "for_s", f"{raw} is out of range (0 < for_s <= {MAX_FOR_S} seconds)")
            return None
        return float(raw)

    def _compile_excepts(self, raw: list[Any], kind: Kind, loc: Loc, key: str) -> list[ExceptEntry] | None:
        out: list[ExceptEntry] = []
        ok = True
        for i, table in enumerate(raw):
            path = f"{key}[{i}]"
            if not isinstance(table, dict):
                self.error(loc, path, f"expected a table of conditions, got {tname(table)}")
                ok = False
                continue
            if not table:
                self.error(loc, path, "empty except entry (it would match every event)")
                ok = False
                continue
            conds = self.compile_table(table, kind, loc, path)
            if conds is None:
                ok = False
                continue
            out.append(ExceptEntry(loc, path, conds))
        return out if ok else None

    # ---- 4. rule overrides

    def apply_rule_overrides(self) -> None:
        for item in self.overrides:
            if item.target == "rule":
                self._override_rule(item)

    def _override_rule(self, item: RawItem) -> None:
        d = item.data
        name = d["rule"]
        if name not in self.rule_names:
            self.error(item.loc, "rule", f"unknown rule '{name}'")
            return
        build = self.builds.get(name)  # None: the rule has errors, already reported
        changes: dict[str, Any] = {}
        if "enabled" in d and self._typed(item.loc, "enabled", d["enabled"], bool, "a boolean"):
            changes["enabled"] = d["enabled"]
        for key, enum in (("action", Action), ("severity", Severity), ("scope", Scope)):
            if key in d:
                value = self._enum(item.loc, key, d[key], enum)
                if value is not None:
                    changes[key] = value
        for_s = None
        if "for_s" in d and build is not None:
            for_s = self._for_s(item.loc, d["for_s"], build.on)
        extra: list[ExceptEntry] = []
        if "append_except" in d:
            raw = d["append_except"]
            if not isinstance(raw, list):
                self.error(item.loc, "append_except", f"expected an array of tables, got {tname(raw)}")
            elif build is not None:
                with self._owned(f"rule:{name}"):
                    extra = self._compile_excepts(raw, build.on, item.loc, "append_except") or []
        if build is None:
            return
        for key, value in changes.items():
            setattr(build, key, value)
        if "action" in changes:
            build.action_origin = f"override #{item.index} in {item.loc.file}"
        build.excepts.extend(extra)
        if for_s is not None:
            build.for_s = for_s

    # ---- 5. kernel checks and warnings

    def check_deny(self) -> None:
        count = 0
        for build in self.builds.values():
            if build.action is not Action.DENY:
                continue
            why = f" (action set by {build.action_origin})" if build.action_origin else ""
            for p in deny_problems(build.on, build.match, [e.conds for e in build.excepts], build.scope):
                if p.group is None:
                    loc, key = build.loc, (p.cond.path if p.cond is not None else "action")
                else:
                    entry = build.excepts[p.group]
                    loc, key = entry.loc, (p.cond.path if p.cond is not None else entry.path)
                via = f" (from macro '{p.cond.via}')" if p.cond is not None and p.cond.via else ""
                self.error(loc, key, p.message + via + why)
            if build.on is Kind.CONNECT and build.enabled and not is_unix_deny(build.match):
                count += 1
                if count == MAX_DENY_RULES + 1:
                    self.error(
                        build.loc,
                        "action",
                        f"more than {MAX_DENY_RULES} enabled connect deny rules; the kernel holds {MAX_DENY_RULES}",
                    )

    def compile_egress(self) -> None:
        from .egress import compile_profiles

        self.egress = compile_profiles(self, self.raw_egress)

    def check_unused(self) -> None:
        lists = [ld for name, ld in self.lists.items() if name not in self.used_lists]
        macros = [md for name, md in self.macros.items() if name not in self.used_macros]
        for ld in lists:
            self.warn(ld.loc, "", "unused (no rule refers to it)")
        for md in macros:
            self.warn(md.defined or md.loc, "", "unused (no rule refers to it)")
        for md in macros:  # still validate them: they may be used tomorrow
            self._validate_unused_macro(md.name, md)

    # ---- one fact in one place: who reads each list, lists that look alike

    def _closure(self, owner: str, seen: set[str]) -> set[str]:
        """Lists an owner reads, through macros and lists that name lists."""
        out: set[str] = set()
        for what, name in self.refs.get(owner, ()):
            key = f"{what}:{name}"
            if key in seen:
                continue
            seen.add(key)
            if what == "macro":
                out |= self._closure(key, seen)
            else:
                out |= self._list_closure(name, seen)
        return out

    def _list_closure(self, name: str, seen: set[str]) -> set[str]:
        out = {name}
        ld = self.lists.get(name)
        for e in ld.entries if ld else ():
            ref = list_ref(e)
            if ref is not None and f"list:{ref}" not in seen:
                seen.add(f"list:{ref}")
                out |= self._list_closure(ref, seen)
        return out

    def list_readers(self) -> dict[str, tuple[str, ...]]:
        readers: dict[str, set[str]] = {name: set() for name in self.lists}
        for rule in self.builds:
            for name in self._closure(f"rule:{rule}", set()):
                readers.setdefault(name, set()).add(rule)
        return {k: tuple(sorted(v)) for k, v in sorted(readers.items())}

    def check_same_concept(self) -> None:
        """Warn when two lists look like one concept kept twice (issue 19):
        the same entries, or names that share two words and entries in
        common, read as the same kind of value. Neither may name the other."""
        names = sorted(n for n in self.lists if n not in self.broken_lists)
        facts: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for n in names:
            got = self.expand_list(n, ())
            if got is None:
                continue
            entries = frozenset(_norm_entry(v) for v, _ in got) - {""}
            words = frozenset(w for w in n.lower().split("_") if w and w not in _GENERIC_WORDS)
            facts[n] = (entries, words)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if a not in facts or b not in facts:
                    continue
                if b in self._list_closure(a, set()) or a in self._list_closure(b, set()):
                    continue
                (ea, wa), (eb, wb) = facts[a], facts[b]
                if not ea or not eb:
                    continue
                ta, tb = self.list_types.get(a, set()), self.list_types.get(b, set())
                if ta and tb and not ta & tb:
                    continue  # read as different kinds of value (ports and exe globs)
                same = ea == eb
                alike = len(wa & wb) >= 2 and bool(ea & eb)
                if same or alike:
                    why = "the same entries" if same else f"names that share {sorted(wa & wb)} and entries in common"
                    self.warn(
                        self.lists[b].loc, "",
                        f"looks like the same concept as list '{a}' ({self.lists[a].loc.file}): {why}; "
                        f"keep one list and have every rule read it (or make one include the other: \"${a}\")",
                    )

    def _validate_unused_macro(self, name: str, md: MacroDef) -> None:
        fields = self.macro_fields(name)
        kind = next((k for k in Kind if fields <= set(FIELDS[k])), None)
        if kind is None:
            self.error(md.loc, "", f"no event kind has all of its fields ({', '.join(sorted(fields))})")
            return
        self.expand_macro(name, kind, ())

    # ---- result

    def result(self) -> LoadResult:
        errors, warnings = list(self.errors), list(self.warnings)
        count = len(self.raw_rules)
        if errors:
            return LoadResult(None, errors, warnings, tuple(self.toml_files), count)
        rules = tuple(b.freeze() for b in self.builds.values())
        policy = Policy(rules=rules, version=policy_version(self.files), files=tuple(self.toml_files),
                        egress=self.egress)
        return LoadResult(policy, errors, warnings, tuple(self.toml_files), count, self.list_readers())


def discover(paths: Iterable[Path | str]) -> tuple[list[Path], list[Diagnostic]]:
    """The TOML files to load (directories: their *.toml), sorted by path."""
    found: dict[str, Path] = {}
    diags: list[Diagnostic] = []
    for p in map(Path, paths):
        if p.is_dir():
            tomls = sorted(q for q in p.glob("*.toml") if q.is_file())
            if not tomls:
                diags.append(Diagnostic(str(p), "", "", "no *.toml files in this directory", Level.WARNING))
            for q in tomls:
                found.setdefault(str(q), q)
        elif p.exists():
            found.setdefault(str(p), p)
        else:
            diags.append(Diagnostic(str(p), "", "", "no such file or directory"))
    return [found[k] for k in sorted(found)], diags


def load_policy(paths: Iterable[Path | str]) -> LoadResult:
    """Load, validate and compile the policy files at `paths` (files or
    directories). `result.policy` is None iff `result.errors`."""
    files, diags = discover(paths)
    loader = Loader()
    for d in diags:
        loader._add(d)
    for path in files:
        loader.read(path)
    loader.apply_list_macro_overrides()
    loader.compile_rules()
    loader.apply_rule_overrides()
    loader.check_deny()
    loader.compile_egress()
    loader.check_unused()
    loader.check_same_concept()
    return loader.result()

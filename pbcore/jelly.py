"""Jelly: Python values <-> s-expressions, as Twisted's ``twisted.spread.jelly``.

The forms (the first item of a list names its type)::

    None                 [b"None"]
    True / False         [b"boolean", b"true" | b"false"]
    int, float, bytes    themselves
    str                  [b"unicode", <utf-8 bytes>]
    list / tuple         [b"list", item, ...] / [b"tuple", item, ...]
    dict                 [b"dictionary", [key, value], ...]
    set / frozenset      [b"set", item, ...] / [b"frozenset", item, ...]
    datetime             [b"datetime", b"Y M D h m s us"]   (also date, time, timedelta)
    Decimal              [b"decimal", digits_as_int, exponent]
    registered classes   [copy_tag, state]

A container met a second time (or met again inside itself) is sent once: its
first occurrence becomes ``[b"reference", n, <form>]`` and later ones
``[b"dereference", n]``, so shared and cyclic structures arrive shared and
cyclic.

Safety: module, class, function and method forms are never unjellied, and no
name from the wire is ever imported. An instance arrives only as a copy tag
registered with :func:`setUnjellyableForClass` (or its factory and tree
variants), or as a class explicitly allowed with
:meth:`SecurityOptions.allowInstancesOf`. Everything else is
:class:`~pbcore.errors.InsecureJelly` or :class:`~pbcore.errors.JellyError`.

Extension points for the layers above (jelly knows nothing about PB):

* an object with a ``jellyFor(jellier)`` method (see :class:`Jellyable`)
  serializes itself and sees ``jellier.invoker``;
* a registered class with an ``unjellyFor(unjellier, expression)`` method
  builds itself and sees ``unjellier.invoker``;
* :class:`Unjellier` takes *handlers*, protocol-level forms (the broker's
  ``remote``, ``local``, ``cached`` ...) that take precedence over the registry.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import itertools
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn, Protocol

from .banana import _SPEEDUPS, DEFAULT_LIMITS, Limits, Sexp
from .errors import BananaError, InsecureJelly, JellyError, NotJellyable, ProtocolError
from .keys import COMPOSITE, PEER_ID_BOUND, SALTED, Collisions, KeyMeter, items
from .preview import error_text

__all__ = [
    "NOT_FLAT",
    "Jellier",
    "Jellyable",
    "SecurityOptions",
    "Unjellier",
    "Unjellyable",
    "Unpersistable",
    "flat_value",
    "plain_reader",
    "globalSecurity",
    "jelly",
    "qual",
    "setUnjellyableFactoryForClass",
    "setUnjellyableForClass",
    "setUnjellyableForClassTree",
    "unjelly",
    "unjellyableFactoryRegistry",
    "unjellyableRegistry",
]

#: A handler for one form: called with the unjellier and the whole expression.
Handler = Callable[["Unjellier", list[Any]], Any]
# A resolved builder: also told the reference number its value will get, if any.
_Form = Callable[["Unjellier", list[Any], "int | None"], Any]


def qual(cls: type) -> str:
    """The fully qualified name of a class, as Twisted writes it: ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _tag(name: str | bytes | type) -> bytes:
    if isinstance(name, type):
        name = qual(name)
    if isinstance(name, str):
        name = name.encode("utf-8")
    return name


# ---------------------------------------------------------------------------
# Security


class SecurityOptions:
    """Which forms, modules and classes may be unjellied.

    A new instance allows only the atoms (None, bool, str, numbers, dates,
    decimal, set, frozenset). :meth:`allowBasicTypes` adds the containers and
    references; :data:`globalSecurity`, the default everywhere, has them.
    Any dotted name (a copy tag) passes the type check; whether it can be
    built depends on the copy-tag registry.
    """

    basicTypes: Final = [
        "dictionary",
        "list",
        "tuple",
        "reference",
        "dereference",
        "unpersistable",
        "persistent",
        "long_int",
        "long",
        "dict",
    ]

    def __init__(self) -> None:
        self.allowedTypes: dict[bytes, int] = dict.fromkeys(
            [
                b"None",
                b"bool",
                b"boolean",
                b"string",
                b"str",
                b"int",
                b"float",
                b"datetime",
                b"time",
                b"date",
                b"timedelta",
                b"NoneType",
                b"unicode",
                b"decimal",
                b"set",
                b"frozenset",
            ],
            1,
        )
        self.allowedModules: dict[bytes, int] = {}
        self.allowedClasses: dict[type, int] = {}

    def allowBasicTypes(self) -> None:
        """Allow the containers (list, tuple, dict) and shared references."""
        self.allowTypes(*self.basicTypes)

    def allowTypes(self, *types: str | bytes | type) -> None:
        """Allow forms by name (or copy tags by class)."""
        for name in types:
            self.allowedTypes[_tag(name)] = 1

    def allowInstancesOf(self, *classes: type) -> None:
        """Allow plain instances of these classes, sent as ``[qualname, state]``.

        The class is found in this list by its name; it is never imported.
        """
        self.allowBasicTypes()
        self.allowTypes("instance", "class", "classobj", "module")
        for cls in classes:
            self.allowTypes(qual(cls))
            self.allowModules(cls.__module__)
            self.allowedClasses[cls] = 1

    def allowModules(self, *modules: str | bytes | types.ModuleType) -> None:
        """Record modules as allowed. (pbcore never imports a module from the wire.)"""
        for module in modules:
            name = module.__name__ if isinstance(module, types.ModuleType) else module
            self.allowedModules[_tag(name)] = 1

    def isModuleAllowed(self, moduleName: str | bytes) -> bool:
        """Whether the module was allowed with :meth:`allowModules`."""
        return _tag(moduleName) in self.allowedModules

    def isClassAllowed(self, klass: type) -> bool:
        """Whether plain instances of *klass* may travel."""
        return klass in self.allowedClasses

    def isTypeAllowed(self, typeName: str | bytes) -> bool:
        """Whether the form named *typeName* may be unjellied."""
        name = _tag(typeName)
        return name in self.allowedTypes or b"." in name


#: The options used when none are given: atoms, containers and copy tags.
globalSecurity: Final = SecurityOptions()
globalSecurity.allowBasicTypes()


# ---------------------------------------------------------------------------
# The copy-tag registry

#: Copy tag -> the local class that represents it (or a handler function).
unjellyableRegistry: dict[bytes, Any] = {}
#: Copy tag -> a factory called with the unjellied state.
unjellyableFactoryRegistry: dict[bytes, Callable[[Any], Any]] = {}


def setUnjellyableForClass(classname: str | bytes | type, unjellyable: Any) -> None:
    """Make *unjellyable* (a class) the local representation of copy tag *classname*.

    A class with ``unjellyFor(unjellier, expression)`` builds itself; any other
    class gets a blank instance whose ``__setstate__`` (or ``__dict__``)
    receives the state. *classname* may be a class, whose qualified name is
    used, or any tag string a peer sends.
    """
    tag = _tag(classname)
    unjellyableRegistry[tag] = unjellyable
    globalSecurity.allowTypes(tag)


def setUnjellyableFactoryForClass(classname: str | bytes | type, copyFactory: Callable[[Any], Any]) -> None:
    """Build instances of copy tag *classname* by calling ``copyFactory(state)``."""
    tag = _tag(classname)
    unjellyableFactoryRegistry[tag] = copyFactory
    globalSecurity.allowTypes(tag)


def setUnjellyableForClassTree(module: types.ModuleType, baseClass: type, prefix: str | None = None) -> None:
    """Register every subclass of *baseClass* found in *module*.

    Each is registered under ``prefix + "." + class name``; *prefix* defaults
    to the module's name, and ``""`` registers bare class names.
    """
    if prefix is None:
        prefix = module.__name__
    if prefix:
        prefix = prefix + "."
    for name in dir(module):
        candidate = getattr(module, name)
        if isinstance(candidate, type) and issubclass(candidate, baseClass):
            setUnjellyableForClass(f"{prefix}{name}", candidate)


class Unpersistable:
    """Stands in for something the peer could not serialize; ``reason`` says why.

    It travels as ``[b"unpersistable", reason]``. (Twisted prefixes the reason
    it reads with ``"Unpersistable data: "``; pbcore keeps the peer's text.)
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unpersistable({self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unpersistable) and other.reason == self.reason

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------
# Self-serializing objects


class _JellyHook(Protocol):
    def jellyFor(self, jellier: Jellier) -> Any: ...


class Jellyable:
    """Inherit from me to serialize yourself as ``[qualname, getStateFor(jellier)]``."""

    def getStateFor(self, jellier: Jellier) -> Any:
        """The state to send; by default the instance ``__dict__``."""
        return self.__dict__

    def jellyFor(self, jellier: Jellier) -> Any:
        """Return this object's s-expression (shared references handled by *jellier*)."""
        sexp = jellier.prepare(self)
        sexp.extend([qual(type(self)).encode("utf-8"), jellier.jelly(self.getStateFor(jellier))])
        return jellier.preserve(self, sexp)


class Unjellyable:
    """Inherit from me to rebuild yourself from ``[tag, state]`` with :meth:`setStateFor`."""

    def setStateFor(self, unjellier: Unjellier, state: Any) -> None:
        """Take the unjellied state; by default it becomes the instance ``__dict__``."""
        self.__dict__ = state

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        """Rebuild from the expression ``[tag, state]``; return the object."""
        if len(jellyList) != 2:
            raise JellyError(f"expected [tag, state], got {len(jellyList)} items")
        self.setStateFor(unjellier, unjellier.unjelly(jellyList[1]))
        return self


# ---------------------------------------------------------------------------
# Serializing


class Jellier:
    """The state of one serialization: which containers were seen, and the invoker.

    Use :func:`jelly`; :class:`Jellyable` implementations call :meth:`prepare`,
    :meth:`jelly` and :meth:`preserve`.
    """

    def __init__(
        self,
        taster: SecurityOptions = globalSecurity,
        invoker: Any = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.taster = taster
        self.invoker = invoker
        self._max_depth = limits.max_depth
        self._depth = 0
        # id -> the expression of a container already serialized (or a
        # placeholder while it is being serialized).
        self._preserved: dict[int, list[Any]] = {}
        # id -> [b"dereference", n] once the container has a reference number.
        self._cooked: dict[int, list[Any]] = {}
        # Keeps every tracked object alive so that no id() is reused meanwhile
        # (getStateFor may return temporary objects).
        self._alive: list[object] = []
        self._next_ref = 1

    def prepare(self, obj: object) -> list[Any]:
        """Start serializing a container: returns a fresh list for its expression."""
        self._preserved[id(obj)] = []
        self._alive.append(obj)
        return []

    def preserve(self, obj: object, sexp: list[Any]) -> list[Any]:
        """Finish serializing a container; returns the expression to use."""
        oid = id(obj)
        if oid in self._cooked:
            # Referenced from inside itself: the placeholder became
            # [reference, n, placeholder-copy]; fill in the real expression.
            placeholder = self._preserved[oid]
            placeholder[2] = sexp
            return placeholder
        self._preserved[oid] = sexp
        return sexp

    def _seen(self, obj: object) -> list[Any] | None:
        """The dereference to use if *obj* was met before, else None."""
        oid = id(obj)
        cooked = self._cooked.get(oid)
        if cooked is not None:
            return cooked
        earlier = self._preserved.get(oid)
        if earlier is None:
            return None
        # Second meeting: give the first expression a number, in place, so
        # that whoever holds it now holds [reference, n, expression].
        ref = self._next_ref
        self._next_ref += 1
        earlier[:] = [b"reference", ref, earlier[:]]
        cooked = self._cooked[oid] = [b"dereference", ref]
        return cooked

    def jelly(self, obj: Any) -> Any:
        """Return the s-expression for *obj*."""
        kind = type(obj)
        if kind is int or kind is bytes or kind is float:
            return obj
        if kind is str:
            try:
                return [b"unicode", obj.encode("utf-8")]
            except UnicodeEncodeError as error:  # a lone surrogate: no UTF-8 for it
                raise NotJellyable(f"cannot jelly a str that is not valid Unicode: {error}") from None
        if kind is list or kind is dict or kind is tuple:
            return self._container(obj, kind)
        if obj is None:
            return [b"None"]
        if kind is bool:
            return [b"boolean", b"true" if obj else b"false"]
        if kind is set or kind is frozenset:
            return self._container(obj, kind)
        simple = _SIMPLE_JELLIERS.get(kind)
        if simple is not None:
            return simple(obj)
        hook = getattr(kind, "jellyFor", None)
        if hook is not None:
            again = self._seen(obj)
            if again is not None:
                return again
            self._enter()
            try:
                return hook(obj, self)
            finally:
                self._depth -= 1
        if self.taster.isClassAllowed(kind):
            again = self._seen(obj)
            if again is not None:
                return again
            self._enter()
            try:
                sexp = self.prepare(obj)
                state = obj.__getstate__() if hasattr(obj, "__getstate__") else obj.__dict__
                sexp.extend([qual(kind).encode("utf-8"), self.jelly(state)])
                return self.preserve(obj, sexp)
            finally:
                self._depth -= 1
        raise NotJellyable(
            # The type only, not the object's repr: this text may reach the peer in an error answer.
            f"cannot jelly a {qual(kind)} object: send built-in types, "
            "or make the class Copyable/Jellyable, or allow it with SecurityOptions.allowInstancesOf"
        )

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > self._max_depth:
            self._depth -= 1
            raise BananaError(f"cannot jelly: values nested deeper than the limit of {self._max_depth}")

    def _container(self, obj: Any, kind: type) -> list[Any]:
        again = self._seen(obj)
        if again is not None:
            return again
        self._enter()
        try:
            self._preserved[id(obj)] = []
            self._alive.append(obj)
            jelly = self.jelly
            if kind is dict:
                sexp: list[Any] = [b"dictionary"]
                append = sexp.append
                for key, value in obj.items():
                    append([jelly(key), jelly(value)])
            else:
                sexp = [_CONTAINER_ATOMS[kind]]
                append = sexp.append
                for item in obj:  # a loop, not a comprehension: one frame less per level
                    append(jelly(item))
        finally:
            self._depth -= 1
        return self.preserve(obj, sexp)


_CONTAINER_ATOMS: Final[dict[type, bytes]] = {
    list: b"list",
    tuple: b"tuple",
    set: b"set",
    frozenset: b"frozenset",
}


def _jelly_datetime(value: datetime.datetime) -> list[Any]:
    if value.tzinfo is not None:
        raise NotJellyable("cannot jelly a datetime with a tzinfo (Twisted's jelly has no form for it)")
    fields = (value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond)
    return [b"datetime", " ".join(map(str, fields)).encode()]


def _jelly_time(value: datetime.time) -> list[Any]:
    if value.tzinfo is not None:
        raise NotJellyable("cannot jelly a time with a tzinfo (Twisted's jelly has no form for it)")
    return [b"time", f"{value.hour} {value.minute} {value.second} {value.microsecond}".encode()]


def _jelly_date(value: datetime.date) -> list[Any]:
    return [b"date", f"{value.year} {value.month} {value.day}".encode()]


def _jelly_timedelta(value: datetime.timedelta) -> list[Any]:
    return [b"timedelta", f"{value.days} {value.seconds} {value.microseconds}".encode()]


def _jelly_decimal(value: decimal.Decimal) -> list[Any]:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise NotJellyable(f"cannot jelly Decimal {value}: jelly has no form for NaN or infinity")
    magnitude = int("".join(map(str, digits))) if digits else 0
    return [b"decimal", -magnitude if sign else magnitude, exponent]


_SIMPLE_JELLIERS: Final[dict[type, Callable[[Any], list[Any]]]] = {
    datetime.datetime: _jelly_datetime,
    datetime.date: _jelly_date,
    datetime.time: _jelly_time,
    datetime.timedelta: _jelly_timedelta,
    decimal.Decimal: _jelly_decimal,
    Unpersistable: lambda value: [b"unpersistable", str(value.reason).encode("utf-8")],
}


def jelly(
    obj: Any,
    taster: SecurityOptions = globalSecurity,
    *,
    invoker: Any = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Sexp:
    """Serialize *obj* to an s-expression (see the module docstring for the forms).

    Raises :class:`~pbcore.errors.NotJellyable` for a value that has no form.
    """
    sexp: Sexp = Jellier(taster, invoker, limits).jelly(obj)
    return sexp


# ---------------------------------------------------------------------------
# Unserializing


class _Hole:
    """A value referred to before it exists: a tuple or frozenset on a cycle.

    Tuples and frozensets cannot be built before their items, so a
    ``dereference`` to one from inside itself gets a hole; whoever receives
    the hole registers a callback that patches the real value in later.
    """

    __slots__ = ("callbacks", "filled")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []
        self.filled = False

    def fill(self, value: Any) -> None:
        self.filled = True
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback(value)


def _shape(expression: list[Any], size: int) -> None:
    if len(expression) != size:
        raise JellyError(f"{expression[0]!r} form needs {size - 1} item(s), got {len(expression) - 1}")


def _text(expression: list[Any], size: int = 2) -> str:
    _shape(expression, size)
    raw = expression[1]
    if type(raw) is not bytes:
        raise JellyError(f"{expression[0]!r} form needs a byte string, got {type(raw).__name__}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JellyError(f"{expression[0]!r} form is not valid UTF-8: {error}") from None


_INTEGER: Final = re.compile(r"-?[0-9]{1,19}\Z")  # ASCII digits only: str.isdigit() admits "²"


def _numbers(expression: list[Any], count: int) -> list[int]:
    text = _text(expression)
    fields = text.split(" ")
    if len(fields) != count or not all(_INTEGER.match(field) for field in fields):
        raise JellyError(f"{expression[0]!r} form needs {count} integers, got {text[:60]!r}")
    return [int(field) for field in fields]


class Unjellier:
    """The state of one unserialization: references seen so far, invoker, handlers.

    Use :func:`unjelly`. ``unjellyFor`` implementations call :meth:`unjelly`
    for the parts of their expression and may read :attr:`invoker`.
    """

    def __init__(
        self,
        taster: SecurityOptions = globalSecurity,
        invoker: Any = None,
        handlers: Mapping[bytes, Handler] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.taster = taster
        self.invoker = invoker
        self._handlers = handlers or {}
        self._limits = limits
        self._max_depth = limits.max_depth
        self._depth = 0
        self._sexp: Sexp | None = None  # the whole expression: its size is the hashing budget's base
        self._meter: KeyMeter | None = None  # made for the first tuple or frozenset key
        # id -> (tuple, depth) of the nested tuples built since the first dereference (see _built).
        self._tuple_depths: dict[int, tuple[Any, int]] | None = None
        self.references: dict[int, Any] = {}
        self._forms: dict[bytes, _Form] = {}  # head -> builder, resolved once per unjellier
        self._plain_unicode = b"unicode" not in self._handlers and bool(taster.isTypeAllowed(b"unicode"))
        self._post: list[Callable[[], None]] = []
        self._holes: list[_Hole] = []  # one per reference, checked at the end

    def unjellyFull(self, sexp: Sexp) -> Any:
        """Unjelly a whole expression, then run the ``postUnjelly`` hooks it collected."""
        self._sexp = sexp
        value = self.unjelly(sexp)
        for hole in self._holes:
            if not hole.filled:
                # Only immutables on the cycle (a tuple inside itself): no
                # Python value has this shape.
                raise JellyError("a reference cycle made only of tuples or frozensets")
        for hook in self._post:
            _from_peer(b"postUnjelly", hook)
        return value

    def unjelly(self, obj: Any, _ref: int | None = None) -> Any:
        """Return the value for one expression."""
        if type(obj) is not list:
            if type(obj) in _PLAIN:
                return obj
            raise JellyError(f"not an s-expression: {type(obj).__name__}")
        if not obj:
            raise JellyError("empty list where a jelly form was expected")
        head = obj[0]
        # Text is most of what arrives: read it here, without the dispatch.
        if head == b"unicode" and self._plain_unicode and len(obj) == 2 and type(obj[1]) is bytes:
            try:
                return obj[1].decode("utf-8")
            except UnicodeDecodeError:
                pass  # the general path below says what is wrong
        if type(head) is not bytes:
            raise JellyError(f"a jelly form starts with its type name, not {head!r:.40}")
        form = self._forms.get(head)
        if form is None:
            form = self._forms[head] = self._form_for(head)
        return form(self, obj, _ref)

    def _form_for(self, head: bytes) -> _Form:
        """How to build the form named *head*: handlers, then built-ins, then copy tags."""
        handler = self._handlers.get(head)
        if handler is not None:
            return lambda unjellier, obj, _ref: handler(unjellier, obj)
        if not self.taster.isTypeAllowed(head):
            raise InsecureJelly(f"the security options do not allow {head!r:.80}")
        builtin = _BUILTIN_FORMS.get(head)
        if builtin is not None:
            return builtin
        return lambda unjellier, obj, ref: unjellier._instance(head, obj, ref)

    def _nest(self) -> None:
        # Counted only by the forms that recurse; an unjellier that raised is
        # not used again, so no unwinding is needed on errors.
        self._depth += 1
        if self._depth > self._max_depth:
            raise JellyError(f"values nested deeper than the limit of {self._max_depth}")

    # -- containers ---------------------------------------------------------

    def _list(self, obj: list[Any], ref: int | None) -> list[Any]:
        self._nest()
        result: list[Any] = []
        if ref is not None:
            self.references[ref] = result
        unjelly = self.unjelly
        for index, item in enumerate(obj[1:]):
            value = item if type(item) in _PLAIN else unjelly(item)
            result.append(value)
            if type(value) is _Hole:
                value.callbacks.append(_setter(result, index))
        self._depth -= 1
        return result

    def _dict(self, obj: list[Any], ref: int | None) -> dict[Any, Any]:
        self._nest()
        result: dict[Any, Any] = {}
        if ref is not None:
            self.references[ref] = result
        unjelly = self.unjelly
        collisions: Collisions | None = None
        for pair in obj[1:]:
            if type(pair) is not list or len(pair) != 2:
                raise JellyError(f"a dictionary item must be a [key, value] list, got {pair!r:.60}")
            key, value = pair
            key = key if type(key) in _PLAIN else unjelly(key)
            value = value if type(value) in _PLAIN else unjelly(value)
            if type(key) is _Hole or type(value) is _Hole:
                self._later(result, key, value)
                continue
            if type(key) is not str and type(key) not in SALTED:  # the usual str keys pay one test
                if collisions is None:
                    collisions = Collisions(self._limits, "dictionary")
                self._key(key, collisions, result)
            _insert(result, key, value)
        self._depth -= 1
        return result

    def _later(self, result: dict[Any, Any], key: Any, value: Any) -> None:
        entry = [key, value]
        collisions = Collisions(self._limits, "dictionary")

        def fill(index: int, known: Any) -> None:
            entry[index] = known
            if type(entry[0]) is not _Hole and type(entry[1]) is not _Hole:
                self._key(entry[0], collisions, result)
                _insert(result, entry[0], entry[1])

        for index in (0, 1):
            if type(entry[index]) is _Hole:
                entry[index].callbacks.append(lambda v, i=index: fill(i, v))

    def _sequence(self, obj: list[Any], _ref: int | None, build: Callable[[list[Any]], Any]) -> Any:
        """A tuple or frozenset: built when all its items are known."""
        self._nest()
        unjelly = self.unjelly
        items = []
        for item in obj[1:]:  # a loop, not a comprehension: one frame less per level
            items.append(item if type(item) in _PLAIN else unjelly(item))
        self._depth -= 1
        missing = [index for index, item in enumerate(items) if type(item) is _Hole]
        if not missing:
            if build is tuple and self._tuple_depths is None:
                return _build(build, items)  # the common case: no depth to track, no keys to hash
            return self._built(build, items)
        hole = _Hole()
        remaining = [len(missing)]

        def fill(index: int, value: Any) -> None:
            items[index] = value
            remaining[0] -= 1
            if not remaining[0]:
                hole.fill(self._built(build, items))

        for index in missing:
            items[index].callbacks.append(lambda v, i=index: fill(i, v))
        return hole

    def _set(self, obj: list[Any], ref: int | None) -> set[Any]:
        self._nest()
        result: set[Any] = set()
        if ref is not None:
            self.references[ref] = result
        collisions = Collisions(self._limits, "set")

        def add(value: Any) -> None:
            if type(value) not in SALTED:
                self._key(value, collisions, result)
            _add(result, value)

        for item in obj[1:]:
            value = self.unjelly(item)
            if type(value) is _Hole:
                value.callbacks.append(add)
            else:
                add(value)
        self._depth -= 1
        return result

    # -- what keys cost (see pbcore.keys) -----------------------------------------

    def _key(self, key: Any, collisions: Collisions, existing: Any) -> None:
        """Charge *key*, about to be hashed into *existing*, to this message's budgets."""
        if type(key) in COMPOSITE:
            meter = self._meter
            if meter is None:
                meter = self._meter = KeyMeter(self._limits, items(self._sexp))
            meter.charge(key)
        collisions.add(key, existing)

    def _built(self, build: Callable[[list[Any]], Any], items: list[Any]) -> Any:
        """Build a tuple or frozenset from its known items, within the depth and key budgets.

        Shared references can nest tuples far deeper than the message itself
        is nested, and CPython hashes a tuple recursively with no guard: a
        tuple 10**5 deep crashes the process when hashed. So once a message
        has used a dereference (the only way to nest deeper than the message
        itself), each tuple's depth is known when it is built and refused past
        ``max_depth``. Tuples built before count as depth 1: they are at most
        ``max_depth`` deep, so the true depth stays below twice the limit.
        """
        depths = self._tuple_depths
        depth = 1
        if depths is not None:
            for item in items:
                if type(item) in COMPOSITE:
                    known = depths.get(id(item))
                    depth = max(depth, 2 if known is None else known[1] + 1)
            if depth > self._max_depth:
                raise JellyError(
                    f"tuples nested deeper than the limit of {self._max_depth} (through shared references)"
                )
        if build is frozenset:
            collisions = Collisions(self._limits, "frozenset")
            for index, item in enumerate(items):
                if type(item) not in SALTED:
                    self._key(item, collisions, itertools.islice(items, index))
        value = _build(build, items)
        if depth > 1 and depths is not None:
            depths[id(value)] = (value, depth)
        return value

    # -- references -----------------------------------------------------------

    def _reference(self, obj: list[Any], _ref: int | None) -> Any:
        _shape(obj, 3)
        ref, body = obj[1], obj[2]
        if type(ref) is not int or not 0 <= ref < PEER_ID_BOUND:
            raise JellyError(f"reference number must be an int from 0 to 2**61 - 2, got {ref!r:.40}")
        if ref in self.references:
            raise JellyError(f"reference number {ref} is defined twice")
        hole = self.references[ref] = _Hole()
        self._holes.append(hole)
        self._nest()
        value = self.unjelly(body, ref)
        self._depth -= 1
        if type(value) is _Hole:
            # A tuple or frozenset still waiting for (a hole of) itself.
            value.callbacks.append(lambda v: self._resolve(ref, hole, v))
        else:
            self._resolve(ref, hole, value)
        return value

    def _resolve(self, ref: int, hole: _Hole, value: Any) -> None:
        self.references[ref] = value
        hole.fill(value)

    def _dereference(self, obj: list[Any], _ref: int | None) -> Any:
        _shape(obj, 2)
        ref = obj[1]
        if type(ref) is not int or ref not in self.references:
            raise JellyError(f"dereference of unknown reference {ref!r:.40}")
        if self._tuple_depths is None:
            self._tuple_depths = {}  # from now on values can nest deeper than the message: see _built
        return self.references[ref]

    # -- instances --------------------------------------------------------------

    def _instance(self, tag: bytes, obj: list[Any], ref: int | None) -> Any:
        registered = unjellyableRegistry.get(tag)
        if registered is not None:
            if not isinstance(registered, type):
                return self._post_hook(_from_peer(tag, registered, self, obj))
            instance = _blank(registered)
            if ref is not None:
                self.references[ref] = instance
            build = getattr(instance, "unjellyFor", None)
            if build is not None:
                return self._post_hook(_from_peer(tag, build, self, obj))
            _shape(obj, 2)
            return self._post_hook(_from_peer(tag, _set_state, instance, self.unjelly(obj[1])))
        factory = unjellyableFactoryRegistry.get(tag)
        if factory is not None:
            _shape(obj, 2)
            return self._post_hook(_from_peer(tag, factory, self.unjelly(obj[1])))
        for cls in self.taster.allowedClasses:
            if qual(cls).encode("utf-8") == tag:
                _shape(obj, 2)
                instance = _blank(cls)
                if ref is not None:
                    self.references[ref] = instance
                return self._post_hook(_from_peer(tag, _set_state, instance, self.unjelly(obj[1])))
        if tag in _NEVER:
            raise InsecureJelly(f"{tag.decode()!r} forms are never unjellied: no code is loaded from the wire")
        raise InsecureJelly(f"unknown type {tag!r:.80}: no class is registered for this copy tag")

    def _post_hook(self, value: Any) -> Any:
        hook = getattr(value, "postUnjelly", None)
        if hook is not None:
            self._post.append(hook)
        return value


_PLAIN: Final = frozenset({bytes, int, float})  # Banana's atoms stand for themselves

#: What :func:`flat_value` returns for an expression it leaves to :class:`Unjellier`.
NOT_FLAT: Final = object()
_FLAT_SEQUENCES: Final[dict[bytes, Callable[[list[Any]], Any]]] = {b"tuple": tuple, b"list": list}
_FLAT_LEVELS: Final = 3  # containers nested this deep at most (a call's arguments are a tuple)


def flat_value(sexp: Sexp, taster: SecurityOptions, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The value of a plain expression, else :data:`NOT_FLAT`.

    Plain: atoms, strings, None and booleans, and tuples, lists and dictionaries of them,
    nested at most three deep (dictionary keys are atoms or strings). For
    these the result is what ``Unjellier(taster, limits=limits).unjellyFull(sexp)``
    gives, without making an unjellier: most call arguments and answers are
    plain. Anything else, and anything in doubt (a subclass of
    SecurityOptions, a dictionary whose keys could collide, bad UTF-8), is
    NOT_FLAT: the general way handles it and says what is wrong.
    """
    return plain_reader(taster, limits)(sexp)


def plain_reader(taster: SecurityOptions, limits: Limits = DEFAULT_LIMITS) -> Callable[[Sexp], Any]:
    """``lambda sexp: flat_value(sexp, taster, limits)``, with what it needs of *limits* read once.

    What a broker reads every call's arguments and every answer with first.
    *taster*'s allowed types are still read at each call (they are a public,
    mutable table).
    """
    levels = min(limits.max_depth, _FLAT_LEVELS)
    collisions = limits.max_hash_collisions
    plain_taster = type(taster) is SecurityOptions
    compiled = _compiled_flat  # the same reading, in C (pbcore/_speedups.c, read_plain)

    def read(sexp: Sexp) -> Any:
        if type(sexp) is not list:
            return sexp if type(sexp) in _PLAIN else NOT_FLAT
        if not plain_taster:
            return NOT_FLAT
        if compiled is not None:
            return compiled(sexp, taster.allowedTypes, collisions, levels, NOT_FLAT)
        return _flat(sexp, taster.allowedTypes, limits, levels)

    return read


_compiled_flat: Callable[..., Any] | None = getattr(_SPEEDUPS, "flat_value", None)


def _flat(sexp: list[Any], allowed: dict[bytes, int], limits: Limits, levels: int) -> Any:
    # One list of a plain expression; *levels* containers may still nest here.
    head = sexp[0] if sexp else None
    if type(head) is not bytes or head not in allowed:
        return NOT_FLAT
    if head == b"unicode":
        if len(sexp) == 2 and type(sexp[1]) is bytes:
            try:
                return sexp[1].decode("utf-8")
            except UnicodeDecodeError:
                pass
        return NOT_FLAT
    if head == b"None":
        return None if len(sexp) == 1 else NOT_FLAT
    if head == b"boolean":
        if len(sexp) == 2 and (sexp[1] == b"true" or sexp[1] == b"false"):
            return sexp[1] == b"true"
        return NOT_FLAT
    if not levels:
        return NOT_FLAT
    levels -= 1
    if head == b"dictionary":
        if len(sexp) > limits.max_hash_collisions + 1:  # below this many keys none is counted (see Collisions)
            return NOT_FLAT
        result: dict[Any, Any] = {}
        for pair in itertools.islice(sexp, 1, None):
            if type(pair) is not list or len(pair) != 2:
                return NOT_FLAT
            key, value = pair
            if type(key) not in _PLAIN and (
                type(key) is not list or (key := _flat(key, allowed, limits, 0)) is NOT_FLAT
            ):
                return NOT_FLAT
            if type(value) not in _PLAIN and (
                type(value) is not list or (value := _flat(value, allowed, limits, levels)) is NOT_FLAT
            ):
                return NOT_FLAT
            result[key] = value
        return result
    build = _FLAT_SEQUENCES.get(head)
    if build is None:
        return NOT_FLAT
    items = []
    for item in itertools.islice(sexp, 1, None):
        if type(item) not in _PLAIN and (
            type(item) is not list or (item := _flat(item, allowed, limits, levels)) is NOT_FLAT
        ):
            return NOT_FLAT
        items.append(item)
    return build(items)


_NEVER: Final = frozenset({b"module", b"class", b"function", b"method", b"instance"})


def _from_peer(tag: bytes, hook: Callable[..., Any], *args: Any) -> Any:
    """Run a class's own unjelly code on the peer's state.

    The state is the peer's, so whatever that code raises about it is the
    peer's error: a JellyError naming the tag (the original is chained).
    """
    try:
        return hook(*args)
    except ProtocolError:
        raise
    except Exception as error:
        raise JellyError(
            f"cannot build {tag!r:.80} from the state the peer sent: {type(error).__name__}: {error_text(error, 200)}"
        ) from error


def _blank(cls: Any) -> Any:
    """An instance whose __init__ has not run: the state arrives afterwards."""
    return cls.__new__(cls)


def _setter(target: list[Any], index: int) -> Callable[[Any], None]:
    def patch(value: Any) -> None:
        target[index] = value

    return patch


# Hashing runs the __hash__ and __eq__ of the classes the peer's copy tags name: whatever
# they raise is about the peer's value, so it refuses the value (a JellyError), not the
# connection.


def _insert(result: dict[Any, Any], key: Any, value: Any) -> None:
    try:
        result[key] = value
    except Exception as error:
        _unhashable(error, f"dictionary key of type {type(key).__name__}")


def _build(build: Callable[[list[Any]], Any], items: list[Any]) -> Any:
    try:
        return build(items)
    except Exception as error:
        _unhashable(error, "item in a set or frozenset")


def _add(result: set[Any], value: Any) -> None:
    try:
        result.add(value)
    except Exception as error:
        _unhashable(error, f"set item of type {type(value).__name__}")


def _unhashable(error: Exception, what: str) -> NoReturn:
    if isinstance(error, ProtocolError):
        raise error
    if isinstance(error, TypeError):
        raise JellyError(f"unhashable {what}") from None
    raise JellyError(
        f"{what} cannot be hashed or compared: {type(error).__name__}: {error_text(error, 200)}"
    ) from error


def _set_state(instance: Any, state: Any) -> Any:
    setter = getattr(instance, "__setstate__", None)
    if setter is not None:
        setter(state)
    elif state is None:  # object.__getstate__() of an instance with an empty __dict__
        instance.__dict__ = {}
    elif isinstance(state, dict):
        instance.__dict__ = state
    else:
        raise JellyError(f"state for {type(instance).__qualname__} must be a dictionary")
    return instance


def _unicode(u: Unjellier, obj: list[Any], ref: int | None) -> str:
    if len(obj) == 2 and type(obj[1]) is bytes:  # the commonest form: skip the general checks
        try:
            return obj[1].decode("utf-8")
        except UnicodeDecodeError:
            pass
    return _text(obj)


def _none(u: Unjellier, obj: list[Any], ref: int | None) -> None:
    _shape(obj, 1)


def _boolean(u: Unjellier, obj: list[Any], ref: int | None) -> bool:
    _shape(obj, 2)
    if obj[1] == b"true":
        return True
    if obj[1] == b"false":
        return False
    raise JellyError(f"boolean form needs b'true' or b'false', got {obj[1]!r:.40}")


def _datetime_form(kind: Callable[..., Any], count: int) -> Callable[[Unjellier, list[Any], int | None], Any]:
    def build(u: Unjellier, obj: list[Any], ref: int | None) -> Any:
        fields = _numbers(obj, count)
        try:
            if kind is datetime.timedelta:
                return datetime.timedelta(days=fields[0], seconds=fields[1], microseconds=fields[2])
            return kind(*fields)
        except (ValueError, OverflowError) as error:
            raise JellyError(f"{obj[0]!r} form out of range: {error}") from None

    return build


def _decimal(u: Unjellier, obj: list[Any], ref: int | None) -> decimal.Decimal:
    _shape(obj, 3)
    value, exponent = obj[1], obj[2]
    if type(value) is not int or type(exponent) is not int:
        raise JellyError("decimal form needs two ints: digits and exponent")
    try:
        digits = tuple(int(d) for d in str(abs(value)))
        return decimal.Decimal((1 if value < 0 else 0, digits, exponent))
    except (ValueError, ArithmeticError) as error:  # too many digits, exponent out of range
        raise JellyError(f"decimal form out of range: {error!r:.80}") from None


def _unpersistable(u: Unjellier, obj: list[Any], ref: int | None) -> Unpersistable:
    return Unpersistable(_text(obj))  # just the peer's reason, so it survives a round trip


def _persistent(u: Unjellier, obj: list[Any], ref: int | None) -> Unpersistable:
    return Unpersistable("Persistent callback not found")


_BUILTIN_FORMS: Final[dict[bytes, _Form]] = {
    b"None": _none,
    b"unicode": _unicode,
    b"boolean": _boolean,
    b"list": Unjellier._list,
    b"tuple": functools.partial(Unjellier._sequence, build=tuple),
    b"dictionary": Unjellier._dict,
    b"set": Unjellier._set,
    b"frozenset": functools.partial(Unjellier._sequence, build=frozenset),
    b"reference": Unjellier._reference,
    b"dereference": Unjellier._dereference,
    b"datetime": _datetime_form(datetime.datetime, 7),
    b"date": _datetime_form(datetime.date, 3),
    b"time": _datetime_form(datetime.time, 4),
    b"timedelta": _datetime_form(datetime.timedelta, 3),
    b"decimal": _decimal,
    b"unpersistable": _unpersistable,
    b"persistent": _persistent,
}


def unjelly(
    sexp: Sexp,
    taster: SecurityOptions = globalSecurity,
    *,
    invoker: Any = None,
    handlers: Mapping[bytes, Handler] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Any:
    """Rebuild the value an s-expression describes.

    Raises :class:`~pbcore.errors.JellyError` (or its subclass
    :class:`~pbcore.errors.InsecureJelly`) for anything malformed or refused;
    never imports anything.
    """
    if not handlers:  # a plain value needs no unjellier (handlers could claim its forms)
        value = flat_value(sexp, taster, limits)
        if value is not NOT_FLAT:
            return value
    return Unjellier(taster, invoker, handlers, limits).unjellyFull(sexp)

"""Plain data classes without the start-up cost of `dataclasses`.

`pykvm run` defines about thirty small data classes on its way to the guest. With
`dataclasses` that cost ~30 ms of a ~90 ms run on CPython 3.11: ~14 ms to import it (it pulls
in inspect, ast, dis, tokenize and re) and ~0.5 ms per class, because every class has its
`__init__`, `__repr__` and `__eq__` generated as source text and compiled. A record class gets
the same behaviour from shared functions that read the class's field table, so defining one
costs microseconds. Only the subset pykvm uses is offered: fields from annotations, defaults,
`field(default=, default_factory=, repr=)`, `frozen=True` (immutable and hashable), and the
module functions fields(), replace() and asdict(). Creating an instance is a little slower
than a generated `__init__`; no record is created on a hot path.
"""

from __future__ import annotations

__all__ = ["FrozenInstanceError", "asdict", "field", "fields", "record", "replace"]

_MISSING = object()


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a frozen record."""


class Field:
    """One field of a record: its name, annotation (as written), default or default factory, and whether repr shows it."""

    __slots__ = ("name", "type", "default", "default_factory", "repr")

    def __init__(self, default=_MISSING, default_factory=_MISSING, repr=True):
        if default is not _MISSING and default_factory is not _MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = self.type = None
        self.default = default
        self.default_factory = default_factory
        self.repr = repr

    def __repr__(self) -> str:
        return f"Field(name={self.name!r})"


def field(*, default=_MISSING, default_factory=_MISSING, repr: bool = True) -> Field:
    """A field with a default, a default factory (called per instance), or hidden from repr."""
    return Field(default, default_factory, repr)


def record(cls=None, /, *, frozen: bool = False):
    """Class decorator: fields from the class's annotations, in order, with the defaults given."""

    def wrap(cls):
        return _process(cls, frozen)

    return wrap if cls is None else wrap(cls)


def fields(obj) -> tuple[Field, ...]:
    """The fields of a record class or instance, in declaration order."""
    try:
        return obj.__record_fields__
    except AttributeError:
        raise TypeError(f"{obj!r} is not a record class or instance") from None


def replace(obj, /, **changes):
    """A new instance of obj's class with the given fields changed."""
    for name in changes:
        if name not in obj.__record_names__:
            raise TypeError(f"{type(obj).__name__} has no field {name!r}")
    values = {f.name: getattr(obj, f.name) for f in obj.__record_fields__}
    values.update(changes)
    return type(obj)(**values)


def asdict(obj) -> dict:
    """The fields as a dict, nested records, lists, tuples and dicts converted too."""
    if not hasattr(type(obj), "__record_fields__"):
        raise TypeError("asdict() should be called on record instances")
    return _asdict(obj)


def _asdict(value):
    if hasattr(type(value), "__record_fields__"):
        return {f.name: _asdict(getattr(value, f.name)) for f in value.__record_fields__}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_asdict(v) for v in value)
    if isinstance(value, dict):
        return {_asdict(k): _asdict(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- the shared methods
def _process(cls, frozen: bool):
    table = []
    seen_default = False
    for name, annotation in cls.__dict__.get("__annotations__", {}).items():
        value = cls.__dict__.get(name, _MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name, f.type = name, annotation
        if isinstance(value, Field):
            if f.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        if seen_default and not has_default:
            raise TypeError(f"non-default field {name!r} follows a default field")
        seen_default = seen_default or has_default
        table.append(f)
    cls.__record_fields__ = tuple(table)
    cls.__record_names__ = frozenset(f.name for f in table)
    cls.__record_frozen__ = frozen
    cls.__match_args__ = tuple(f.name for f in table)
    cls.__init__ = _init
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    if frozen:
        cls.__setattr__ = _frozen_setattr
        cls.__delattr__ = _frozen_delattr
        cls.__hash__ = _hash
    else:
        cls.__hash__ = None     # mutable and compared by value: unhashable, as a dataclass
    return cls


def _init(self, *args, **kwargs):
    table = self.__record_fields__
    if len(args) > len(table):
        raise TypeError(f"{type(self).__name__}() takes {len(table)} positional arguments but {len(args)} were given")
    for name in kwargs:
        if name not in self.__record_names__:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
    setter = object.__setattr__
    for i, f in enumerate(table):
        if i < len(args):
            if f.name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {f.name!r}")
            value = args[i]
        elif f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        else:
            raise TypeError(f"{type(self).__name__}() missing required argument: {f.name!r}")
        setter(self, f.name, value)


def _repr(self) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.__record_fields__ if f.repr)
    return f"{type(self).__qualname__}({shown})"


def _values(self) -> tuple:
    return tuple(getattr(self, f.name) for f in self.__record_fields__)


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _frozen_setattr(self, name, value):
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise FrozenInstanceError(f"cannot delete field {name!r}")

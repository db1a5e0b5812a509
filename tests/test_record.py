"""pykvm.record behaves as dataclasses does on the subset pykvm uses."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.record import FrozenInstanceError, asdict, field, fields, record, replace


@record(frozen=True)
class Point:
    """A frozen record (module level, so pickle finds it)."""

    x: int
    y: int = 0
    tags: tuple = ()


@record
class Box:
    """A mutable record with a factory default and a field hidden from repr."""

    name: str
    items: list = field(default_factory=list)
    secret: bytes = field(default=b"", repr=False)
    inner: Point | None = None


@dataclasses.dataclass(frozen=True)
class DPoint:
    x: int
    y: int = 0
    tags: tuple = ()


@dataclasses.dataclass
class DBox:
    name: str
    items: list = dataclasses.field(default_factory=list)
    secret: bytes = dataclasses.field(default=b"", repr=False)
    inner: DPoint | None = None


def _same_repr(ours, theirs) -> bool:
    return repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


values = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.binary(max_size=4))


@given(values, values, st.lists(values, max_size=3).map(tuple))
def test_frozen_record_matches_a_frozen_dataclass(x, y, tags):
    ours, theirs = Point(x, y, tags), DPoint(x, y, tags)
    assert _same_repr(ours, theirs)
    assert ours == Point(x=x, y=y, tags=tags) and ours != theirs   # another class is never equal
    assert hash(ours) == hash(Point(x, y, tags))
    assert replace(ours, y=1) == Point(x, 1, tags)
    assert asdict(ours) == dataclasses.asdict(theirs)
    assert pickle.loads(pickle.dumps(ours)) == ours
    with pytest.raises(FrozenInstanceError):
        ours.x = 1
    with pytest.raises(AttributeError):      # as dataclasses' FrozenInstanceError is
        del ours.y


@given(st.text(max_size=5), st.lists(values, max_size=3))
def test_mutable_record_matches_a_dataclass(name, items):
    ours, theirs = Box(name, list(items), b"k", Point(1)), DBox(name, list(items), b"k", DPoint(1))
    assert _same_repr(ours, theirs) or "Point" in repr(ours)
    assert "secret" not in repr(ours)
    assert ours == Box(name, list(items), b"k", Point(1))
    ours.name = "other"
    assert ours.name == "other"
    with pytest.raises(TypeError):          # mutable and compared by value: unhashable
        hash(ours)
    assert asdict(ours) == {"name": "other", "items": list(items), "secret": b"k",
                            "inner": {"x": 1, "y": 0, "tags": ()}}


def test_defaults_and_factories():
    a, b = Box("a"), Box("b")
    assert a.items == [] and a.items is not b.items      # a factory runs per instance
    assert a.secret == b"" and a.inner is None
    assert Point.y == 0                                   # plain defaults stay class attributes
    assert [f.name for f in fields(Box)] == ["name", "items", "secret", "inner"]
    assert [f.type for f in fields(Box)] == ["str", "list", "bytes", "Point | None"]   # as written
    assert fields(a) == fields(Box)


@pytest.mark.parametrize("call, message", [
    (lambda: Point(), "missing required argument: 'x'"),
    (lambda: Point(1, 2, (), 4), "takes 3 positional arguments but 4 were given"),
    (lambda: Point(1, x=2), "multiple values for argument 'x'"),
    (lambda: Point(1, z=2), "unexpected keyword argument 'z'"),
    (lambda: replace(Point(1), z=2), "has no field 'z'"),
    (lambda: fields(object()), "is not a record"),
    (lambda: asdict({"x": 1}), "record instances"),
])
def test_misuse_is_a_type_error(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_a_required_field_after_a_default_is_refused():
    with pytest.raises(TypeError, match="non-default field 'b' follows a default field"):
        @record
        class Bad:
            a: int = 0
            b: int


def test_both_default_and_factory_is_refused():
    with pytest.raises(ValueError):
        field(default=1, default_factory=int)


def test_methods_and_properties_of_the_class_are_kept():
    @record(frozen=True)
    class Span:
        start: int
        size: int

        @property
        def end(self) -> int:
            return self.start + self.size

        def contains(self, addr: int) -> bool:
            return self.start <= addr < self.end

    s = Span(0x1000, 0x100)
    assert s.end == 0x1100 and s.contains(0x10ff) and not s.contains(0x1100)
    assert {s, Span(0x1000, 0x100)} == {s}

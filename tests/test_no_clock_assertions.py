"""No test asserts how fast the machine was: a guard over the test sources.

A test that compares a duration with a literal (``assert took < 5.0``), with a factor of
another figure (``a_ms > 1.08 * b_ms``) or with another duration passes or fails with the
machine's speed and load, not with the code: speed claims live in ``bench/``. The guard parses
every Python file under ``tests/`` and reports each ordering comparison (``<``, ``>``, ``<=``,
``>=``) between a *duration* and a number, a scaled figure or another duration, naming the
file and line. A duration is a difference involving a clock call (``time.time()``,
``perf_counter()``, ``monotonic()``, their ``_ns`` forms, ``process_time()``), a name bound to
one (or to arithmetic on one), or a name or key that says it is a time (``took``, ``elapsed``,
``duration``, ``latency``, ``runtime``, ``*_ms``, ``seconds``, ...).

Waiting with a bound (``while time.monotonic() < deadline``) compares a clock reading with a
deadline, not a duration with a number: allowed. A comparison that cannot flake (for example
a clock the test itself advances) is allowed with a comment on its line, or the line before,
``# clock-ok: <why it cannot flake>``. A sign check (``took > 0``: a figure was measured) is
not a speed claim: allowed too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"time", "perf_counter", "monotonic", "perf_counter_ns", "monotonic_ns", "time_ns",
          "process_time", "process_time_ns"}
TIME_WORD = re.compile(r"(^|_)(took|elapsed|duration|latency|runtime|wall|seconds|secs?)(_|$)"
                       r"|_ms(_|$)|^ms$|_s$")
ALLOW = re.compile(r"#\s*clock-ok:\s*\S")
ORDER = (ast.Lt, ast.Gt, ast.LtE, ast.GtE)


def _is_clock_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in CLOCKS


def _label(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
            and isinstance(node.slice.value, str):
        return node.slice.value
    return ""


class _Scan:
    def __init__(self, tree: ast.AST):
        self.clock_names: set[str] = set()  # bound to a clock reading
        self.durations: set[str] = set()  # bound to a duration
        # fixpoint over assignments (order of binding does not matter for a guard)
        assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign,
                                                                 ast.AugAssign))]
        for _ in range(4):
            for a in assigns:
                targets = a.targets if isinstance(a, ast.Assign) else [a.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if a.value is None or not names:
                    continue
                if _is_clock_call(a.value):
                    self.clock_names.update(names)
                elif self.duration(a.value):
                    self.durations.update(names)

    def _clockish(self, node: ast.AST) -> bool:
        return _is_clock_call(node) or (isinstance(node, ast.Name) and node.id in self.clock_names)

    def duration(self, node: ast.AST) -> bool:
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Sub) and (self._clockish(node.left)
                                                 or self._clockish(node.right)):
                return True
            return self.duration(node.left) or self.duration(node.right)
        if isinstance(node, ast.Name) and node.id in self.durations:
            return True
        label = _label(node)
        return bool(label) and bool(TIME_WORD.search(label.lower()))

    def _number_or_scaled(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return True
        if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            return self._number_or_scaled(node.left) or self._number_or_scaled(node.right)
        return False

    def offending(self, cmp: ast.Compare) -> bool:
        ops = [cmp.left, *cmp.comparators]
        for op, a, b in zip(cmp.ops, ops, ops[1:]):
            if not isinstance(op, ORDER):
                continue
            for x, y in ((a, b), (b, a)):
                if isinstance(y, ast.Constant) and y.value == 0:
                    continue  # a sign check ("a figure was measured"), not a speed
                if self.duration(x) and (self._number_or_scaled(y) or self.duration(y)):
                    return True
        return False


def _fails(stmt: ast.stmt) -> bool:
    """A statement that fails the test: ``raise ...`` or ``pytest.fail(...)``."""
    return isinstance(stmt, ast.Raise) or (isinstance(stmt, ast.Expr)
                                           and isinstance(stmt.value, ast.Call)
                                           and _label(stmt.value.func) == "fail")


def clock_assertions(source: str, filename: str = "<test>") -> list[str]:
    """``FILE:LINE: source line`` for each comparison of a duration with a number, a scaled
    figure or another duration, in asserts and in conditions that fail a test
    (``raise`` or ``pytest.fail`` under an ``if``), unless allowed by a ``# clock-ok:`` comment."""
    tree = ast.parse(source, filename)
    scan = _Scan(tree)
    lines = source.splitlines()
    found = []
    checked: list[ast.Compare] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            checked += [n for n in ast.walk(node.test) if isinstance(n, ast.Compare)]
        elif isinstance(node, ast.If) and any(_fails(s) for s in node.body):
            checked += [n for n in ast.walk(node.test) if isinstance(n, ast.Compare)]
    for cmp in checked:
        if not scan.offending(cmp):
            continue
        lo, hi = cmp.lineno, getattr(cmp, "end_lineno", cmp.lineno) or cmp.lineno
        window = lines[max(0, lo - 2):hi]
        if any(ALLOW.search(x) for x in window):
            continue
        found.append(f"{filename}:{lo}: {lines[lo - 1].strip()}")
    return sorted(set(found), key=lambda s: int(s.split(":")[1]))


def test_no_test_compares_a_duration_with_a_number_or_another_duration():
    found = []
    for f in sorted(TESTS.rglob("*.py")):
        found += clock_assertions(f.read_text(), str(f.relative_to(TESTS.parent)))
    assert not found, ("tests that assert how fast the machine was (move the claim to bench/, "
                       "or make the machine deterministic; '# clock-ok: why' if it cannot "
                       "flake):\n" + "\n".join(found))


PLANTED = '''
import time
def test_fast():
    t0 = time.monotonic()
    work()
    took = time.monotonic() - t0
    assert took < 5.0
'''


def test_the_guard_finds_a_planted_wall_clock_assertion():
    assert clock_assertions(PLANTED, "tests/test_planted.py") == [
        "tests/test_planted.py:7: assert took < 5.0"]


def test_the_guard_finds_each_shape_and_spares_bounded_waits():
    src = '''
import time
def test_shapes(runs, r):
    start = time.perf_counter()
    run()
    end = time.perf_counter()
    assert end - start <= 2                                      # 7: a difference of readings
    assert (time.perf_counter() - start) * 1000 < 300            # 8: scaled difference
    assert runs["1"]["runtime_ms_cpu"] > 1.08 * runs["2"]["runtime_ms_cpu"]   # 9: ratio
    elapsed_s = r.wall
    if elapsed_s > 30:                                           # 11: fails the test
        pytest.fail("slow")
    assert 0.3 < r["runtime_rel"] < 3                            # 13: a measured ratio
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:                           # a bounded wait: fine
        assert time.monotonic() < deadline, "still waiting"      # a timeout: fine
    assert took_by_op_clock < 2  # clock-ok: the test's own clock, advanced by counted work
    assert len(runs) > 2                                         # not a time: fine
    assert r["runtime_ms"] > 0                                   # a sign check: fine
'''
    lines = [int(x.split(":")[1]) for x in clock_assertions(src)]
    assert lines == [7, 8, 9, 11, 13], clock_assertions(src)

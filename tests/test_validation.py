"""Tests for L{clawproxy.policy.validation}: checks on a request head."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from clawproxy.errors import Rejected
from clawproxy.policy.validation import check_fields, check_method


class MethodTests(SynchronousTestCase):
    """L{check_method}: nginx's method rules, TRACE and CONNECT refused."""

    def code(self, method: bytes) -> tuple[int, str | None]:
        rej = self.assertRaises(Rejected, check_method, method)
        return rej.status, rej.code

    def test_accepted(self) -> None:
        """Registered and unknown upper-case methods pass (routing decides on them)."""
        for method in (b"GET", b"POST", b"OPTIONS", b"PATCH", b"FOO", b"X-Y_Z",
                       b"UPDATEREDIRECTREF", b"A" * 32):
            check_method(method)

    def test_malformed(self) -> None:
        """Lower or mixed case, digits, other characters, or over 32 bytes: 400."""
        for method in (b"get", b"Get", b"FOO1", b"G.T", b"A" * 33, b"A" * 10000, b""):
            self.assertEqual(self.code(method), (400, "invalid_method"), method)

    def test_refused(self) -> None:
        """TRACE and CONNECT: 405."""
        for method in (b"TRACE", b"CONNECT"):
            self.assertEqual(self.code(method), (405, "method_not_allowed"))


class FieldTests(SynchronousTestCase):
    """L{check_fields}: visible ASCII targets, no controls in values, known Expect."""

    def code(self, target: bytes, headers: list[tuple[bytes, list[bytes]]]
             ) -> tuple[int, str | None]:
        rej = self.assertRaises(Rejected, check_fields, target, headers)
        return rej.status, rej.code

    def test_plain_passes(self) -> None:
        """Visible ASCII targets, TAB and obs-text in values, Expect: 100-continue pass."""
        check_fields(b"/v1/chat/completions?x=%80&y=~", [
            (b"Content-Type", [b"application/json"]),
            (b"X-A", [b"a\tb", b"caf\xc3\xa9"]),
            (b"Expect", [b"100-Continue"]),
        ])

    def test_target_bytes(self) -> None:
        """Any byte of the target outside 0x21-0x7e: 400 invalid_target."""
        for byte in [*range(0x21), *range(0x7f, 0x100)]:
            target = b"/v1/a%cb" % byte
            self.assertEqual(self.code(target, []), (400, "invalid_target"), target)

    def test_header_value_controls(self) -> None:
        """Controls other than HTAB (and DEL) in a value: 400 invalid_header."""
        for byte in [*range(0x09), *range(0x0a, 0x20), 0x7f]:
            headers = [(b"Content-Type", [b"a%cb" % byte])]
            self.assertEqual(self.code(b"/", headers), (400, "invalid_header"), byte)

    def test_unknown_expect(self) -> None:
        """An Expect other than 100-continue, alone or beside it: 417."""
        for values in ([b"foo"], [b""], [b"100-continue", b"x"], [b"100-continue, x"]):
            self.assertEqual(self.code(b"/", [(b"expect", values)]),
                             (417, "expectation_failed"), values)

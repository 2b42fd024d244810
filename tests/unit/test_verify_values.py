"""How verify compares a computed value with the stored one."""

from __future__ import annotations

from decimal import Decimal, localcontext

from pgstream.verify.values import values_equal


def test_an_average_rounded_by_postgres_equals_the_exact_quotient() -> None:
    """PostgreSQL keeps 16 fractional digits of 10 / 3 (numeric), Python's Decimal 28
    significant digits: one quotient, not a wrong value."""
    with localcontext() as ctx:
        ctx.prec = 28
        exact = Decimal("10.00") / Decimal(3)
    stored = Decimal("3.3333333333333333")
    assert values_equal(exact, stored)
    assert values_equal(Decimal(2) / Decimal(3), Decimal("0.66666666666666666667"))


def test_exact_numbers_still_compare_exactly() -> None:
    assert not values_equal(Decimal("10.01"), Decimal("10.02"))
    assert not values_equal(Decimal("123456789012345.01"), Decimal("123456789012345.02"))
    assert not values_equal(7, Decimal("7.0000000000000001"))
    assert values_equal(7, Decimal("7.00"))
    # a real difference between two long quotients is still one
    assert not values_equal(Decimal("3.3333333333333333"), Decimal("3.3333333333333343"))
    assert not values_equal(Decimal("NaN"), Decimal("NaN"))

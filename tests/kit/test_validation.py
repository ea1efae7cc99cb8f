"""Names and organizations: exactly the allowed characters, with nothing after them (not even a newline)."""

from __future__ import annotations

import pytest

from services.kit.validation import check_name, check_organization
from tuneforge_core.errors import Violations


@pytest.mark.parametrize("value", ["hostile\n", "acme\r\n", "a\x00", "Acme", "-acme", "a" * 64, "acme corp"])
def test_bad_organizations_and_names_are_refused(value: str) -> None:
    v = Violations()
    check_organization(v, value)
    check_name(v, value)
    assert [i.field for i in v.items] == ["organization", "name"]


@pytest.mark.parametrize("value", ["acme", "a", "team-7.prod_x", "a" * 63])
def test_good_organizations_and_names_pass(value: str) -> None:
    v = Violations()
    check_organization(v, value)
    check_name(v, value)
    assert not v


def test_a_name_shaped_like_an_id_is_refused() -> None:
    from tuneforge_core.ids import new_id

    for prefix in ("ds", "job", "dep", "key", "evt"):
        v = Violations()
        check_name(v, new_id(prefix))
        assert [i.field for i in v.items] == ["name"] and "must not look like an id" in v.items[0].description
    for value in ("ds_small", "job_1", "chat-01m975e04pejx5vapcnkf797ye", "ds_" + "a" * 25):
        v = Violations()
        check_name(v, value)
        assert not v, value

"""sekd-lab's pieces, checked the way sekd checks its own (sekd.testing): each against its float64
reference, the chunked flow against the dense one under every policy / class sampler / criterion it can
meet, its options refused by name, and 2 ranks against 1 process."""

import sekd_lab.pieces  # noqa: F401 - registers the pieces (installed, the sekd.plugins entry point does too)
from sekd.testing import check_policy, check_signal


def test_the_disagreement_margin_meets_sekds_contract():
    check_signal("disagreement_margin")


def test_the_top_p_policy_meets_sekds_contract():
    check_policy("top_p", {"p": 0.5})

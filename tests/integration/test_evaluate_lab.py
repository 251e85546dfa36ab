"""The evaluation on real guests: each method's outcomes are the ones its design implies.

Expectations are derived from the tampered guest's manifest (which techniques it holds) and from what
each method can see by construction, not from hard-coded counts.
"""

from __future__ import annotations

import pytest

from nephoscope.service.evaluate import DETECTED, MISSED, score_guest, truth_processes
from nephoscope.store.sqlite import Store

pytestmark = pytest.mark.guest

# what each method's design implies per technique (agent: the guest's own view; inspect: kernel
# structures; arch: page contents only)
EXPECTED = {
    "agent": {"preload-hidden": MISSED, "trojaned-binary": MISSED, "masquerade": DETECTED,
              "deleted-binary": DETECTED, "fileless-memfd": DETECTED, "code-injection": DETECTED},
    "inspect": {"preload-hidden": DETECTED, "trojaned-binary": MISSED, "masquerade": DETECTED,
                "deleted-binary": DETECTED, "fileless-memfd": DETECTED, "code-injection": DETECTED},
    "arch": {"preload-hidden": DETECTED, "trojaned-binary": DETECTED, "code-injection": DETECTED,
             "unpackaged-binary": DETECTED, "masquerade": DETECTED},
}


@pytest.fixture(scope="module")
def tampered_scores(tampered_guest, default_kb, tmp_path_factory) -> dict:
    store = Store(tmp_path_factory.mktemp("eval") / "s.sqlite")
    return {s.method: s for s in score_guest(tampered_guest, ["agent", "inspect", "arch"], store=store)}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_method_detects_what_its_design_implies(tampered_guest, tampered_scores, method) -> None:
    techniques = {t["id"] for t in tampered_guest.manifest()["techniques"]}
    expected = {t: v for t, v in EXPECTED[method].items() if t in techniques}
    assert expected, "the tampered manifest lists no technique this test knows"
    got = {t: tampered_scores[method].techniques.get(t) for t in expected}
    assert got == expected


def test_power_on_the_clean_guest(clean_guest, default_kb, tmp_path) -> None:
    scores = {s.method: s for s in score_guest(clean_guest, ["inspect", "arch"], store=Store(tmp_path / "s.sqlite"))}
    truth = scores["arch"].truth_processes
    assert truth > 5
    assert scores["inspect"].seen == truth  # the kernel lists every process
    assert scores["inspect"].identified == 0  # but cannot tell package versions by itself
    packaged = [p for p in truth_processes(clean_guest.manifest()) if p["package"]]
    assert scores["arch"].identified == len(packaged)  # every packaged binary, with its exact version

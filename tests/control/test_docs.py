"""docs/osc.md carries exactly the parameter table generated from the schema."""

from __future__ import annotations

from bridge.control import PARAMS, osc_table_markdown
from tests.runtime.helpers import ROOT, load_script


def test_docs_table_is_the_generated_one() -> None:
    generator = load_script("gen_osc_doc.py")
    text = (ROOT / "docs" / "osc.md").read_text(encoding="utf-8")
    assert generator.with_table(text, osc_table_markdown()) == text, (
        "docs/osc.md is out of date; run python scripts/gen_osc_doc.py"
    )


def test_table_has_one_row_per_param_with_its_address_and_default() -> None:
    rows = osc_table_markdown().splitlines()[2:]
    assert len(rows) == len(PARAMS)
    for row, param in zip(rows, PARAMS, strict=True):
        assert row.startswith(f"| `{param.address}` |")
        assert param.effect in row
    assert "| `32 45` |" in rows[[p.name for p in PARAMS].index("t_index_list")]

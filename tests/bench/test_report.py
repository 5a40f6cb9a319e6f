"""BENCHMARKS.md section replacement (pure logic)."""

from fastrelay.bench.report import replace_section, table


def test_replace_section_appends_then_replaces(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nintro\n")
    replace_section(md, "x", "first")
    replace_section(md, "y", "other")
    replace_section(md, "x", "second")
    text = md.read_text()
    assert "first" not in text and text.count("second") == 1 and "other" in text and "intro" in text
    assert text.index("second") < text.index("other")


def test_table():
    assert table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_layout_section_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    start = layout.index("```\nsmolctl/\n") + 4
    block = layout[start:layout.index("```", start)]
    listed = set(re.findall(r"^  (\S+\.py)\s", block, re.MULTILINE))
    modules = {p.name for p in (ROOT / "smolctl").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert listed == modules

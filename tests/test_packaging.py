"""setup.py lists every package of the tree: a non-editable install must not lose a subpackage."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_lists_every_subpackage():
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(
        ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
        for kw in node.keywords if kw.arg == "packages"
    )
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dit_fast").rglob("__init__.py")}
    found |= {"dit_fast.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found <= set(listed), f"setup.py packages miss {sorted(found - set(listed))}"

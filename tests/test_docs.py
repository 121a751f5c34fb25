"""The repo documents itself: no pointers to notes outside it, no dead links, and the loss
reference values in docs/loss.md are the ones tests/test_loss.py checks.

Scope: the files git tracks, except the committed run evidence under results/ (logs and
configs written by past runs, kept as they were).
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Background notes that were never part of the repo, and folders outside it. Spelled so that this
# file does not match its own patterns.
FORBIDDEN = re.compile(r"(?<![\w-])shared[/]|/work[/]"
                       r"|\b(?:REFERENCE|STUDY|DESIGN|STYLE|PHANTOM)\.md\b")

# [text](target): target without spaces or parentheses; images too.
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^()\s]+)\)")
# in .py files only targets that look like repo paths count (code such as `f[0](x)` does not)
PATHLIKE = re.compile(r"^[\w.-]+(?:/[\w.-]+)*\.(?:md|py|png|json|csv|txt|sh|toml|ya?ml)$")
DOC_MENTION = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)")
# docs/<name>.md "Section" or docs/<name>.md, "Section" (the quote may follow a comment marker
# on the next line)
DOC_SECTION = re.compile(r"(?<![\w/.-])(docs/[\w.-]+\.md)[,:]?\s*(?:#\s*)?"
                         r"[\"'“]([A-Za-z0-9][^\"'”\n]*)[\"'”]")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    names = [n for n in out.stdout.decode().split("\0") if n]
    return [ROOT / n for n in names
            if not n.startswith(("results/", ".git/")) and (ROOT / n).is_file()]


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # binary
        return None


def text_files(*suffixes: str) -> list[tuple[Path, str]]:
    files = [(p, read_text(p)) for p in tracked_files() if not suffixes or p.suffix in suffixes]
    return [(p, t) for p, t in files if t is not None]


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def headings(doc: Path) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", doc.read_text(), re.M)]


# ----------------------------------------------------------------------------- (a) self-contained

def test_no_references_to_documents_outside_the_repo():
    hits = [f"{p.relative_to(ROOT)}:{line_of(t, m.start())}: {m.group(0)}"
            for p, t in text_files() for m in FORBIDDEN.finditer(t)]
    assert not hits, ("these lines point to notes or folders that are not part of the repo; "
                      "put the facts into docs/ and point there:\n" + "\n".join(hits))


# ----------------------------------------------------------------------------- (b) links resolve

def test_relative_markdown_links_resolve():
    dead = []
    for path, text in text_files(".md", ".py"):
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, in-page anchors
            file_part = target.split("#", 1)[0]
            if path.suffix == ".py" and not PATHLIKE.match(file_part):
                continue
            resolved = (path.parent / file_part).resolve()
            if not (resolved.is_relative_to(ROOT) and resolved.exists()):
                dead.append(f"{path.relative_to(ROOT)}:{line_of(text, m.start())}: {m.group(0)}")
    assert not dead, "links to files that do not exist:\n" + "\n".join(dead)


def test_docs_mentions_resolve():
    missing = [f"{p.relative_to(ROOT)}:{line_of(t, m.start())}: {m.group(1)}"
               for p, t in text_files(".md", ".py") for m in DOC_MENTION.finditer(t)
               if not (ROOT / m.group(1)).is_file()]
    assert not missing, "mentions of docs/ files that do not exist:\n" + "\n".join(missing)


def test_docs_section_references_resolve():
    """`docs/<name>.md, "Section"` names the start of a heading of that file (case-insensitive)."""
    bad = []
    for path, text in text_files(".md", ".py"):
        for m in DOC_SECTION.finditer(text):
            doc, section = ROOT / m.group(1), m.group(2).strip().lower()
            if doc.is_file() and not any(h.lower().startswith(section) for h in headings(doc)):
                bad.append(f"{path.relative_to(ROOT)}:{line_of(text, m.start())}: "
                           f"{m.group(1)} has no section \"{m.group(2)}\"")
    assert not bad, "section references without such a heading:\n" + "\n".join(bad)


# ------------------------------------------------------------------------- (c) loss reference values

LOSS_DOC = ROOT / "docs" / "loss.md"
LOSS_TESTS = ROOT / "tests" / "test_loss.py"
ROW_INDEX = (("x.sum()", 0), ("bce", 1), ("dice", 2), ("bwft", 3))  # as REFERENCE's tuples


def reference_section() -> str:
    text = LOSS_DOC.read_text()
    m = re.search(r"^## Reference values\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{LOSS_DOC}: no '## Reference values' section"
    return m.group(1)


def doc_table() -> dict[str, list]:
    """{'A': [x_sum, bce, dice, bwft], ...} from the first table of the section ('—' = None)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in reference_section().splitlines() if line.lstrip().startswith("|")]
    assert len(rows) >= 3, "no table in the 'Reference values' section"
    header, body = rows[0], [r for r in rows[2:] if r]
    names = header[1:]
    table = {name: [None] * 4 for name in names}
    seen = set()
    for label, *cells in body:
        index = next((i for key, i in ROW_INDEX if key in label.lower()), None)
        assert index is not None, f"unexpected row {label!r} in the reference table"
        seen.add(index)
        for name, cell in zip(names, cells):
            table[name][index] = None if cell in ("—", "-", "") else float(cell)
    assert seen == {0, 1, 2, 3}, "the reference table needs rows x.sum(), BCE, 1 − Dice, BWFT"
    return table


def test_reference_table():
    tree = ast.parse(LOSS_TESTS.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "REFERENCE" for t in n.targets))
    reference = ast.literal_eval(node.value)
    assert doc_table() == {name: list(values) for name, values in reference.items()}


def _tests_vector_function():
    """`vector` of tests/test_loss.py, taken from its source (importing that module would pull
    in segmentation_models_pytorch, which this check does not need)."""
    import torch

    tree = ast.parse(LOSS_TESTS.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "vector")
    scope = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(LOSS_TESTS), "exec"), scope)
    return scope["vector"]


def test_reference_setup_lines_are_the_tests_vectors():
    """The doc's setup lines, executed, give the tests' tensors and the draw values it quotes."""
    import torch

    lines = reference_section().splitlines()
    vector = _tests_vector_function()
    found = set()
    for i, line in enumerate(lines):
        m = re.match(r"^([ABC]): (torch\.manual_seed.*)$", line)
        if not m:
            continue
        name, code = m.group(1), m.group(2)
        scope = {"torch": torch}
        exec(code, scope)  # noqa: S102 - the documented setup line itself
        x_ref, t_ref = vector(name)
        if not (torch.equal(scope["x"], x_ref) and torch.equal(scope["t"], t_ref)):
            pytest.fail(f"vector {name}: the setup line in docs/loss.md does not give the tensors "
                        f"of vector({name!r}) in tests/test_loss.py")
        draw = lines[i + 1]
        first = re.search(r"x\.flatten\(\)\[:4\] = \[([^\]]+)\]", draw)
        assert first, f"vector {name}: no x.flatten()[:4] line"
        assert [float(v) for v in first.group(1).split(",")] == pytest.approx(
            x_ref.flatten()[:4].tolist(), abs=1e-5)
        total = re.search(r"x\.sum\(\) = (-?[\d.]+)", draw)
        if total:
            assert float(total.group(1)) == pytest.approx(x_ref.sum().item(), abs=1e-4)
        positives = re.search(r"positives per sample \[([^\]]+)\]", draw)
        assert positives, f"vector {name}: no 'positives per sample'"
        counts = t_ref.flatten(1).sum(1).int().tolist()
        assert [int(v) for v in positives.group(1).split(",")] == counts, name
        found.add(name)
    assert found == {"A", "B", "C"}

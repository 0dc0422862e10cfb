"""The README and the --help texts can be read without files we do not ship.

Comments and docs point at InternEvo behaviour with short codes (a letter group, a dash, two digits) and at
InternEvo quirks as "quirk 5.N". Every one used anywhere in the repository must be defined by a heading of
docs/internevo_parity.md; the README must link each code it uses to that entry; no text may cite a numbered section
(the section sign) of a document that is not in the repository; and --help texts carry none of these at all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from .conftest import ROOT

PARITY = ROOT / "docs" / "internevo_parity.md"
PARITY_LINK = "docs/internevo_parity.md"
CODE = re.compile(r"\b([A-Z]{1,3})-(\d{2})\b")
# A range ("X-02..X-04", "X-01..04") or a list ("X-03/04/05") names the codes it spans too.
CODE_RANGE = re.compile(r"\b([A-Z]{1,3})-(\d{2})\.\.(?:\1-)?(\d{2})\b")
CODE_LIST = re.compile(r"\b([A-Z]{1,3})-(\d{2})((?:/\d{2})+)\b")
QUIRK = re.compile(r"\b[Qq]uirks? (5\.\d+)")
NOT_CODES = {"UTF-16", "UTF-32"}  # things the pattern matches that are not reference codes
SECTION_SIGN = "\N{SECTION SIGN}"
ISSUE_NUMBER = re.compile(r"\bissue #?\d+", re.I)  # our tracker's numbers mean nothing to a reader of --help
SCANNED_DIRS = ("internevo_jax", "tools", "configs", "tests")


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "launch.py", *sorted((ROOT / "docs").glob("*.md"))]
    for d in SCANNED_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return [f for f in files if f != Path(__file__)]  # this file spells out made-up codes to test the scan


def codes_in(text: str) -> set[str]:
    found = {m.group(0) for m in CODE.finditer(text)} - NOT_CODES
    for m in CODE_RANGE.finditer(text):
        prefix, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
        found |= {f"{prefix}-{i:02d}" for i in range(lo, hi + 1)}
    for m in CODE_LIST.finditer(text):
        found |= {f"{m.group(1)}-{n}" for n in m.group(3).split("/")[1:]}
    return found


def quirks_in(text: str) -> set[str]:
    return {m.group(1) for m in QUIRK.finditer(text)}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def parity_headings() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", PARITY.read_text(), re.M)]


def defined() -> tuple[set[str], set[str], set[str]]:
    """(codes, quirk numbers, anchors) that docs/internevo_parity.md defines by a heading."""
    heads = parity_headings()
    codes = {h for h in heads if CODE.fullmatch(h)}
    quirks = {m.group(1) for h in heads if (m := re.fullmatch(r"Quirk (5\.\d+)", h))}
    return codes, quirks, {slug(h) for h in heads}


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def undefined_uses(files: list[Path]) -> list[str]:
    codes, quirks, _ = defined()
    problems = []
    for path in files:
        text = path.read_text()
        rel = shown(path)
        problems += [f"{rel}: {c}" for c in sorted(codes_in(text) - codes)]
        problems += [f"{rel}: quirk {q}" for q in sorted(quirks_in(text) - quirks)]
    return problems


def test_every_code_used_is_defined_in_the_parity_doc():
    problems = undefined_uses(scanned_files())
    assert not problems, f"used but not defined by a heading of {PARITY_LINK}:\n" + "\n".join(problems)


def test_a_code_missing_from_the_parity_doc_is_caught(tmp_path):
    """The scan itself works: an undefined code, one hidden in a range, and an unknown quirk are all reported."""
    unknown = "ZZ-99"
    text = f"see {unknown}, D-01..D-03 and MON-01/77, quirk 5.99\n"
    (tmp_path / "x.py").write_text(text)
    assert set(undefined_uses([tmp_path / "x.py"])) == {f"x.py: {unknown}", "x.py: MON-77", "x.py: quirk 5.99"}


def test_parity_doc_headings_are_unique_and_links_to_it_resolve():
    heads = parity_headings()
    assert len({slug(h) for h in heads}) == len(heads), "two headings of the parity doc share an anchor"
    _, _, anchors = defined()
    broken = []
    for path in scanned_files():
        for m in re.finditer(r"internevo_parity\.md#([\w-]+)", path.read_text()):
            if m.group(1) not in anchors:
                broken.append(f"{path.relative_to(ROOT)}: #{m.group(1)}")
        if path == PARITY:  # its own table of contents
            broken += [
                f"{PARITY_LINK}: #{a}" for a in re.findall(r"\]\(#([\w-]+)\)", path.read_text()) if a not in anchors
            ]
    assert not broken, "links to missing anchors:\n" + "\n".join(broken)


def test_no_text_cites_a_numbered_section_of_an_unshipped_document():
    cited = [str(p.relative_to(ROOT)) for p in scanned_files() if SECTION_SIGN in p.read_text()]
    assert not cited, f"{SECTION_SIGN} references (use a code or a {PARITY_LINK}#anchor link): {cited}"


def test_readme_links_every_code_it_uses_to_its_entry():
    text = (ROOT / "README.md").read_text()
    # Remove the well-formed links; whatever code or quirk is left is used bare (or linked to the wrong anchor).
    linked = re.compile(r"\[(?P<name>[^\]]+)\]\(" + re.escape(PARITY_LINK) + r"#(?P<anchor>[\w-]+)\)")
    wrong = [m.group(0) for m in linked.finditer(text) if slug(m.group("name")) != m.group("anchor")]
    wrong = [w for w in wrong if codes_in(w) or quirks_in(w)]  # a named section may have any link text
    bare = linked.sub("", text)
    assert not wrong, f"links whose anchor is not the code's own: {wrong}"
    assert not codes_in(bare) and not quirks_in(bare), (
        f"README uses {sorted(codes_in(bare)) + sorted(quirks_in(bare))} without linking {PARITY_LINK}"
    )
    assert "reference " + SECTION_SIGN not in text and not ISSUE_NUMBER.search(text)


def help_texts(path: Path) -> list[tuple[int, str]]:
    """The description, epilog and argument help strings of the argparse parsers a file builds, as --help prints
    them (f-string and %-format parts: their literal text). A parser described from the module docstring gets the
    docstring's first paragraph."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree, clean=False) or ""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "__doc__":
            out.append((1, doc.split("\n\n")[0]))
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if func not in ("ArgumentParser", "add_argument", "add_argument_group", "add_parser", "add_subparsers"):
            continue
        for kw in node.keywords:
            if kw.arg in ("help", "description", "epilog", "usage"):
                parts = [
                    c.value for c in ast.walk(kw.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                out.append((node.lineno, " ".join(parts)))
    return out


def help_files() -> list[Path]:
    return [ROOT / "launch.py", ROOT / "internevo_jax" / "initialize.py", *sorted((ROOT / "tools").glob("*.py"))]


def help_problems(path: Path) -> list[str]:
    """Codes and quirks are allowed in a help text that also names the parity doc; section signs and issue numbers
    never."""
    problems = []
    for line, text in help_texts(path):
        refs = sorted(codes_in(text)) + [f"quirk {q}" for q in sorted(quirks_in(text))]
        unresolvable = ([SECTION_SIGN] if SECTION_SIGN in text else []) + ISSUE_NUMBER.findall(text)
        if (refs and PARITY_LINK not in text) or unresolvable:
            problems.append(f"{shown(path)}:{line}: {refs + unresolvable} in {text[:80]!r}")
    return problems


def test_help_texts_carry_no_internal_references():
    problems = [p for path in help_files() for p in help_problems(path)]
    assert not problems, "--help texts a reader cannot resolve:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source, bad",
    [
        ('import argparse\np = argparse.ArgumentParser()\np.add_argument("--x", help="as in CK-03")\n', True),
        (
            '"""Tool (see issue #6).\n\nMore."""\nimport argparse\np = argparse.ArgumentParser(description=__doc__)\n',
            True,
        ),
        ('"""Tool.\n\nDetails: D-05."""\nimport argparse\np = argparse.ArgumentParser(description=__doc__)\n', False),
        (
            'import argparse\np = argparse.ArgumentParser()\np.add_argument("--x", help=f"D-05 ({PARITY_LINK})")\n',
            False,
        ),
    ],
)
def test_help_scan_sees_arguments_and_docstring_descriptions(tmp_path, source, bad):
    path = tmp_path / "tool.py"
    path.write_text(source.replace("{PARITY_LINK}", PARITY_LINK))
    assert bool(help_problems(path)) is bad

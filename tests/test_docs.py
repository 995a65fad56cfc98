"""The docs stay true to the repository: links resolve, cited design.md sections exist, every
kept benchmark result is in the manifest, and the README stays short."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/MANIFEST.md"]


def test_readme_is_at_most_10_kb():
    assert (ROOT / "README.md").stat().st_size <= 10 * 1024


def test_relative_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_cited_design_sections_exist():
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs/design.md").read_text(), re.M))
    for path in [*ROOT.glob("mlx_dhsa/**/*.py"), *ROOT.glob("scripts/*.py")]:
        for n in re.findall(r"design\.md (?:section|s\.) (\d+)", path.read_text()):
            assert n in sections, f"{path.relative_to(ROOT)} cites design.md section {n}"


def test_every_benchmark_file_is_in_the_manifest():
    manifest = (ROOT / "benchmarks/MANIFEST.md").read_text()
    for path in (ROOT / "benchmarks").rglob("*"):
        if path.is_file() and path.name != "MANIFEST.md":
            assert f"`{path.name}`" in manifest, f"{path.relative_to(ROOT)} not in MANIFEST.md"

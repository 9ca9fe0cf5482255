"""The pictures in docs/ are what ``python -m tools.docs_pictures`` draws today."""
import pytest

from topo_compiler.tools import docs_pictures
from topo_compiler.viz import have_dot


@pytest.fixture(scope="module")
def pictures():
    return docs_pictures.generate()


def test_committed_pictures_match_what_the_compiler_draws(pictures):
    assert sorted(pictures) == ["darts-edge-after", "darts-edge-before"]
    assert docs_pictures.stale(docs_pictures.DOCS, pictures) == [], \
        "docs/ pictures are stale: run `python -m tools.docs_pictures` and commit the result"


def test_pictures_are_stable_across_runs(pictures):
    again = docs_pictures.generate()
    assert {k: g.source for k, g in again.items()} == \
        {k: g.source for k, g in pictures.items()}


def test_the_after_picture_shows_the_merged_edge(pictures):
    """What the README says: 6 conv units and 16 other modules before; 3 merged
    convolutions and 6 other modules after, no zero branch left."""
    before, after = pictures["darts-edge-before"].source, pictures["darts-edge-after"].source
    assert "conv / non-conv / total: 6 / 16 / 22" in before and "× 0" in before
    assert "conv / non-conv / total: 3 / 6 / 9" in after and "× 0" not in after
    assert after.count("merged dense conv") == 3


def test_stale_notices_an_edited_dot_or_an_svg_from_another_dot(pictures, tmp_path):
    name, graph = next(iter(pictures.items()))
    one = {name: graph}
    assert docs_pictures.stale(tmp_path, one) == [name]  # missing files are stale
    (tmp_path / f"{name}.dot").write_text(graph.source, encoding="utf-8")
    stamp = f"<!-- {docs_pictures.STAMP} {docs_pictures.digest(graph.source)} -->"
    (tmp_path / f"{name}.svg").write_text(f"<svg>{stamp}</svg>", encoding="utf-8")
    assert docs_pictures.stale(tmp_path, one) == []
    (tmp_path / f"{name}.svg").write_text("<svg><!-- another --></svg>", encoding="utf-8")
    assert docs_pictures.stale(tmp_path, one) == [name]
    (tmp_path / f"{name}.svg").write_text(f"<svg>{stamp}</svg>", encoding="utf-8")
    (tmp_path / f"{name}.dot").write_text(graph.source + " ", encoding="utf-8")
    assert docs_pictures.stale(tmp_path, one) == [name]


@pytest.mark.skipif(not have_dot(), reason="graphviz's dot is not installed")
def test_write_then_check(tmp_path, capsys):
    assert docs_pictures.main(["--out", str(tmp_path), "--check"]) == 1
    assert "python -m tools.docs_pictures" in capsys.readouterr().out
    assert docs_pictures.main(["--out", str(tmp_path)]) == 0
    assert docs_pictures.main(["--out", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "darts-edge-after.svg").read_text().startswith("<?xml")

"""The two stage scripts carry deliberate copies of the same run plumbing (config loading, logging, weight
fetch, checkpoint swap, resume, signals), so that each stays one self-contained file. Like the "Copied from"
checks of large ML codebases, this fails as soon as a helper present in both scripts differs between them."""
import ast

from conftest import REPO

# Each script's own entry points: they describe their stage and differ on purpose.
ENTRY_POINTS = {"build_parser", "parse_args", "main"}


def top_level_definitions(path):
    source = path.read_text()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_helpers_present_in_both_scripts_are_identical():
    stage1, stage2 = top_level_definitions(REPO / "train_stage1.py"), top_level_definitions(REPO / "train_stage2.py")
    shared = (set(stage1) & set(stage2)) - ENTRY_POINTS
    assert len(shared) >= 15, sorted(shared)  # the plumbing is really shared, not renamed apart
    differing = sorted(name for name in shared if stage1[name] != stage2[name])
    assert not differing, f"copies differ between train_stage1.py and train_stage2.py: {differing}"


def test_the_check_sees_a_one_character_drift(tmp_path):
    drifted = (REPO / "train_stage2.py").read_text().replace("    CHECK_EVERY = 10", "    CHECK_EVERY = 11")
    (tmp_path / "train_stage2.py").write_text(drifted)
    stage1, stage2 = top_level_definitions(REPO / "train_stage1.py"), top_level_definitions(tmp_path / "train_stage2.py")
    assert stage1["StopOnSignal"] != stage2["StopOnSignal"]

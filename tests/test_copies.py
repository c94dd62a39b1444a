"""The two stage scripts share their run plumbing as deliberate copies, so that each stays one file to read and
edit. As transformers' `# Copied from` checks do, a helper of train_stage2.py marked

    # Copied from train_stage1.py            (the helper of the same name)
    # Copied from train_stage1.py:NAME       (train_stage1.py's NAME, renamed in the copy)

must be train_stage1.py's helper, word for word but for its name. A block of 10 or more lines that is identical
in both scripts without a marker (imports aside) is a copy nobody checks, and fails too.

    python tests/test_copies.py          # check
    python tests/test_copies.py --fix    # rewrite every marked copy from train_stage1.py
"""
import ast
import difflib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE, COPY = REPO / "train_stage1.py", REPO / "train_stage2.py"
MARKER = re.compile(r"^# Copied from train_stage1\.py(?::(\w+))?\s*$")
MIN_UNMARKED_LINES = 10


def definitions(text):
    """{name: (first line, end line)} of the top-level functions and classes, 0-based, decorators included."""
    spans = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            spans[node.name] = (first, node.end_lineno)
    return spans


def marked_copies(text):
    """[(copy name, source name, first line, end line)] of the marked definitions of a script."""
    lines = text.splitlines()
    copies = []
    for name, (first, end) in definitions(text).items():
        match = MARKER.match(lines[first - 1]) if first else None
        if match:
            copies.append((name, match.group(1) or name, first, end))
    return copies


def expected_copy(source_lines, source_span, source_name, copy_name):
    block = source_lines[source_span[0]:source_span[1]]
    if source_name != copy_name:  # only the name in the definition's own line changes
        header = next(i for i, line in enumerate(block) if re.match(rf"(def|class) {source_name}\b", line))
        block[header] = re.sub(rf"\b{source_name}\b", copy_name, block[header], count=1)
    return block


def check(source_text, copy_text):
    """The problems found: drifted or orphaned copies, and unmarked identical blocks."""
    source_lines, copy_lines = source_text.splitlines(), copy_text.splitlines()
    source_spans = definitions(source_text)
    problems, covered_source, covered_copy = [], set(), set()
    for name, source_name, first, end in marked_copies(copy_text):
        covered_copy.update(range(first - 1, end))
        if source_name not in source_spans:
            problems.append(f"train_stage2.py:{first + 1}: {name} is marked as a copy of {source_name}, which "
                            "train_stage1.py does not define")
            continue
        covered_source.update(range(*source_spans[source_name]))
        if copy_lines[first:end] != expected_copy(source_lines, source_spans[source_name], source_name, name):
            problems.append(f"train_stage2.py:{first + 1}: {name} differs from train_stage1.py's {source_name}; "
                            "edit train_stage1.py and run `python tests/test_copies.py --fix`")

    def kept(lines, covered):  # (line number, text) of the lines no marked copy accounts for, but blank lines
        return [(i, line) for i, line in enumerate(lines)  # and imports, which say what a file uses, not what it does
                if i not in covered and line.strip() and not re.match(r"(import|from) \S", line)]

    source_kept, copy_kept = kept(source_lines, covered_source), kept(copy_lines, covered_copy)
    matcher = difflib.SequenceMatcher(None, [t for _, t in source_kept], [t for _, t in copy_kept], autojunk=False)
    for block in matcher.get_matching_blocks():
        if block.size >= MIN_UNMARKED_LINES:
            problems.append(f"train_stage2.py:{copy_kept[block.b][0] + 1}: {block.size} lines are identical to "
                            f"train_stage1.py:{source_kept[block.a][0] + 1} without a `# Copied from` marker")
    return problems


def fix(source_text, copy_text):
    """copy_text with every marked copy rewritten from source_text."""
    source_lines, copy_lines = source_text.splitlines(), copy_text.splitlines()
    source_spans = definitions(source_text)
    for name, source_name, first, end in sorted(marked_copies(copy_text), key=lambda c: -c[2]):
        if source_name in source_spans:
            copy_lines[first:end] = expected_copy(source_lines, source_spans[source_name], source_name, name)
    return "\n".join(copy_lines) + "\n"


def test_marked_copies_match_their_source_and_nothing_else_is_copied():
    source_text, copy_text = SOURCE.read_text(), COPY.read_text()
    assert len(marked_copies(copy_text)) >= 10  # the plumbing really is shared, not renamed apart
    problems = check(source_text, copy_text)
    assert not problems, "\n".join(problems)


def test_a_one_character_drift_fails():
    drifted = COPY.read_text().replace("    CHECK_EVERY = 10", "    CHECK_EVERY = 11")
    assert any("StopOnSignal differs" in p for p in check(SOURCE.read_text(), drifted))


def test_a_renamed_copy_that_drifted_fails_and_one_that_did_not_passes():
    copy_text = COPY.read_text()
    renamed = copy_text.replace("# Copied from train_stage1.py\ndef prepare_data(",
                                "# Copied from train_stage1.py:prepare_data\ndef load_data(")
    renamed = renamed.replace("= prepare_data(", "= load_data(")
    assert renamed != copy_text and check(SOURCE.read_text(), renamed) == []
    drifted = renamed.replace('img_size = args.img_size or data_config["input_size"][-1]',
                              'img_size = args.img_size or data_config["input_size"][1]')
    assert drifted != renamed
    assert any("load_data differs from train_stage1.py's prepare_data" in p for p in check(SOURCE.read_text(), drifted))
    # renamed without saying what it copies: no source of that name, so it fails too
    orphan = copy_text.replace("# Copied from train_stage1.py\ndef prepare_data(",
                               "# Copied from train_stage1.py\ndef load_data(")
    assert any("load_data is marked as a copy of load_data" in p for p in check(SOURCE.read_text(), orphan))


def test_an_unmarked_identical_block_of_ten_lines_fails():
    copy_text = COPY.read_text()
    unmarked = copy_text.replace("# Copied from train_stage1.py\nclass Checkpoints:", "class Checkpoints:")
    assert unmarked != copy_text
    assert any("without a `# Copied from` marker" in p for p in check(SOURCE.read_text(), unmarked))
    nine = "\n".join(f"    value_{i} = {i}" for i in range(9))
    source_text = SOURCE.read_text() + f"\n\ndef nine_lines():\n{nine}\n"
    assert check(source_text, copy_text + f"\n\ndef nine_lines_too():\n{nine}\n") == []
    ten = nine + "\n    value_9 = 9"
    problems = check(SOURCE.read_text() + f"\n\ndef ten_lines():\n{ten}\n", copy_text + f"\n\ndef ten():\n{ten}\n")
    assert any("10 lines are identical" in p for p in problems)


def test_fix_rewrites_a_drifted_copy(tmp_path):
    drifted = COPY.read_text().replace("    CHECK_EVERY = 10", "    CHECK_EVERY = 11")
    assert fix(SOURCE.read_text(), drifted) == COPY.read_text()


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        fixed = fix(SOURCE.read_text(), COPY.read_text())
        if fixed != COPY.read_text():
            COPY.write_text(fixed)
            print(f"rewrote the marked copies in {COPY.name}")
    problems = check(SOURCE.read_text(), COPY.read_text())
    print("\n".join(problems) or "the copies match train_stage1.py")
    sys.exit(1 if problems else 0)

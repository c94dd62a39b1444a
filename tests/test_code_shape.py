"""The layout and the style the project keeps (docs/development.md): layers that run one way, no code written
twice, and code as people write it. Each check reads the sources; none imports them."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = sorted(p for p in REPO.glob("*.py") if not p.name.startswith("train_stage"))
STAGES = sorted(REPO.glob("train_stage*.py"))
PROGRAMS = sorted([*REPO.glob("tools/*.py"), *REPO.glob("benchmarks/*.py")])
PROJECT = SHARED + STAGES + PROGRAMS
# No run of this many lines (blank lines and comments aside) may stand in two places.
LONGEST_REPEAT = 12


def imported_modules(path):
    """The top-level names a file imports (`import a.b` and `from a.b import c` both give a)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_shared_modules_import_neither_the_stage_scripts_nor_the_tools():
    for path in SHARED:
        forbidden = imported_modules(path) & {"tools", "benchmarks", *(p.stem for p in STAGES)}
        assert not forbidden, (
            f"{path.name} imports {sorted(forbidden)}: a shared module takes what it needs as arguments"
        )


def test_the_project_modules_import_each_other_without_a_cycle():
    modules = {path.stem: path for path in SHARED + STAGES}
    graph = {name: imported_modules(path) & set(modules) - {name} for name, path in modules.items()}
    done = set()

    def visit(name, trail):
        assert name not in trail, f"import cycle: {' -> '.join([*trail, name])}"
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def code_lines(path):
    """(line number, the line stripped) of a file's code, without blank lines, comments and docstrings' inside."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "import ", "from ")):
            lines.append((number, stripped))
    return lines


def repeated_runs(paths, length):
    """(place, place) pairs where the same `length` lines of code stand in two files, or twice in one."""
    seen = {}
    repeats = []
    for path in paths:
        lines = code_lines(path)
        for start in range(len(lines) - length + 1):
            window = tuple(text for _, text in lines[start : start + length])
            if sum(len(text) for text in window) < 20 * length:  # runs of brackets and short words say nothing
                continue
            place = f"{path.relative_to(REPO)}:{lines[start][0]}"
            if window in seen and not seen[window].startswith(f"{path.relative_to(REPO)}:"):
                repeats.append((seen[window], place))
            seen.setdefault(window, place)
    return repeats


# The functions that hold a stage's recipe: the two scripts may share their shape (each is edited on its own, as
# Accelerate's examples are); machinery both run is written once.
RECIPE_FUNCTIONS = ("main", "train_teacher", "train_student", "train_one_epoch")


def in_recipe(place):
    """Whether a place (file:line) lies in a stage script's recipe function."""
    name, line = place.rsplit(":", 1)
    if not name.startswith("train_stage"):
        return False
    for node in ast.parse((REPO / name).read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in RECIPE_FUNCTIONS:
            if node.lineno <= int(line) <= node.end_lineno:
                return True
    return False


def test_no_run_of_lines_stands_in_two_files():
    repeats = [pair for pair in repeated_runs(PROJECT, LONGEST_REPEAT) if not all(map(in_recipe, pair))]
    assert not repeats, f"the same {LONGEST_REPEAT} lines stand in two places (write them once): {repeats[:5]}"


def test_the_repeat_check_finds_a_copied_function(tmp_path):
    source = "\n".join(f"    value_{i} = compute_something(argument_{i}, other_{i})" for i in range(14))
    (tmp_path / "a.py").write_text(f"def first():\n{source}\n")
    (tmp_path / "b.py").write_text(f"def second():\n{source}\n")
    global REPO
    repo = REPO
    REPO = tmp_path
    try:
        assert repeated_runs([tmp_path / "a.py", tmp_path / "b.py"], LONGEST_REPEAT)
    finally:
        REPO = repo


def style_problems(path):
    """Packed assignments of unrelated names, nested conditional expressions and conditional iterables."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            target = node.targets[0]
            names = target.elts if isinstance(target, ast.Tuple) else []
            # (x1, y1), (x2, y2) = points[0], points[1]: the corners of one box, unpacked
            if len(names) >= 2 and not all(isinstance(name, ast.Tuple) for name in names):
                problems.append(f"{where}: one assignment of {len(names)} names")
        if isinstance(node, ast.IfExp) and any(isinstance(part, ast.IfExp) for part in (node.body, node.orelse)):
            problems.append(f"{where}: a nested conditional expression")
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.IfExp):
            problems.append(f"{where}: a conditional iterable")
    return problems


def test_code_reads_as_people_write_it():
    problems = [problem for path in PROJECT for problem in style_problems(path)]
    assert not problems, "\n".join(problems)


def calls_with_many_positional_arguments(paths, defined):
    """Places where a function or class of `defined` is called with more than three positional arguments."""
    places = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            positional = [arg for arg in node.args if not isinstance(arg, ast.Starred)]
            if name in defined and len(positional) > 3:
                places.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}")
    return places


def test_a_call_of_more_than_three_arguments_names_them():
    defined = {
        node.name
        for path in PROJECT
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    places = calls_with_many_positional_arguments(PROJECT, defined)
    assert not places, "name the arguments of these calls:\n" + "\n".join(places)


def test_the_call_check_finds_four_positional_arguments(tmp_path):
    (tmp_path / "a.py").write_text("def f(a, b, c, d):\n    pass\n\n\nf(1, 2, 3, d=4)\nf(1, 2, 3, 4)\n")
    global REPO
    repo = REPO
    REPO = tmp_path
    try:
        assert calls_with_many_positional_arguments([tmp_path / "a.py"], {"f"}) == ["a.py:6 f"]
    finally:
        REPO = repo


def test_shared_modules_take_values_not_the_command_lines_namespace():
    # starting a run (the Accelerator from the flags, the flags saved) is the one place that reads them all
    allowed = {"training_run.py:start"}
    taking = [
        f"{path.name}:{node.name}"
        for path in SHARED
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and "args" in [arg.arg for arg in node.args.args + node.args.kwonlyargs]
    ]
    assert set(taking) <= allowed, f"pass these the values they use: {sorted(set(taking) - allowed)}"


# What each update decides, as the stage scripts' train_one_epoch calls it: none of it in a shared module.
UPDATE_DECISIONS = {"step_update", "clip_grad_norm_", "step", "zero_grad", "update", "save_latest", "requested", "stop"}


def called_methods(node):
    return {
        call.func.attr for call in ast.walk(node) if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
    }


def counts_updates(node):
    return any(
        isinstance(step, ast.AugAssign) and getattr(step.target, "attr", None) == "global_step"
        for step in ast.walk(node)
    )


def test_each_stage_makes_every_training_decision_in_its_own_train_one_epoch():
    for path in STAGES:
        loops = [
            node
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name == "train_one_epoch"
        ]
        assert len(loops) == 1, f"{path.name} has no train_one_epoch"
        missing = UPDATE_DECISIONS - called_methods(loops[0])
        assert not missing and counts_updates(loops[0]), f"{path.name}'s train_one_epoch does not call {missing}"
    for path in SHARED:
        tree = ast.parse(path.read_text())
        decided = called_methods(tree) & {"step_update", "clip_grad_norm_", "save_latest", "requested"}
        assert not decided and not counts_updates(tree), f"{path.name} decides for the loop: {decided}"


def test_no_module_is_named_for_nothing():
    vague = [p for p in PROJECT if re.fullmatch(r"(utils?|common|helpers?|misc)", p.stem)]
    assert not vague, f"name these for what they hold: {vague}"


def heading_anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#") and " " in line:
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_link_of_the_readme_and_the_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken

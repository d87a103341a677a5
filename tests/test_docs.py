"""The docs stay true: the op reference lists the registry, the user guide's code runs."""
import os
import re

from graphc import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def listed_ops(text):
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.M))


def test_ops_md_lists_every_registered_op():
    registry = cli._load_all_ops()
    listed = listed_ops(read("ops.md"))
    missing = sorted(set(registry) - listed)
    stale = sorted(listed - set(registry))
    hint = "regenerate with: python -m graphc docs-ops -o docs/ops.md"
    assert not missing, f"docs/ops.md misses ops {missing}; {hint}"
    assert not stale, f"docs/ops.md lists ops that no longer exist {stale}; {hint}"


def test_ops_md_flags_match_registry():
    text = read("ops.md")
    for name, op in cli._load_all_ops().items():
        row = re.search(rf"^\| `{name}` \| (\S+) \| (yes|no) \| (yes|no) \|", text, flags=re.M)
        assert row, name
        assert row.group(2) == ("yes" if op.differentiable else "no"), name
        assert row.group(3) == ("yes" if op.elementwise else "no"), name


def test_generator_covers_registry_and_public_functions():
    text = cli.ops_reference_markdown()
    assert listed_ops(text) == set(cli._load_all_ops())
    assert "| `conv2d` | 2 | yes | no | `stride=1, padding=0, dilation=1, groups=1` |" in text
    for fname in ("relu", "conv2d", "matmul", "cross_entropy"):
        assert f"`gc.{fname}`" in text


def test_docs_ops_command_writes_file(tmp_path):
    out = tmp_path / "ops.md"
    assert cli.main(["docs-ops", "-o", str(out)]) == 0
    assert listed_ops(out.read_text()) == set(cli._load_all_ops())


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


_NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def printed_matches(expected: str, actual: str) -> bool:
    """Does `actual` (what a print wrote) match the guide's `# expected` comment?

    Whitespace runs are equal; "..." stands for any text, "<your file>" for a
    file name and "<line>" for a line number; numbers must agree to 1e-3
    (relative), so a doc that shows a value shows the value the code prints.
    """
    parts, numbers = [], []
    for tok in re.split(rf"(\.\.\.|<your file>|<line>|{_NUMBER}|\s+)", expected.strip()):
        if not tok:
            continue
        if tok == "...":
            parts.append(".*?")
        elif tok == "<your file>":
            parts.append(".+?")
        elif tok == "<line>":
            parts.append(r"\d+")
        elif tok.isspace():
            parts.append(r"\s+")
        elif re.fullmatch(_NUMBER, tok):
            parts.append(f"({_NUMBER})")
            numbers.append(float(tok))
        else:
            parts.append(re.escape(tok))
    m = re.fullmatch("".join(parts), actual.strip(), flags=re.S)
    if m is None:
        return False
    return all(abs(float(got) - want) <= 1e-3 * abs(want) + 1e-9
               for got, want in zip(m.groups(), numbers))


def expected_prints(block: str) -> dict:
    """{line number in the block: expected text} of every `print(...)  # text` line
    (two spaces before the '#'; a comment starting "e.g." is an example, not checked)."""
    out = {}
    for n, line in enumerate(block.splitlines(), 1):
        code, sep, comment = line.partition("  # ")
        if sep and code.strip().startswith("print(") and not comment.startswith("e.g."):
            out[n] = comment.strip()
    return out


def test_printed_matches():
    assert printed_matches("loss 195.000 -> 101.645", "loss 195.000 -> 101.6451")
    assert not printed_matches("loss 195.000 -> 101.645", "loss 195.000 -> 0.000")
    assert printed_matches("a: float32(2, 3) ... at <your file>:<line>",
                           "a: float32(2, 3)\n  more\n  at x.md[block 2]:3")
    assert not printed_matches("a: float32[2,3]", "a: float32(2, 3)")
    assert printed_matches("{'w': 120.6, 'b': 12.4}", "{'w': 120.6, 'b': 12.4}")
    assert not printed_matches("{'w': 120.6, 'b': 12.4}", "{'w': 0.0, 'b': 0.0}")


def test_user_guide_code_runs(tmp_path, monkeypatch, capsys):
    """Every ```python block of docs/user_guide.md runs, in order, in one namespace,
    and every print whose line carries a `# value` comment prints that value."""
    blocks = python_blocks(read("user_guide.md"))
    assert len(blocks) >= 10
    joined = "\n".join(blocks)
    for topic in ("gc.grad(", "gc.compile(", "gc.render(", "compile_step(", "train.fit("):
        assert topic in joined, topic
    monkeypatch.chdir(tmp_path)            # the guide writes pictures and weights to cwd
    import builtins
    import io
    import sys
    printed: dict = {}          # (block name, line) -> texts printed from that line

    def recording_print(*args, **kwargs):
        buf = io.StringIO()
        builtins.print(*args, **{**kwargs, "file": buf})
        caller = sys._getframe(1)
        printed.setdefault((caller.f_code.co_filename, caller.f_lineno), []).append(
            buf.getvalue())
        builtins.print(*args, **kwargs)

    ns = {"__name__": "user_guide", "print": recording_print}
    checked = 0
    for k, block in enumerate(blocks):
        name = f"user_guide.md[python block {k + 1}]"
        code = compile(block, name, "exec")
        exec(code, ns)
        for line, want in expected_prints(block).items():
            got = printed.get((name, line))
            assert got, f"{name}, line {line}: expected a print of {want!r}, none ran"
            assert printed_matches(want, got[-1]), \
                f"{name}, line {line}: the guide says it prints {want!r}, it printed {got[-1]!r}"
            checked += 1
    assert checked >= 8                      # the guide shows values, and they are checked
    for name in ("forward.png", "training.svg", "step.pdf", "gradients.png", "mlp.npz"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "forward.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "float32(N, 3)" in out and "('layer1',)" in out


def test_docs_link_targets_exist():
    for name in ("user_guide.md", "architecture.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)", read(name)):
            assert os.path.exists(os.path.join(DOCS, target)), f"{name} links to {target}"


# ------------------------------------------------------------------ the layering of architecture.md
def _imports(path, module):
    """(graphc subpackage imported, at module level?) for every import in a file."""
    import ast
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                if node.module:
                    names = [".".join(base + [node.module])]
                else:
                    names = [".".join(base + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, id(node) in top) for n in names if n.startswith("graphc")]
    return found


def _layer(name):
    parts = name.split(".")
    if len(parts) < 2:
        return "graphc"
    if parts[1] == "backends" and len(parts) > 2:
        return "backends." + parts[2]
    return parts[1]


def _layer_imports():
    edges = {}
    pkg = os.path.join(ROOT, "graphc")
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            me = _layer(module)
            for target, top_level in _imports(path, module):
                other = _layer(target)
                if other != me:
                    edges.setdefault(me, []).append((other, top_level, rel))
    return edges


NEVER = {   # layer -> layers it must never import (docs/architecture.md)
    "ir": {"ops", "passes", "backends", "kernel", "autodiff", "function", "nn", "optim", "viz",
           "cli"},
    "ops": {"passes", "backends", "function", "nn", "optim", "viz", "cli"},
    "autodiff": {"backends", "passes", "function"},
    "passes": {"backends"},
    "nn": {"backends"},
    "optim": {"backends"},
    "viz": {"backends", "passes"},
    "data": {"backends", "ops", "ir", "passes"},
    "kernel": {"passes", "backends"},
}


def test_architecture_import_rules_hold():
    edges = _layer_imports()
    bad = []
    for me, rules in NEVER.items():
        for other, top_level, where in edges.get(me, []):
            target = other.split(".")[0]
            if target not in rules:
                continue
            if me == "ir" and other == "viz" and not top_level:
                continue        # Graph._repr_svg_: a lazy, in-method import for Jupyter
            bad.append(f"{where} imports graphc.{other}")
    backends = [k for k in edges if k.startswith("backends.")]
    for b in backends:
        for other, _, where in edges[b]:
            if other.startswith("backends.") and other != b:
                bad.append(f"{where} (backend) imports another backend graphc.{other}")
    assert not bad, "layering violations (see docs/architecture.md):\n" + "\n".join(bad)


def test_readme_tour_runs(tmp_path, monkeypatch, recwarn):
    """The README's Python tour runs as written (one epoch instead of eight, to stay
    fast), without a dtype-cast warning, and writes what it says it writes."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = python_blocks(f.read())
    assert len(blocks) == 2 and "epochs=8" in blocks[1]
    blocks[1] = blocks[1].replace("epochs=8", "epochs=1")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme"}
    for k, block in enumerate(blocks):
        exec(compile(block, f"README.md[python block {k + 1}]", "exec"), ns)
    from graphc.input_cast import InputCastWarning
    assert not [w for w in recwarn if issubclass(w.category, InputCastWarning)]
    assert (tmp_path / "train.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "lenet.npz").stat().st_size > 0

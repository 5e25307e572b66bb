"""The quickstart notebook runs headlessly end to end (small parameters)."""

import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


# Appended to the notebook by the test: the numbers the notebook computed, as one JSON line.
CHECK_CELL = """
import json
print("NOTEBOOK_CHECK " + json.dumps({
    "l0": evaluation["l0"], "k": SAE_K, "n_features": n_features,
    "dense": evaluation["dense_features"], "eval_tokens": evaluation["eval_tokens"],
    "stats_l0": stats["summary"]["mean_l0"], "stats_dense": stats["summary"]["dense"],
    "feature": feature, "dense_ids": stats["dense"], "mass": mass, **out}))
"""


def test_notebook_is_valid_and_parameterised():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "RUN_DIR" in tagged[0].source and "SAE_K" in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean
    numbers = [int(m.group(1)) for c in nb.cells if c.cell_type == "markdown"
               for m in re.finditer(r"^## (\d+)\.", c.source, re.M)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # consecutive sections
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "restore_run(" in code and 'architecture="topk"' in code


@pytest.mark.slow
def test_notebook_executes(tmp_path):
    """Runs the notebook (small parameters, one CPU device): a TopK dictionary with L0 <= k
    and few dense features, one feature picked and clamped, and generations that change."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        body = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # value {i * j}"
                         for j in range(60))
        (docs / f"m{i}.py").write_text(body)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = (f"RUN_DIR = {str(tmp_path / 'run')!r}\nCORPUS_SOURCE = 'text'\n"
                   f"CORPUS_PATH = {str(docs)!r}\nTOKENIZER = 'byte'\nLM_STEPS = 150\n"
                   "SAE_STEPS = 20\nSAE_FEATURES = 512\nSAE_K = 2\nANALYSIS_CONTEXTS = 32\n")
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    env_keep = os.environ.get("XLA_FLAGS")
    os.environ.pop("XLA_FLAGS", None)  # the kernel runs on one CPU device, as on Colab
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": ROOT}})
        client.execute()
    finally:
        if env_keep is not None:
            os.environ["XLA_FLAGS"] = env_keep
    assert os.path.isfile(tmp_path / "run" / "sae" / "analysis" / "dashboard" / "index.html")
    assert os.path.isfile(tmp_path / "run" / "sae" / "analysis" / "features.json")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "--- steered" in text and "--- baseline" in text and "dashboard:" in text
    assert "top contexts:" in text and "[" in text.split("top contexts:")[1]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("NOTEBOOK_CHECK ")]
    got = json.loads(line.split(" ", 1)[1])
    print(line)  # pytest -s shows the numbers
    # Sparse: TopK keeps k features per token; few features fire on > 1% of the tokens.
    assert got["l0"] <= got["k"] + 1e-6 and got["stats_l0"] <= got["k"] + 1e-6, got
    assert got["dense"] <= 0.25 * got["n_features"], got
    assert got["stats_dense"] <= 0.25 * got["n_features"], got
    assert got["feature"] not in got["dense_ids"]
    # Clamping the chosen feature changes what the model writes, toward what it promotes.
    assert got["steered"] != got["baseline"], got
    assert got["mass"]["steered"] > got["mass"]["baseline"], got

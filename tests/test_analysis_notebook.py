"""The quickstart notebook runs headlessly end to end (small parameters)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


def test_notebook_is_valid_and_parameterised():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "RUN_DIR" in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean


@pytest.mark.slow
def test_notebook_executes(tmp_path):
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
                   f"CORPUS_PATH = {str(docs)!r}\nTOKENIZER = 'byte'\nLM_STEPS = 12\n"
                   "SAE_STEPS = 20\nSAE_FEATURES = 64\nANALYSIS_CONTEXTS = 32\n")
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
    assert "--- steered ---" in text and "dashboard:" in text

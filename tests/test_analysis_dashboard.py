"""Plots and the static dashboard: full pipeline from a byte-level token store with hostile
text, HTML escaping, and (slow) rendering in headless Chromium with no console errors."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from saejax.analysis import dashboard, features, plots
from saejax.normalize import Normalizer
from saejax.sae.bundle import SAEBundle
from saejax.data.corpus import CorpusConfig, CorpusJobConfig
from saejax.data.tokenizer import TokenizerConfig
from saejax.data.corpus import build_token_store
from saejax.lm.config import ModelConfig
from saejax.lm.model import build_model
from saejax.sae.config import SAEConfig
from saejax.sae.model import init_params

HOSTILE = ["<script>alert(1)</script>", "</script><script>alert(2)</script>",
           "<img src=x onerror=alert(3)>", "\"'><svg onload=alert(4)>", "&lt;b&gt;"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    docs = root / "docs"
    docs.mkdir()
    for i in range(6):
        text = "\n".join(f"line {j}: {HOSTILE[(i + j) % len(HOSTILE)]} and\tsome text {i * j}"
                         for j in range(40))
        (docs / f"doc{i}.txt").write_text(text)
    store = build_token_store(CorpusJobConfig(
        corpus=CorpusConfig(source="text", path=str(docs), seq_len=32, val_fraction=0.0,
                            out_dir=str(root / "store")),
        tokenizer=TokenizerConfig(kind="byte")))
    tokens = store.read("train", 0, 64)
    model = build_model(ModelConfig(vocab_size=store.vocab_size, max_len=32, d_model=32,
                                    n_heads=2, d_mlp=48), seed=0)
    sae = SAEBundle(init_params(jax.random.key(0), SAEConfig(d_in=48, n_features=24),
                                np.zeros(48)), SAEConfig(d_in=48, n_features=24),
                    site="mlp.post", normalizer=Normalizer(7.0))
    cfg = features.FeatureStatsConfig(batch_size=16, top_k=5, samples_per_interval=2,
                                      ablation_contexts=1)
    stats = features.compute_feature_stats(model, sae, tokens, cfg, tokenizer=store.tokenizer())
    # The vocabulary itself is hostile too: every string below reaches the pages.
    stats["vocab"][60:60 + len(HOSTILE)] = HOSTILE
    for f in stats["features"]:
        f["logits"]["top"][0][0] = 60
    metrics = root / "metrics.jsonl"
    with open(metrics, "w") as fh:
        for step in range(0, 200, 10):
            fh.write(json.dumps({"step": step, "loss": 1.0 / (step + 1), "l0": 30 - step / 10,
                                 "dead_features": step // 20, "note": "text"}) + "\n")
        fh.write('{"step": 2')  # a line cut by a crash
    out = root / "dashboard"
    index = dashboard.write_dashboard(stats, str(out), metrics_path=str(metrics))
    return stats, out, index


def test_pipeline_writes_pages_and_plots(run):
    stats, out, index = run
    assert stats["meta"]["n_tokens"] == 64 * 32 and stats["summary"]["alive"] > 0
    assert len(glob.glob(str(out / "features" / "*.html"))) == 24
    for png in ("density.png", "l0.png", "training.png"):
        with open(out / png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(index).read()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "<link" not in text


def test_corpus_text_is_escaped(run):
    stats, out, _ = run
    pages = [open(p).read() for p in glob.glob(str(out / "**" / "*.html"), recursive=True)]
    alive = [f for f in stats["features"] if f["top"]]
    page = open(out / "features" / f"{alive[0]['id']}.html").read()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a logit token, escaped
    for text in pages:
        scripts = re.findall(r"<script\b[^>]*>", text)
        assert all(s in ("<script>", '<script type="application/json" id="feature-data">')
                   for s in scripts), scripts
        assert len(scripts) <= 2
        for bad in ("<script>alert", "alert(1)</script>", "<img src=x", "<svg onload"):
            assert bad not in text
    # The embedded JSON still decodes to the original strings.
    index = open(out / "index.html").read()
    blob = index.split('id="feature-data">', 1)[1].split("</script>", 1)[0]
    rows = json.loads(blob)["rows"]
    assert any(HOSTILE[0] in r["logits"] for r in rows)


def test_training_curves_skip_bad_lines_and_non_numeric_fields(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "tag": "x"}\n\nnot json\n{"step": 2, "loss": 1.0}\n')
    assert [r["step"] for r in plots.read_metrics(str(path))] == [1, 2]
    assert os.path.getsize(plots.plot_training_curves(str(path), str(tmp_path / "c.png"))) > 0
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="no numeric metrics"):
        plots.plot_training_curves(str(path), str(tmp_path / "d.png"))


def _chromium():
    """Paths of chromium and chromedriver; skips when they are missing (a test never
    installs anything: `make browsers` does)."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip("chromium and chromedriver are not installed: run `make browsers` "
                    "(Debian packages chromium, chromium-driver)")
    return chrome, driver


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(run, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By

    chrome, driver_path = _chromium()
    _, out, index = run
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts,
                              service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(f"file://{index}")
        rows = driver.find_elements(By.CSS_SELECTOR, "#rows tr")
        summary = driver.find_element(By.ID, "shown").text
        assert rows and "matching features" in summary
        # Sorting: click "id" -> ascending ids.
        driver.find_element(By.CSS_SELECTOR, 'th[data-key="id"]').click()
        ids = [int(r.find_element(By.TAG_NAME, "td").text)
               for r in driver.find_elements(By.CSS_SELECTOR, "#rows tr")]
        assert ids == sorted(ids)
        # Search by id narrows to one row; unticking "hide dead" shows all 24.
        box = driver.find_element(By.ID, "search")
        box.send_keys(f"#{ids[0]}")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#rows tr")) == 1
        box.clear()
        box.send_keys(" ")
        driver.find_element(By.ID, "hide-dead").click()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#rows tr")) == 24
        box.clear()
        driver.find_element(By.ID, "hide-dead").click()
        driver.save_screenshot(str(tmp_path / "index.png"))
        # No script from the corpus ran: an alert would be open now.
        assert driver.execute_script("return 1 + 1") == 2
        logs = driver.get_log("browser")
        driver.get(f"file://{out / 'features' / f'{ids[0]}.html'}")
        assert driver.find_elements(By.CSS_SELECTOR, ".ctx .tok")
        driver.save_screenshot(str(tmp_path / "feature.png"))
        logs += driver.get_log("browser")
    finally:
        driver.quit()
    errors = [entry for entry in logs if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    assert os.path.getsize(tmp_path / "index.png") > 1000
    if os.environ.get("SAEJAX_KEEP_SCREENSHOTS"):
        keep = os.environ["SAEJAX_KEEP_SCREENSHOTS"]
        os.makedirs(keep, exist_ok=True)
        for name in ("index.png", "feature.png"):
            shutil.copy(tmp_path / name, os.path.join(keep, name))


@pytest.mark.slow
def test_analyze_run_on_a_trained_sae(tiny_lm_dir, tmp_path):
    """Tiny LM (the tiny_lm_dir fixture) -> tiny SAE run (saejax.train) -> analyze_run: the
    `make demo` report path."""
    from experiments import sae_tiny
    from saejax.analysis.report import analyze_run
    from saejax.config import from_config
    from saejax.train import train as train_sae
    from saejax.train_config import SAETrainConfig

    sd = sae_tiny.get_config()
    sd.lm.dir = tiny_lm_dir
    sd.workdir = str(tmp_path / "sae")
    sd.progress_bar = False
    sd.eval.every = 1000
    train_sae(from_config(SAETrainConfig, sd))
    # A hostile title: the page's own text must be escaped like the corpus's (the index
    # shows single byte tokens only, so corpus text cannot spell "<script>alert" there).
    out = analyze_run(str(tmp_path / "sae"), n_contexts=32, title=f"{HOSTILE[0]} run",
                      config=features.FeatureStatsConfig(batch_size=16, top_k=5,
                                                         ablation_max_features=16))
    stats = features.load_stats(out["stats"])
    assert stats["meta"]["n_features"] == 256 and stats["meta"]["site"].endswith("mlp.post")
    assert stats["meta"]["norm_scale"] != 1.0 and stats["summary"]["alive"] > 0
    page = open(out["dashboard"]).read()
    assert "training.png" in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; run" in page
    # The same run drives launch/steer.py through --workdir (LM and tokenizer from metadata).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "launch", "steer.py"),
                          f"--workdir={tmp_path / 'sae'}", "--feature=3", "--scale=5",
                          "--prompt=def ", "--num_tokens=5", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(json.loads(res.stdout.strip().splitlines()[-1])["steered"]) == 1
    # ... and launch/analyze.py, into the run's own analysis/ folder by default.
    res = subprocess.run([sys.executable, os.path.join(root, "launch", "analyze.py"),
                          f"--workdir={tmp_path / 'sae'}", "--contexts=16", "--ablation_features=4"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    text = open(tmp_path / "sae" / "analysis" / "summary.md").read()
    assert "| dead (silent for the last" in text and "| silent on the analysed tokens |" in text
    assert os.path.isfile(tmp_path / "sae" / "analysis" / "dashboard" / "index.html")

"""Plots and the static dashboard: the full pipeline from a byte-level token store with
hostile text; synthetic statistics (format 2) for coverage, escaping, the compact encoding,
sizes, neurons and (slow) rendering in headless Chromium with no console errors."""

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
from saejax.analysis.dashboard_data import B64, LEVELS
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
           "<img src=x onerror=alert(3)>", "\"'><svg onload=alert(4)>", "&lt;b&gt;",
           "\\\"); alert(5); //", "line\u2028sep\u2029para", "'\"`${alert(6)}`"]
PLANT = ["zq", "xelif", "_w"]  # tokens of a fragment only the planted unit's contexts hold
PLANTED = 7


def synthetic_stats(n, *, vocab_size=4096, top_k=20, n_intervals=11, samples=5, width=17,
                    before=12, seq_len=128, n_contexts=512, hist_bins=32, n_logit=10,
                    unit="feature", interp=True, seed=0):
    """A format-2 stats dict of ``n`` units at the given settings (demo: the defaults).

    Windows and activation patterns come from small pools (shared lists keep 16,384 units
    in memory); about 1 in 8 window activations is non-zero, as in the demo's statistics.
    Unit 2 is silent; vocabulary strings include HOSTILE and whitespace; unit PLANTED's
    first top context holds PLANT.
    """
    rng = np.random.default_rng(seed)
    vocab = [f"t{i}" if i % 7 else f" w{i}" for i in range(vocab_size)]
    vocab[10:14] = ["\n", "\t", "  ", ""]
    vocab[60:60 + len(HOSTILE)] = HOSTILE
    plant_ids = list(range(100, 100 + len(PLANT)))
    vocab[100:100 + len(PLANT)] = PLANT
    safe = np.setdiff1d(np.arange(vocab_size), plant_ids)
    windows = [[int(t) for t in rng.choice(safe, width)] for _ in range(512)]
    patterns = []
    for _ in range(128):
        a = np.where(rng.random(width) < 0.08, rng.random(width), 0.0)
        a[before] = 0.5 + rng.random() / 2
        patterns.append([round(float(x), 4) for x in a])

    m = n * (top_k + n_intervals * samples)  # contexts
    draws = zip(rng.integers(n_contexts, size=m).tolist(),
                rng.integers(before, seq_len - 4, size=m).tolist(),
                rng.integers(512, size=m).tolist(), rng.integers(128, size=m).tolist(),
                strict=True)

    def ex(act):
        row, pos, w, p = next(draws)
        return {"row": row, "pos": pos, "act": act, "tokens": windows[w], "acts": patterns[p],
                "center": before}

    feats = []
    for i in range(n):
        silent = i == 2
        mx = 0.0 if silent else round(1 + 9 * float(rng.random()), 3)
        top = [] if silent else [ex(round(mx * (1 - j / (2 * top_k)), 4)) for j in range(top_k)]
        ivs = [{"lo": mx * j / n_intervals, "hi": mx * (j + 1) / n_intervals,
                "examples": [] if silent else [ex(round(mx * (j + .5) / n_intervals, 4))
                                               for _ in range(samples)]}
               for j in range(n_intervals)]
        f = {"id": i, "density": 0.0 if silent else float(rng.random() * 1e-2),
             "mean_act": 0.01, "max_act": mx, "top": top, "intervals": ivs,
             "hist": {"lo": 0.0, "hi": mx, "counts": [int(c) for c in rng.integers(0, 500, hist_bins)],
                      "estimated": i % 3 == 0},
             "logits": {"top": [[int(t), 0.5] for t in rng.integers(0, vocab_size, n_logit)],
                        "bottom": [[int(t), -0.5] for t in rng.integers(0, vocab_size, n_logit)]},
             "ablation": None if silent else {"delta_logp_all": -1e-4, "delta_logp_active": -0.02,
                                              "contexts": 4},
             "neighbours": {"decoder": [[(i + 1) % n, 0.5]], "coact": [[(i + 3) % n, 0.25]]}}
        if interp and not silent:
            f["interp"] = {"kind": "token" if i % 2 else "prev_token", "tokens": [60, 61],
                           "precision": 0.5, "recall": 0.4, "f1": 0.44,
                           "auroc": round(0.5 + float(rng.random()) / 2, 3)}
        feats.append(f)
    if n > PLANTED:
        feats[PLANTED]["top"][0] = dict(feats[PLANTED]["top"][0],
                                        tokens=windows[0][:before - 1] + plant_ids
                                        + windows[0][before + 2:])
    density = [f["density"] for f in feats]
    return {"format": 2,
            "meta": {"site": "blocks.0.mlp.post", "norm_scale": 1.5, "n_features": n, "d_in": 512,
                     "n_contexts": n_contexts, "seq_len": seq_len, "n_tokens": n_contexts * seq_len,
                     "window": {"before": before, "after": width - before - 1, "width": width},
                     "top_k": top_k, "n_intervals": n_intervals, "logit_mode": "fold_ln",
                     "ultralow_threshold": 1e-6, "dense_threshold": 0.01, "unit": unit,
                     "split": "val", "train_dead": {"fraction": 0.125, "window": 1000}},
            "summary": {"alive": n - 1, "silent": 1, "ultralow": 0, "dense": 0, "mean_l0": 24.0,
                        "interp": {"n_scored": n - 1, "auroc_median": 0.75} if interp else None},
            "density": density, "mean_act": [0.01] * n, "mean_act_active": [0.5] * n,
            "max_act": [f["max_act"] for f in feats], "silent": [2], "ultralow": [], "dense": [],
            "l0_hist": [0, 3, 10, 4], "vocab": vocab, "features": feats}


def load_js(path):
    """The JSON literal of a data file (``window.X = {...};`` or ``saejaxShard(k, {...});``)."""
    text = open(path, encoding="utf-8").read()
    m = re.fullmatch(r"(?:window\.\w+ = (.*);|saejaxShard\((\d+), (.*)\);)\n", text, re.S)
    assert m, text[:200]
    return json.loads(m.group(1) if m.group(1) is not None else m.group(3))


def decode(s, w):
    return [sum(B64.index(c) * 64 ** (w - 1 - j) for j, c in enumerate(s[i:i + w]))
            for i in range(0, len(s), w)]


def shard_units(out):
    units = []
    for path in sorted(glob.glob(str(out / "data" / "shard_*.js"))):
        data = load_js(path)
        assert os.path.basename(path) == f"shard_{data['k']}.js"
        units += data["units"]
    return units


def dashboard_bytes(out):
    return sum(os.path.getsize(p) for p in glob.glob(str(out / "**" / "*"), recursive=True)
               if os.path.isfile(p))


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
            fh.write(json.dumps({"step": step, "train/loss": 1.0 / (step + 1), "train/l0": 30 - step / 10,
                                 "eval/dead_features": step // 20, "note": "text"}) + "\n")
        fh.write('{"step": 2')  # a line cut by a crash
    out = root / "dashboard"
    index = dashboard.write_dashboard(stats, str(out), metrics_path=str(metrics))
    return stats, out, index


def test_pipeline_writes_pages_data_and_plots(run):
    stats, out, index = run
    assert stats["meta"]["n_tokens"] == 64 * 32 and stats["summary"]["alive"] > 0
    assert os.path.isfile(out / "feature.html") and os.path.isfile(out / "data" / "vocab.js")
    assert sorted(u["i"] for u in shard_units(out)) == list(range(24))
    pngs = {os.path.basename(p) for p in glob.glob(str(out / "plots" / "*.png"))}
    assert pngs == {"density.png", "l0.png", "training_train_loss.png", "training_train_l0.png",
                    "training_eval_dead_features.png"}  # one per numeric metric
    for png in pngs:
        with open(out / "plots" / png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    for page in (index, out / "feature.html"):
        text = open(page).read()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "<link" not in text
    assert all(f'src="plots/{p}"' in open(index).read() for p in pngs)


def _check_escaped(out, vocab):
    files = glob.glob(str(out / "**" / "*.html"), recursive=True) + \
        glob.glob(str(out / "**" / "*.js"), recursive=True)
    for path in files:
        text = open(path, encoding="utf-8").read()
        for bad in ("<script>alert", "alert(1)</script>", "</script><script>", "<img src=x",
                    "<svg onload", "\u2028", "\u2029"):
            assert bad not in text, (path, bad)
        if path.endswith(".html"):
            scripts = re.findall(r"<script\b[^>]*>", text)
            assert all(s == "<script>" or re.fullmatch(r'<script src="data/\w+\.js">', s)
                       for s in scripts), scripts
            assert scripts.count("<script>") == 1
    # The data files decode to the original strings.
    assert load_js(out / "data" / "vocab.js") == vocab


def test_corpus_text_is_escaped(run):
    stats, out, _ = run
    _check_escaped(out, stats["vocab"])
    units = shard_units(out)
    assert all(u["lt"][0][0] == 60 for u in units)  # the hostile logit token, by id


def test_synthetic_hostile_text_is_escaped_and_round_trips(tmp_path):
    stats = synthetic_stats(40, vocab_size=300, top_k=3, n_intervals=2, samples=1)
    stats["vocab"][20] = "</script><script>alert(1)</script>"
    out = tmp_path / "d"
    dashboard.write_dashboard(stats, str(out), make_plots=False,
                              title="</script><script>alert(1)</script>")
    _check_escaped(out, stats["vocab"])
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in open(out / "index.html").read()
    assert load_js(out / "data" / "meta.js")["title"] == "</script><script>alert(1)</script>"


def test_every_unit_is_in_the_index_and_in_exactly_one_shard(tmp_path):
    stats = synthetic_stats(300, vocab_size=500, top_k=4, n_intervals=3, samples=2)
    out = tmp_path / "d"
    dashboard.write_dashboard(stats, str(out), make_plots=False)
    cols = load_js(out / "data" / "index.js")["columns"]
    assert cols["id"] == list(range(300))  # no cap
    assert all(len(v) == 300 for v in cols.values())
    assert cols["tags"][2] == 1 and cols["top_token"][2] == -1  # silent
    assert len(load_js(out / "data" / "search.js")) == 300
    units = shard_units(out)
    assert [u["i"] for u in units] == list(range(300))  # each once, in order
    meta = load_js(out / "data" / "meta.js")
    assert meta["n"] == 300 and meta["n_shards"] == len(glob.glob(str(out / "data" / "shard_*")))
    # The compact contexts decode to the statistics' tokens and activations.
    f, u = stats["features"][5], units[5]
    for ex, c in zip(f["top"], u["top"], strict=True):
        assert c[:2] == [ex["row"], ex["pos"]] and len(c) == 4  # centre = window.before
        assert decode(c[2], meta["tok_digits"]) == ex["tokens"]
        acts = [0.0] * len(ex["tokens"])
        pairs = decode(c[3], 1)
        for p, hi, lo in zip(pairs[::3], pairs[1::3], pairs[2::3], strict=True):
            acts[p] = (hi * 64 + lo) / LEVELS * u["s"]
        want = list(ex["acts"])
        want[ex["center"]] = ex["act"]
        np.testing.assert_allclose(acts, want, atol=u["s"] / LEVELS)
    assert u["ip"]["auroc"] == f["interp"]["auroc"] and u["nb"]["decoder"][0][0] == 6
    assert [v["h"][3] for v in units[:4]] == [1, 0, 0, 1]   # histogram estimated or exact


def test_a_rewrite_leaves_no_stale_pages_or_shards(tmp_path):
    """A dashboard written over an older one (the old one-page-per-feature layout, or more
    units) keeps none of its pages or shards; files it does not own stay."""
    out = tmp_path / "d"
    dashboard.write_dashboard(synthetic_stats(300, vocab_size=500, top_k=2, n_intervals=2,
                                              samples=1), str(out), make_plots=False)
    (out / "features").mkdir()
    (out / "features" / "12.html").write_text("old page")
    (out / "notes.txt").write_text("mine")
    assert len(glob.glob(str(out / "data" / "shard_*"))) == 3
    dashboard.write_dashboard(synthetic_stats(100, vocab_size=500, top_k=2, n_intervals=2,
                                              samples=1), str(out), make_plots=False)
    assert len(glob.glob(str(out / "data" / "shard_*"))) == 1
    assert not (out / "features").exists() and (out / "notes.txt").read_text() == "mine"


def test_summary_names_silent_and_train_dead(tmp_path):
    stats = synthetic_stats(12, vocab_size=200, top_k=2, n_intervals=2, samples=1)
    page = open(dashboard.write_dashboard(stats, str(tmp_path / "d"), make_plots=False)).read()
    assert "silent (never fired on the analysed tokens) 1" in page
    assert "dead (silent for the last 1000 training steps): 12.5%" in page
    assert "median held-out AUROC 0.75" in page


def test_neurons_beside_features(tmp_path):
    stats = synthetic_stats(20, vocab_size=200, top_k=2, n_intervals=2, samples=1)
    neurons = synthetic_stats(16, vocab_size=200, top_k=2, n_intervals=2, samples=1,
                              unit="neuron", seed=1)
    del neurons["meta"]["unit"]  # defaults to "neuron" under neurons/
    out = tmp_path / "d"
    index = dashboard.write_dashboard(stats, str(out), neurons=neurons)
    main, sub = open(index).read(), open(out / "neurons" / "index.html").read()
    assert 'href="neurons/index.html"' in main and 'href="../index.html"' in sub
    assert 'src="plots/interp_comparison.png"' in main
    assert os.path.getsize(out / "plots" / "interp_comparison.png") > 1000
    assert os.path.isfile(out / "neurons" / "plots" / "density.png")
    meta = load_js(out / "neurons" / "data" / "meta.js")
    assert meta["label"] == "Neuron" and meta["n"] == 16 and meta["other"]["href"] == "../index.html"
    assert [u["i"] for u in shard_units(out / "neurons")] == list(range(16))


def test_size_per_unit_at_demo_settings(tmp_path):
    """At the demo's settings (top 20, 11 intervals x 5, windows of 17, BPE-4096) a unit
    costs < 40 MB / 4,096 (fast check on 512 units; the slow test writes all 4,096)."""
    out = tmp_path / "d"
    dashboard.write_dashboard(synthetic_stats(512), str(out), make_plots=False)
    assert dashboard_bytes(out) * 4096 / 512 <= 40e6, dashboard_bytes(out)


@pytest.mark.slow
def test_size_of_a_demo_sized_dashboard(tmp_path):
    """4,096 units at the demo's settings fit in 40 MB (all files)."""
    out = tmp_path / "d"
    dashboard.write_dashboard(synthetic_stats(4096), str(out), make_plots=False)
    size = dashboard_bytes(out)
    assert size <= 40e6 and len(shard_units(out)) == 4096, size


@pytest.mark.slow
def test_16384_units_write(tmp_path):
    out = tmp_path / "d"
    dashboard.write_dashboard(synthetic_stats(16384, interp=False), str(out), make_plots=False)
    assert load_js(out / "data" / "meta.js")["n_shards"] == 16384 // dashboard.SHARD_SIZE
    assert len(load_js(out / "data" / "index.js")["columns"]["id"]) == 16384


def test_training_curves_one_png_per_metric_and_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0, "tag": "x", "time": 5.0}\n\nnot json\n'
                    '{"step": 2, "train/loss": 1.0, "perf/tokens_per_s": 10}\n{"step": 3')
    assert [r["step"] for r in plots.read_metrics(str(path))] == [1, 2]
    pngs = plots.plot_training_curves(str(path), str(tmp_path / "c"))
    assert [os.path.basename(p) for p in pngs] == ["training_train_loss.png",
                                                   "training_perf_tokens_per_s.png"]
    assert all(os.path.getsize(p) > 1000 for p in pngs)
    assert plots.metric_label("perf/tokens_per_s") == ("throughput", "tokens / s")
    path.write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="no numeric metrics"):
        plots.plot_training_curves(str(path), str(tmp_path / "d"))
    assert plots.plot_training_curves(str(path), str(tmp_path / "d"), allow_empty=True) == []


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
def test_dashboard_renders_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By

    chrome, driver_path = _chromium()
    stats = synthetic_stats(250, vocab_size=300, top_k=4, n_intervals=3, samples=2)
    neurons = synthetic_stats(30, vocab_size=300, top_k=2, n_intervals=2, samples=1,
                              unit="neuron", seed=1)
    out = tmp_path / "dash"
    index = dashboard.write_dashboard(stats, str(out), neurons=neurons)
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

    def ids():
        return [int(r.find_element(By.TAG_NAME, "td").text)
                for r in driver.find_elements(By.CSS_SELECTOR, "#rows tr")]

    try:
        driver.get(f"file://{index}")
        assert "249 matching features (of 250)" in driver.find_element(By.ID, "shown").text
        assert len(ids()) == 100  # a page
        driver.find_element(By.ID, "hide-silent").click()
        assert driver.find_element(By.ID, "page").text == "page 1 of 3"
        seen = ids()
        while driver.find_element(By.ID, "next").is_enabled():
            driver.find_element(By.ID, "next").click()
            seen += ids()
        assert sorted(seen) == list(range(250))  # every unit, across pages
        driver.find_element(By.CSS_SELECTOR, 'th[data-key="id"]').click()
        assert ids() == list(range(100))
        box = driver.find_element(By.ID, "search")
        box.send_keys("XELIF_")  # context text across token boundaries, any case
        assert ids() == [PLANTED]
        box.clear()
        box.send_keys("#17")
        assert ids() == [17]
        driver.save_screenshot(str(tmp_path / "index.png"))
        assert driver.execute_script("return 1 + 1") == 2  # no alert from the corpus is open
        logs = driver.get_log("browser")
        driver.get(f"file://{out / 'feature.html'}?id={PLANTED}")
        centres = driver.find_elements(By.CSS_SELECTOR, ".ctx .tok.center")
        assert centres and centres[0].text == PLANT[1]
        assert len(driver.find_elements(By.CSS_SELECTOR, ".ctx")) == 4 + 3 * 2
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith(f"Feature {PLANTED}")
        assert "raises that token's logit" in driver.page_source
        driver.save_screenshot(str(tmp_path / "feature.png"))
        driver.get(f"file://{out / 'feature.html'}#3")  # hash fallback
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Feature 3")
        driver.get(f"file://{out / 'neurons' / 'index.html'}")
        assert "29 matching neurons" in driver.find_element(By.ID, "shown").text
        driver.get(f"file://{out / 'neurons' / 'feature.html'}?id=4")
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Neuron 4")
        assert driver.execute_script("return 1 + 1") == 2
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
    # A hostile title: the page's own text must be escaped like the corpus's.
    out = analyze_run(str(tmp_path / "sae"), n_contexts=32, title=f"{HOSTILE[0]} run",
                      config=features.FeatureStatsConfig(batch_size=16, top_k=5,
                                                         ablation_max_features=16))
    stats = features.load_stats(out["stats"])
    assert stats["meta"]["n_features"] == 256 and stats["meta"]["site"].endswith("mlp.post")
    assert stats["meta"]["norm_scale"] != 1.0 and stats["summary"]["alive"] > 0
    page = open(out["dashboard"]).read()
    assert "plots/training_train_loss.png" in page and "<script>alert" not in page
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

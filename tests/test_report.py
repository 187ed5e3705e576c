"""``agentsim report DIR``: self-contained HTML and markdown reports of a run, a sweep and a study.

The run and the sweep are real (``agentsim simulate`` / ``agentsim sweep`` through the CLI); the
study directory is built here per the study contract (``study.json``, a CSV table, a PNG figure, run
manifests under ``cells_dir``), so these tests do not depend on any one study. The browser test loads
the reports in Debian's Chromium (``apt-get install chromium``) driven by Playwright.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agentsim.cli import run_cli
from agentsim.outputs import check_result_dir, check_sweep_dir, is_result_dir
from agentsim.report import MAX_TABLE_ROWS, build_report, config_toml

CHROMIUM = "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Refs(HTMLParser):
    """Every URL-bearing attribute, every tag name and the text of a page."""

    URL_ATTRS = {"src", "href", "srcset", "action", "poster", "data", "formaction", "background", "xlink:href"}

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.figures: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in self.URL_ATTRS:
                self.refs.append((tag, k, v or ""))
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))
        if tag == "figure":
            self.figures.append(dict(attrs).get("id", ""))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _assert_self_contained(path: Path) -> _Refs:
    page = _parse(path)
    bad = [r for r in page.refs if not (r[2].startswith("data:") or r[2].startswith("#"))]
    assert not bad, f"external references in {path}: {bad[:3]}"
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    raw = path.read_text(encoding="utf-8")
    assert "url(" not in raw and "@import" not in raw and "http://" not in raw and "https://" not in raw
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    return page


def _cli(*args: str) -> int:
    return run_cli([str(a) for a in args])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    assert _cli("simulate", "--duration", "20", "--agents", "8", "--seed", "3", "-q", "-o", run) == 0
    spec = root / "sweep.toml"
    spec.write_text('[sweep]\nout = "unused"\n[base]\nduration = 10.0\n[base.workload]\nagents = 4\n'
                    '[grid]\npolicy = [{name = "vllm", route = "round-robin"}, {name = "vllm", route = "least-loaded"}]\n'
                    '"workload.agents,seed" = [[2, 0], [6, 1]]\n')
    sweep = root / "sweep"
    assert _cli("sweep", spec, "-o", sweep) == 0
    study = root / "study"
    (study / "cells").mkdir(parents=True)
    shutil.copytree(run, study / "cells" / "demo" / "cells" / "c0")
    pd.DataFrame({"agents": np.arange(100), "mean_ttft_ms": np.linspace(10, 50, 100),
                  "router": ["round-robin"] * 100}).to_csv(study / "demo.csv", index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2, 3], [3, 1, 2])
    fig.savefig(study / "demo.png")
    plt.close(fig)
    (study / "study.json").write_text(json.dumps({
        "kind": "agentsim-study", "study": "demo", "quick": True,
        "command": "agentsim study demo --quick -o out/demo", "tables": {"demo": "demo.csv"},
        "figures": ["demo.png"], "findings": ["TTFT grows <script>alert(1)</script> & so on"],
        "failed": ["cell-7: engine ran out of KV blocks"], "cells_dir": "cells",
        "versions": {"agentsim": "0.1.0"}, "git_revision": "abc123", "created_utc": "2026-11-30T23:00:00Z",
        "wall_s": 1.5}))
    return {"root": root, "run": run, "sweep": sweep, "study": study}


def test_run_report_is_self_contained_with_its_figures_tables_and_provenance(dirs):
    run = dirs["run"]
    assert _cli("report", run) == 0
    out = run / "report.html"
    page = _assert_self_contained(out)
    assert page.figures == ["fig-latency_cdf", "fig-engines_over_time", "fig-throughput_over_time"]
    assert len(page.imgs) == len(page.figures)
    text = " ".join(page.text)
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert "policy vllm" in text and "8 agents (react)" in text
    assert f"{summary['mean_ttft_ms']:.2f}" in text  # the headline table shows the run's own numbers
    assert "ttft_ms" in text and "p95" in text and "output_throughput" in text
    assert manifest["git_revision"] in text and "seed = 3" in text
    assert f"agentsim simulate -c config.toml -o {run}" in text
    assert "<details" in out.read_text()
    # the report may sit in the result directory: it is still a result a rerun may replace
    assert is_result_dir(run) and check_result_dir(run) == "replace"


def test_run_config_toml_reproduces_the_run(dirs, tmp_path):
    run = dirs["run"]
    manifest = json.loads((run / "manifest.json").read_text())
    (tmp_path / "config.toml").write_text(config_toml(manifest["config"]))
    again = tmp_path / "again"
    assert _cli("simulate", "-c", tmp_path / "config.toml", "-q", "-o", again) == 0
    assert json.loads((again / "summary.json").read_text()) == json.loads((run / "summary.json").read_text())


def test_sweep_report_plots_metrics_against_the_swept_key(dirs):
    sweep = dirs["sweep"]
    out = dirs["root"] / "sweep-report.html"
    assert _cli("report", sweep, "-o", out) == 0
    page = _assert_self_contained(out)
    rep = build_report(sweep)
    assert [f.name for f in rep.figures] == ["metrics_vs_workload_agents"]
    assert page.figures == ["fig-metrics_vs_workload_agents"] and len(page.imgs) == 1
    results = pd.read_parquet(sweep / "results.parquet")
    assert len(rep.tables[0].rows) == len(results) == 4
    assert len(rep.provenance) == 4
    rr, ll = '{"name": "vllm", "route": "round-robin"}', '{"name": "vllm", "route": "least-loaded"}'
    # grid order; a linked key's two keys; a policy given as a table shown as JSON
    assert [p.label.split(": ", 1)[1] for p in rep.provenance] == [
        f"policy={rr}, workload.agents=2, seed=0", f"policy={rr}, workload.agents=6, seed=1",
        f"policy={ll}, workload.agents=2, seed=0", f"policy={ll}, workload.agents=6, seed=1"]
    assert [r[0] for r in rep.tables[0].rows] == [rr, rr, ll, ll]
    assert rep.tables[0].columns[:3] == ["policy", "workload.agents", "seed"]
    text = " ".join(page.text)
    assert "agentsim sweep" in text and "workload.agents" in text
    # a report inside the sweep directory (its default place) does not make a rerun refuse it
    shutil.copy(out, sweep / "report.html")
    assert check_sweep_dir(sweep) == "replace"
    (sweep / "report.html").unlink()


def test_study_report_escapes_text_truncates_tables_and_lists_failures(dirs):
    study = dirs["study"]
    assert _cli("report", study) == 0
    out = study / "report.html"
    raw = out.read_text(encoding="utf-8")
    page = _assert_self_contained(out)
    assert len(page.imgs) == 1
    assert base64.b64decode(page.imgs[0].split(",", 1)[1]) == (study / "demo.png").read_bytes()
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; so on" in raw
    text = " ".join(page.text)
    assert "Study demo (quick)" in text and "agentsim study demo --quick -o out/demo" in text
    assert "cell-7: engine ran out of KV blocks" in text
    assert f"first {MAX_TABLE_ROWS} of 100 rows shown" in text
    assert "cells/demo/cells/c0" in text  # provenance of the runs under cells_dir
    assert raw.count("<tr>") == 1 + MAX_TABLE_ROWS


def test_study_json_faults_are_one_line_exit_2(dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(dirs["study"], bad, ignore=shutil.ignore_patterns("report.*"))
    meta = json.loads((bad / "study.json").read_text())
    for figures, needle in ((["../outside.png"], "outside the study directory"), (["nope.png"], "no such file"),
                            (["demo.csv"], "is not a PNG file")):
        (bad / "study.json").write_text(json.dumps({**meta, "figures": figures}))
        assert _cli("report", bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "figures[0]" in err and needle in err
        assert not (bad / "report.html").exists()


def test_markdown_report_writes_relative_png_figures(dirs):
    out = dirs["root"] / "md" / "run.md"
    assert _cli("report", dirs["run"], "-o", out) == 0  # a .md output picks the markdown format
    md = out.read_text()
    links = [line.split("](", 1)[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 3 and all(link.startswith("run_files/") for link in links)
    for link in links:
        assert (out.parent / link).read_bytes().startswith(PNG_MAGIC)
    assert "| ttft_ms |" in md and "```toml" in md and "<details>" in md and "<html" not in md


def test_existing_output_is_refused_without_force(dirs, capsys):
    out = dirs["root"] / "twice.html"
    assert _cli("report", dirs["run"], "-o", out) == 0
    first = out.read_bytes()
    out.write_text("mine")
    assert _cli("report", dirs["run"], "-o", out) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "mine"
    assert _cli("report", dirs["run"], "-o", out, "--force") == 0
    assert out.read_bytes() == first  # the same directory gives the same bytes
    # a figure folder holding someone else's file is never touched, even with --force
    md = dirs["root"] / "mine.md"
    (dirs["root"] / "mine_files").mkdir()
    (dirs["root"] / "mine_files" / "notes.txt").write_text("keep")
    assert _cli("report", dirs["run"], "-o", md, "--force") == 2
    assert "notes.txt" in capsys.readouterr().err and not md.exists()
    assert _cli("report", dirs["run"], "-o", dirs["root"]) == 2  # a directory is not an output file


def test_bad_directory_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    for d, needle in ((tmp_path / "missing", "no such directory"), (tmp_path / "other", "not an agentsim run"),
                      (tmp_path / "file.txt", "is a file")):
        assert _cli("report", d) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err and str(d) in err
    assert _cli("report", tmp_path / "other", "--format", "pdf") == 2
    assert list((tmp_path / "other").iterdir()) == [tmp_path / "other" / "notes.txt"]


def test_reports_render_in_headless_chromium(dirs):
    """Debian's Chromium (Playwright drives it; no browser download): no console or page errors,
    every figure decoded (naturalWidth > 0), a full-page screenshot that is not blank."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    pages = [dirs["run"] / "report.html", dirs["root"] / "sweep-report.html", dirs["study"] / "report.html"]
    for p in pages:
        if not p.exists():
            assert _cli("report", p.parent if p.name == "report.html" else dirs["sweep"], "-o", p) == 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            for p in pages:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                errors: list[str] = []
                page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("request", lambda r, errors=errors: errors.append(f"request {r.url[:60]}")
                        if not r.url.startswith(("file:", "data:")) else None)
                page.goto(p.as_uri(), wait_until="load")
                widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
                assert widths and all(w > 0 for w in widths), (p, widths)
                assert len(widths) == len(_parse(p).imgs)
                assert page.title().startswith(("Run", "Sweep", "Study"))
                shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L"), float)
                assert shot.shape[0] > 900 and shot.var() > 0 and (shot < 250).mean() > 0.01
                assert errors == [], (p, errors)
                page.close()
        finally:
            browser.close()


def test_live_run_report_names_where_it_ran_and_the_live_command(dirs, tmp_path):
    """A live result directory holds the same files as a simulated one; its manifest adds where it ran
    (live/runner.py manifest_base) and the driver options (live/driver.py). The directory here is the
    simulated run with those keys set as a live run writes them (a real live run takes minutes)."""
    live = tmp_path / "live"
    shutil.copytree(dirs["run"], live, ignore=shutil.ignore_patterns("*.parquet", "report*"))  # no figures: faster
    m = json.loads((live / "manifest.json").read_text())
    m.update(backend="live", cluster="local 2-node Ray cluster", live_model="tiny", load_format="dummy",
             dtype="float32", gpu="no GPU", status="finished", wall_time_s=21.5,
             live_options={"drain_timeout": None, "sample_interval": 1.0, "flush_interval": 5.0,
                           "kill_engines": [[1, 4.0]]})
    (live / "manifest.json").write_text(json.dumps(m))
    rep = build_report(live)
    assert rep.title.startswith("Run (live)") and not any("incomplete" in n for n in rep.notes)
    assert rep.command == (f"agentsim live -c config.toml --local-nodes 2 --model tiny --load-format dummy "
                           f"--dtype float32 --sample-interval 1.0 --flush-interval 5.0 --kill-engine 1@4.0 -o {live}")
    assert rep.provenance[0].fields["cluster"] == "local 2-node Ray cluster"
    assert rep.provenance[0].fields["wall time"] == "21.50 s"
    (live / "manifest.json").write_text(json.dumps({**m, "complete": False, "status": "interrupted"}))
    assert "this run is incomplete (status interrupted)" in build_report(live).notes[0]

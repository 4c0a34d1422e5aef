"""The report card (chatforge.report): on a small, schema-correct run written here (three stages
pretrain -> sft -> dpo with eval.json, metrics.jsonl, answers.jsonl, config.json), the HTML is
self-contained with valid PNG plots, the lineage is in order, the arrows say the right thing,
the Markdown has the tables, --compare works, bad files are named, the optional sections
render, the web app serves it to logged-in users only, and headless Chromium loads every image.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.report import ReportError, build_report, write_report
from chatforge.report.cli import write_run_report
from chatforge.report.gather import verdict
from chatforge.report.render import change

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WHERES = [f"conversations/test.jsonl:{i}" for i in (1, 3, 5)]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _stage(run: Path, subdir: str, stage: str, version: str, parent: dict | None, metrics: dict, primary: str,
           goal: str = "max", data: dict | None = None, details: dict | None = None, answers: list | None = None,
           steps: int = 20) -> None:
    d = run / subdir
    _write(d / "model" / "config.json", {"format": "chatforge-model", "format_version": 1, "model": {"n_layer": 1},
                                         "stage": stage, "version": version, "parent": parent})
    _write(d / "eval.json", {
        "schema": 1, "stage": stage, "task": "lm" if stage == "pretrain" else "chat", "version": version,
        "parent": parent, "data": data or {}, "primary": {"name": primary, "value": metrics[primary], "goal": goal},
        "metrics": metrics, "details": details or {},
        "train": {"steps": steps, "tokens": steps * 1024, "tokens_per_s": 5000.0, "dtype": "bf16", "device": "cpu",
                  "method": "full", "trainable_params": 1000, "total_params": 1000},
        "wall_time_s": 12.5, "created_at": "2026-01-01T00:00:00+00:00", "versions": {"chatforge": "0.1.0"}})
    log = [{"kind": "eval", "step": 0, "val_loss": 6.0, "val_ppl": 403.4}]
    for step in range(1, steps + 1):
        log.append({"kind": "train", "step": step, "loss": 6.0 - 2.0 * step / steps, "lr": 1e-3})
        if step % 10 == 0:
            log.append({"kind": "eval", "step": step, "val_loss": 6.0 - 1.5 * step / steps,
                        "val_ppl": 2.718 ** (6.0 - 1.5 * step / steps)})
    _jsonl(d / "metrics.jsonl", log)
    if answers is not None:
        _jsonl(d / "answers.jsonl", answers)


def _answers(text: str) -> list[dict]:
    return [{"where": w, "prompt": [{"role": "system", "content": "record"}, {"role": "user", "content": f"q{i}?"}],
             "reference": f"ref {i}", "answer": f"{text} {i}", "checks": {"status": i == 0, "ended": True}}
            for i, w in enumerate(WHERES)]


def make_fake_run(root: Path, dpo_chrf: float = 9.0) -> Path:
    """pretrain -> sft -> dpo. SFT's forgetting: pre-training perplexity rose (worse); DPO vs SFT on the same
    prompts: chrF rose (better), its loss fell (better), the status check fell (worse)."""
    run = root
    _write(run / "manifest.json", {"stages": {}, "versions": {"torch": "2.13.0"}})
    _stage(run, "pretrain", "pretrain", "aaaaaaaaaaaa", None,
           {"val_ppl": 40.0, "val_loss": 3.69, "unigram_ppl": 400.0, "val_tokens": 12800}, "val_ppl", "min",
           data={"val": {"source": "val.bin", "fingerprint": "sha256:pre"}})
    pre = {"stage": "pretrain", "version": "aaaaaaaaaaaa", "path": "pretrain/model"}
    conv = {"val": {"source": "conv/val", "fingerprint": "sha256:cv"}, "test": {"source": "conv/test",
                                                                                 "fingerprint": "sha256:ct"}}
    _stage(run, "finetune/sft", "sft", "bbbbbbbbbbbb", pre,
           {"test_status_correct": 0.5, "test_chrf": 7.0, "test_check_status": 0.5, "generated": 3, "val_loss": 3.0,
            "val_ppl": 20.1, "pretrain_val_ppl_before": 40.0, "pretrain_val_ppl_after": 44.0,
            "forgetting_ppl_change_pct": 10.0},
           "test_status_correct", data=conv, answers=_answers("sft answer"))
    sft = {"stage": "sft", "version": "bbbbbbbbbbbb", "path": "finetune/sft/model"}
    _stage(run, "align/dpo", "dpo", "cccccccccccc", sft,
           {"test_check_status": 0.25, "test_chrf": dpo_chrf, "generated": 3, "test_loss": 2.5,
            "test_reward_accuracy": 0.75, "test_answer_tokens": 12.0, "test_parent_answer_tokens": 10.0},
           "test_check_status", data={"test": {"source": "prefs", "fingerprint": "sha256:pt"}},
           details={"parent_checks": {"test_check_status": 0.5}}, answers=_answers("dpo answer"), steps=10)
    # SFT's own test loss on the same data as DPO's? No: a different fingerprint, so no parent figure.
    return run


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return make_fake_run(tmp_path / "runs" / "r")


def _row(data, stage: str, metric: str):
    s = next(s for s in data.stages if s.name == stage)
    return s.row(metric)


def _images(html: str) -> list[bytes]:
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def _valid_png(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 50
    return width, height


def test_html_is_self_contained_with_png_plots(fake_run, tmp_path):
    html_path, md_path = write_report(build_report(fake_run), tmp_path / "out")
    html = html_path.read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', html, flags=re.I)
    assert links and all(link.startswith("data:") for link in links), links
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    images = _images(html)
    assert len(images) == 3  # one figure per stage
    for png in images:
        _valid_png(png)
    # the Markdown's plots are files beside it
    md = md_path.read_text(encoding="utf-8")
    for name in re.findall(r"\]\((plots/[^)]+\.png)\)", md):
        _valid_png((md_path.parent / name).read_bytes())
    assert "](plots/finetune-sft.png)" in md


def test_lineage_is_a_chain_from_pretraining(fake_run):
    data = build_report(fake_run)
    assert [[(n["stage"], n["version"]) for n in c] for c in data.lineage] == [
        [("pretrain", "aaaaaaaaaaaa"), ("sft", "bbbbbbbbbbbb"), ("dpo", "cccccccccccc")]]
    assert [s.name for s in data.stages] == ["pretrain", "sft", "dpo"]
    html = write_report(data, fake_run / "report")[0].read_text(encoding="utf-8")
    chain = html[html.index('<div class="chain">'):]
    assert chain.index("pretrain</b>") < chain.index("sft</b>") < chain.index("dpo</b>")
    md = (fake_run / "report" / "report.md").read_text(encoding="utf-8")
    assert "- pretrain@`aaaaaaaaaaaa` → sft@`bbbbbbbbbbbb` → dpo@`cccccccccccc`" in md


def test_arrows_say_better_or_worse_by_the_metrics_goal(fake_run):
    data = build_report(fake_run)
    # forgetting: the pre-training perplexity rose from 40 to 44: up, and worse
    ppl = _row(data, "sft", "pretrain_val_ppl")
    assert (ppl.value, ppl.parent, ppl.verdict) == (44.0, 40.0, "worse")
    assert change(ppl) == ("▲ +4 (+10.0%) worse", "worse")
    # DPO vs SFT on the same prompts: chrF rose (better); the status check fell (worse, from parent_checks)
    chrf = _row(data, "dpo", "test_chrf")
    assert (chrf.parent, chrf.verdict) == (7.0, "better") and change(chrf)[0].startswith("▲") and "better" in change(chrf)[0]
    status = _row(data, "dpo", "test_check_status")
    assert (status.parent, status.verdict) == (0.5, "worse") and change(status)[0].startswith("▼")
    # a count gets the direction only; the parent's answer length measured by DPO's own test sits beside its own
    tokens = _row(data, "dpo", "test_answer_tokens")
    assert (tokens.parent, tokens.verdict) == (10.0, "changed") and _row(data, "dpo", "test_parent_answer_tokens") is None
    # a figure on other data gets no parent: SFT's val_ppl (chat data) is not pre-training's val_ppl
    assert _row(data, "sft", "val_ppl").parent is None and _row(data, "dpo", "test_loss").parent is None
    assert verdict("val_loss", 2.0, 3.0) == "better" and verdict("val_loss", 3.0, 2.0) == "worse"
    assert verdict("test_accuracy", 0.5, 0.5) == "same" and verdict("x", None, 1.0) is None
    html = write_report(data, fake_run / "report")[0].read_text(encoding="utf-8")
    assert ('<td>pretrain_val_ppl</td><td class="num">44</td><td class="num">40</td>'
            '<td class="num worse">▲ +4 (+10.0%) worse</td>') in html
    assert re.search(r"<td>test_chrf</td>.*?<td class=\"num better\">▲ \+2 \(\+28\.6%\) better</td>", html)


def test_markdown_has_the_tables_and_answers_side_by_side(fake_run):
    _, md_path = write_report(build_report(fake_run), fake_run / "report")
    md = md_path.read_text(encoding="utf-8")
    assert "| stage | version | parent | primary | value | parent's | change | wall (s) |" in md
    assert "| metric | dpo | sft | change |" in md and "| test_chrf | 9 | 7 | ▲ +2 (+28.6%) better |" in md
    assert "| pretrain_val_ppl | 44 | 40 | ▲ +4 (+10.0%) worse |" in md
    assert "### sft vs dpo" in md and "| q0? | ref 0 | sft answer 0 | dpo answer 0 |" in md


def test_compare_two_runs_and_two_models(fake_run, tmp_path, capsys):
    other = make_fake_run(tmp_path / "runs" / "r2", dpo_chrf=6.0)
    data = build_report(None, compare=(fake_run, other))
    a, b = data.compare
    assert (a.label, b.label) == ("r", "r2") and not data.stages
    html_path, md_path = write_report(data, tmp_path / "cmp")
    md = md_path.read_text(encoding="utf-8")
    assert "| test_chrf | 9 | 6 | ▼ -3 (-33.3%) worse |" in md  # B's chrF is lower: worse
    assert "| pretrain_val_ppl | 44 | 44 | = same |" in md
    assert len(_images(html_path.read_text(encoding="utf-8"))) == 3  # curves of each shared stage, overlaid
    # two models, through the CLI: the SFT and DPO models of one run
    code = main(["report", "--compare", str(fake_run / "finetune/sft/model"), str(fake_run / "align/dpo/model"),
                 "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr().out.split()
    assert code == 0 and printed == [str(tmp_path / "cli" / "report.html"), str(tmp_path / "cli" / "report.md")]
    md = (tmp_path / "cli" / "report.md").read_text(encoding="utf-8")
    assert "### sft@bbbbbbbbbbbb vs dpo@cccccccccccc" in md and "| test_chrf | 7 | 9 | ▲ +2 (+28.6%) better |" in md


def test_cli_default_output_and_one_models_lineage(fake_run, tmp_path, capsys):
    runs = fake_run.parent
    assert main(["report", "--name", "r", "--runs-dir", str(runs)]) == 0
    assert capsys.readouterr().out.split() == [str(fake_run / "report" / "report.html"),
                                               str(fake_run / "report" / "report.md")]
    assert main(["report", "sft", "--name", "r", "--runs-dir", str(runs), "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    md = (tmp_path / "one" / "report.md").read_text(encoding="utf-8")
    assert "pretrain@`aaaaaaaaaaaa` → sft@`bbbbbbbbbbbb`" in md and "### dpo" not in md
    assert main(["report", "cccccccccccc", "--name", "r", "--runs-dir", str(runs), "--out", str(tmp_path / "v")]) == 0
    assert "→ dpo@`cccccccccccc`" in (tmp_path / "v" / "report.md").read_text(encoding="utf-8")


def test_missing_or_malformed_files_are_named(fake_run, capsys):
    ev = fake_run / "align" / "dpo" / "eval.json"
    ev.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportError, match=re.escape(str(ev)) + ": malformed eval.json"):
        build_report(fake_run)
    ev.write_text(json.dumps({"stage": "dpo", "version": "c", "metrics": {}}), encoding="utf-8")
    with pytest.raises(ReportError, match=re.escape(str(ev)) + r".*'primary' is missing"):
        build_report(fake_run)
    ev.unlink()
    log = fake_run / "finetune" / "sft" / "metrics.jsonl"
    log.write_text(log.read_text() + "{cut short\n", encoding="utf-8")
    with pytest.raises(ReportError, match=re.escape(str(log)) + r":\d+: malformed metrics.jsonl line"):
        build_report(fake_run)
    assert main(["report", str(fake_run)]) == 2
    assert str(log) in capsys.readouterr().err.replace("\n", "")
    empty = fake_run.parent / "empty"
    (empty / "tokenizer").mkdir(parents=True)  # a run whose data stages ran, no training stage yet
    with pytest.raises(ReportError, match="no stage results"):
        build_report(empty)


def test_retrained_parent_shows_an_older_version_and_no_parent_figures(fake_run):
    sft = fake_run / "finetune" / "sft"
    (sft / "versions").mkdir()
    shutil.copytree(sft / "model", sft / "versions" / "bbbbbbbbbbbb")  # the version DPO started from
    config = json.loads((sft / "model" / "config.json").read_text())
    _write(sft / "model" / "config.json", {**config, "version": "dddddddddddd"})
    ev = json.loads((sft / "eval.json").read_text())
    _write(sft / "eval.json", {**ev, "version": "dddddddddddd"})
    data = build_report(fake_run)
    chain = next(c for c in data.lineage if c[-1]["stage"] == "dpo")
    assert [(n["stage"], n["version"], n["current"]) for n in chain] == [
        ("pretrain", "aaaaaaaaaaaa", True), ("sft", "bbbbbbbbbbbb", False), ("dpo", "cccccccccccc", True)]
    dpo = next(s for s in data.stages if s.name == "dpo")
    assert dpo.row("test_chrf").parent is None and "retrained since" in dpo.notes[0]
    assert dpo.row("test_check_status").parent == 0.5  # parent_checks were measured on the right version


def test_human_registry_and_safety_sections(fake_run, tmp_path):
    _write(fake_run / "safety" / "refusals.json", {"title": "refusal probe", "model": "dpo@cccccccccccc",
                                                   "metrics": {"refusal_rate": 0.9},
                                                   "cases": [{"prompt": "p<b>", "answer": "no", "verdict": "ok"}]})
    human = {"tables": [{"title": "ratings by aspect", "columns": ["model", "fluency", "n"],
                         "rows": [["sft@b", 3.2, 40], ["dpo@c", 3.9, 40]], "note": "mean of 1-5 scores"}],
             "comparisons": [{"dataset": "blind dpo@c vs sft@b", "aligned": "dpo@c", "parent": "sft@b",
                              "judgements": 20, "aligned_wins": 14, "win_rate": 0.7, "interval_95": [0.48, 0.85]}]}
    registry = {"versions": [{"stage": "dpo", "version": "cccccccccccc", "aliases": ["prod", "latest"],
                              "decision": "promoted", "reason": "checks up"}]}
    html_path, md_path = write_report(build_report(fake_run, human=human, registry=registry), tmp_path / "o")
    html, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    for text in ("Human evaluation", "ratings by aspect", "blind comparison: blind dpo@c vs sft@b", "0.48-0.85",
                 "Model registry", "prod, latest", "promoted", "Safety", "refusal probe", "refusal_rate"):
        assert text in html and text in md, text
    assert "p&lt;b&gt;" in html and "p<b>" not in html  # run texts are escaped
    # a dict of another shape still shows, as generic tables
    html = write_report(build_report(fake_run, human={"raters": 3, "by_model": [{"model": "m", "mean": 4.1}]}),
                        tmp_path / "g")[0].read_text(encoding="utf-8")
    assert "<h3>by_model</h3>" in html and "<td>raters</td>" in html


def test_pipeline_report_and_run_without_results(fake_run, tmp_path):
    html_path, md_path = write_run_report(fake_run)
    assert html_path == fake_run / "report" / "report.html" and md_path.is_file()
    (tmp_path / "bare").mkdir()
    assert write_run_report(tmp_path / "bare") is None  # only data stages ran: no report yet


def test_web_app_serves_the_report_to_logged_in_users(fake_run, tmp_path):
    from fastapi.testclient import TestClient
    from serve_fixtures import ADMIN_PASSWORD, save_tiny_model, settings_for

    from chatforge.serve.app import create_app

    write_run_report(fake_run)
    model = save_tiny_model(tmp_path / "served" / "finetune" / "sft" / "model")
    (tmp_path / "served" / "report").mkdir()
    shutil.copy(fake_run / "report" / "report.html", tmp_path / "served" / "report" / "report.html")
    _write(tmp_path / "served" / "manifest.json", {"stages": {}})
    with TestClient(create_app(settings_for(tmp_path, [("m", model)]))) as client:
        r = client.get("/report", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/report"
        client.cookies.set("cf_session", "forged")
        assert client.get("/report", follow_redirects=False).status_code == 303
        client.cookies.clear()
        assert client.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}).status_code == 200
        r = client.get("/report")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "chatforge report card" in r.text and "img-src data:" in r.headers["content-security-policy"]
        assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': no script at all
        (tmp_path / "served" / "report" / "report.html").unlink()
        r = client.get("/report")
        assert r.status_code == 404 and "chatforge report" in r.text


def test_report_in_headless_chromium(fake_run, tmp_path):
    from ci import skip_or_fail

    chromium = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright import sync_api
    except ImportError:
        skip_or_fail("playwright (python) is not installed")
    if not Path(chromium).exists():
        skip_or_fail(f"no chromium at {chromium} (install Debian's chromium, or set CHATFORGE_CHROMIUM to one)")
    html_path, _ = write_report(build_report(fake_run), tmp_path / "out")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri())
            widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 3 and all(w > 0 for w in widths), widths
            assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing from the network
            assert page.locator("td.worse").count() >= 2 and page.locator("td.better").count() >= 1
            out = Path(os.environ.get("CHATFORGE_SCREENSHOTS", tmp_path))
            out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out / "report.png"), full_page=True)
            assert (out / "report.png").stat().st_size > 10_000
            _report_through_the_web_app(browser, fake_run, tmp_path)
        finally:
            browser.close()


def _report_through_the_web_app(browser, fake_run: Path, tmp_path: Path) -> None:
    """Log in, follow the nav's Report link: the served report's images load under its CSP, with no violation."""
    from serve_fixtures import ADMIN_PASSWORD, live_server, save_tiny_model, settings_for

    from chatforge.serve.app import create_app

    served = tmp_path / "served"
    model = save_tiny_model(served / "finetune" / "sft" / "model")
    _write(served / "manifest.json", {"stages": {}})
    write_report(build_report(fake_run), served / "report")
    app = create_app(settings_for(tmp_path, [("m", model)], allowed_hosts=()))
    with live_server(app) as base:
        context = browser.new_context(base_url=base, viewport={"width": 1200, "height": 900})
        try:
            page = context.new_page()
            refused: list[str] = []
            page.on("console", lambda m: refused.append(m.text) if "Refused" in m.text or "Content Security" in m.text
                    else None)
            page.goto("/report")
            page.wait_for_url(re.compile(r"/login\?next=%2Freport|/login\?next=/report"))  # not logged in
            page.fill("#username-input", "admin")
            page.fill("#password-input", ADMIN_PASSWORD)
            page.press("#password-input", "Enter")
            page.wait_for_url(f"{base}/report")
            widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 3 and all(w > 0 for w in widths), widths
            # the styles applied: a worse change is red
            assert page.locator("td.worse").first.evaluate("e => getComputedStyle(e).color") == "rgb(207, 34, 46)"
            page.goto("/chat")
            page.click("nav .links a:has-text('Report')")
            page.wait_for_url(f"{base}/report")
            assert not refused, refused
        finally:
            context.close()


def test_blind_comparison_from_the_runs_feedback_store(fake_run, capsys):
    """``chatforge report`` reads the run's feedback.db: a blind DPO-vs-SFT comparison with judgements becomes
    a human-eval table."""
    from chatforge.align.review import queue_comparison
    from chatforge.store.db import Store
    from chatforge.store.service import create_user, next_assignment, submit_ranking

    store = Store(f"sqlite:///{fake_run / 'feedback.db'}")
    create_user(store, "admin", "pw-admin-admin", "admin")
    rev = create_user(store, "rev", "pw-rev-rev-rev", "reviewer")
    out = queue_comparison(store, fake_run / "align/dpo/model", fake_run / "finetune/sft/model", ["rev"], 0)
    for i in range(3):  # DPO's answer first on 2 of the 3 prompts
        a = next_assignment(store, rev["id"], "rank")
        dpo_first = sorted(a["responses"], key=lambda r: not r["text"].startswith("dpo"))
        submit_ranking(store, rev["id"], a["assignment_id"], [r["id"] for r in (dpo_first if i < 2 else dpo_first[::-1])])
    store.close()
    assert main(["report", str(fake_run)]) == 0
    capsys.readouterr()
    md = (fake_run / "report" / "report.md").read_text(encoding="utf-8")
    assert f"### blind comparison: {out['dataset']}" in md
    assert "| judgements | 3 |" in md and "| aligned preferred | 2 |" in md and "| win rate | 0.6667 |" in md
    # the store's statistics, as `feedback stats` prints them: one row per version, no JSON blobs
    assert "### Bradley-Terry ratings (Elo scale 400, mean at 1000" in md
    assert "### Pairwise win rates (ties count half; 95% Wilson interval)" in md
    bt = md.split("### Bradley-Terry ratings")[1].split("###")[0]
    assert "{" not in bt and bt.count("@") == 2  # two versions: the DPO and the SFT model
